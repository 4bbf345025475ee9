//! WebSockets over HTTP/2 (RFC 8441) end to end: a client on the `h2`
//! crate opens extended CONNECT streams to the broker, over cleartext
//! (prior knowledge) and over TLS (ALPN), in both modes; what the
//! direct-mode tests check of HTTP/1.1 (byte-exact echo, close codes,
//! refusals) runs over both HTTP versions from one table.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::h2ws::{H2Connection, STREAM_WINDOW};
use common::pki::Pki;
use common::upstream::{refused_addr, silent_listener, TestUpstream};
use common::*;
use futures_util::{SinkExt, StreamExt};
use mux_peer::{Behavior, MuxPeer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A WebSocket to the broker over either HTTP version.
type Ws = WebSocketStream<Pin<Box<dyn Io>>>;

/// Which HTTP a test's WebSockets come over.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Http1,
    Http2,
}

/// Opens WebSockets to one broker over `via`: each its own TCP connection
/// over HTTP/1.1, streams of one connection over HTTP/2.
enum Opener {
    Http1(SocketAddr),
    Http2(H2Connection),
}

impl Opener {
    async fn new(via: Via, addr: SocketAddr) -> Opener {
        match via {
            Via::Http1 => Opener::Http1(addr),
            Via::Http2 => Opener::Http2(H2Connection::cleartext(addr).await),
        }
    }

    /// A WebSocket on `path`, or the status that refused it.
    async fn try_open(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
        match self {
            Opener::Http1(addr) => {
                let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
                for (k, v) in headers {
                    request.headers_mut().append(
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        http::HeaderValue::from_str(v).unwrap(),
                    );
                }
                let tcp = TcpStream::connect(addr).await.unwrap();
                let io: Pin<Box<dyn Io>> = Box::pin(tcp);
                match within("handshake", tokio_tungstenite::client_async(request, io)).await {
                    Ok((ws, _)) => Ok(ws),
                    Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
                    Err(e) => panic!("handshake failed: {e}"),
                }
            }
            Opener::Http2(h2) => {
                let (head, stream) = h2.connect(path, headers).await.expect("stream");
                if head.status != 200 {
                    return Err(head.status.as_u16());
                }
                let io: Pin<Box<dyn Io>> = Box::pin(stream);
                Ok(WebSocketStream::from_raw_socket(
                    io,
                    tokio_tungstenite::tungstenite::protocol::Role::Client,
                    None,
                )
                .await)
            }
        }
    }

    async fn open(&self, path: &str) -> Ws {
        self.try_open(path, &[]).await.expect("WebSocket accepted")
    }
}

