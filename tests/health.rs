//! Health checks and load balancing through the running broker.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::upstream::{HealthUpstream, TestUpstream};
use common::*;
use mux_peer::{Behavior, MuxPeer, PeerEvent};
use tokio_tungstenite::tungstenite::Message;

async fn admin_upstreams(broker: &Running) -> serde_json::Value {
    let (status, _, body) = http_get(broker.admin_addr, "/admin/upstreams").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).expect("JSON")
}

/// The admin view of one target: (healthy, passive state).
async fn target_state(broker: &Running, target: SocketAddr) -> (bool, String) {
    let v = admin_upstreams(broker).await;
    let url = format!("ws://{target}");
    let t = v[0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["url"] == url.as_str())
        .expect("target listed")
        .clone();
    (
        t["healthy"].as_bool().unwrap(),
        t["passive"].as_str().unwrap().to_string(),
    )
}

/// A target killed mid-run is taken out after `threshold` failures, gets no
/// new sessions (clients never see it: the broker moves on to the next
/// target), and is used again once it is back and its trial succeeds.
#[tokio::test]
async fn a_dead_target_is_taken_out_and_used_again_when_it_returns() {
    let mut a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let a_addr = a.addr;
    let cfg = direct_config(
        &[a.addr, b.addr],
        "",
        "health_checks: {threshold: 2, interval: 60, passive_backoff: 100ms, passive_backoff_max: 200ms}",
        "",
    );
    let broker = start_broker(&cfg).await;
    let url = broker.url("/ws/echo");
    // Round robin: one session on each target.
    let (mut c1, _) = connect(&url, &[]).await;
    let (_c2, _) = connect(&url, &[]).await;
    a.handshake().await;
    drop(a); // the target dies: its port refuses connections

    // Its session's loss is the first failure. Awaited, so that it is
    // counted before the new sessions' connects rather than racing them
    // (the broker records it before it closes the client).
    expect_close(&mut c1).await;

    // Every client still gets a session; a takes two failures and is out.
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (mut ws, _) = connect(&url, &[]).await;
        echo_roundtrip(&mut ws, Message::text("via b")).await;
        clients.push(ws);
    }
    let (healthy, passive) = target_state(&broker, a_addr).await;
    assert!(!healthy);
    assert_eq!(passive, "unhealthy");
    let m = broker.metrics().await;
    let a_label = format!("ws://{a_addr}");
    let failures = m.value(
        "muxgate_health_checks_total",
        &[("target", &a_label), ("outcome", "failure")],
    );
    assert_eq!(
        failures, 2.0,
        "exactly threshold attempts reached the dead target"
    );
    assert_eq!(
        m.value("muxgate_target_healthy", &[("target", &a_label)]),
        0.0
    );

    // It comes back: after its backoff a trial session reaches it.
    let mut a = TestUpstream::start_on(a_addr).await;
    let mut reached = false;
    for _ in 0..200 {
        let (mut ws, _) = connect(&url, &[]).await;
        echo_roundtrip(&mut ws, Message::text("ping")).await;
        if let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), a.seen.recv()).await
        {
            reached = true;
            break;
        }
    }
    assert!(reached, "the returned target got a session again");
    let (healthy, passive) = target_state(&broker, a_addr).await;
    assert!(healthy, "the trial's success closed the circuit");
    assert_eq!(passive, "healthy");
}

