//! Direct mode (`enable_direct_communication: true`): one dedicated
//! upstream WebSocket per client.
//!
//! [`connect_upstream`] runs before the client's upgrade is accepted, so a
//! dead backend is an HTTP status, not a broken socket. [`relay`] then runs
//! the session in one task, by one of two relays:
//!
//! - `frames`: the frame relay, for every route without message plugins.
//!   It relays frames as bytes, unchanged, checking what RFC 6455 requires
//!   of them, and holds no buffer while idle.
//! - `messages`: the message relay, for routes whose message plugins need
//!   whole messages.
//!
//! Both end by the same rules (`crate::session::ending`).

use std::future::Future;
use std::sync::Arc;

use futures_util::future::Either;
use hyper::upgrade::OnUpgrade;
use tracing::debug;

use crate::close;
use crate::limits::ConnectionPermit;
use crate::metrics::Metrics;
use crate::session::SessionGuard;
use crate::upstream::{Connected, TargetLease, Upstream};
use muxgate_backend::deflate::stream::DeflateSettings;
use muxgate_plugins::SessionHooks;

mod connect;
mod frames;
mod messages;

pub(crate) use connect::{connect_upstream, UpstreamUnavailable};

/// Everything a direct session owns; dropping it releases the connection
/// permit, the target lease and the registry entry. Passed around boxed:
/// each layer of the session's future would otherwise hold its own copy.
pub(crate) struct DirectSession {
    pub guard: SessionGuard,
    /// Message plugins, `pre_request` on client messages and
    /// `post_response` on upstream ones.
    pub hooks: SessionHooks,
    pub permit: ConnectionPermit,
    pub lease: TargetLease,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    /// The message relay: permessage-deflate as agreed with the client,
    /// which the broker terminates (the upstream socket is uncompressed).
    /// The frame relay leaves compression to the peers.
    pub client_deflate: Option<DeflateSettings>,
}

/// The session's task, ready to spawn: it relays between the client, once
/// its upgrade completes, and the upstream until the session ends, then
/// closes both sides with the right codes. Frame by frame when no message
/// plugin needs whole messages, else message by message (boxed: its
/// larger future must not set the size of every session's task).
pub(crate) fn relay(
    session: Box<DirectSession>,
    on_upgrade: OnUpgrade,
    upstream: Connected,
) -> impl Future<Output = ()> + Send + 'static {
    let hooks = &session.hooks;
    if hooks.has_pre_request() || hooks.has_post_response() {
        Either::Right(Box::pin(messages::run(session, on_upgrade, upstream)))
    } else {
        Either::Left(frames::run(session, on_upgrade, Box::new(upstream)))
    }
}

/// The client's upgrade failed after the upstream was connected: closes
/// the upstream with 1001.
async fn abandon(session: Box<DirectSession>, upstream: Connected, error: std::io::Error) {
    debug!(session = %session.guard.handle.id, %error, "client upgrade failed");
    let mut socket = upstream.websocket(session.upstream.socket_config).await;
    let close = close::frame(close::GOING_AWAY, "client went away");
    let timeout = session.upstream.config.websocket_config.close_timeout;
    let _ = tokio::time::timeout(timeout, socket.close(Some(close))).await;
}