/// One case of the table every HTTP version runs.
enum Case {
    /// The message comes back byte-exact.
    Echo(Message),
    /// The client closes with (code, reason): the upstream sees it, and the
    /// client gets it back.
    ClientCloses(u16, &'static str),
    /// The client closes and at once ends its side (an HTTP/2 client ends
    /// its stream with the close frame, as Chromium does; an HTTP/1.1 one
    /// shuts its socket's write side down): it still gets the answer.
    ClientClosesAndEnds(u16, &'static str),
    /// The upstream closes with (code, reason): the client gets it.
    UpstreamCloses(u16, &'static str),
    /// The upstream's TCP connection is cut: the client gets 1014.
    UpstreamDrops,
}

/// The direct-mode tests' cases: text and binary of every length class
/// the frame format has, multi-byte text, and close codes both ways.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        cases.push(Case::Echo(Message::Binary(Bytes::from(bytes))));
        let text: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        cases.push(Case::Echo(Message::text(text)));
    }
    cases.push(Case::Echo(Message::text("héllo wörld ✓ 🚀")));
    cases.push(Case::ClientCloses(4001, "bye"));
    cases.push(Case::ClientCloses(1000, ""));
    cases.push(Case::ClientClosesAndEnds(4002, "half"));
    cases.push(Case::UpstreamCloses(4001, "bye"));
    cases.push(Case::UpstreamCloses(1008, "policy"));
    cases.push(Case::UpstreamDrops);
    cases
}

/// Runs every case of [`cases`] through a direct-mode broker over `via`;
/// over HTTP/2 all of them share one connection.
async fn run_cases(via: Via) {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "http2: true")).await;
    let opener = Opener::new(via, broker.client_addr).await;
    let mut ws = opener.open("/ws/echo").await;
    let _ = up.handshake().await;
    for case in cases() {
        let ends_too = matches!(case, Case::ClientClosesAndEnds(..));
        match case {
            Case::Echo(msg) => echo_roundtrip(&mut ws, msg).await,
            Case::ClientCloses(code, reason) | Case::ClientClosesAndEnds(code, reason) => {
                let mut closing = opener.open("/ws/echo").await;
                let _ = up.handshake().await;
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                if !ends_too {
                    closing.close(Some(frame)).await.unwrap();
                } else {
                    closing.send(Message::Close(Some(frame))).await.unwrap();
                    tokio::io::AsyncWriteExt::shutdown(closing.get_mut())
                        .await
                        .unwrap();
                }
                assert_eq!(up.close().await, (code, reason.to_string()), "{via:?}");
                assert_eq!(
                    expect_close(&mut closing).await,
                    (code, reason.to_string()),
                    "{via:?}"
                );
                expect_end(&mut closing).await;
            }
            Case::UpstreamCloses(code, reason) => {
                let mut closing = opener.open("/ws/echo").await;
                let _ = up.handshake().await;
                closing
                    .send(Message::text(format!("close:{code}:{reason}")))
                    .await
                    .unwrap();
                assert_eq!(
                    expect_close(&mut closing).await,
                    (code, reason.to_string()),
                    "{via:?}"
                );
                expect_end(&mut closing).await;
            }
            Case::UpstreamDrops => {
                let mut dropped = opener.open("/ws/echo").await;
                let _ = up.handshake().await;
                dropped.send(Message::text("drop")).await.unwrap();
                // tungstenite reads the reserved 1014 as 1002: the code
                // on the wire is the metric's, checked below.
                expect_close(&mut dropped).await;
                expect_end(&mut dropped).await;
            }
        }
    }
    let label = match via {
        Via::Http1 => "1.1",
        Via::Http2 => "2",
    };
    let m = broker.metrics().await;
    assert_eq!(
        m.value("muxgate_sessions_total", &[("http_version", label)]),
        7.0,
        "{via:?}"
    );
    assert_eq!(
        m.value(
            "muxgate_close_codes_sent_total",
            &[("side", "client"), ("code", "1014")]
        ),
        1.0
    );
}

/// The direct-mode cases over HTTP/1.1 (on a listener that serves
/// HTTP/2 too: the same port takes both).
#[tokio::test]
async fn the_direct_mode_table_over_http1() {
    run_cases(Via::Http1).await;
}

/// The same cases over HTTP/2, every WebSocket a stream of one connection.
#[tokio::test]
async fn the_direct_mode_table_over_http2() {
    run_cases(Via::Http2).await;
}

/// A config with a direct upstream on `/ws/echo` and a multiplexed one
/// on `/ws/mux`.
fn both_modes(echo: SocketAddr, mux: SocketAddr, server: &str) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n{server}\
upstreams:
  - name: echo
    routes: [{{external_path: /ws/echo, internal_path: /echo}}]
    targets: [{{url: 'ws://{echo}'}}]
    websocket_config: {{enable_direct_communication: true}}
  - name: mux
    routes: [{{external_path: /ws/mux, internal_path: /mux}}]
    targets: [{{url: 'ws://{mux}'}}]
    websocket_config: {{enable_direct_communication: false, pool_size: 1}}
",
        server = server
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    )
}

