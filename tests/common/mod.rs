//! Test harness: the broker started in-process from a YAML string on
//! `127.0.0.1:0`, real upstream WebSocket servers on port 0, WebSocket and
//! raw-HTTP clients, a `/metrics` parser, and the real binary as a child
//! process. Nothing here sleeps to wait:
//! every helper awaits the event it needs, under a timeout.
#![allow(dead_code)]

pub mod h2ws;
pub mod pki;
pub mod raw;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use muxgate::shutdown::{DrainOutcome, Shutdown};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound on any single awaited event in a test.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Awaits `fut`, failing the test with `what` after [`TIMEOUT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A broker running in this process.
pub struct Running {
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: Shutdown,
    pub task: JoinHandle<DrainOutcome>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.client_addr, path)
    }

    /// Fetches `/metrics` and parses it.
    pub async fn metrics(&self) -> Metrics {
        let (status, _, body) = http_get(self.admin_addr, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics");
        Metrics::parse(&body)
    }

    /// Fetches `/metrics` until `settled` holds, for counts that settle
    /// just after the event a test can await: a session is counted as
    /// ended once both of its sides have closed, a moment after its client
    /// saw the end.
    pub async fn metrics_when(&self, what: &str, settled: impl Fn(&Metrics) -> bool) -> Metrics {
        within(what, async {
            loop {
                let m = self.metrics().await;
                if settled(&m) {
                    return m;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    pub async fn stop(self) -> DrainOutcome {
        self.shutdown.begin();
        within("broker drain", self.task)
            .await
            .expect("broker task")
    }
}

/// Starts the broker on `yaml`, whose listeners should be `127.0.0.1:0`.
pub async fn start_broker(yaml: &str) -> Running {
    // RUST_LOG=debug shows the broker's logs in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let config = muxgate::config::load_str("test.yaml", yaml)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{yaml}"));
    run(config).await
}

async fn run(config: muxgate::config::Config) -> Running {
    let broker = muxgate::Broker::bind(config).await.expect("bind broker");
    Running {
        client_addr: broker.client_addr(),
        admin_addr: broker.admin_addr(),
        shutdown: broker.shutdown(),
        task: tokio::spawn(broker.run(std::future::pending())),
    }
}

/// Starts the broker on the config file at `path`, which it reloads from
/// (`POST /admin/reload`, SIGHUP); listeners should be `127.0.0.1:0`.
pub async fn start_broker_from_file(path: &std::path::Path) -> Running {
    let config =
        muxgate::config::load_file(path).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    run(config).await
}

/// A direct-mode config with one upstream `echo` on `/ws/echo` (internal
/// `/echo`) over `targets`; `ws` adds lines to `websocket_config`,
/// `upstream` to the upstream, `server` to `server`.
pub fn direct_config(targets: &[SocketAddr], ws: &str, upstream: &str, server: &str) -> String {
    config_in_mode(true, targets, ws, upstream, server)
}

/// The same as [`direct_config`] with the upstream multiplexed.
pub fn mux_config(targets: &[SocketAddr], ws: &str, upstream: &str, server: &str) -> String {
    config_in_mode(false, targets, ws, upstream, server)
}

fn config_in_mode(
    direct: bool,
    targets: &[SocketAddr],
    ws: &str,
    upstream: &str,
    server: &str,
) -> String {
    let targets: String = targets
        .iter()
        .map(|a| format!("      - url: ws://{a}\n"))
        .collect();
    let indent = |s: &str, n: usize| {
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("{}{}\n", " ".repeat(n), l.trim_start()))
            .collect::<String>()
    };
    format!(
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n{server}\
upstreams:\n  - name: echo\n    routes:\n      - external_path: /ws/echo\n        internal_path: /echo\n    targets:\n{targets}{upstream}    websocket_config:\n      enable_direct_communication: {direct}\n{ws}",
        server = indent(server, 2),
        upstream = indent(upstream, 4),
        ws = indent(ws, 6),
    )
}

/// Opens a WebSocket to `url` with extra request headers.
pub async fn connect(
    url: &str,
    headers: &[(&str, &str)],
) -> (Client, http::Response<Option<Vec<u8>>>) {
    let mut request = url.into_client_request().expect("client request");
    for (k, v) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    within(
        "client handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("client handshake succeeds")
}

/// The next data or close message from `ws` (pings and pongs skipped).
pub async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Option<Message> {
    within("a message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
}

/// Reads until the broker's close frame arrives; returns it (code, reason).
pub async fn expect_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> (u16, String) {
    match next_message(ws).await {
        Some(Message::Close(Some(CloseFrame { code, reason }))) => {
            (code.into(), reason.to_string())
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Reads until the stream ends (the broker closed the TCP connection, or
/// over HTTP/2 the stream).
pub async fn expect_end<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    within("the connection to end", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
}

/// Sends `msg` and asserts the echo equals it.
pub async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    msg: Message,
) {
    ws.send(msg.clone()).await.expect("send");
    let got = next_message(ws).await.expect("an echo");
    assert_eq!(got, msg, "echo differs");
}

/// Status, lower-cased headers and body of an HTTP response.
pub type HttpReply = (u16, Vec<(String, String)>, String);

/// A raw HTTP/1.1 exchange: sends `request` (complete, with the blank
/// line) and returns status, lower-cased headers and body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> HttpReply {
    within("an HTTP response", async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(parsed) = parse_response(&buf) {
                return parsed;
            }
        }
        parse_response(&buf).expect("a complete HTTP response")
    })
    .await
}

/// Whether the broker at `addr` turns away a new upgrade to `path`: the
/// connection is refused, reset or closed before any response (a listener
/// closing with connections still in its backlog resets them), or the
/// answer is 503.
pub async fn new_session_refused(addr: SocketAddr, path: &str) -> bool {
    within("a refusal", async {
        let Ok(mut tcp) = TcpStream::connect(addr).await else {
            return true;
        };
        if tcp
            .write_all(upgrade_request(addr, path, "").as_bytes())
            .await
            .is_err()
        {
            return true;
        }
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return buf.is_empty(),
                Err(e) => panic!("read: {e}"),
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some((status, _, _)) = parse_response(&buf) {
                return status == 503;
            }
        }
        buf.is_empty()
    })
    .await
}

fn parse_response(buf: &[u8]) -> Option<HttpReply> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match len {
        Some(n) if body.len() >= n => Some((status, headers, body[..n].to_string())),
        Some(_) => None,
        None if status == 101 => Some((status, headers, String::new())),
        None => Some((status, headers, body.to_string())),
    }
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub async fn http_get(addr: SocketAddr, path: &str) -> HttpReply {
    raw_http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// A valid upgrade request for `path`, plus `extra` header lines.
pub fn upgrade_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Sends the upgrade request for `path` and, in the same write, a masked
/// text frame of `text` (under 126 bytes), as a client that does not wait
/// for the 101 may; returns the text of the first frame that comes back
/// behind the 101.
pub async fn echo_of_text_behind_the_request(addr: SocketAddr, path: &str, text: &str) -> String {
    assert!(text.len() < 126);
    within("the echo of a frame sent behind the request", async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = upgrade_request(addr, path, "").into_bytes();
        out.extend([0x81, 0x80 | text.len() as u8]);
        out.extend(mask);
        out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        tcp.write_all(&out).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "ended after {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            assert!(
                buf.starts_with(b"HTTP/1.1 101"),
                "{:?}",
                String::from_utf8_lossy(&buf)
            );
            let frame = &buf[head + 4..];
            if frame.len() < 2 || frame.len() < 2 + usize::from(frame[1] & 0x7f) {
                continue;
            }
            assert_eq!(frame[0], 0x81, "a final text frame");
            let len = usize::from(frame[1]);
            assert!(len < 126, "short and unmasked");
            return String::from_utf8(frame[2..2 + len].to_vec()).expect("UTF-8");
        }
    })
    .await
}

/// Parsed `/metrics`.
pub struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Metrics(prometheus_parse::Scrape::parse(lines).expect("valid exposition format"))
    }

    /// The value of `name` whose labels include all of `labels`, summed over
    /// the series that match (0 when none does).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref h) => {
                    h.last().map(|b| b.count).unwrap_or(0.0)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            })
            .sum()
    }

    /// What `muxgate_compression_bytes_total` counts for one hop
    /// (`client` or `mux`) of `upstream` in `direction`: the message bytes
    /// and the compressed payload bytes that carried them.
    pub fn hop_bytes(&self, upstream: &str, hop: &str, direction: &str) -> (f64, f64) {
        let form = |form: &str| {
            self.value(
                "muxgate_compression_bytes_total",
                &[
                    ("upstream", upstream),
                    ("hop", hop),
                    ("direction", direction),
                    ("form", form),
                ],
            )
        };
        (form("uncompressed"), form("compressed"))
    }

    /// Whether the exposition declares `name` with a `# TYPE` line.
    pub fn has_family(&self, name: &str) -> bool {
        self.0.docs.contains_key(name)
    }
}

