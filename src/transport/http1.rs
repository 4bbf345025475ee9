//! The client listeners' HTTP server: hyper's HTTP/1 server on the
//! broker's own sockets.
//!
//! `axum::serve` runs hyper-util's automatic server, which reads the first
//! bytes of each connection to tell HTTP/1 from HTTP/2 and then puts them
//! back behind a rewind layer of its own. An upgraded client connection
//! then sits in a box, behind two rewind layers, one of them of a private
//! type: it cannot be taken back out, and every read and write of a
//! relayed session pays for the layers. Clients reach the broker over
//! HTTP/1 only (WebSockets over HTTP/2 are not served), so this module
//! serves each connection with hyper's HTTP/1 server directly, on a
//! [`ClientStream`] that [`crate::transport::upgraded`] takes back out after the 101.
//!
//! It does what `axum::serve` would: accepts through axum's
//! [`Listener`] (with its back-off on errors such as running out of file
//! descriptors), gives each request its peer's address as [`ConnectInfo`],
//! and serves upgrades. When shutdown begins it stops accepting, and each
//! connection finishes the request it is serving and closes (an idle
//! keep-alive connection closes at once). The connections' tasks belong to
//! the shutdown tracker's listeners group, which the broker waits for after
//! the drain; one still open once the drain is over is dropped.
//!
//! Why not hyper-util's `GracefulShutdown`, which does this signal-and-wait
//! for a set of connections: it watches only connections that implement
//! its sealed `GracefulConnection` trait, and hyper-util 0.1.21 implements
//! that for `http1::Connection` but not for the `UpgradeableConnection`
//! that `with_upgrades` makes (only for the automatic server's, whose
//! rewind layers this module exists to avoid). So each connection calls
//! hyper's own `graceful_shutdown` when the shutdown token fires, and the
//! tracker's group does the waiting.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::debug;

use crate::shutdown::Shutdown;
use crate::transport::tls::ClientStream;

/// The smallest read buffer hyper takes.
const MIN_HYPER_BUF: usize = 8192;

/// What a client connection is allowed before it is closed.
#[derive(Clone)]
pub(crate) struct Limits {
    /// For a whole request head, from the connection's start or the end of
    /// its last response (`server.header_read_timeout`): a connection that
    /// sends nothing, or a head byte by byte, holds a file descriptor
    /// only this long.
    pub header_read_timeout: Duration,
    /// Counts the connections closed for it.
    pub header_timeouts: IntCounter,
    /// The most a request head may take (`server.max_request_head_size`);
    /// hyper reads no more than this for one and answers a larger one 431.
    pub max_head: usize,
    /// Counts the heads answered 431.
    pub heads_too_large: IntCounter,
}

/// Serves `router` to every connection `listener` accepts until shutdown
/// begins; each connection runs on `shutdown`'s listeners group until it
/// closes or is upgraded (an upgraded one belongs to its session).
pub(crate) async fn serve<L>(mut listener: L, router: Router, limits: Limits, shutdown: Shutdown)
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Into<ClientStream>,
{
    // One token of each for all connections: clones, not a child apiece.
    let stopping = shutdown.token();
    let released = shutdown.released_token();
    let connections = shutdown.listeners();
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopping.cancelled() => break,
        };
        connections.spawn(connection(
            io.into(),
            remote,
            router.clone(),
            limits.clone(),
            stopping.clone(),
            released.clone(),
        ));
    }
}

/// Serves one client connection until it closes, is upgraded, or (after
/// `stopping`) has answered the request in progress; drops it if that
/// takes until `released`.
async fn connection(
    io: ClientStream,
    remote: SocketAddr,
    router: Router,
    limits: Limits,
    stopping: CancellationToken,
    released: CancellationToken,
) {
    let service = router.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        request
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_head)
        // The read buffer never holds more than a head (hyper's floor is
        // 8 KiB): a connection costs at most that before its upgrade.
        .max_buf_size(limits.max_head.max(MIN_HYPER_BUF))
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = stopping.cancelled() => {
            served.as_mut().graceful_shutdown();
            tokio::select! {
                result = served.as_mut() => result,
                // As the other loops' connections are, with their runtimes.
                () = released.cancelled() => return,
            }
        }
    };
    match result {
        Ok(()) => {}
        Err(error) if error.is_parse_too_large() => {
            limits.heads_too_large.inc();
            debug!(%remote, limit = limits.max_head, "client's request head is over max_request_head_size; answered 431 and closed");
        }
        Err(error) if error.is_timeout() => {
            limits.header_timeouts.inc();
            debug!(%remote, timeout = ?limits.header_read_timeout, "client sent no request head in time; closed");
        }
        Err(error) => debug!(%remote, %error, "client connection failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            header_timeouts: IntCounter::new("header_timeouts", "test").unwrap(),
            max_head: 16 * 1024,
            heads_too_large: IntCounter::new("heads_too_large", "test").unwrap(),
        }
    }

    /// A keep-alive connection idle between requests is closed as soon as
    /// shutdown begins, and the listeners' group is then empty, while the
    /// drain has not ended.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_closes_when_shutdown_begins() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let router = Router::new().fallback(|| async { "ok" });
        let server = shutdown
            .listeners()
            .spawn(serve(tcp, router, limits(), shutdown.clone()));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !answer.ends_with(b"ok") {
            let n = client.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "closed before answering");
            answer.extend_from_slice(&chunk[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));

        shutdown.begin();
        let closed = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
        server.await.unwrap();
        assert!(shutdown.listeners_stopped(Duration::from_secs(5)).await);
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
