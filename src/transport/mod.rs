//! Transport: the sockets under every session, and nothing above them.
//!
//! This room knows TCP, TLS and HTTP/1 but no session, upstream or config:
//! the layers above hand it what they decided (a listener, a TLS config,
//! header limits) and get sockets back.
//!
//! - [`event_loops`]: thread-per-core; the `server.workers` loops that serve clients.
//! - [`accept`]: the loops take accepted connections in turn; a handover closes them.
//! - [`tls`]: the `wss://` listener and the `wss://` upstream stream (rustls).
//! - [`http1`]: the client listeners' HTTP/1 server (hyper, on the broker's own sockets).
//! - [`upgraded`]: client and upstream sockets taken back out of hyper after the upgrade.
//! - [`chunked`]: reads in chunks through one buffer per loop, so an idle
//!   socket holds no read buffer of its own.

pub(crate) mod accept;
pub(crate) mod chunked;
pub(crate) mod event_loops;
pub(crate) mod http1;
pub(crate) mod tls;
pub(crate) mod upgraded;
