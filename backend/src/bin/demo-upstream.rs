//! The demo upstream as its own process: `demo-upstream [ADDR]`
//! (default 127.0.0.1:3000). Benchmarks run it apart from the broker so the
//! two do not share a runtime.

#![forbid(unsafe_code)]

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-upstream: binding {addr}: {e}");
            std::process::exit(69);
        }
    };
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    muxgate_backend::demo::serve(listener, stop).await;
}
