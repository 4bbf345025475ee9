//! Multiplexed mode end to end, against `tests/support/mux_peer.rs`, an
//! upstream written from `shared/mux-protocol.md` alone (it shares no code
//! with the broker), in both encodings.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use bytes::Bytes;
use common::upstream::refused_addr;
use common::*;
use futures_util::{SinkExt, StreamExt};
use mux_peer::{Behavior, MuxPeer, OutFrame, Payload, PeerEvent};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const ENVELOPES: [&str; 2] = ["json", "binary"];

/// Hello comes first on every connection, the open carries route, path,
/// headers, remote address and offered subprotocols, messages pass
/// byte-exact both ways, and close codes cross in both directions.
#[tokio::test]
async fn sessions_round_trip_in_both_encodings() {
    for envelope in ENVELOPES {
        let mut peer = MuxPeer::start(Behavior::Echo).await;
        let cfg = mux_config(
            &[peer.addr],
            &format!("envelope: {envelope}\npool_size: 1"),
            "forward_headers: [user-agent]",
            "",
        );
        let broker = start_broker(&cfg).await;
        let offered = format!("muxgate.v1.{envelope}");
        match peer.next_event().await {
            PeerEvent::Connected {
                subprotocol, path, ..
            } => {
                assert_eq!(subprotocol.as_deref(), Some(offered.as_str()));
                assert_eq!(path, "/echo");
            }
            other => panic!("expected a connection first, got {other:?}"),
        }
        match peer.next_event().await {
            PeerEvent::Hello { hello, .. } => {
                assert_eq!(hello["type"], "hello");
                assert_eq!(hello["version"], 1);
                assert!(Uuid::parse_str(hello["connection"].as_str().unwrap()).is_ok());
                assert!(Uuid::parse_str(hello["instance"].as_str().unwrap()).is_ok());
            }
            other => panic!("expected hello second, got {other:?}"),
        }

        // Multiplexed mode selects no subprotocol (the upstream is not asked
        // before the upgrade); the offer still reaches it in `open`.
        let a = broker.client_addr;
        let offer = "User-Agent: mux-test\r\nSec-WebSocket-Protocol: chat.v1, chat.v2\r\n";
        let (status, headers, _) = raw_http(a, &upgrade_request(a, "/ws/echo?room=7", offer)).await;
        assert_eq!(status, 101);
        assert_eq!(header(&headers, "sec-websocket-protocol"), None);
        match peer
            .wait_for("open", |e| matches!(e, PeerEvent::Open { .. }))
            .await
        {
            PeerEvent::Open {
                route,
                path,
                headers,
                subprotocols,
                remote_addr,
                resumed,
                claims,
                ..
            } => {
                assert_eq!(route, "/ws/echo");
                assert_eq!(path, "/echo?room=7");
                assert_eq!(headers["user-agent"], "mux-test");
                assert_eq!(subprotocols, vec!["chat.v1", "chat.v2"]);
                assert!(remote_addr.unwrap().starts_with("127.0.0.1:"));
                assert!(!resumed);
                assert_eq!(claims, None);
            }
            _ => unreachable!(),
        }
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        peer.next_open().await;
        for len in [0usize, 1, 125, 126, 65535, 65536] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            echo_roundtrip(&mut ws, Message::Binary(Bytes::from(bytes))).await;
            let text: String = (0..len)
                .map(|i| ['a', 'é', '✓', '"', '\\'][i % 5])
                .collect();
            echo_roundtrip(&mut ws, Message::text(text)).await;
        }
        // The largest message fits on the mux link too, although its
        // envelope is larger (base64, or six-byte escapes in JSON text).
        echo_roundtrip(&mut ws, Message::Binary(Bytes::from(vec![0xffu8; 1 << 20]))).await;
        echo_roundtrip(&mut ws, Message::text("\u{1}".repeat(1 << 20))).await;
        // Upstream-initiated close, code and reason preserved.
        ws.send(Message::text("close:4001:kicked")).await.unwrap();
        assert_eq!(
            expect_close(&mut ws).await,
            (4001, "kicked".into()),
            "{envelope}"
        );
        expect_end(&mut ws).await;

        // Client-initiated close reaches the upstream.
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        let (_, session, _) = peer.next_open().await;
        ws.close(Some(CloseFrame {
            code: CloseCode::from(4002),
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        match peer
            .wait_for("close", |e| matches!(e, PeerEvent::Close { .. }))
            .await
        {
            PeerEvent::Close {
                session: s,
                code,
                reason,
                ..
            } => {
                assert_eq!((s, code, reason.as_str()), (session, 4002, "bye"));
            }
            _ => unreachable!(),
        }
        // A close frame without a code is reported as 1005.
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        peer.next_open().await;
        ws.close(None).await.unwrap();
        match peer
            .wait_for("close", |e| matches!(e, PeerEvent::Close { .. }))
            .await
        {
            PeerEvent::Close { code, .. } => assert_eq!(code, 1005),
            _ => unreachable!(),
        }
        assert_eq!(
            peer.total_connections(),
            1,
            "one mux connection carried it all"
        );
        broker.stop().await;
    }
}

/// What a client sends in the same packet as its upgrade request reaches
/// the upstream: hyper reads it along with the request, and the session
/// takes it over with the socket.
#[tokio::test]
async fn bytes_behind_the_request_are_relayed() {
    let peer = MuxPeer::start(Behavior::Echo).await;
    let broker = start_broker(&mux_config(&[peer.addr], "pool_size: 1", "", "")).await;
    assert_eq!(
        echo_of_text_behind_the_request(broker.client_addr, "/ws/echo", "early bird").await,
        "early bird"
    );
}

/// An upstream close code a client may not receive becomes 1011.
#[tokio::test]
async fn invalid_upstream_close_codes_become_1011() {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let broker = start_broker(&mux_config(&[peer.addr], "pool_size: 1", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (conn, session, _) = peer.next_open().await;
    peer.send(
        conn,
        OutFrame::Close {
            session,
            code: 1006,
            reason: "nope".into(),
        },
    )
    .await;
    assert_eq!(expect_close(&mut ws).await, (1011, "nope".into()));
}

/// `broadcast` reaches the listed sessions, or every session on the
/// connection when no list is given; unknown ids are skipped.
#[tokio::test]
async fn broadcast_to_listed_and_to_all_sessions() {
    for envelope in ENVELOPES {
        let mut peer = MuxPeer::start(Behavior::Manual).await;
        let cfg = mux_config(
            &[peer.addr],
            &format!("envelope: {envelope}\npool_size: 1"),
            "",
            "",
        );
        let broker = start_broker(&cfg).await;
        let mut clients = Vec::new();
        let mut ids = Vec::new();
        let mut conn = 0;
        for _ in 0..3 {
            let (ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
            let (c, s, _) = peer.next_open().await;
            clients.push(ws);
            ids.push(s);
            conn = c;
        }
        peer.send(
            conn,
            OutFrame::Broadcast {
                sessions: Some(vec![ids[0], Uuid::new_v4(), ids[2]]),
                payload: Payload::Text("to 0 and 2".into()),
            },
        )
        .await;
        peer.send(
            conn,
            OutFrame::Broadcast {
                sessions: None,
                payload: Payload::Binary(vec![1, 2, 3]),
            },
        )
        .await;
        assert_eq!(
            next_message(&mut clients[0]).await,
            Some(Message::text("to 0 and 2"))
        );
        assert_eq!(
            next_message(&mut clients[2]).await,
            Some(Message::text("to 0 and 2"))
        );
        for ws in clients.iter_mut() {
            assert_eq!(
                next_message(ws).await,
                Some(Message::binary(vec![1u8, 2, 3])),
                "{envelope}"
            );
        }
        drop(clients);
        broker.stop().await;
    }
}

/// Malformed frames, unknown types and unknown sessions are dropped and
/// counted by reason; the mux connection stays up and keeps serving.
#[tokio::test]
async fn malformed_frames_are_counted_and_the_connection_stays_up() {
    for envelope in ENVELOPES {
        let mut peer = MuxPeer::start(Behavior::Echo).await;
        let cfg = mux_config(
            &[peer.addr],
            &format!("envelope: {envelope}\npool_size: 1"),
            "",
            "",
        );
        let broker = start_broker(&cfg).await;
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        let (conn, _, _) = peer.next_open().await;
        let junk: Vec<Message> = if envelope == "json" {
            vec![
                Message::text("not json"),
                Message::text(
                    r#"{"session":"00000000-0000-0000-0000-000000000000","text":"no type"}"#,
                ),
                Message::text(r#"{"type":"teleport"}"#),
                Message::text(format!(
                    r#"{{"type":"message","session":"{}","text":"nobody"}}"#,
                    Uuid::new_v4()
                )),
                Message::text(format!(
                    r#"{{"type":"message","session":"{}","binary":"***"}}"#,
                    Uuid::new_v4()
                )),
                Message::binary(vec![1u8, 2, 3]),
            ]
        } else {
            let mut unknown = vec![0x02u8];
            unknown.extend_from_slice(Uuid::new_v4().as_bytes());
            unknown.extend_from_slice(b"nobody");
            let mut bad_utf8 = vec![0x02u8];
            bad_utf8.extend_from_slice(&[0; 16]);
            bad_utf8.push(0xff);
            vec![
                Message::binary(vec![0x02u8; 5]),
                Message::binary([[0x7fu8].as_slice(), &[0; 16]].concat()),
                Message::binary(unknown),
                Message::binary(bad_utf8),
                Message::text("text frame in the binary encoding"),
            ]
        };
        let n = junk.len();
        for msg in junk {
            peer.send_raw(conn, msg).await;
        }
        echo_roundtrip(&mut ws, Message::text("still flowing")).await;
        let m = broker.metrics().await;
        assert_eq!(
            m.value("muxgate_mux_frames_dropped_total", &[("upstream", "echo")]),
            n as f64,
            "{envelope}"
        );
        assert!(
            m.value(
                "muxgate_mux_frames_dropped_total",
                &[("reason", "unknown_session")]
            ) >= 1.0
        );
        assert_eq!(peer.total_connections(), 1);
        drop(ws);
        broker.stop().await;
    }
}

/// 1,000 concurrent clients share `pool_size: 2` upstream sockets; each gets
/// only its own replies, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_over_two_upstream_sockets() {
    let peer = MuxPeer::start(Behavior::Echo).await;
    let cfg = mux_config(&[peer.addr], "pool_size: 2\nenvelope: binary", "", "");
    let broker = start_broker(&cfg).await;
    let url = broker.url("/ws/echo");
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(connect(&url, &[]).await.0);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                for k in 0..5 {
                    ws.send(Message::text(format!("{i}:{k}"))).await.unwrap();
                }
                for k in 0..5 {
                    assert_eq!(
                        next_message(&mut ws).await,
                        Some(Message::text(format!("{i}:{k}")))
                    );
                }
                ws
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(within("client", t).await.unwrap());
    }
    assert_eq!(
        peer.total_connections(),
        2,
        "the upstream saw exactly pool_size sockets"
    );
    assert_eq!(peer.open_connections(), 2);
    assert_eq!(peer.open_sessions(), 1000);
    let m = broker.metrics().await;
    assert_eq!(
        m.value("muxgate_sessions_active", &[("mode", "multiplexed")]),
        1000.0
    );
    assert_eq!(
        m.value("muxgate_mux_connections", &[("state", "live")]),
        2.0
    );
    drop(clients);
}

/// Kill one of two targets mid-traffic: no client is disconnected, the
/// survivor sees `resumed` opens, and every message a client sent after the
/// kill arrives exactly once, but for the first few, which the broker may
/// have written into the dead socket before it noticed (mux-protocol.md §5.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_rebinds_sessions_in_order_without_duplicates() {
    /// Messages per client that may go into the dead socket: the broker
    /// notices at its next write or read there, so a handful at most.
    const MOST_LOST_IN_A_DEAD_SOCKET: u32 = 10;
    let mut a = MuxPeer::start(Behavior::Echo).await;
    let mut b = MuxPeer::start(Behavior::Echo).await;
    let cfg = mux_config(
        &[a.addr, b.addr],
        "pool_size: 2\nresume_timeout: 5s\nresume_buffer: 1000",
        "health_checks: {threshold: 1, interval: 60}",
        "",
    );
    let broker = start_broker(&cfg).await;
    let url = broker.url("/ws/echo");
    let clients = 40;
    let mut sockets = Vec::new();
    for _ in 0..clients {
        sockets.push(connect(&url, &[]).await.0);
    }
    // Every session is open on one of the two targets.
    let (mut on_a, mut opened) = (0, 0);
    while opened < clients {
        tokio::select! {
            e = a.next_event() => if matches!(e, PeerEvent::Open { .. }) { on_a += 1; opened += 1 },
            e = b.next_event() => if matches!(e, PeerEvent::Open { .. }) { opened += 1 },
        }
    }
    assert!(
        on_a > 0 && on_a < clients,
        "sessions spread over both targets ({on_a} on a)"
    );

    // Client i sends "i:k" for k = 0, 1, ... until 50 messages after it saw
    // the kill, then "i:end"; it collects the echoes until "end".
    let (kill_tx, kill_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let killed = kill_rx.clone();
            tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let sender = async {
                    let (mut k, mut first_after) = (0u32, None);
                    loop {
                        if first_after.is_none() && *killed.borrow() {
                            first_after = Some(k);
                        }
                        if first_after.is_some_and(|f| k >= f + 50) {
                            break;
                        }
                        tx.send(Message::text(format!("{i}:{k}"))).await.unwrap();
                        k += 1;
                        // Interleave with the other clients and the kill.
                        tokio::task::yield_now().await;
                    }
                    tx.send(Message::text(format!("{i}:end"))).await.unwrap();
                    (first_after.unwrap(), tx)
                };
                let receiver = async {
                    let mut got = Vec::new();
                    loop {
                        match within("echo", rx.next()).await {
                            Some(Ok(Message::Text(t))) => {
                                let (c, k) = t.split_once(':').unwrap();
                                assert_eq!(c.parse::<usize>().unwrap(), i, "only its own replies");
                                if k == "end" {
                                    break got;
                                }
                                got.push(k.parse::<u32>().unwrap());
                            }
                            Some(Ok(Message::Close(f))) => panic!("client {i} closed: {f:?}"),
                            Some(Ok(_)) => {}
                            other => panic!("client {i} lost: {other:?}"),
                        }
                    }
                };
                let ((first_after, _tx), got) = tokio::join!(sender, receiver);
                (i, first_after, got)
            })
        })
        .collect();
    // Let traffic flow, then kill target a.
    a.wait_for("traffic on a", |e| matches!(e, PeerEvent::Message { .. }))
        .await;
    a.kill().await;
    kill_tx.send_replace(true);

    for t in tasks {
        let (i, first_after, got) = within("client task", t).await.unwrap();
        let tail: Vec<u32> = got.iter().copied().filter(|k| *k >= first_after).collect();
        // §5.3: what the broker wrote into the dead socket before it saw the
        // death may be lost, and that can only be the first few messages
        // after the kill; from the first one delivered on, every message
        // arrives once, in order (re-sent after the resumed `open`).
        let resumed_from = tail.first().copied().unwrap_or(first_after + 50);
        assert!(
            resumed_from - first_after <= MOST_LOST_IN_A_DEAD_SOCKET,
            "client {i}: lost {} messages after the kill: {tail:?}",
            resumed_from - first_after
        );
        let expected: Vec<u32> = (resumed_from..first_after + 50).collect();
        assert_eq!(
            tail, expected,
            "client {i}: every message after the kill, once, in order"
        );
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "client {i}: nothing twice");
    }
    // The survivor saw the moved sessions re-opened as resumed.
    let mut resumed = 0;
    while let Some(e) = b.try_next_event() {
        if let PeerEvent::Open { resumed: true, .. } = e {
            resumed += 1;
        }
    }
    assert_eq!(
        resumed, on_a,
        "every session of the dead target resumed on the survivor"
    );
    let m = broker.metrics().await;
    assert_eq!(m.value("muxgate_sessions_rebound_total", &[]), on_a as f64);
}