/// Several WebSockets of both modes on one HTTP/2 connection, their
/// messages interleaved: each stream gets its own echoes, and the
/// sessions are counted with `http_version="2"`.
#[tokio::test]
async fn several_websockets_share_one_connection_in_both_modes() {
    let up = TestUpstream::start().await;
    let peer = MuxPeer::start(Behavior::Echo).await;
    let broker = start_broker(&both_modes(up.addr, peer.addr, "http2: true")).await;
    let h2 = H2Connection::cleartext(broker.client_addr).await;
    let mut sockets = Vec::new();
    for i in 0..6 {
        let path = if i % 2 == 0 { "/ws/echo" } else { "/ws/mux" };
        let (ws, head) = h2.open(path, &[]).await;
        assert!(
            head.headers.get("sec-websocket-accept").is_none(),
            "{head:?}"
        );
        assert!(head.headers.get("x-request-id").is_some(), "{head:?}");
        sockets.push(ws);
    }
    for round in 0..20 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            ws.send(Message::text(format!("{i}:{round}")))
                .await
                .unwrap();
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            let got = within("an echo", ws.next()).await.unwrap().unwrap();
            assert_eq!(got, Message::text(format!("{i}:{round}")));
        }
    }
    let m = broker.metrics().await;
    for mode in ["direct", "multiplexed"] {
        assert_eq!(
            m.value(
                "muxgate_sessions_active",
                &[("mode", mode), ("http_version", "2")]
            ),
            3.0,
            "{mode}"
        );
    }
    assert_eq!(
        m.value("muxgate_sessions_active", &[("http_version", "1.1")]),
        0.0
    );
    for ws in &mut sockets {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = within("the close", ws.next()).await {}
    }
    broker
        .metrics_when("sessions ended", |m| {
            m.value("muxgate_sessions_active", &[]) == 0.0
        })
        .await;
}

/// A handshake's path, headers and the status it gets.
type Refusal = (&'static str, &'static [(&'static str, &'static str)], u16);

