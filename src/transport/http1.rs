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
//! It does what `axum::serve` did for the broker: accepts through axum's
//! [`Listener`] (with its back-off on errors such as running out of file
//! descriptors), gives each request its peer's address as [`ConnectInfo`],
//! serves upgrades, and on `stop` stops accepting, lets each connection
//! finish the request it is serving and close, and returns once all have.
//! The connections' tasks belong to it.

use std::future::Future;
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
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::debug;

use crate::transport::tls::ClientStream;

/// The smallest read buffer hyper takes.
const MIN_HYPER_BUF: usize = 8192;

/// What a client connection is allowed before it is closed.
#[derive(Clone)]
pub struct Limits {
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

/// Serves `router` to every connection `listener` accepts until `stop`
/// resolves; returns once the connections it was serving have closed
/// (upgraded ones are no longer its own: they belong to their sessions).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
) where
    L: Listener<Addr = SocketAddr>,
    L::Io: Into<ClientStream>,
{
    let connections = TaskTracker::new();
    let stopping = CancellationToken::new();
    tokio::pin!(stop);
    loop {
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        connections.spawn(connection(
            io.into(),
            remote,
            router.clone(),
            limits.clone(),
            stopping.clone(),
        ));
    }
    drop(listener);
    stopping.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one client connection until it closes, is upgraded, or (after
/// `stopping`) has answered the request in progress.
async fn connection(
    io: ClientStream,
    remote: SocketAddr,
    router: Router,
    limits: Limits,
    stopping: CancellationToken,
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
            served.await
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