/// No live mux connection: a client waits up to handshake_timeout, then 503.
#[tokio::test]
async fn no_mux_connection_is_503() {
    let dead = refused_addr().await;
    let cfg = mux_config(&[dead], "handshake_timeout: 300ms", "", "");
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    let (status, _, _) = raw_http(a, &upgrade_request(a, "/ws/echo", "")).await;
    assert_eq!(status, 503);
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_handshakes_rejected_total",
            &[("reason", "no_mux_connection")]
        ),
        1.0
    );
}

/// An upstream that does not select the offered subprotocol is dropped and
/// counted as a failure of the target.
#[tokio::test]
async fn upstream_must_select_the_mux_subprotocol() {
    let peer = MuxPeer::start(Behavior::RejectSubprotocol).await;
    let cfg = mux_config(
        &[peer.addr],
        "handshake_timeout: 300ms\npool_size: 1",
        "",
        "",
    );
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        503
    );
    let m = broker.metrics().await;
    assert!(
        m.value(
            "muxgate_upstream_connect_failures_total",
            &[("reason", "subprotocol")]
        ) >= 1.0
    );
}

/// With the only target gone, sessions wait resume_timeout and close with 1013.
#[tokio::test]
async fn sessions_close_with_1013_when_no_connection_returns() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let cfg = mux_config(&[peer.addr], "pool_size: 1\nresume_timeout: 300ms", "", "");
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    peer.next_open().await;
    peer.kill().await;
    assert_eq!(expect_close(&mut ws).await.0, 1013);
}