/// A refusal has the same status over HTTP/2 as over HTTP/1.1, for each
/// reason a handshake is refused before the WebSocket exists.
#[tokio::test]
async fn refusals_have_the_same_status_over_both_versions() {
    let up = TestUpstream::start().await;
    let (silent, _held) = silent_listener().await;
    let refused = refused_addr().await;
    let yaml = format!(
        "server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  http2: true
jwt: {{secret: a-test-secret-that-is-long-enough-for-hs256}}
upstreams:
  - name: echo
    routes: [{{external_path: /ws/echo, internal_path: /echo}}]
    targets: [{{url: 'ws://{up}'}}]
    websocket_config: {{enable_direct_communication: true}}
  - name: origin
    routes: [{{external_path: /ws/origin, internal_path: /echo}}]
    targets: [{{url: 'ws://{up}'}}]
    allowed_origins: [https://app.example]
    websocket_config: {{enable_direct_communication: true}}
  - name: auth
    routes: [{{external_path: /ws/auth, internal_path: /echo}}]
    targets: [{{url: 'ws://{up}'}}]
    auth_required: true
    websocket_config: {{enable_direct_communication: true}}
  - name: refused
    routes: [{{external_path: /ws/refused, internal_path: /echo}}]
    targets: [{{url: 'ws://{refused}'}}]
    websocket_config: {{enable_direct_communication: true}}
  - name: silent
    routes: [{{external_path: /ws/silent, internal_path: /echo}}]
    targets: [{{url: 'ws://{silent}'}}]
    websocket_config: {{enable_direct_communication: true, handshake_timeout: 200ms}}
",
        up = up.addr
    );
    let broker = start_broker(&yaml).await;
    let table: [Refusal; 6] = [
        ("/nowhere", &[], 404),
        ("/ws/origin", &[("origin", "https://evil.example")], 403),
        ("/ws/auth", &[], 401),
        ("/ws/refused", &[], 502),
        ("/ws/silent", &[], 504),
        ("/ws/origin", &[("origin", "https://app.example")], 200),
    ];
    for via in [Via::Http1, Via::Http2] {
        let opener = Opener::new(via, broker.client_addr).await;
        for (path, headers, status) in table {
            let got = match opener.try_open(path, headers).await {
                Ok(_) => 200,
                Err(status) => status,
            };
            assert_eq!(got, status, "{via:?} {path} {headers:?}");
        }
    }
    let m = broker.metrics().await;
    for version in ["1.1", "2"] {
        for (status, reason) in [
            ("404", "not_found"),
            ("403", "origin_not_allowed"),
            ("502", "upstream_connect"),
            ("504", "upstream_timeout"),
        ] {
            assert_eq!(
                m.value(
                    "muxgate_handshakes_rejected_total",
                    &[
                        ("status", status),
                        ("reason", reason),
                        ("http_version", version)
                    ]
                ),
                1.0,
                "{version} {status}"
            );
        }
    }
    // A plain GET on a stream is a request to a WebSocket path (426), and
    // a CONNECT without :protocol cannot open one.
    let h2 = H2Connection::cleartext(broker.client_addr).await;
    assert_eq!(h2.request(http::Method::GET, "/ws/echo").await, 426);
    assert_eq!(h2.request(http::Method::GET, "/favicon.ico").await, 404);
    assert_eq!(h2.request(http::Method::POST, "/ws/echo").await, 405);
}

/// Every stream counts against `max_connections` and
/// `max_connections_per_ip` as a socket does, and its end frees the slot.
#[tokio::test]
async fn streams_count_against_the_connection_limits() {
    let up = TestUpstream::start().await;
    for (limit, status) in [
        ("max_connections: 2", 503),
        ("max_connections_per_ip: 2", 429),
    ] {
        let server = format!("http2: true\n{limit}");
        let broker = start_broker(&direct_config(&[up.addr], "", "", &server)).await;
        let h2 = H2Connection::cleartext(broker.client_addr).await;
        let (mut first, _) = h2.open("/ws/echo", &[]).await;
        let (_second, _) = h2.open("/ws/echo", &[]).await;
        let (head, _) = h2.connect("/ws/echo", &[]).await.unwrap();
        assert_eq!(head.status, status, "{limit}");
        // Over HTTP/1.1 too: the streams hold the slots.
        let a = broker.client_addr;
        assert_eq!(
            raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
            status
        );
        first.close(None).await.unwrap();
        while let Some(Ok(_)) = within("the close", first.next()).await {}
        broker
            .metrics_when("the slot freed", |m| {
                m.value("muxgate_sessions_active", &[]) == 1.0
            })
            .await;
        let (mut again, _) = h2.open("/ws/echo", &[]).await;
        again.send(Message::text("slot reused")).await.unwrap();
        assert_eq!(
            within("echo", again.next()).await.unwrap().unwrap(),
            Message::text("slot reused")
        );
    }
}

/// `server.http2_max_concurrent_streams` is what the broker's SETTINGS
/// allow a connection.
#[tokio::test]
async fn the_stream_limit_is_advertised() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "http2: true")).await;
    assert_eq!(
        H2Connection::cleartext(broker.client_addr)
            .await
            .max_streams(),
        100
    );
    let server = "http2: true\nhttp2_max_concurrent_streams: 3";
    let broker = start_broker(&direct_config(&[up.addr], "", "", server)).await;
    assert_eq!(
        H2Connection::cleartext(broker.client_addr)
            .await
            .max_streams(),
        3
    );
}

