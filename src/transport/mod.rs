//! Transport: the sockets under every session, and nothing above them.
//!
//! This room knows TCP, TLS and HTTP but no session, upstream or config:
//! the layers above hand it what they decided (a listener, a TLS config,
//! header limits) and get sockets back.
//!
//! - [`event_loops`]: thread-per-core; the `server.workers` loops that serve clients.
//! - [`accept`]: the loops take accepted connections in turn; a handover closes them.
//! - [`tls`]: the `wss://` listener and the `wss://` upstream stream (rustls).
//! - [`server`]: the client listeners' HTTP server (hyper, on the broker's own
//!   sockets): which HTTP each connection speaks.
//! - [`client_conn`]: what serving one client connection needs, its limits and tokens.
//! - [`http1`]: an HTTP/1.1 connection, whose upgrade hands its socket over.
//! - [`http2`]: an HTTP/2 connection, whose streams carry WebSockets (RFC 8441).
//! - [`upgraded`]: client and upstream sockets taken back out of hyper after the upgrade.
//! - [`chunked`]: reads in chunks through one buffer per loop, so an idle
//!   socket holds no read buffer of its own.

pub(crate) mod accept;
pub(crate) mod chunked;
pub(crate) mod client_conn;
pub(crate) mod event_loops;
pub(crate) mod http1;
pub(crate) mod http2;
pub(crate) mod server;
pub(crate) mod tls;
pub(crate) mod upgraded;
