//! `relay`: the least a proxy on tokio can do, for comparison only.
//!
//! `relay --listen 127.0.0.1:8480 --upstream 127.0.0.1:3100` copies bytes
//! both ways between each accepted connection and a new one to the
//! upstream (`tokio::io::copy_bidirectional`), on one single-threaded
//! event loop per core that accepts from a shared listener, as the broker's
//! loops do. It reads no HTTP and no WebSocket frame, so it passes the
//! upgrade and every frame through untouched, and it supervises nothing:
//! what it costs per message is tokio's readiness and scheduling and the
//! system calls, which any tokio-based relay pays. `bench/paired.sh` puts
//! it beside NGINX and muxgate direct.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    /// Event loops (default: one per core).
    #[arg(long)]
    loops: Option<usize>,
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let loops = cli
        .loops
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let listener = std::net::TcpListener::bind(cli.listen)?;
    listener.set_nonblocking(true)?;
    let threads = (0..loops)
        .map(|_| {
            let listener = listener.try_clone()?;
            let upstream = cli.upstream;
            Ok(std::thread::spawn(move || serve(listener, upstream)))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for thread in threads {
        thread.join().expect("an event loop panicked")?;
    }
    Ok(())
}

/// One event loop: accepts and relays until an accept fails.
fn serve(listener: std::net::TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}
