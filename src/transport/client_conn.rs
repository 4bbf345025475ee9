//! What serving one client connection needs, whichever HTTP it speaks:
//! shared by the listener's server (`transport::server`), which decides
//! the HTTP, and the two that serve it (`transport::http1`,
//! `transport::http2`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

/// What a client connection is allowed before it is closed.
#[derive(Clone)]
pub(crate) struct Limits {
    /// For a whole request head, from the connection's start or the end of
    /// its last response (`server.header_read_timeout`): a connection that
    /// sends nothing, or a head byte by byte, holds a file descriptor
    /// only this long. Over HTTP/2, for the connection's preface and its
    /// first request.
    pub header_read_timeout: Duration,
    /// Counts the connections closed for it.
    pub header_timeouts: IntCounter,
    /// The most a request head may take (`server.max_request_head_size`);
    /// hyper reads no more than this for one and answers a larger one 431
    /// (over HTTP/2, the most the header list may take).
    pub max_head: usize,
    /// Counts the heads answered 431.
    pub heads_too_large: IntCounter,
}

/// What serving one client connection needs, whichever HTTP it speaks.
pub(crate) struct Connection {
    pub remote: SocketAddr,
    pub router: Router,
    pub limits: Limits,
    pub tokens: Tokens,
}

/// The shutdown's tokens a connection watches.
#[derive(Clone)]
pub(crate) struct Tokens {
    /// The listeners closed: stop taking requests.
    pub closed: CancellationToken,
    /// Shutdown began (in a handover, after the listeners closed).
    pub begun: CancellationToken,
    /// The drain is over: whatever is left is dropped.
    pub released: CancellationToken,
}
