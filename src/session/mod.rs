//! Sessions: one per client WebSocket, whatever the upstream's mode.
//!
//! The [`SessionManager`] is the one interface both modes share: it gives a
//! session its id, its cancellation token and its registry entry, keeps the
//! per-upstream gauges, and forgets the session when its [`SessionGuard`]
//! drops. Direct mode (`crate::direct`) owns two sockets per session;
//! multiplexed mode (`crate::mux`) binds each session to a shared mux
//! connection. Both hold the session's [`SessionGuard`] for its life.

pub(crate) mod alarms;
pub(crate) mod client;
pub(crate) mod drain;
pub(crate) mod ending;
pub(crate) mod keepalive;
pub(crate) mod side;
pub(crate) mod when_woken;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Mode;
use crate::handshake::HttpVersion;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A session's id: a random UUID, logged as the field `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId(pub Uuid);

impl SessionId {
    pub(crate) fn new() -> SessionId {
        SessionId(Uuid::new_v4())
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// What the registry knows of an open session; shared (one allocation)
/// between the registry and the session's guard.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    pub id: SessionId,
    pub upstream: Arc<str>,
    /// The route's `external_path`.
    pub route: Arc<str>,
    pub mode: Mode,
    /// Direct mode: the target it is connected to (its URL).
    pub target: Option<Arc<str>>,
    pub remote: SocketAddr,
    /// The handshake's `X-Request-Id`, the client's or a new one.
    pub request_id: String,
    pub started: Instant,
    /// Cancelling it ends the session (the client gets 1001).
    pub cancel: CancellationToken,
    /// permessage-deflate was agreed with the client (whoever compresses):
    /// `muxgate_compressed_sessions_active` counts it.
    pub compressed: bool,
    /// The HTTP its WebSocket came over (`http_version` in metrics).
    pub http_version: HttpVersion,
    /// A reload or an admin drain took its route or target away (see
    /// [`drain`]): `muxgate_sessions_draining` counts it.
    draining: AtomicBool,
}

impl SessionHandle {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Where a new session is going, for the registry.
pub(crate) struct Placement {
    pub upstream: Arc<str>,
    pub route: Arc<str>,
    pub mode: Mode,
    pub target: Option<Arc<str>>,
    pub compressed: bool,
    pub http_version: HttpVersion,
}

/// The registry of open sessions.
pub(crate) struct SessionManager {
    sessions: DashMap<SessionId, Arc<SessionHandle>>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
}

impl SessionManager {
    pub(crate) fn new(metrics: Arc<Metrics>, shutdown: Shutdown) -> Arc<SessionManager> {
        Arc::new(SessionManager {
            sessions: DashMap::new(),
            metrics,
            shutdown,
        })
    }

    /// Registers a new session; it stays registered while the guard lives.
    pub(crate) fn open(
        self: &Arc<Self>,
        placement: Placement,
        remote: SocketAddr,
        request_id: String,
    ) -> SessionGuard {
        let Placement {
            upstream,
            route,
            mode,
            target,
            compressed,
            http_version,
        } = placement;
        let handle = Arc::new(SessionHandle {
            id: SessionId::new(),
            upstream,
            route,
            mode,
            target,
            remote,
            request_id,
            started: Instant::now(),
            cancel: self.shutdown.token(),
            compressed,
            http_version,
            draining: AtomicBool::new(false),
        });
        self.metrics.session_opened(
            &handle.upstream,
            mode.as_str(),
            compressed,
            http_version.as_str(),
        );
        self.sessions.insert(handle.id, Arc::clone(&handle));
        SessionGuard {
            manager: Arc::clone(self),
            handle,
        }
    }

    /// Open sessions of `upstream`, and how many of them are draining.
    pub(crate) fn count_for(&self, upstream: &str) -> (usize, usize) {
        self.sessions
            .iter()
            .filter(|s| &*s.upstream == upstream)
            .fold((0, 0), |(all, draining), s| {
                (all + 1, draining + usize::from(s.is_draining()))
            })
    }
}

/// A registered session; dropping it unregisters the session.
pub(crate) struct SessionGuard {
    manager: Arc<SessionManager>,
    pub handle: Arc<SessionHandle>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.manager.sessions.remove(&self.handle.id);
        self.manager.metrics.session_closed(
            &self.handle.upstream,
            self.handle.mode.as_str(),
            self.handle.compressed,
            self.handle.http_version.as_str(),
        );
        if self.handle.draining.swap(false, Ordering::AcqRel) {
            self.manager
                .metrics
                .sessions_draining(&self.handle.upstream, -1);
        }
    }
}
