//! permessage-deflate (RFC 7692) through the broker.
//!
//! Direct mode's frame relay passes it end to end: the client's offers go
//! to the upstream, the upstream's answer comes back only if it is a valid
//! answer to them (else 502), and compressed frames cross unchanged. The
//! peers here are Python `websockets` (tests/support/deflate_peer.py), an
//! implementation independent of the broker, and hand-made frames.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::raw::RawPeer;
use common::upstream::TestUpstream;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/deflate_peer.py");

/// Python `websockets` echoing with permessage-deflate, its defaults.
struct PythonEcho {
    addr: SocketAddr,
    _child: Child,
}

async fn python_echo() -> PythonEcho {
    let mut child = Command::new("python3")
        .args([PEER, "serve"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 (pip install -r examples/python_upstream/requirements.txt)");
    let stdout = child.stdout.take().expect("piped");
    let port = within("the Python echo's port", async {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await.unwrap();
        line.trim().parse::<u16>().expect("a port")
    })
    .await;
    PythonEcho {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _child: child,
    }
}

/// The Rust library's demo upstream, in this process: it takes
/// permessage-deflate on a plain echo, and speaks the mux protocol.
struct Demo {
    addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Demo {
    async fn start() -> Demo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));
        Demo { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        within("demo stop", self.task).await.unwrap();
    }
}

/// The two configs in which the broker terminates compression, in front of
/// `demo`: multiplexed, and direct behind a message plugin (the message
/// relay).
fn terminating(demo: SocketAddr) -> [(&'static str, String); 2] {
    let pass_all =
        "plugins: [{name: message_size, stage: pre_request, settings: {max_bytes: 1MiB}}]";
    [
        ("multiplexed", mux_config(&[demo], "", "", "")),
        ("message relay", direct_config(&[demo], "", pass_all, "")),
    ]
}

/// Runs the Python client against `url`; its report.
async fn python_client(url: &str) -> serde_json::Value {
    let out = within(
        "the Python client",
        Command::new("python3")
            .args([PEER, "client", url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn bytes_relayed(m: &Metrics, direction: &str) -> f64 {
    ["text", "binary"]
        .iter()
        .map(|kind| {
            m.value(
                "muxgate_message_bytes_total",
                &[
                    ("upstream", "echo"),
                    ("direction", direction),
                    ("kind", kind),
                ],
            )
        })
        .sum()
}

/// What `deflate_peer.py client` sends: every length class, compressible
/// and not, as text and binary.
fn client_payload_bytes() -> f64 {
    let lengths = [0, 1, 125, 126, 255, 256, 4096, 65535, 65536, 300_000];
    lengths.iter().map(|&n| (4 * n) as f64).sum()
}

/// A browser-like client and a server that both speak permessage-deflate
/// agree on it through the frame relay, and every message arrives byte
/// for byte. The broker relays the compressed bytes: what it counts is
/// well under what the client sent, since half the messages are JSON.
#[tokio::test]
async fn the_frame_relay_passes_permessage_deflate_end_to_end() {
    let echo = python_echo().await;
    let broker = start_broker(&direct_config(&[echo.addr], "", "", "")).await;
    let report = python_client(&broker.url("/ws/echo")).await;
    let agreed = report["extensions"].as_str().expect("an extension agreed");
    assert!(agreed.starts_with("permessage-deflate"), "{agreed}");
    assert_eq!(report["echoed"], 40);
    let m = broker
        .metrics_when("the session counted as ended", |m| {
            m.value(
                "muxgate_sessions_active",
                &[("upstream", "echo"), ("mode", "direct")],
            ) == 0.0
        })
        .await;
    let sent = client_payload_bytes();
    let relayed = bytes_relayed(&m, "client_to_upstream");
    eprintln!("frame relay: {relayed} bytes relayed for {sent} message bytes sent");
    assert!(
        relayed < 0.8 * sent,
        "compressed frames relayed as they are: {relayed} of {sent} bytes"
    );
    assert_eq!(
        m.value(
            "muxgate_compressed_sessions_active",
            &[("upstream", "echo")]
        ),
        0.0
    );
    broker.stop().await;
}

/// The same client with `compression.enabled: false`: nothing is offered
/// upstream, nothing agreed, and the messages still arrive.
#[tokio::test]
async fn with_compression_disabled_nothing_is_offered() {
    let echo = python_echo().await;
    let broker = start_broker(&direct_config(
        &[echo.addr],
        "compression: {enabled: false}",
        "",
        "",
    ))
    .await;
    let report = python_client(&broker.url("/ws/echo")).await;
    assert_eq!(report["extensions"], serde_json::Value::Null);
    assert_eq!(report["echoed"], 40);
    broker.stop().await;
}

/// Compressed frames cross the broker unchanged both ways, byte for byte:
/// RFC 7692 §7.2.3.1's "Hello", then §7.2.3.2's second "Hello" with the
/// window taken over, which only the upstream's own inflater can read. The
/// session counts as compressed while open.
#[tokio::test]
async fn compressed_frames_cross_unchanged() {
    let echo = python_echo().await;
    let broker = start_broker(&direct_config(&[echo.addr], "", "", "")).await;
    let (mut client, head) = RawPeer::client_with(
        broker.client_addr,
        "/ws/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_compressed_sessions_active",
            &[("upstream", "echo")]
        ),
        1.0
    );
    let first = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let second = [0xf2, 0x00, 0x11, 0x00, 0x00];
    for payload in [&first[..], &second[..]] {
        // FIN, RSV1, text.
        client.write_frame(0xc1, payload).await;
        let echoed = within("the echo", client.read_frame())
            .await
            .expect("a frame");
        assert_eq!(echoed.first, 0xc1, "a compressed text frame");
        assert_eq!(
            echoed.payload, payload,
            "zlib's bytes for \"Hello\", relayed as they are"
        );
    }
    // RSV1 on a control frame is refused whatever was agreed.
    client.write_frame(0xc9, b"ping").await;
    match within("the close", client.next_close()).await {
        common::raw::CloseSeen::Close(code, _) => assert_eq!(code, 1002),
        other => panic!("expected a 1002 close, got {other:?}"),
    }
    broker.stop().await;
}

/// One WebSocket upgrade answered 101 with `extensions` as the upstream's
/// `Sec-WebSocket-Extensions`.
async fn upstream_answering(extensions: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(reply) = common::upstream::switching_protocols(&mut tcp).await else {
                    return;
                };
                let mut reply = String::from_utf8(reply).unwrap();
                reply.truncate(reply.len() - 2);
                reply.push_str(&format!("Sec-WebSocket-Extensions: {extensions}\r\n\r\n"));
                let _ = tcp.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

/// An upstream whose answer no client could accept for the offers it got
/// fails the upstream handshake: 502, counted with reason `extensions`.
#[tokio::test]
async fn an_answer_outside_the_offers_is_a_502() {
    for (offer, answer) in [
        // An extension the broker never passes on.
        ("permessage-deflate", "x-webkit-deflate-frame"),
        // A limit on the client's window it did not offer to honour.
        (
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits=10",
        ),
        // An answer to nothing: the client offered no compression.
        ("", "permessage-deflate"),
        // Malformed.
        ("permessage-deflate", "permessage-deflate;"),
    ] {
        let target = upstream_answering(answer).await;
        let broker = start_broker(&direct_config(&[target], "", "", "")).await;
        let a = broker.client_addr;
        let extra = if offer.is_empty() {
            String::new()
        } else {
            format!("Sec-WebSocket-Extensions: {offer}\r\n")
        };
        let (status, _, _) = raw_http(a, &upgrade_request(a, "/ws/echo", &extra)).await;
        assert_eq!(status, 502, "{offer:?} answered {answer:?}");
        let m = broker.metrics().await;
        assert_eq!(
            m.value(
                "muxgate_upstream_connect_failures_total",
                &[("upstream", "echo"), ("reason", "extensions")]
            ),
            1.0,
            "{offer:?} answered {answer:?}"
        );
        broker.stop().await;
    }
}

/// Offers other than permessage-deflate are not passed on, and a malformed
/// `Sec-WebSocket-Extensions` is a 400 before anything is connected.
#[tokio::test]
async fn only_permessage_deflate_offers_reach_the_upstream() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (_client, head) = RawPeer::client_with(
        broker.client_addr,
        "/ws/echo",
        "Sec-WebSocket-Extensions: x-webkit-deflate-frame, permessage-deflate; client_max_window_bits; server_max_window_bits=\"10\"; bogus\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    // tungstenite's test upstream answers no extension: none is agreed.
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
    let (_, headers) = up.handshake().await;
    assert_eq!(
        header(&headers, "sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits"),
        "the invalid offer (an unknown parameter) and the other extension are left out"
    );
    let a = broker.client_addr;
    let (status, _, body) = raw_http(
        a,
        &upgrade_request(
            a,
            "/ws/echo",
            "Sec-WebSocket-Extensions: permessage-deflate; x=\"\r\n",
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Sec-WebSocket-Extensions"), "{body}");
    broker.stop().await;
}

/// Where the broker must read messages (multiplexed mode, and direct mode's
/// message relay behind a message plugin) it terminates permessage-deflate
/// itself: it answers the client's offer, inflates what the client sends
/// and compresses what it sends back, and the upstream (the demo) gets
/// plain messages: the broker offers it no compression. Every message of the
/// Python client's set arrives byte for byte, and the counts show the JSON
/// half compressed both ways.
#[tokio::test]
async fn the_broker_terminates_permessage_deflate_where_it_reads_messages() {
    let demo = Demo::start().await;
    for (what, config) in terminating(demo.addr) {
        let broker = start_broker(&config).await;
        let report = python_client(&broker.url("/ws/echo")).await;
        let agreed = report["extensions"].as_str().expect("an extension agreed");
        assert_eq!(agreed, "permessage-deflate", "{what}");
        assert_eq!(report["echoed"], 40, "{what}");
        let m = broker
            .metrics_when("the session counted as ended", |m| {
                m.value(
                    "muxgate_compressed_sessions_active",
                    &[("upstream", "echo")],
                ) == 0.0
            })
            .await;
        for direction in ["client_to_upstream", "upstream_to_client"] {
            let (message, wire) = m.hop_bytes("echo", "client", direction);
            assert!(
                wire > 0.0 && wire < 0.8 * message,
                "{what}, {direction}: {wire} compressed bytes for {message}"
            );
        }
        // What crossed uncompressed is what the client sent, message bytes.
        assert_eq!(
            bytes_relayed(&m, "client_to_upstream"),
            client_payload_bytes(),
            "{what}"
        );
        broker.stop().await;
    }
    demo.stop().await;
}

/// The VmRSS (or, with `peak`, VmHWM) of process `pid`, in bytes.
fn rss(pid: u32, peak: bool) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = if peak { "VmHWM:" } else { "VmRSS:" };
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

/// A compression bomb: one frame of a few KiB per MiB it inflates to, 1 GiB
/// of zeros in all. The broker stops inflating at `max_decompressed_size` (1 MiB
/// here, as `max_message_size`) and closes that client with 1009; its
/// peak memory grows by less than the cap plus 1 MiB, and a neighbour on
/// the same upstream goes on echoing.
#[tokio::test]
async fn a_compression_bomb_closes_its_client_with_1009_and_costs_at_most_the_cap() {
    use flate2::{Compress, Compression, FlushCompress};
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let demo = Demo::start().await;
    let yaml = mux_config(&[demo.addr], "", "", "");
    let path = std::env::temp_dir().join(format!("muxgate-bomb-{}.yaml", std::process::id()));
    std::fs::write(&path, &yaml).unwrap();
    let broker = spawn_binary_logged(&path, &[], &[]).await;
    let pid = broker.child.id().unwrap();

    // 1 GiB of zeros, deflated (raw, as permessage-deflate carries it):
    // the first MiB, then the next one, whose blocks only repeat the zero
    // before them, so that they stand for any further MiB of zeros.
    let mut deflate = Compress::new(Compression::best(), false);
    let zeros = vec![0u8; 1 << 20];
    let mut first = Vec::with_capacity(64 * 1024);
    let mut next = Vec::with_capacity(64 * 1024);
    for out in [&mut first, &mut next] {
        deflate
            .compress_vec(&zeros, out, FlushCompress::Sync)
            .unwrap();
        assert_eq!(deflate.total_in() % (1 << 20), 0, "all taken");
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    }
    let mut bomb = first;
    for _ in 1..1024 {
        bomb.extend_from_slice(&next);
    }
    bomb.truncate(bomb.len() - 4);
    assert!(bomb.len() < 2 << 20, "{} compressed bytes", bomb.len());

    // The pool is up once a mux connection is live.
    within("a live mux connection", async {
        loop {
            let (_, _, body) = http_get(broker.admin_addr, "/metrics").await;
            let live = Metrics::parse(&body).value("muxgate_mux_connections", &[("state", "live")]);
            if live > 0.0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let url = format!("ws://{}/ws/echo", broker.client_addr);
    let (mut neighbour, _) = connect(&url, &[]).await;
    echo_roundtrip(&mut neighbour, Message::text("before")).await;
    let before = rss(pid, false);

    let addr = broker.client_addr;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        upgrade_request(
            addr,
            "/ws/echo",
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = common::raw::read_head(&mut tcp).await.expect("a 101");
    assert!(
        head.to_ascii_lowercase().contains("permessage-deflate"),
        "{head}"
    );
    // FIN, RSV1, binary; masked, with a 64-bit length.
    let mask = [0x5a, 0x13, 0xc4, 0x7e];
    let mut frame = vec![0xc2, 0x80 | 127];
    frame.extend((bomb.len() as u64).to_be_bytes());
    frame.extend(mask);
    frame.extend(bomb.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let bomb_len = bomb.len();
    // The broker stops reading once it gave up: the rest may never go.
    let (mut reader, mut writer) = tcp.into_split();
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&frame).await;
        writer
    });
    // The broker's first frame is its close (unmasked, a short payload).
    let mut close = [0u8; 4];
    within("the 1009", reader.read_exact(&mut close))
        .await
        .unwrap();
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1009);
    write.abort();
    let peak = rss(pid, true);
    let cap = 1 << 20;
    eprintln!(
        "bomb: {} KiB compressed for 1 GiB; broker RSS {} KiB before, peak {} KiB after (+{} KiB)",
        bomb_len / 1024,
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
    assert!(
        peak.saturating_sub(before) < cap + (1 << 20),
        "peak RSS grew by {} KiB (before {} KiB, peak {} KiB)",
        (peak.saturating_sub(before)) / 1024,
        before / 1024,
        peak / 1024
    );
    // The neighbour never noticed.
    echo_roundtrip(&mut neighbour, Message::text("after")).await;
    neighbour.send(Message::Close(None)).await.unwrap();
    let (status, _, body) = http_get(broker.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = Metrics::parse(&body);
    assert_eq!(
        m.value(
            "muxgate_decompression_limit_closes_total",
            &[("upstream", "echo"), ("hop", "client")]
        ),
        1.0
    );
    let _ = std::fs::remove_file(&path);
    demo.stop().await;
}

/// A compressed session's close handshake completes: the client's close
/// is answered with the broker's, in both modes that terminate
/// compression.
#[tokio::test]
async fn a_compressed_session_closes_cleanly() {
    let demo = Demo::start().await;
    for (what, config) in terminating(demo.addr) {
        let broker = start_broker(&config).await;
        broker
            .metrics_when("a live pool, if any", |m| {
                what != "multiplexed"
                    || m.value("muxgate_mux_connections", &[("state", "live")]) > 0.0
            })
            .await;
        let (mut client, head) = RawPeer::client_with(
            broker.client_addr,
            "/ws/echo",
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        )
        .await;
        assert!(
            head.to_ascii_lowercase().contains("permessage-deflate"),
            "{what}: {head}"
        );
        // RFC 7692's compressed "Hello" comes back as "Hello" (below
        // min_size: uncompressed).
        client
            .write_frame(0xc1, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00])
            .await;
        let echoed = within("the echo", client.read_frame())
            .await
            .expect("a frame");
        assert_eq!(
            (echoed.first, &echoed.payload[..]),
            (0x81, &b"Hello"[..]),
            "{what}"
        );
        client.write_frame(0x88, &[0x03, 0xe8]).await;
        match within("the close", client.next_close()).await {
            common::raw::CloseSeen::Close(code, _) => assert_eq!(code, 1000, "{what}"),
            other => panic!("{what}: expected the broker's close, got {other:?}"),
        }
        broker.stop().await;
    }
    demo.stop().await;
}

/// A mux target that takes the broker's permessage-deflate offer
/// (`mux_compression`) and answers each connection's hello with one
/// compressed message of `zeros` bytes: a few KiB on the wire.
async fn mux_target_sending(zeros: usize) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use muxgate_backend::deflate::codec::MIN_DEFLATE_WINDOW_BITS;
    use muxgate_backend::deflate::negotiate;
    use muxgate_backend::deflate::stream::{DeflateSettings, Deflating};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut agreed = None;
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                let callback = |request: &Request, mut response: Response| {
                    let headers = response.headers_mut();
                    if let Some(p) = request.headers().get("sec-websocket-protocol") {
                        headers.insert("sec-websocket-protocol", p.clone());
                    }
                    let offers = negotiate::offers(request.headers()).unwrap_or_default();
                    let preferences = negotiate::Preferences::default();
                    if let Some((a, answer)) =
                        negotiate::accept(&offers, &preferences, MIN_DEFLATE_WINDOW_BITS)
                    {
                        headers.insert("sec-websocket-extensions", answer);
                        agreed = Some(a);
                    }
                    Ok(response)
                };
                let Ok(mut ws) =
                    tokio_tungstenite::accept_hdr_async(Deflating::plain(tcp), callback).await
                else {
                    return;
                };
                let agreed = agreed.expect("the broker offered permessage-deflate");
                let settings = DeflateSettings {
                    agreed,
                    level: 1,
                    min_size: 0,
                    max_decompressed_size: 64 << 20,
                };
                ws.get_mut().enable(Role::Server, settings, Box::new(()));
                // The hello first, then the envelope no mux connection may hold.
                let _hello = ws.next().await;
                let _ = ws.send(Message::binary(vec![0u8; zeros])).await;
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    (addr, task)
}

/// With `mux_compression` the broker inflates what a target sends only up
/// to the mux connection's own message limit (here 70 KiB: 6 × 1 KiB
/// `max_message_size` plus 64 KiB): a target whose compressed message would
/// inflate to 1 MiB loses its connection at once, counted as a
/// decompression-limit close of the mux hop, and the broker goes on.
#[tokio::test]
async fn a_mux_connections_inflating_stops_at_its_message_limit() {
    let (target, task) = mux_target_sending(1 << 20).await;
    let config = mux_config(
        &[target],
        "max_message_size: 1KiB\ncompression: {mux_compression: true}",
        "health_checks: {passive: false}",
        "",
    );
    let broker = start_broker(&config).await;
    let m = broker
        .metrics_when("a mux connection failed at the limit", |m| {
            m.value(
                "muxgate_decompression_limit_closes_total",
                &[("upstream", "echo"), ("hop", "mux")],
            ) >= 1.0
        })
        .await;
    // Only what was inflated up to the cap counts as read.
    let (inflated, _) = m.hop_bytes("echo", "mux", "upstream_to_client");
    let connections_failed = m.value(
        "muxgate_decompression_limit_closes_total",
        &[("upstream", "echo"), ("hop", "mux")],
    );
    eprintln!("{connections_failed} mux connections failed, {inflated} bytes inflated in all");
    assert!(
        inflated <= connections_failed * f64::from(70 * 1024 + 1),
        "{inflated} bytes inflated by {connections_failed} connections"
    );
    broker.stop().await;
    task.abort();
}
