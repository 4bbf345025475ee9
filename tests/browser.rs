//! A real browser against the broker: headless Chromium (Debian's
//! `chromium`, driven by npm's `playwright-core` from tests/browser) opens
//! the shipped `/ws/echo` and `/ws/chat` on the shipped `upstreams.yaml`
//! with its bundled demo upstream, listeners moved to port 0.
//!
//! Needs `apt-get install chromium` and `npm ci --prefix tests/browser`
//! (`.ci/run` does both).

mod common;

use std::path::Path;

use common::*;
use tokio::process::Command;

const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

/// The shipped config on port 0, its targets pointing at `demo`.
fn shipped_config(demo: std::net::SocketAddr) -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("upstreams.yaml"))
            .expect("the shipped upstreams.yaml");
    text.replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0")
        .replace("admin_listen: 127.0.0.1:9090", "admin_listen: 127.0.0.1:0")
        .replace("ws://127.0.0.1:3000", &format!("ws://{demo}"))
}

/// The shipped config with its demo upstream, served until [`Shipped::stop`].
struct Shipped {
    broker: Running,
    stop: tokio_util::sync::CancellationToken,
    demo: tokio::task::JoinHandle<()>,
}

impl Shipped {
    /// Starts the demo upstream and the broker on the shipped config, with
    /// `server` (YAML lines) added to its `server` section, and waits for
    /// the mux pool: a browser's handshake on a multiplexed route needs a
    /// live connection.
    async fn start(server: &str) -> Shipped {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let demo = tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));
        let yaml = shipped_config(addr).replacen("server:\n", &format!("server:\n{server}"), 1);
        let broker = start_broker(&yaml).await;
        broker
            .metrics_when("a live mux connection", |m| {
                m.value("muxgate_mux_connections", &[("state", "live")]) > 0.0
            })
            .await;
        Shipped { broker, stop, demo }
    }

    async fn stop(self) {
        self.broker.stop().await;
        self.stop.cancel();
        within("demo stop", self.demo).await.unwrap();
    }
}

/// Runs tests/browser/websockets.mjs on `base` and `paths` with `env`, and
/// returns its report: per path, what the browser's WebSocket saw.
async fn browse(base: &str, paths: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> serde_json::Value {
    let out = within(
        "Chromium",
        Command::new("node")
            .current_dir(BROWSER_DIR)
            .envs(env.iter().copied())
            .arg("websockets.mjs")
            .arg(base)
            .args(paths)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node (and `npm ci --prefix tests/browser`)");
    assert!(
        out.status.success(),
        "the browser script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&out.stdout).expect("one JSON line");
    eprintln!("chromium on {base}: {report}");
    report
}

/// Both shipped routes agreed permessage-deflate, echoed text and binary
/// byte for byte, and closed with 1000.
fn assert_both_routes_served(report: &serde_json::Value) {
    for path in ["/ws/echo", "/ws/chat"] {
        let seen = &report[path];
        assert_eq!(seen["extensions"], "permessage-deflate", "{path}: {seen}");
        assert_eq!(seen["textBack"], true, "{path}: {seen}");
        assert_eq!(seen["binaryBack"], true, "{path}: {seen}");
        assert_eq!(seen["closed"], 1000, "{path}: {seen}");
    }
}

/// Chromium agrees permessage-deflate with the broker on both shipped
/// routes (the demo upstream is multiplexed: the broker compresses), and
/// text and binary messages come back byte for byte.
#[tokio::test]
async fn chromium_gets_permessage_deflate_on_the_shipped_routes() {
    let shipped = Shipped::start("").await;
    let broker = &shipped.broker;
    let base = format!("ws://{}", broker.client_addr);
    let report = browse(&base, &["/ws/echo", "/ws/chat"], &[]).await;
    assert_both_routes_served(&report);
    let m = broker
        .metrics_when("both sessions ended", |m| {
            m.value("muxgate_sessions_active", &[]) == 0.0
        })
        .await;
    assert_eq!(m.value("muxgate_sessions_total", &[]), 2.0);
    let compressed = m.value(
        "muxgate_compression_bytes_total",
        &[("hop", "client"), ("form", "compressed")],
    );
    let uncompressed = m.value(
        "muxgate_compression_bytes_total",
        &[("hop", "client"), ("form", "uncompressed")],
    );
    assert!(
        compressed > 0.0 && compressed < uncompressed,
        "{compressed} compressed bytes for {uncompressed}"
    );
    shipped.stop().await;
}

/// Chromium reaches the shipped config on a TLS listener (its certificate
/// signed by a test CA that Chromium trusts through an NSS database of its
/// own) over HTTP/2: the page is the broker's 404 for an unknown path,
/// which opens the connection; a no-cors fetch of that path goes over it,
/// and so do the `wss://` WebSockets that follow, on both shipped routes
/// (direct and multiplexed), as streams, as the broker's metrics show.
#[tokio::test]
async fn chromium_opens_websockets_over_http2_after_loading_a_page() {
    let pki = common::pki::Pki::new();
    // Chromium reads trusted CAs from $HOME/.pki/nssdb.
    let home = pki.dir.join("home");
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    for args in [
        vec!["-N", "-d", &db, "--empty-password"],
        vec![
            "-A",
            "-d",
            &db,
            "-n",
            "muxgate-test-ca",
            "-t",
            "C,,",
            "-i",
            pki.ca.to_str().unwrap(),
        ],
    ] {
        let status = Command::new("certutil")
            .args(&args)
            .status()
            .await
            .expect("certutil (apt-get install libnss3-tools)");
        assert!(status.success(), "certutil {args:?}");
    }
    // A TLS listener: HTTP/2 is on by default.
    let tls = format!(
        "  tls: {{cert_file: '{}', key_file: '{}'}}\n",
        pki.cert.display(),
        pki.key.display()
    );
    let shipped = Shipped::start(&tls).await;
    let broker = &shipped.broker;
    let origin = format!("localhost:{}", broker.client_addr.port());
    let warm_up = format!("https://{origin}/no-such-page");
    let env = [("HOME", home.as_os_str()), ("WARM_UP", warm_up.as_ref())];
    let report = browse(&format!("wss://{origin}"), &["/ws/echo", "/ws/chat"], &env).await;
    assert_both_routes_served(&report);
    let m = broker
        .metrics_when("the sessions ended", |m| {
            m.value("muxgate_sessions_active", &[]) == 0.0
        })
        .await;
    // The page's and the fetch's 404s (and the page's favicon's), and
    // the WebSockets, all over HTTP/2.
    let not_found = m.value(
        "muxgate_handshakes_rejected_total",
        &[("status", "404"), ("http_version", "2")],
    );
    assert!(not_found >= 2.0, "{not_found} 404s over HTTP/2");
    for mode in ["direct", "multiplexed"] {
        assert_eq!(
            m.value(
                "muxgate_sessions_total",
                &[("http_version", "2"), ("mode", mode)]
            ),
            1.0,
            "the {mode} WebSocket did not come over HTTP/2"
        );
    }
    shipped.stop().await;
}