/// Without `server.http2` a cleartext listener speaks HTTP/1.1 only: an
/// HTTP/2 preface is not a request it serves.
#[tokio::test]
async fn cleartext_http2_is_off_unless_asked_for() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let tcp = TcpStream::connect(broker.client_addr).await.unwrap();
    let handshake = h2::client::handshake(tcp).await;
    let refused = match handshake {
        Err(_) => true,
        Ok((send, connection)) => {
            let driver = tokio::spawn(connection);
            let request = http::Request::get(format!("http://{}/ws/echo", broker.client_addr))
                .body(())
                .unwrap();
            let answered = match send.ready().await {
                Ok(mut send) => match send.send_request(request, true) {
                    Ok((response, _)) => within("an answer", response).await.is_ok(),
                    Err(_) => false,
                },
                Err(_) => false,
            };
            driver.abort();
            !answered
        }
    };
    assert!(
        refused,
        "HTTP/2 was served on a cleartext listener without http2: true"
    );
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::text("HTTP/1.1 still")).await;
}

/// On a TLS listener HTTP/2 is on by default, chosen by ALPN; a client
/// that offers only http/1.1 gets HTTP/1.1 on the same port.
#[tokio::test]
async fn tls_listeners_offer_http2_by_alpn() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let server = format!(
        "tls: {{cert_file: '{}', key_file: '{}'}}",
        pki.cert.display(),
        pki.key.display()
    );
    let broker = start_broker(&direct_config(&[up.addr], "", "", &server)).await;
    let tls = |alpn: &[&[u8]]| {
        let mut config = (*pki.client_config()).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    let name = ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(broker.client_addr).await.unwrap();
    let stream = tls(&[b"h2", b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let authority = format!("localhost:{}", broker.client_addr.port());
    let h2 = H2Connection::over(stream, "https", authority, STREAM_WINDOW).await;
    let (mut ws, _) = h2.open("/ws/echo", &[]).await;
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(
        within("echo", ws.next()).await.unwrap().unwrap(),
        Message::binary(vec![7u8; 100_000])
    );

    let tcp = TcpStream::connect(broker.client_addr).await.unwrap();
    let stream = tls(&[b"http/1.1"]).connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://localhost:{}/ws/echo", broker.client_addr.port());
    let (mut ws1, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    ws1.send(Message::text("over HTTP/1.1")).await.unwrap();
    assert_eq!(
        within("echo", ws1.next()).await.unwrap().unwrap(),
        Message::text("over HTTP/1.1")
    );
    let m = broker.metrics().await;
    assert_eq!(
        m.value("muxgate_sessions_active", &[("http_version", "2")]),
        1.0
    );
    assert_eq!(
        m.value("muxgate_sessions_active", &[("http_version", "1.1")]),
        1.0
    );
}

/// Shutdown reaches HTTP/2 sessions: the connection gets GOAWAY (no new
/// stream opens on it), each stream's WebSocket closes with 1001, and the
/// connection ends after its last stream.
#[tokio::test]
async fn shutdown_sends_goaway_and_closes_each_stream_with_1001() {
    let up = TestUpstream::start().await;
    let peer = MuxPeer::start(Behavior::Echo).await;
    let broker = start_broker(&both_modes(up.addr, peer.addr, "http2: true")).await;
    let h2 = H2Connection::cleartext(broker.client_addr).await;
    let (mut direct, _) = h2.open("/ws/echo", &[]).await;
    let (mut mux, _) = h2.open("/ws/mux", &[]).await;
    for ws in [&mut direct, &mut mux] {
        ws.send(Message::text("before")).await.unwrap();
        assert_eq!(
            within("echo", ws.next()).await.unwrap().unwrap(),
            Message::text("before")
        );
    }
    let shutdown = broker.shutdown.clone();
    shutdown.begin();
    for ws in [&mut direct, &mut mux] {
        match within("the close", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected 1001, got {other:?}"),
        }
        while let Some(Ok(_)) = within("the end", ws.next()).await {}
    }
    // GOAWAY: a stream opened now is refused, and the connection ends.
    assert!(
        h2.connect("/ws/echo", &[]).await.is_err(),
        "a stream opened after GOAWAY"
    );
    let ended = within("the connection's end", h2.driver).await.unwrap();
    assert!(ended.is_ok(), "the connection ended cleanly: {ended:?}");
    let outcome = within("drain", broker.task).await.unwrap();
    assert_eq!(outcome, muxgate::shutdown::DrainOutcome::Drained);
}

/// One stream whose client stops reading stops only itself: flow control
/// holds its upstream back, while a neighbour on the same connection keeps
/// at least 90% of its rate without the slow one. That rate is a control
/// stream's on a connection of its own, measured in turns with the
/// neighbour, so that whatever else loads the machine meanwhile (the
/// other tests of this binary) weighs on both alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_slow_its_neighbour() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "http2: true")).await;
    let h2 = H2Connection::cleartext(broker.client_addr).await;
    let (mut neighbour, _) = h2.open("/ws/echo", &[]).await;
    let (slow, _) = h2.open("/ws/echo", &[]).await;
    let other = H2Connection::cleartext(broker.client_addr).await;
    let (mut control, _) = other.open("/ws/echo", &[]).await;

    /// Round trips of 16 KiB per second over 200 of them.
    async fn rate(ws: &mut common::h2ws::H2Client) -> f64 {
        let msg = Message::binary(vec![1u8; 16 * 1024]);
        let started = Instant::now();
        for _ in 0..200 {
            ws.send(msg.clone()).await.unwrap();
            within("echo", ws.next()).await.unwrap().unwrap();
        }
        200.0 / started.elapsed().as_secs_f64()
    }

    // The slow one sends 64 MiB and reads none of its echoes: once the
    // windows and buffers on its path are full, its writes wait.
    let (mut slow_tx, slow_rx) = slow.split();
    let sent = Arc::new(AtomicUsize::new(0));
    let pusher = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let chunk = Message::binary(vec![2u8; 256 * 1024]);
            for _ in 0..256 {
                slow_tx.send(chunk.clone()).await.unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
            }
            slow_tx
        })
    };
    // Stalled: it got no further while the neighbour made 200 round trips.
    loop {
        let before = sent.load(Ordering::Relaxed);
        rate(&mut neighbour).await;
        if sent.load(Ordering::Relaxed) == before {
            break;
        }
    }
    let (mut beside, mut alone) = (0.0f64, 0.0f64);
    for _ in 0..5 {
        beside = beside.max(rate(&mut neighbour).await);
        alone = alone.max(rate(&mut control).await);
    }
    let held = sent.load(Ordering::Relaxed);
    eprintln!(
        "neighbour {beside:.0}/s beside the slow reader, control {alone:.0}/s; \
         the slow one held after {held} of 256 messages"
    );
    assert!(
        !pusher.is_finished(),
        "64 MiB passed a reader that reads nothing"
    );
    assert!(
        beside >= 0.9 * alone,
        "the neighbour's rate is {beside:.0}/s beside the slow reader, {alone:.0}/s without"
    );
    // Nothing is lost: read now, the slow stream gets every echo.
    let mut slow_rx = slow_rx;
    let mut echoed = 0;
    while echoed < 256 {
        match within("the slow stream's echoes", slow_rx.next()).await {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(b.len(), 256 * 1024);
                echoed += 1;
            }
            other => panic!("expected an echo, got {other:?}"),
        }
    }
    drop(within("the pusher", pusher).await.unwrap());
}

