//! `server.max_request_head_size`: a request head up to the limit is
//! served, a larger one is answered 431 and counted, on direct and
//! multiplexed routes alike; and 10,000 clients sending oversized heads
//! slowly at once cost the broker a bounded amount of memory while it goes
//! on serving others. The load runs against the real binary in a child
//! process, so that its memory is its own and the clients' sockets do not
//! count against its open files.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::net::SocketAddr;

use common::upstream::TestUpstream;
use common::*;
use mux_peer::{Behavior, MuxPeer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The default `server.max_request_head_size`.
const LIMIT: usize = 16 * 1024;

/// An upgrade request for `path`, padded by an `X-Pad` header to exactly
/// `size` bytes.
fn head_of(addr: SocketAddr, path: &str, size: usize) -> String {
    let bare = upgrade_request(addr, path, "X-Pad: \r\n").len();
    let head = upgrade_request(
        addr,
        path,
        &format!("X-Pad: {}\r\n", "a".repeat(size - bare)),
    );
    assert_eq!(head.len(), size);
    head
}

/// Sends `head` (a broker that stops reading may cut the write short) and
/// returns the status of the answer.
async fn status_of(addr: SocketAddr, head: &str) -> u16 {
    within("an answer to the head", async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&answer);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
    })
    .await
}

#[tokio::test]
async fn heads_up_to_the_limit_are_served_and_larger_ones_get_431() {
    for direct in [true, false] {
        let (_direct, _mux, yaml) = if direct {
            let up = TestUpstream::start().await;
            let yaml = direct_config(&[up.addr], "", "", "");
            (Some(up), None, yaml)
        } else {
            let peer = MuxPeer::start(Behavior::Echo).await;
            let yaml = mux_config(&[peer.addr], "pool_size: 1", "", "");
            (None, Some(peer), yaml)
        };
        let broker = start_broker(&yaml).await;
        let a = broker.client_addr;
        for size in [LIMIT - 1, LIMIT] {
            let head = head_of(a, "/ws/echo", size);
            assert_eq!(status_of(a, &head).await, 101, "direct={direct}: {size} B");
        }
        for size in [LIMIT + 1, 100_000] {
            let head = head_of(a, "/ws/echo", size);
            assert_eq!(status_of(a, &head).await, 431, "direct={direct}: {size} B");
        }
        // Counted once hyper's answer is out: just after the client has it.
        let rejected = |m: &Metrics| {
            m.value(
                "muxgate_handshakes_rejected_total",
                &[("status", "431"), ("reason", "request_head_too_large")],
            )
        };
        let m = broker
            .metrics_when("both 431s counted", |m| rejected(m) >= 2.0)
            .await;
        assert_eq!(rejected(&m), 2.0, "direct={direct}");
        broker.stop().await;
    }
}

#[tokio::test]
async fn the_limit_is_a_setting() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(
        &[up.addr],
        "",
        "",
        "max_request_head_size: 4KiB",
    ))
    .await;
    let a = broker.client_addr;
    assert_eq!(status_of(a, &head_of(a, "/ws/echo", 4096)).await, 101);
    assert_eq!(status_of(a, &head_of(a, "/ws/echo", 4097)).await, 431);
    broker.stop().await;
}

/// Resident memory of process `pid`, and its peak, in bytes.
fn rss_and_peak(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Clients of the slow oversized-head load.
const SLOW_CLIENTS: usize = 10_000;
/// Each sends its head in pieces this large, one piece per round over
/// all clients, until the broker answers.
const PIECE: usize = 2048;
/// What a broker may hold per connection sending a head, on top of what
/// it held idle: the read buffer of at most `max_request_head_size` and
/// the connection's task and hyper state.
const BOUND_PER_CONNECTION: u64 = 36 * 1024;

#[tokio::test]
async fn ten_thousand_slow_oversized_heads_cost_bounded_memory() {
    let up = TestUpstream::start().await;
    let yaml = direct_config(&[up.addr], "", "", "max_connections: 20000\nworkers: 2");
    let (child, addr) = spawn_binary(&yaml).await;
    let pid = child.id().expect("running");
    let url = format!("ws://{addr}/ws/echo");
    let (mut served, _) = connect(&url, &[]).await;
    echo_roundtrip(&mut served, Message::text("before")).await;
    let (idle, _) = rss_and_peak(pid);

    let head = head_of(addr, "/ws/echo", 4 * LIMIT);
    let mut clients = Vec::with_capacity(SLOW_CLIENTS);
    for _ in 0..SLOW_CLIENTS {
        clients.push(Some(
            within("a connection", TcpStream::connect(addr))
                .await
                .unwrap(),
        ));
    }
    let mut answered = 0;
    let mut offset = 0;
    while answered < SLOW_CLIENTS {
        assert!(
            offset < head.len(),
            "{answered} of {SLOW_CLIENTS} answered after the whole head"
        );
        let piece = &head.as_bytes()[offset..(offset + PIECE).min(head.len())];
        offset += PIECE;
        for slot in clients.iter_mut() {
            let Some(tcp) = slot else { continue };
            if tcp.write_all(piece).await.is_err() {
                // Answered and closed by the broker.
                *slot = None;
                answered += 1;
            }
        }
        // Another client is served while the load is on.
        let (mut other, _) = connect(&url, &[]).await;
        echo_roundtrip(&mut other, Message::text(format!("during round {offset}"))).await;
        echo_roundtrip(&mut served, Message::text("still here")).await;
        if offset > LIMIT + PIECE {
            // Every head is over the limit by now: the rest are answered as
            // the broker reads them, or on the next write.
            for slot in clients.iter_mut() {
                let Some(tcp) = slot else { continue };
                let mut status = [0u8; 12];
                match within("a 431", tcp.read_exact(&mut status)).await {
                    Ok(_) => assert_eq!(&status, b"HTTP/1.1 431"),
                    Err(e) => panic!("no answer to an oversized head: {e}"),
                }
                *slot = None;
                answered += 1;
            }
        }
    }
    let (_, peak) = rss_and_peak(pid);
    let per_connection = peak.saturating_sub(idle) / SLOW_CLIENTS as u64;
    eprintln!("broker RSS idle {idle} B, peak {peak} B under the load: {per_connection} B per slow connection");
    assert!(
        per_connection <= BOUND_PER_CONNECTION,
        "{per_connection} B per connection sending an oversized head"
    );
    echo_roundtrip(&mut served, Message::text("after")).await;
}
