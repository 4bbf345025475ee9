//! The same client scenarios through the broker against three upstreams:
//! the Python example (`examples/python_upstream`, written from
//! `shared/mux-protocol.md` alone), the Rust library's demo upstream
//! (`muxgate-backend`), in both encodings, and the demo again with the
//! upstream switched to direct mode; both upstreams once more with
//! permessage-deflate on the mux connections (`mux_compression`), Python's
//! being the `websockets` package's own implementation of it.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A config with `/ws/echo` and `/ws/chat` on one upstream in `mode`.
fn config(target: SocketAddr, direct: bool, envelope: &str) -> String {
    config_with(target, direct, envelope, "")
}

/// [`config`] with `ws` added to `websocket_config` (one line).
fn config_with(target: SocketAddr, direct: bool, envelope: &str, ws: &str) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n\
upstreams:\n  - name: demo\n    routes:\n      - external_path: /ws/echo\n        internal_path: /echo\n      \
- external_path: /ws/chat\n        internal_path: /chat\n    targets:\n      - url: ws://{target}\n    \
websocket_config:\n      enable_direct_communication: {direct}\n      envelope: {envelope}\n      pool_size: 2\n      {ws}\n"
    )
}

/// Echo of text and binary (byte-exact, every length class), order, and a
/// client close.
async fn echo_scenario(broker: &Running) {
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    for len in [0usize, 1, 126, 65536] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
        echo_roundtrip(&mut ws, Message::Binary(Bytes::from(bytes))).await;
        let text: String = (0..len).map(|i| ['x', 'ü', '✓', '"'][i % 4]).collect();
        echo_roundtrip(&mut ws, Message::text(text)).await;
    }
    for k in 0..100 {
        ws.send(Message::text(k.to_string())).await.unwrap();
    }
    for k in 0..100 {
        assert_eq!(
            next_message(&mut ws).await,
            Some(Message::text(k.to_string()))
        );
    }
    ws.close(None).await.unwrap();
    expect_end(&mut ws).await;
}

/// The next chat message that is not a "join:" announcement.
async fn next_chat(ws: &mut Client) -> Option<Message> {
    loop {
        match next_message(ws).await {
            Some(Message::Text(t)) if t.as_str().starts_with("join:") => continue,
            other => return other,
        }
    }
}

/// Two chat members: each message reaches both (the upstream fans out
/// with `broadcast`, across mux connections).
async fn chat_scenario(broker: &Running) {
    let (mut a, _) = connect(&broker.url("/ws/chat"), &[]).await;
    let (mut b, _) = connect(&broker.url("/ws/chat"), &[]).await;
    // Each member hears its own join, so the upstream has registered it
    // (the two may sit on different mux connections, which are not ordered).
    for (ws, name) in [(&mut a, "join:a"), (&mut b, "join:b")] {
        ws.send(Message::text(name)).await.unwrap();
        loop {
            match next_message(ws).await {
                Some(Message::Text(t)) if t.as_str() == name => break,
                Some(Message::Text(t)) if t.as_str().starts_with("join:") => continue,
                other => panic!("expected {name}, got {other:?}"),
            }
        }
    }
    a.send(Message::text("from a")).await.unwrap();
    assert_eq!(next_chat(&mut a).await, Some(Message::text("from a")));
    assert_eq!(next_chat(&mut b).await, Some(Message::text("from a")));
    b.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    for ws in [&mut a, &mut b] {
        assert_eq!(next_chat(ws).await, Some(Message::binary(vec![1u8, 2, 3])));
    }
    for ws in [&mut a, &mut b] {
        ws.close(None).await.unwrap();
        expect_end(ws).await;
    }
}

/// Starts the Python example upstream on port 0.
async fn python_upstream() -> (Child, SocketAddr) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python_upstream/upstream.py"
    );
    let mut child = Command::new("python3")
        .args([script, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 is installed (.ci/run installs the websockets package)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = within("the Python upstream to listen", lines.next_line())
        .await
        .unwrap()
        .expect("upstream.py printed `listening HOST:PORT`; is `websockets` installed? (pip install websockets)");
    let addr = line
        .strip_prefix("listening ")
        .expect("listening line")
        .parse()
        .unwrap();
    (child, addr)
}

/// The Python example interoperates through the broker in both encodings.
#[tokio::test]
async fn python_example_upstream_in_both_encodings() {
    let (_child, addr) = python_upstream().await;
    for envelope in ["json", "binary"] {
        let broker = start_broker(&config(addr, false, envelope)).await;
        echo_scenario(&broker).await;
        chat_scenario(&broker).await;
        // Its `close:CODE:REASON` command: the upstream closes the session.
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        ws.send(Message::text("close:4001:bye")).await.unwrap();
        assert_eq!(
            expect_close(&mut ws).await,
            (4001, "bye".into()),
            "{envelope}"
        );
        expect_end(&mut ws).await;
        broker.stop().await;
    }
}

/// The Rust library's demo upstream interoperates in both encodings.
#[tokio::test]
async fn rust_library_upstream_in_both_encodings() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let demo = tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));
    for envelope in ["json", "binary"] {
        let broker = start_broker(&config(addr, false, envelope)).await;
        echo_scenario(&broker).await;
        chat_scenario(&broker).await;
        broker.stop().await;
    }
    stop.cancel();
    within("demo stop", demo).await.unwrap();
}

/// Toggling the upstream between modes in the config (and restarting):
/// the same client scenario passes in both.
#[tokio::test]
async fn the_same_clients_pass_in_both_modes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let demo = tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));
    for direct in [true, false] {
        let broker = start_broker(&config(addr, direct, "json")).await;
        echo_scenario(&broker).await;
        let m = broker.metrics().await;
        let mode = if direct { "direct" } else { "multiplexed" };
        assert_eq!(m.value("muxgate_sessions_total", &[("mode", mode)]), 1.0);
        broker.stop().await;
    }
    stop.cancel();
    within("demo stop", demo).await.unwrap();
}

/// With `mux_compression` the broker offers permessage-deflate on its mux
/// connections. The Python example accepts it with `websockets`' own
/// implementation (whose defaults answer `server_max_window_bits=12`), the
/// Rust demo with the library's; either way the same client scenarios pass
/// in both encodings, and the mux hop carries fewer bytes than its
/// envelopes hold, both ways. The clients themselves offered nothing.
#[tokio::test]
async fn both_upstreams_take_mux_compression_in_both_encodings() {
    let (_child, python) = python_upstream().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rust = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let demo = tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));
    for (who, addr) in [("python", python), ("rust", rust)] {
        for envelope in ["json", "binary"] {
            let yaml = config_with(
                addr,
                false,
                envelope,
                "compression: {mux_compression: true}",
            );
            let broker = start_broker(&yaml).await;
            echo_scenario(&broker).await;
            chat_scenario(&broker).await;
            let m = broker.metrics().await;
            for direction in ["client_to_upstream", "upstream_to_client"] {
                let (message, wire) = m.hop_bytes("demo", "mux", direction);
                eprintln!("{who}, {envelope}, {direction}: {message} envelope bytes as {wire}");
                assert!(
                    message > 0.0 && wire > 0.0 && wire < message,
                    "{who}, {envelope}, {direction}: {wire} compressed bytes for {message}"
                );
            }
            assert_eq!(
                m.value(
                    "muxgate_compressed_sessions_active",
                    &[("upstream", "demo")]
                ),
                0.0,
                "no client asked for compression"
            );
            broker.stop().await;
        }
    }
    stop.cancel();
    within("demo stop", demo).await.unwrap();
}