/// A client written from the RFCs in another language: Python's `h2`
/// and `wsproto` (tests/support/h2_ws_client.py) open WebSockets in both
/// modes on one HTTP/2 connection, echo every length class byte-exact,
/// and close both ways.
#[tokio::test]
async fn a_python_h2_and_wsproto_client_opens_websockets_in_both_modes() {
    let up = TestUpstream::start().await;
    let peer = MuxPeer::start(Behavior::Echo).await;
    let broker = start_broker(&both_modes(up.addr, peer.addr, "http2: true")).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/h2_ws_client.py");
    let out = within(
        "the Python client",
        tokio::process::Command::new("python3")
            .arg(script)
            .arg(broker.client_addr.to_string())
            .args([
                "--path", "/ws/echo", "--path", "/ws/mux", "--path", "/ws/echo", "--path",
                "/ws/mux",
            ])
            .args(["--upstream-close", "/ws/echo"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3 (with tests/support/requirements.txt installed)");
    assert!(
        out.status.success(),
        "the Python client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["streams"], 4);
    let codes: Vec<(String, u64)> = report["closes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["by"].as_str().unwrap().to_owned(),
                c["code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        codes
            .iter()
            .filter(|c| c == &&("client".to_owned(), 4001))
            .count(),
        4,
        "{report}"
    );
    assert!(codes.contains(&("upstream".to_owned(), 4002)), "{report}");
    let m = broker
        .metrics_when("the sessions ended", |m| {
            m.value("muxgate_sessions_active", &[]) == 0.0
        })
        .await;
    assert_eq!(
        m.value(
            "muxgate_sessions_total",
            &[("http_version", "2"), ("mode", "direct")]
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "muxgate_sessions_total",
            &[("http_version", "2"), ("mode", "multiplexed")]
        ),
        2.0
    );
}

/// A reload reaches HTTP/2 sessions as it does any: the sessions of a
/// route it removes close with 1001 once `drain_timeout` is over, while
/// the other streams of the same connection go on.
#[tokio::test]
async fn a_reload_that_removes_a_route_closes_its_streams_with_1001() {
    let up = TestUpstream::start().await;
    let peer = MuxPeer::start(Behavior::Echo).await;
    let dir = std::env::temp_dir().join(format!("muxgate-h2-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("upstreams.yaml");
    let server = "http2: true\ndrain_timeout: 200ms";
    std::fs::write(&file, both_modes(up.addr, peer.addr, server)).unwrap();
    let broker = start_broker_from_file(&file).await;
    let h2 = H2Connection::cleartext(broker.client_addr).await;
    let (mut kept, _) = h2.open("/ws/echo", &[]).await;
    let (mut removed, _) = h2.open("/ws/mux", &[]).await;
    echo_roundtrip(&mut removed, Message::text("before")).await;

    // The same file without the multiplexed upstream.
    std::fs::write(&file, direct_config(&[up.addr], "", "", server)).unwrap();
    let reload = "POST /admin/reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw_http(broker.admin_addr, reload).await;
    assert_eq!(status, 200, "{body}");
    let (code, _) = expect_close(&mut removed).await;
    assert_eq!(code, 1001);
    expect_end(&mut removed).await;
    echo_roundtrip(&mut kept, Message::text("still here")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// In a restart's handover (the listener closes first, sessions go on
/// until the drain begins) an HTTP/2 connection gets GOAWAY at once: its
/// open WebSocket goes on, a new stream is refused (the client opens it
/// on a new connection, which the kernel gives the other process), and
/// when shutdown begins the WebSocket closes with 1001.
#[tokio::test]
async fn a_handover_sends_goaway_and_keeps_the_open_streams_until_the_drain() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "http2: true")).await;
    let h2 = H2Connection::cleartext(broker.client_addr).await;
    let (mut ws, _) = h2.open("/ws/echo", &[]).await;
    echo_roundtrip(&mut ws, Message::text("before")).await;
    broker.shutdown.hand_over();
    // A stream sent before GOAWAY reached the client is still served (as
    // the handover serves every request it had taken); once it arrived,
    // new streams are refused.
    within("GOAWAY", async {
        while let Ok((_, stream)) = h2.connect("/ws/echo", &[]).await {
            drop(stream);
        }
    })
    .await;
    echo_roundtrip(&mut ws, Message::text("during the handover")).await;
    broker.shutdown.begin();
    assert_eq!(expect_close(&mut ws).await.0, 1001);
    expect_end(&mut ws).await;
    let ended = within("the connection's end", h2.driver).await.unwrap();
    assert!(ended.is_ok(), "the connection ended cleanly: {ended:?}");
}
