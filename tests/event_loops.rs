//! Thread-per-core serving (`server.workers`): sessions accepted by any of
//! the event loops relay in both modes, each loop's accepts are counted,
//! and shutdown drains the sessions of every loop.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use common::upstream::TestUpstream;
use common::*;
use futures_util::SinkExt;
use mux_peer::{Behavior, MuxPeer, PeerEvent};
use muxgate::shutdown::DrainOutcome;
use tokio_tungstenite::tungstenite::Message;

const LOOPS: usize = 4;
const CLIENTS: usize = 64;

/// Accepts per event loop, from `muxgate_connections_accepted_total`.
async fn accepts_per_loop(broker: &Running) -> Vec<f64> {
    let m = broker.metrics().await;
    (0..LOOPS)
        .map(|i| {
            m.value(
                "muxgate_connections_accepted_total",
                &[("event_loop", &i.to_string())],
            )
        })
        .collect()
}

/// Opens `CLIENTS` sessions, echoes one message on each, and returns them.
async fn open_and_echo(broker: &Running) -> Vec<Client> {
    let url = broker.url("/ws/echo");
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let (mut ws, _) = connect(&url, &[]).await;
        echo_roundtrip(&mut ws, Message::text(format!("hello {i}"))).await;
        clients.push(ws);
    }
    clients
}

/// The `server` lines of both tests' configs.
fn server_settings() -> String {
    format!("workers: {LOOPS}\nshutdown_grace: 5s")
}

/// Begins shutdown and expects every client closed with 1001, then the end.
async fn expect_all_closed_by_shutdown(broker: &Running, clients: &mut [Client]) {
    broker.shutdown.begin();
    for ws in clients {
        assert_eq!(expect_close(ws).await.0, 1001);
        expect_end(ws).await;
    }
}

/// Every accepted connection is counted on exactly one loop, more than one
/// loop takes connections, and the sessions of all of them relay.
fn assert_spread(per_loop: &[f64]) {
    assert_eq!(
        per_loop.iter().sum::<f64>(),
        CLIENTS as f64,
        "each connection is accepted once: {per_loop:?}"
    );
    let busy = per_loop.iter().filter(|&&n| n > 0.0).count();
    assert!(
        busy > 1,
        "connections should spread over the {LOOPS} loops, got {per_loop:?}"
    );
}

/// Direct sessions on every loop echo both ways and, at shutdown, are all
/// closed with 1001 (client and upstream alike) before the drain ends.
#[tokio::test]
async fn direct_sessions_on_every_loop_relay_and_drain() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", &server_settings())).await;
    let mut clients = open_and_echo(&broker).await;
    assert_spread(&accepts_per_loop(&broker).await);
    // A second message on every session, all in flight at once.
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::binary(vec![i as u8; 3000])).await.unwrap();
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(
            next_message(ws).await,
            Some(Message::binary(vec![i as u8; 3000]))
        );
    }

    expect_all_closed_by_shutdown(&broker, &mut clients).await;
    for _ in 0..CLIENTS {
        assert_eq!(up.close().await.0, 1001);
    }
    assert_eq!(broker.stop().await, DrainOutcome::Drained);
}

/// Multiplexed sessions accepted on other loops than the pool's share its
/// connections: every client gets its own echoes, and all drain.
#[tokio::test]
async fn multiplexed_sessions_on_every_loop_share_the_pool() {
    let peer = MuxPeer::start(Behavior::Echo).await;
    let broker = start_broker(&mux_config(
        &[peer.addr],
        "pool_size: 2\nenvelope: binary",
        "",
        &server_settings(),
    ))
    .await;
    let mut clients = open_and_echo(&broker).await;
    assert_spread(&accepts_per_loop(&broker).await);
    assert_eq!(peer.total_connections(), 2);
    assert_eq!(peer.open_sessions(), CLIENTS);

    expect_all_closed_by_shutdown(&broker, &mut clients).await;
    assert_eq!(broker.stop().await, DrainOutcome::Drained);
}

/// With a pool connection on every loop, the slots are spread one per
/// loop, and each session binds to the connection on the loop that
/// accepted it, so no message crosses from one loop's thread to another.
#[tokio::test]
async fn multiplexed_sessions_bind_to_the_connection_on_their_own_loop() {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let broker = start_broker(&mux_config(
        &[peer.addr],
        &format!("pool_size: {LOOPS}\nenvelope: binary"),
        "",
        &server_settings(),
    ))
    .await;
    // A connection answers a ping only once it serves sessions, which is
    // after it is offered to them.
    let mut conns = Vec::new();
    while conns.len() < LOOPS {
        if let PeerEvent::Hello { conn, .. } = peer
            .wait_for("hello", |e| matches!(e, PeerEvent::Hello { .. }))
            .await
        {
            conns.push(conn);
        }
    }
    for &conn in &conns {
        peer.send_raw(conn, Message::Ping(Default::default())).await;
    }
    let mut answered = Vec::new();
    while answered.len() < LOOPS {
        if let PeerEvent::Pong { conn } = peer
            .wait_for("pong", |e| matches!(e, PeerEvent::Pong { .. }))
            .await
        {
            answered.push(conn);
        }
    }

    let url = broker.url("/ws/echo");
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(connect(&url, &[]).await.0);
        peer.wait_for("open", |e| matches!(e, PeerEvent::Open { .. }))
            .await;
    }
    let per_loop = accepts_per_loop(&broker).await;
    assert_spread(&per_loop);
    let (status, _, body) = http_get(broker.admin_addr, "/admin/upstreams").await;
    assert_eq!(status, 200);
    let upstreams: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let connections = upstreams[0]["pool"]["connections"]
        .as_array()
        .expect("pool connections");
    let mut loops: Vec<u64> = connections
        .iter()
        .map(|c| c["event_loop"].as_u64().expect("event_loop"))
        .collect();
    loops.sort_unstable();
    assert_eq!(loops, (0..LOOPS as u64).collect::<Vec<_>>(), "{upstreams}");
    for c in connections {
        let event_loop = c["event_loop"].as_u64().unwrap() as usize;
        assert_eq!(
            c["sessions"].as_u64(),
            Some(per_loop[event_loop] as u64),
            "the sessions accepted on loop {event_loop} bind to its connection: {upstreams}"
        );
    }

    expect_all_closed_by_shutdown(&broker, &mut clients).await;
    assert_eq!(broker.stop().await, DrainOutcome::Drained);
}

