//! SIGTERM drains the real binary: clients get 1001, upstreams a clean
//! close, and the process exits 0 within `shutdown_grace`.

mod common;

use std::time::Instant;

use common::upstream::TestUpstream;
use common::*;
use tokio_tungstenite::tungstenite::Message;

/// SIGTERM closes open sessions with 1001 (the upstream too) and exits 0.
#[tokio::test]
async fn sigterm_drains_sessions_and_exits_zero() {
    let mut up = TestUpstream::start().await;
    let (mut child, addr) =
        spawn_binary(&direct_config(&[up.addr], "", "", "shutdown_grace: 5s")).await;
    let url = format!("ws://{addr}/ws/echo");
    let (mut a, _) = connect(&url, &[]).await;
    let (mut b, _) = connect(&url, &[]).await;
    echo_roundtrip(&mut a, Message::text("a")).await;
    echo_roundtrip(&mut b, Message::text("b")).await;

    sigterm(&child);
    assert_eq!(
        expect_close(&mut a).await,
        (1001, "server shutting down".to_string())
    );
    assert_eq!(expect_close(&mut b).await.0, 1001);
    // Reading on lets the clients' close replies go out.
    expect_end(&mut a).await;
    expect_end(&mut b).await;
    assert_eq!(up.close().await.0, 1001);
    assert_eq!(up.close().await.0, 1001);
    let status = within("the process to exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    // No new connection is accepted any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A client that never answers the close cannot hold the process past
/// shutdown_grace: it still exits 0, promptly.
#[tokio::test]
async fn sigterm_exits_within_grace_when_a_client_never_answers() {
    let up = TestUpstream::start().await;
    let (mut child, addr) = spawn_binary(&direct_config(
        &[up.addr],
        "close_timeout: 30s",
        "",
        "shutdown_grace: 500ms",
    ))
    .await;
    // Connected but never polled again: it will not answer the close frame.
    let (_silent, _) = connect(&format!("ws://{addr}/ws/echo"), &[]).await;
    let started = Instant::now();
    sigterm(&child);
    let status = within("the process to exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    // Well under close_timeout (30s): the grace period bounded the drain.
    assert!(
        started.elapsed().as_secs() < 10,
        "took {:?}",
        started.elapsed()
    );
}

/// The README's run command: `muxgate --demo ADDR` serves the demo echo
/// upstream next to the broker, so a client echoes at once.
#[tokio::test]
async fn demo_flag_starts_the_bundled_upstream() {
    // The demo's address must be in the config before it starts: reserve a
    // free port, release it, and hand it to both.
    let demo = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = direct_config(&[demo], "", "", "");
    let path = std::env::temp_dir().join(format!("muxgate-demo-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&path, &yaml).unwrap();
    let (mut child, addr) = spawn_binary_with(&path, &["--demo", &demo.to_string()]).await;
    let (mut ws, _) = connect(&format!("ws://{addr}/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::text("hello demo")).await;
    sigterm(&child);
    assert_eq!(expect_close(&mut ws).await.0, 1001);
    expect_end(&mut ws).await;
    assert_eq!(within("exit", child.wait()).await.unwrap().code(), Some(0));
    let _ = std::fs::remove_file(&path);
}