/// An active check against a real HTTP endpoint that answers 500 takes the
/// target out; once it answers 200 again it comes back.
#[tokio::test]
async fn active_checks_flip_a_target_out_and_back() {
    let mut h = HealthUpstream::start().await;
    let other = HealthUpstream::start().await;
    let cfg = direct_config(
        &[h.addr, other.addr],
        "",
        "health_checks: {path: /health, active_interval: 20ms, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 2, headers: {x-probe: muxgate}}",
        "",
    );
    let broker = start_broker(&cfg).await;
    assert_eq!(h.probe().await, 200);
    h.set_status(500);
    // Two 500s flip it; a third probe proves the second was recorded.
    while h.probe().await != 500 {}
    h.probe().await;
    h.probe().await;
    assert!(!target_state(&broker, h.addr).await.0);
    let before = h.sessions.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..6 {
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        echo_roundtrip(&mut ws, Message::text("elsewhere")).await;
    }
    assert_eq!(
        h.sessions.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "no sessions while down"
    );

    h.set_status(200);
    while h.probe().await != 200 {}
    h.probe().await;
    h.probe().await;
    assert!(target_state(&broker, h.addr).await.0);
    for _ in 0..4 {
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        echo_roundtrip(&mut ws, Message::text("back")).await;
    }
    assert!(
        h.sessions.load(std::sync::atomic::Ordering::SeqCst) > before,
        "used again"
    );
    let m = broker.metrics().await;
    let label = format!("ws://{}", h.addr);
    assert!(
        m.value(
            "muxgate_health_checks_total",
            &[
                ("target", &label),
                ("kind", "active"),
                ("outcome", "failure")
            ]
        ) >= 2.0
    );
}

/// Weights 3:1 split 4,000 sessions within 5% of 3:1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_sessions() {
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let yaml = direct_config(&[a.addr, b.addr], "", "", "").replace(
        &format!("url: ws://{}\n", a.addr),
        &format!("url: ws://{}\n        weight: 3\n", a.addr),
    );
    let broker = start_broker(&yaml).await;
    let url = broker.url("/ws/echo");
    for _ in 0..4000 {
        let (mut ws, _) = connect(&url, &[]).await;
        ws.close(None).await.unwrap();
    }
    let m = broker.metrics().await;
    let on_a = m.value(
        "muxgate_target_picks_total",
        &[("target", &format!("ws://{}", a.addr))],
    );
    let on_b = m.value(
        "muxgate_target_picks_total",
        &[("target", &format!("ws://{}", b.addr))],
    );
    assert_eq!(on_a + on_b, 4000.0);
    let ratio = on_a / on_b;
    assert!(
        (ratio - 3.0).abs() <= 0.15,
        "split {on_a}:{on_b} is not within 5% of 3:1"
    );
}

/// consistent_hash: the same key always reaches the same target, and taking
/// one of four targets away moves only the keys that were on it.
#[tokio::test]
async fn consistent_hash_keeps_keys_on_their_targets() {
    let mut targets: Vec<TestUpstream> = Vec::new();
    for _ in 0..4 {
        targets.push(TestUpstream::start().await);
    }
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
    let cfg = direct_config(
        &addrs,
        "",
        "load_balancing: consistent_hash\nhash_on: header:x-user-id\nforward_headers: [x-user-id]\nhealth_checks: {threshold: 1, interval: 60, passive_backoff: 1m}",
        "",
    );
    let broker = start_broker(&cfg).await;
    let url = broker.url("/ws/echo");

    /// Which target each user's session reached (by the handshakes the
    /// targets saw, carrying the forwarded x-user-id).
    async fn placement(
        url: &str,
        targets: &mut [(usize, TestUpstream)],
        users: usize,
    ) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for u in 0..users {
            let user = format!("user-{u}");
            let (ws, _) = connect(url, &[("x-user-id", &user)]).await;
            for (i, t) in targets.iter_mut() {
                while let Ok(e) = t.seen.try_recv() {
                    if let common::upstream::Seen::Handshake { headers, .. } = e {
                        if header(&headers, "x-user-id") == Some(user.as_str()) {
                            out.insert(user.clone(), *i);
                        }
                    }
                }
            }
            assert!(out.contains_key(&user), "a target saw {user}'s session");
            drop(ws);
        }
        out
    }
    let mut targets: Vec<(usize, TestUpstream)> = targets.into_iter().enumerate().collect();
    let first = placement(&url, &mut targets, 200).await;
    let again = placement(&url, &mut targets, 200).await;
    assert_eq!(first, again, "the same key reaches the same target");
    let used: std::collections::HashSet<_> = first.values().collect();
    assert_eq!(used.len(), 4, "keys spread over all four targets");

    // Target 2 goes away.
    drop(targets.remove(2));
    let after = placement(&url, &mut targets, 200).await;
    for (user, was) in &first {
        if *was == 2 {
            assert_ne!(after[user], 2);
        } else {
            assert_eq!(after[user], *was, "{user} moved although its target stayed");
        }
    }
}

