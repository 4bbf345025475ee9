//! muxgate: a WebSocket broker.
//!
//! Clients open WebSockets to the broker; each request path leads to an
//! upstream, which runs in direct mode (one upstream WebSocket per client)
//! or multiplexed mode (a few shared mux connections carry every client,
//! see `shared/mux-protocol.md`).
//!
//! # Layout
//!
//! One line per file, layer by layer from the bottom. A file imports only
//! from its own layer and those below, the two modes never import each
//! other, and no file imports one that imports it back (`tests/layers.rs`
//! checks all three, and that this map names every file).
//!
//! Foundation, used everywhere:
//! - `close.rs`: the close-code policy.
//! - `limits.rs`: `max_connections` and per-IP permits, released when a session ends.
//! - `shutdown.rs`: the signal, the one tree of cancellation tokens and the one task tracker.
//! - `metrics.rs`: every Prometheus collector, one method per event.
//!
//! Transport (`transport/`), sockets and nothing above them:
//! - `transport/mod.rs`: the room's map.
//! - `transport/event_loops.rs`: thread-per-core; the `server.workers` loops that serve clients.
//! - `transport/accept.rs`: the loops take accepted connections in turn; a handover closes them.
//! - `transport/tls.rs`: the `wss://` listener and `wss://` upstream streams (rustls).
//! - `transport/server.rs`: the client listeners' HTTP server (hyper, on the broker's own sockets): which HTTP each connection speaks.
//! - `transport/client_conn.rs`: what serving one client connection needs, its limits and tokens.
//! - `transport/http1.rs`: an HTTP/1.1 client connection, whose upgrade hands its socket over.
//! - `transport/http2.rs`: an HTTP/2 client connection, whose streams carry WebSockets (RFC 8441).
//! - `transport/upgraded.rs`: client and upstream sockets taken back out of hyper after the upgrade.
//! - `transport/chunked.rs`: reads through one buffer per event loop.
//!
//! Configuration (`config/`):
//! - `config/mod.rs`: the YAML model of `shared/config.md`.
//! - `config/load.rs`: reading a file: `${NAME}` expansion, parsing, errors with path and line.
//! - `config/path.rs`: field paths and where they stand in the text.
//! - `config/validate.rs`: the checks serde cannot make, every problem at once.
//! - `config/parsed.rs`: target URLs and `hash_on`, parsed once.
//!
//! Upstreams:
//! - `upstream/mod.rs`: targets, leases, connecting to a target, passive-health reports.
//! - `upstream/health.rs`: one target's health, passive and active.
//! - `upstream/balance.rs`: `round_robin`, `least_connections`, `consistent_hash`.
//! - `upstream/probe.rs`: active health checks.
//! - `routing.rs`: `external_path` to upstream and `internal_path`.
//!
//! Handshake and sessions, what both modes share:
//! - `handshake.rs`: the upgrade checks and answers; every refusal is an HTTP status.
//! - `session/mod.rs`: session ids and the registry.
//! - `session/side.rs`: a session's two sides and two directions.
//! - `session/client.rs`: the client's WebSocket, built one way.
//! - `session/drain.rs`: sessions a reload took away run out, up to `drain_timeout`.
//! - `session/keepalive.rs`: ping/pong supervision for every socket.
//! - `session/ending.rs`: how a session ends, plugin close reasons, the two log lines.
//! - `session/alarms.rs`: shutdown and the timer, polled only when one fired.
//! - `session/when_woken.rs`: a future polled only after it woke its task.
//!
//! Direct mode (`direct/`):
//! - `direct/mod.rs`: a direct session and the choice of relay.
//! - `direct/connect.rs`: connecting the upstream before the client's 101.
//! - `direct/messages.rs`: the message relay, for routes with message plugins.
//! - `direct/frames/mod.rs`: the frame relay's map.
//! - `direct/frames/scan.rs`: following and checking frames in a byte stream.
//! - `direct/frames/pump.rs`: one direction: read, scan, write, spill.
//! - `direct/frames/relay.rs`: the relay loop and its timers.
//! - `direct/frames/closing.rs`: the close sequence.
//! - `direct/frames/testing.rs`: what the frame relay's tests share.
//!
//! Multiplexed mode (`mux/`; the frame codec is `muxgate_backend::protocol`):
//! - `mux/mod.rs`: the `open` frame of a new session.
//! - `mux/pool.rs`: `pool_size` connections per upstream, binding, moves between targets.
//! - `mux/conn.rs`: one mux connection's reader, writer and dispatch.
//! - `mux/inbox.rs`: what a connection hands a session, queue and signals.
//! - `mux/session.rs`: one client, its backpressure and re-binding.
//!
//! The app (`app/`):
//! - `app/mod.rs`: binds the listeners, owns the top-level tasks, serves and drains.
//! - `app/state.rs`: what every handler shares.
//! - `app/snapshot.rs`: one applied config, swapped whole; the diff a reload makes.
//! - `app/changes.rs`: what a reload changed, as its log lines and answer tell it.
//! - `app/reload.rs`: reloads, live mode changes and target drains.
//! - `app/watch.rs`: SIGHUP and `watch_config` start reloads.
//! - `app/clients.rs`: the client handler: checks, then the upstream's mode.
//! - `app/admin.rs`: `/metrics`, `/healthz`, `/readyz`, `/admin/...`.
//!
//! Plugins (handshake, pre_request, post_response) live in the
//! `muxgate-plugins` crate; each upstream holds its built `Pipeline`.
//! permessage-deflate's negotiation, codec and stream adapter live in
//! `muxgate_backend::deflate`, which Rust upstreams share: the frame relay
//! passes compression end to end, and the message relay and multiplexed
//! sessions terminate it (`session/client.rs`).
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
#![warn(unreachable_pub)]

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