/// Sessions a pool of two connections on two loops is tested with.
const BALANCED: usize = 200;

/// Opens [`BALANCED`] multiplexed sessions through a broker with two loops
/// and `pool_size: 2`, one after another or all at once, and checks that
/// the loops took them no worse than 40/60, that no connection carries
/// fewer than half its fair share, and that a broadcast to "every session
/// on the connection" reaches exactly the sessions opened on it.
async fn sessions_spread_over_loops_and_connections(all_at_once: bool) {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let broker = start_broker(&mux_config(
        &[peer.addr],
        "pool_size: 2\nenvelope: binary",
        "",
        "workers: 2\nshutdown_grace: 5s",
    ))
    .await;
    let url = broker.url("/ws/echo");
    let mut clients = if all_at_once {
        let connects = (0..BALANCED).map(|_| connect(&url, &[]));
        futures_util::future::join_all(connects)
            .await
            .into_iter()
            .map(|(ws, _)| ws)
            .collect::<Vec<_>>()
    } else {
        let mut clients = Vec::with_capacity(BALANCED);
        for _ in 0..BALANCED {
            clients.push(connect(&url, &[]).await.0);
        }
        clients
    };

    let m = broker.metrics().await;
    let per_loop: Vec<f64> = (0..2)
        .map(|i| {
            m.value(
                "muxgate_connections_accepted_total",
                &[("event_loop", &i.to_string())],
            )
        })
        .collect();
    assert_eq!(
        per_loop.iter().sum::<f64>(),
        BALANCED as f64,
        "{per_loop:?}"
    );
    for n in &per_loop {
        assert!(
            (80.0..=120.0).contains(n),
            "the loops should take 200 connections no worse than 40/60: {per_loop:?}"
        );
    }

    // Which connection each client's session is on: each says who it is.
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::text(format!("client {i}"))).await.unwrap();
    }
    let mut conn_of = vec![0; BALANCED];
    let mut per_conn = std::collections::BTreeMap::<u64, usize>::new();
    for _ in 0..BALANCED {
        if let PeerEvent::Message { conn, payload, .. } = peer
            .wait_for("a client's message", |e| {
                matches!(e, PeerEvent::Message { .. })
            })
            .await
        {
            let mux_peer::Payload::Text(text) = payload else {
                panic!("a text message was sent");
            };
            let i: usize = text.strip_prefix("client ").unwrap().parse().unwrap();
            conn_of[i] = conn;
            *per_conn.entry(conn).or_default() += 1;
        }
    }
    assert_eq!(per_conn.len(), 2, "{per_conn:?}");
    for (conn, sessions) in &per_conn {
        assert!(
            *sessions >= BALANCED / 4,
            "connection {conn} carries {sessions} of {BALANCED} sessions: {per_conn:?}"
        );
    }

    // A broadcast to every session on each connection, then one more
    // message on each: every client gets its own connection's broadcast
    // and nothing else before that message.
    for conn in per_conn.keys() {
        let payload = mux_peer::Payload::Text(format!("broadcast {conn}"));
        peer.send(
            *conn,
            mux_peer::OutFrame::Broadcast {
                sessions: None,
                payload,
            },
        )
        .await;
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(
            next_message(ws).await,
            Some(Message::text(format!("broadcast {}", conn_of[i]))),
            "client {i}"
        );
    }
    for conn in per_conn.keys() {
        let payload = mux_peer::Payload::Text("after".into());
        peer.send(
            *conn,
            mux_peer::OutFrame::Broadcast {
                sessions: None,
                payload,
            },
        )
        .await;
    }
    for ws in clients.iter_mut() {
        assert_eq!(next_message(ws).await, Some(Message::text("after")));
    }

    expect_all_closed_by_shutdown(&broker, &mut clients).await;
    assert_eq!(broker.stop().await, DrainOutcome::Drained);
}

#[tokio::test]
async fn sessions_opened_one_after_another_spread_over_loops_and_connections() {
    sessions_spread_over_loops_and_connections(false).await;
}

#[tokio::test]
async fn sessions_opened_all_at_once_spread_over_loops_and_connections() {
    sessions_spread_over_loops_and_connections(true).await;
}
