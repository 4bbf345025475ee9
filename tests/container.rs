//! The container image's pieces: its config stays the shipped config with
//! the listeners on every interface, and `muxgate health` (its
//! HEALTHCHECK, as the image has no curl) exits 0 on a 200 only.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

fn yaml(path: &str) -> serde_yaml::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// deploy/container/upstreams.yaml loads, has the shipped file's upstreams
/// exactly, and its `server` differs only by listening on 0.0.0.0.
#[test]
fn container_config_is_the_shipped_one_on_all_interfaces() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    muxgate::config::load_file(&root.join("deploy/container/upstreams.yaml"))
        .unwrap_or_else(|e| panic!("deploy/container/upstreams.yaml should load:\n{e}"));

    let shipped = yaml("upstreams.yaml");
    let container = yaml("deploy/container/upstreams.yaml");
    assert_eq!(
        shipped["upstreams"], container["upstreams"],
        "deploy/container/upstreams.yaml: upstreams differ from upstreams.yaml"
    );
    let keys = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys(&shipped), keys(&container), "top-level keys differ");

    let mut server = shipped["server"].clone();
    let expect = [("listen", "0.0.0.0:8080"), ("admin_listen", "0.0.0.0:9090")];
    for (field, addr) in expect {
        assert_eq!(
            container["server"][field].as_str(),
            Some(addr),
            "container server.{field}"
        );
        server[field] = addr.into();
    }
    assert_eq!(
        server, container["server"],
        "server differs beyond listen/admin_listen"
    );
}

fn health(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_muxgate"))
        .args(["health", "--url", url])
        .output()
        .unwrap()
}

/// A one-shot HTTP server answering `status_line`; returns its URL.
fn answer_once(status_line: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let request = String::from_utf8_lossy(&buf[..n]);
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        let body = "ok\n";
        let _ = write!(
            s,
            "{status_line}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    format!("http://{addr}/healthz")
}

#[test]
fn health_exits_0_on_200() {
    let out = health(&answer_once("HTTP/1.1 200 OK"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn health_exits_1_otherwise_and_says_why() {
    let out = health(&answer_once("HTTP/1.1 503 Service Unavailable"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503"),
        "{out:?}"
    );

    // Nothing listens on a port just released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = health(&format!("http://127.0.0.1:{port}/healthz"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting to"),
        "{out:?}"
    );

    let out = health("https://127.0.0.1:9/healthz");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
