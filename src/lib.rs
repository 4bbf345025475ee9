//! muxgate: a WebSocket broker.
//!
//! Clients open WebSockets to the broker; each request path leads to an
//! upstream, which runs in direct mode (one upstream WebSocket per client)
//! or multiplexed mode (a few shared mux connections carry every client,
//! see `shared/mux-protocol.md`).
//!
//! # Layout
//!
//! - [`config`]: the YAML model of `shared/config.md`, loading and validation.
//! - [`app`]: binds the listeners, owns the top-level tasks, serves and drains.
//! - [`event_loops`]: thread-per-core; the `server.workers` loops that serve clients.
//! - [`accept`]: the loops take accepted connections in turn.
//! - [`shutdown`]: the signal, the one tree of cancellation tokens and the one task tracker.
//! - [`routing`]: `external_path` to upstream and `internal_path`.
//! - [`http1`]: the client listeners' HTTP/1 server (hyper, on the broker's own sockets).
//! - [`handshake`]: the client HTTP handler; every refusal is an HTTP status.
//! - [`upgraded`]: client and upstream sockets taken back out of hyper after the upgrade.
//! - [`limits`]: `max_connections` and per-IP permits, released when a session ends.
//! - [`session`]: session ids and the registry both modes share.
//! - [`direct`]: direct mode, the connect-first handshake and the relay.
//! - [`mux`]: multiplexed mode: the pool, the mux connection task, sessions
//!   and their re-binding (the frame codec is `muxgate_backend::protocol`).
//! - [`upstream`]: targets, passive health, balancing, connecting.
//! - [`close`]: the close-code policy.
//! - [`tls`]: the `wss://` listener and `wss://` targets (rustls).
//! - [`metrics`]: every Prometheus collector, one method per event.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/admin/upstreams`.
//!
//! Plugins (handshake, pre_request, post_response) live in the
//! `muxgate-plugins` crate; each upstream holds its built `Pipeline`.
//!
//! # One message in direct mode
//!
//! The handshake handler checks route, upgrade, origin and limits, connects
//! to a healthy target with the client's subprotocols and forwarded headers,
//! and only then answers 101 with the subprotocol the target chose. The
//! session task then relays: a message read from one socket waits in the
//! other's one-slot outbox until that socket takes it, so nothing is queued
//! without bound and a slow side slows the fast one down instead. Close
//! frames pass through with their codes; a side that vanishes or misses its
//! pong closes the other with 1001 (client gone) or 1014 (upstream gone).
//!
//! # One message in multiplexed mode
//!
//! The handshake handler checks the same things, waits (up to
//! `handshake_timeout`) for a live mux connection and answers 101; the
//! session task binds to the least-loaded connection and sends `open`. A
//! client message goes into that connection's bounded write queue (waiting
//! for room, so a backed-up upstream slows its clients through TCP); the
//! connection task encodes and writes it. An upstream frame is decoded by the
//! connection task and handed to the session's bounded queue without waiting;
//! a full queue closes that session (slow consumer) instead of stalling the
//! others. When a connection dies, its unwritten frames go back to their
//! sessions, which re-bind elsewhere and resend them after a resumed `open`.

#![forbid(unsafe_code)]

mod app;
mod close;
pub mod config;
mod direct;
mod handshake;
mod limits;
mod metrics;
mod mux;
mod routing;
mod session;
pub mod shutdown;
mod transport;
mod upstream;

pub use app::{Broker, StartError};
pub use transport::tls::TlsError;