/// With every target down: direct mode answers 502 while it tries them,
/// then 503 once all are out.
#[tokio::test]
async fn every_target_down_is_503_in_direct_mode() {
    let a = TestUpstream::start().await;
    let b = TestUpstream::start().await;
    let cfg = direct_config(
        &[a.addr, b.addr],
        "",
        "health_checks: {threshold: 1, interval: 60, passive_backoff: 1m}",
        "",
    );
    let broker = start_broker(&cfg).await;
    drop(a);
    drop(b);
    let addr = broker.client_addr;
    assert_eq!(
        raw_http(addr, &upgrade_request(addr, "/ws/echo", ""))
            .await
            .0,
        502
    );
    assert_eq!(
        raw_http(addr, &upgrade_request(addr, "/ws/echo", ""))
            .await
            .0,
        503
    );
}

/// A multiplexed upstream whose only target dies reconnects its pool to it
/// when it returns, without a restart.
#[tokio::test]
async fn the_mux_pool_reconnects_to_a_returning_target() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let addr = peer.addr;
    let cfg = mux_config(
        &[addr],
        "pool_size: 1\nresume_timeout: 200ms",
        "health_checks: {threshold: 1, interval: 60, passive_backoff: 100ms, passive_backoff_max: 200ms}",
        "",
    );
    let broker = start_broker(&cfg).await;
    peer.wait_for("hello", |e| matches!(e, PeerEvent::Hello { .. }))
        .await;
    peer.kill().await;
    drop(peer);
    let mut back = MuxPeer::start_on(addr, Behavior::Echo).await;
    back.wait_for("the pool to reconnect", |e| {
        matches!(e, PeerEvent::Hello { .. })
    })
    .await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::text("reconnected")).await;
    let v = admin_upstreams(&broker).await;
    assert_eq!(v[0]["pool"]["live"], 1);
    assert_eq!(v[0]["mode"], "multiplexed");
}

/// Phases of the traffic in the recovered-target test: what the broker's
/// pool was doing when a message was sent.
const BEFORE_KILL: u8 = 0;
const AFTER_KILL: u8 = 1;
/// From the restart of the killed target on, through the pool's move.
const AFTER_RESTART: u8 = 2;
const STOPPED: u8 = 3;

/// What one client sent and got back: (phase, sequence number) each.
struct Traffic {
    sent: Vec<(u8, u64)>,
    echoed: Vec<(u8, u64)>,
    ws: Client,
}

/// Sends a numbered message every 10 ms, tagged with the phase, and keeps
/// every echo, until the phase is [`STOPPED`]; then awaits the echo of
/// every message sent after the restart. Any end of the session fails.
async fn traffic(
    client: usize,
    ws: Client,
    mut phase: tokio::sync::watch::Receiver<u8>,
) -> Traffic {
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut stream) = ws.split();
    let (mut sent, mut echoed) = (Vec::new(), Vec::new());
    let parse = |msg: Option<Result<Message, _>>| -> (u8, u64) {
        let msg = match msg {
            Some(Ok(Message::Text(text))) => text,
            other => panic!("client {client}: the session ended or sent no text: {other:?}"),
        };
        let mut fields = msg.split(' ').map(|f| f.parse::<u64>().unwrap());
        assert_eq!(
            fields.next(),
            Some(client as u64),
            "client {client} got {msg}"
        );
        (fields.next().unwrap() as u8, fields.next().unwrap())
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    let mut seq = 0;
    loop {
        let now = *phase.borrow_and_update();
        if now == STOPPED {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                sink.send(Message::text(format!("{client} {now} {seq}"))).await.unwrap();
                sent.push((now, seq));
                seq += 1;
            }
            msg = stream.next() => echoed.push(parse(msg)),
            _ = phase.changed() => {}
        }
    }
    let awaited = sent.iter().filter(|m| m.0 == AFTER_RESTART).count();
    within("every echo of the messages sent after the restart", async {
        while echoed.iter().filter(|m| m.0 == AFTER_RESTART).count() < awaited {
            echoed.push(parse(stream.next().await));
        }
    })
    .await;
    Traffic {
        sent,
        echoed,
        ws: sink.reunite(stream).expect("halves of one socket"),
    }
}

