//! Flow control (mux-protocol.md §6): a slow client is closed without
//! slowing its neighbours. Alone in its own test binary because it compares
//! message rates, which other tests running in parallel would disturb.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::time::Instant;

use common::*;
use mux_peer::{Behavior, MuxPeer, OutFrame, Payload, PeerEvent};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// A client that stops reading is closed with 1008 "slow consumer"; while
/// it is stalled, a neighbour on the same mux connection keeps at least 90%
/// of the message rate it has without a stalled client.
///
/// Message rates of a test that shares this 2-core machine with its own
/// broker and peer vary by ±20% from round to round, so each comparison is
/// of medians over rounds, and up to three stalled clients are tried: a real
/// stall (a neighbour waiting on the slow client) fails every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_neighbours_keep_flowing() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let cfg = mux_config(&[peer.addr], "pool_size: 1\nclient_queue: 1000", "", "");
    let broker = start_broker(&cfg).await;
    let (mut neighbour, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (conn, _, _) = peer.next_open().await;

    async fn neighbour_rate(ws: &mut Client) -> f64 {
        let mut rates = Vec::new();
        for _ in 0..5 {
            let n = 300;
            let started = Instant::now();
            for k in 0..n {
                echo_roundtrip(ws, Message::text(k.to_string())).await;
            }
            rates.push(n as f64 / started.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    }
    async fn flood(peer: &MuxPeer, conn: u64, session: Uuid, range: std::ops::Range<usize>) {
        for k in range {
            // 4 KiB each, so the stalled client's socket buffers fill fast.
            let payload = Payload::Text(format!("{k:>4096}"));
            peer.send(conn, OutFrame::Message { session, payload })
                .await;
        }
    }

    let mut attempts = Vec::new();
    for attempt in 1..=3 {
        let (mut slow, _) = connect(&broker.url("/ws/echo"), &[]).await;
        let (_, slow_id, _) = peer.next_open().await;
        let unstalled = neighbour_rate(&mut neighbour).await;
        // Stall the slow client: its socket buffers fill and its session's
        // queue holds the rest (below client_queue).
        flood(&peer, conn, slow_id, 0..1500).await;
        // The neighbour's echo travels behind the flood on the shared mux
        // connection: once it is back, the broker has dispatched the flood,
        // and what is measured next is the stalled state alone.
        echo_roundtrip(&mut neighbour, Message::text("after the flood")).await;
        let stalled = neighbour_rate(&mut neighbour).await;
        // Overflow its queue: it is closed, and the neighbour goes on.
        flood(&peer, conn, slow_id, 1500..4000).await;
        echo_roundtrip(&mut neighbour, Message::text("still here")).await;

        // Reading now shows what the socket buffers and queue held, then the 1008.
        let mut seen = 0;
        let (code, reason) = loop {
            match next_message(&mut slow).await {
                Some(Message::Text(_)) => seen += 1,
                Some(Message::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
                other => panic!("expected the slow-consumer close, got {other:?}"),
            }
        };
        assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
        assert!(seen < 4000, "the flood was cut off ({seen} delivered)");
        let m = broker.metrics().await;
        assert_eq!(
            m.value("muxgate_slow_consumer_closes_total", &[]),
            attempt as f64
        );
        // The upstream was told.
        match peer
            .wait_for("close", |e| matches!(e, PeerEvent::Close { .. }))
            .await
        {
            PeerEvent::Close { session, code, .. } => assert_eq!((session, code), (slow_id, 1008)),
            _ => unreachable!(),
        }
        attempts.push(format!("{stalled:.0}/s stalled vs {unstalled:.0}/s"));
        if stalled >= 0.9 * unstalled {
            return;
        }
    }
    panic!("the neighbour's rate fell below 90% while a client was stalled: {attempts:?}");
}
