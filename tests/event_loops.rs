//! Thread-per-core serving (`server.workers`): sessions accepted by any of
//! the event loops relay in both modes, each loop's accepts are counted,
//! and shutdown drains the sessions of every loop.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use common::upstream::TestUpstream;
use common::*;
use futures_util::SinkExt;
use mux_peer::{Behavior, MuxPeer};
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