/// A session whose held messages overflow resume_buffer closes with 1013.
#[tokio::test]
async fn resume_buffer_overflow_is_1013() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let cfg = mux_config(
        &[peer.addr],
        "pool_size: 1\nresume_timeout: 10s\nresume_buffer: 4",
        "",
        "",
    );
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    peer.next_open().await;
    peer.kill().await;
    for k in 0..10 {
        if ws.send(Message::text(k.to_string())).await.is_err() {
            break;
        }
    }
    assert_eq!(expect_close(&mut ws).await.0, 1013);
}

/// Shutdown closes multiplexed clients with 1001 and tells the upstream.
#[tokio::test]
async fn shutdown_closes_multiplexed_sessions_with_1001() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let broker = start_broker(&mux_config(&[peer.addr], "pool_size: 1", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (_, session, _) = peer.next_open().await;
    broker.shutdown.begin();
    assert_eq!(expect_close(&mut ws).await.0, 1001);
    expect_end(&mut ws).await;
    match peer
        .wait_for("close", |e| matches!(e, PeerEvent::Close { .. }))
        .await
    {
        PeerEvent::Close {
            session: s, code, ..
        } => assert_eq!((s, code), (session, 1001)),
        _ => unreachable!(),
    }
    let outcome = within("drain", broker.task).await.unwrap();
    assert_eq!(outcome, muxgate::shutdown::DrainOutcome::Drained);
}
