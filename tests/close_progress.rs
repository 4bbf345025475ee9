//! A session always makes progress on its close handshake, whatever its
//! queues hold: randomized sessions mix a replying plugin, upstream echoes,
//! pings every few milliseconds and a client that sends bursts while it
//! reads only part of what came back, in the direct message relay, the
//! direct frame relay and multiplexed mode. Each one ends with the client's
//! close, which must be answered, and the connection ended, within
//! `close_timeout`; and every message is accounted for: answered, or
//! counted as dropped.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::time::Duration;

use common::upstream::TestUpstream;
use common::*;
use futures_util::{SinkExt, StreamExt};
use mux_peer::{Behavior, MuxPeer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SEEDS: u64 = 30;
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
enum Path {
    MessageRelay,
    FrameRelay,
    Multiplexed,
}

/// Every counter that records a message the broker did not deliver.
fn undelivered(m: &Metrics) -> f64 {
    let family = |name: &str| {
        if m.has_family(name) {
            m.value(name, &[])
        } else {
            0.0
        }
    };
    family("muxgate_messages_dropped_total") + family("muxgate_mux_frames_dropped_total")
}

async fn one_session(path: Path, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Pings every few milliseconds, or none during the session.
    let ping = match rng.random_bool(0.5) {
        true => Duration::from_millis(rng.random_range(5..40)),
        false => Duration::from_secs(60),
    };
    let ws_settings = format!(
        "ping_period: {}ms\npong_wait: 120s\nclose_timeout: {}ms\nclient_queue: 4096",
        ping.as_millis(),
        CLOSE_TIMEOUT.as_millis()
    );
    // From nearly every message answered by the plugin to nearly none.
    let rate = [5, 50, 500][rng.random_range(0..3)];
    let plugins = format!("plugins: [{{name: rate_limit, stage: pre_request, settings: {{messages_per_second: {rate}, burst: 10, action: reply}}}}]");
    let plugins = plugins.as_str();
    let (_direct, _mux, yaml) = match path {
        Path::MessageRelay | Path::FrameRelay => {
            let up = TestUpstream::start().await;
            let upstream = if matches!(path, Path::MessageRelay) {
                plugins
            } else {
                ""
            };
            let yaml = direct_config(&[up.addr], &ws_settings, upstream, "");
            (Some(up), None, yaml)
        }
        Path::Multiplexed => {
            let peer = MuxPeer::start(Behavior::Echo).await;
            let yaml = mux_config(
                &[peer.addr],
                &format!("pool_size: 1\n{ws_settings}"),
                plugins,
                "",
            );
            (None, Some(peer), yaml)
        }
    };
    let broker = start_broker(&yaml).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;

    let total = rng.random_range(1..400usize);
    let (mut sent, mut answered) = (0usize, 0usize);
    while sent < total {
        let burst = rng.random_range(1..=50).min(total - sent);
        for _ in 0..burst {
            let size = rng.random_range(1..2000);
            ws.feed(Message::text("x".repeat(size))).await.unwrap();
        }
        ws.flush().await.unwrap();
        sent += burst;
        // Read only part of what is owed: the rest backs up in the broker.
        let owed = sent - answered;
        for _ in 0..rng.random_range(0..=owed) {
            // tungstenite answers the broker's pings as it reads them.
            match next_message(&mut ws).await {
                Some(Message::Text(_)) => answered += 1,
                other => panic!("{path:?} seed {seed}: {other:?} before the client closed"),
            }
        }
    }

    let closed = tokio::time::Instant::now();
    ws.send(Message::Close(Some(CloseFrame {
        code: 1000.into(),
        reason: "done".into(),
    })))
    .await
    .unwrap();
    let code = within("the close answered", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => answered += 1,
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("{path:?} seed {seed}: {other:?} instead of a close"),
            }
        }
    })
    .await;
    expect_end(&mut ws).await;
    let took = closed.elapsed();
    assert_eq!(code, Some(1000), "{path:?} seed {seed}");
    assert!(
        took < CLOSE_TIMEOUT,
        "{path:?} seed {seed}: the session ended {took:?} after the client's close"
    );
    broker
        .metrics_when("every message accounted for", |m| {
            answered as f64 + undelivered(m) == sent as f64
        })
        .await;
    broker.stop().await;
}

#[tokio::test]
async fn every_session_answers_its_close_within_close_timeout() {
    for seed in 0..SEEDS {
        for path in [Path::MessageRelay, Path::FrameRelay, Path::Multiplexed] {
            one_session(path, seed).await;
        }
    }
}