/// Reads raw frames from the client's TCP stream until a close frame and
/// returns its code and reason, answering pings meanwhile. tungstenite's reader rewrites close codes
/// it considers reserved (1014 among them) to 1002, so tests that check
/// what the broker put on the wire read the frame themselves.
pub async fn raw_close(ws: Client) -> (u16, String) {
    let MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
        panic!("plain TCP expected");
    };
    within("a raw close frame", async {
        loop {
            let mut head = [0u8; 2];
            tcp.read_exact(&mut head).await.expect("frame header");
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    tcp.read_exact(&mut b).await.unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    tcp.read_exact(&mut b).await.unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            if opcode == 0x9 {
                // Answer pings (a masked pong, zero mask key) to stay alive.
                let mut pong = vec![0x8a, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                pong.extend_from_slice(&payload);
                tcp.write_all(&pong).await.unwrap();
                continue;
            }
            if opcode == 0x8 {
                assert!(payload.len() >= 2, "close frame carries a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8(payload[2..].to_vec()).unwrap());
            }
        }
    })
    .await
}

/// Starts the muxgate binary on `yaml` and returns it with its client address,
/// read from its JSON "muxgate listening" log line.
pub async fn spawn_binary(yaml: &str) -> (Child, std::net::SocketAddr) {
    let path = std::env::temp_dir().join(format!("muxgate-test-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, yaml).unwrap();
    let started = spawn_binary_with(&path, &[]).await;
    let _ = std::fs::remove_file(&path);
    started
}

/// Starts the binary on the config at `path` with extra arguments.
pub async fn spawn_binary_with(
    path: &std::path::Path,
    args: &[&str],
) -> (Child, std::net::SocketAddr) {
    let started = spawn_binary_logged(path, args, &[]).await;
    (started.child, started.client_addr)
}

/// The binary, started: its listeners' addresses, as its "muxgate
/// listening" line gave them, and the log lines asked for.
pub struct Spawned {
    pub child: Child,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The JSON log lines after "muxgate listening" with the messages
    /// asked for (as many as [`LOG_LINES`] while nobody reads them).
    pub logs: tokio::sync::mpsc::Receiver<serde_json::Value>,
}

/// The log lines a [`Spawned`] keeps unread; later ones are dropped.
pub const LOG_LINES: usize = 256;

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Skips log lines until one whose message is `message`.
    pub async fn log_line(&mut self, message: &str) -> serde_json::Value {
        within(&format!("the log line {message:?}"), async {
            loop {
                let line = self.logs.recv().await.expect("the process logs on");
                if line["message"] == message {
                    return line;
                }
            }
        })
        .await
    }
}

/// Starts the binary on the config at `path` with extra arguments, and
/// keeps its log lines whose message is one of `messages`.
pub async fn spawn_binary_logged(
    path: &std::path::Path,
    args: &[&str],
    messages: &[&str],
) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_muxgate"))
        .arg("--config")
        .arg(path)
        .args(["--log-format", "json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn muxgate");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = |v: &serde_json::Value, field: &str| -> SocketAddr {
        v[field].as_str().unwrap().parse().unwrap()
    };
    let (client_addr, admin_addr) = within("the listening log line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if v["message"] == "muxgate listening" {
                return (addr(&v, "client_addr"), addr(&v, "admin_addr"));
            }
        }
        panic!("muxgate exited before listening");
    })
    .await;
    // Keep draining the log so the child never blocks on a full pipe,
    // whether or not anyone reads what it says.
    let (tx, logs) = tokio::sync::mpsc::channel(LOG_LINES);
    let messages: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if messages.iter().any(|m| v["message"] == m.as_str()) {
                let _ = tx.try_send(v);
            }
        }
    });
    Spawned {
        child,
        client_addr,
        admin_addr,
        logs,
    }
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}