/// When one of two targets dies, the pool's connections move to the other;
/// once it is back in rotation the pool moves one connection back to it,
/// one at a time, without ending a session, losing, repeating or
/// reordering a message sent from then on.
#[tokio::test]
async fn the_pool_spreads_over_a_recovered_target_again() {
    const CLIENTS: usize = 16;
    let backoff = std::time::Duration::from_secs(1);
    let mut a = MuxPeer::start(Behavior::Echo).await;
    let mut b = MuxPeer::start(Behavior::Echo).await;
    let a_addr = a.addr;
    let broker = start_broker(&mux_config(
        &[a_addr, b.addr],
        "pool_size: 2\nenvelope: binary",
        "health_checks: {threshold: 1, interval: 60, passive_backoff: 1s, passive_backoff_max: 2s}",
        "",
    ))
    .await;
    let hello = |e: &PeerEvent| matches!(e, PeerEvent::Hello { .. });
    a.wait_for("the pool's connection to A", hello).await;
    b.wait_for("the pool's connection to B", hello).await;

    let (phase, phases) = tokio::sync::watch::channel(BEFORE_KILL);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        echo_roundtrip(&mut ws, Message::text("hello")).await;
        clients.push(tokio::spawn(traffic(i, ws, phases.clone())));
    }
    assert!(a.open_sessions() > 0 && b.open_sessions() > 0);

    a.kill().await;
    drop(a);
    phase.send_replace(AFTER_KILL);
    b.wait_for("A's slot to reconnect to B", hello).await;

    let mut a = MuxPeer::start_on(a_addr, Behavior::Echo).await;
    let restarted = tokio::time::Instant::now();
    phase.send_replace(AFTER_RESTART);
    a.wait_for("the pool to move a connection to A", hello)
        .await;
    b.wait_for("the moved connection to close", |e| {
        matches!(e, PeerEvent::Disconnected { .. })
    })
    .await;
    let moved_after = restarted.elapsed();
    assert!(
        moved_after <= backoff + std::time::Duration::from_secs(3),
        "the pool moved {moved_after:?} after the restart"
    );
    // Traffic on the moved connection, then the end.
    a.wait_for("a message on the moved connection", |e| {
        matches!(e, PeerEvent::Message { .. })
    })
    .await;
    phase.send_replace(STOPPED);

    let mut lost_before_restart = 0;
    let mut still_open = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let Traffic {
            sent,
            echoed,
            mut ws,
        } = client.await.expect("client task");
        let mut seen = std::collections::HashSet::new();
        for m in &echoed {
            assert!(seen.insert(*m), "client {i} got {m:?} twice");
        }
        let after: Vec<u64> = echoed
            .iter()
            .filter(|m| m.0 == AFTER_RESTART)
            .map(|m| m.1)
            .collect();
        let sent_after: Vec<u64> = sent
            .iter()
            .filter(|m| m.0 == AFTER_RESTART)
            .map(|m| m.1)
            .collect();
        assert!(!sent_after.is_empty());
        assert_eq!(
            after, sent_after,
            "client {i}: every message once, in order"
        );
        lost_before_restart += sent.len() - echoed.len();
        // The session is still the same one, and still answers.
        echo_roundtrip(&mut ws, Message::text(format!("{i} 9 0"))).await;
        still_open.push(ws);
    }
    // Only messages written to the killed target's socket may be lost
    // (mux-protocol.md §5.3): at most the few in flight when it died.
    assert!(
        lost_before_restart <= CLIENTS * 3,
        "{lost_before_restart} lost"
    );
    assert_eq!(a.open_sessions() + b.open_sessions(), CLIENTS);
    assert_eq!((a.open_connections(), b.open_connections()), (1, 1));

    let m = broker.metrics().await;
    let moved = m.value(
        "muxgate_mux_connections_moved_total",
        &[("to", &format!("ws://{a_addr}"))],
    );
    assert_eq!(moved, 1.0);
    let v = admin_upstreams(&broker).await;
    assert_eq!(v[0]["pool"]["live"], 2);
}
