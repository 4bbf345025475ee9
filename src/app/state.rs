//! What every handler of a running broker shares: the applied config's
//! [`Snapshot`] (swapped whole by a reload), the limits, the session
//! registry, the metrics and the shutdown handle. Built once by
//! `Broker::bind`.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::snapshot::{Runtime, Snapshot};
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::session::SessionManager;
use crate::shutdown::Shutdown;
use crate::transport::tls::ServerTls;

/// State shared by every handler.
pub(crate) struct AppState {
    /// The applied config: loaded once per handshake or admin request.
    pub current: ArcSwap<Snapshot>,
    /// What building a new snapshot needs.
    pub runtime: Runtime,
    pub limits: Arc<ConnectionLimits>,
    pub sessions: Arc<SessionManager>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// The client listener's TLS settings, when clients connect with TLS
    /// (`wss://`, and `X-Forwarded-Proto: https` upstream); a reload
    /// re-reads the certificate and key into it.
    pub tls: Option<ServerTls>,
    /// The client listener serves HTTP/2 (`server.http2`, bound at start):
    /// its TLS settings, read again, offer `h2` by ALPN.
    pub http2: bool,
    /// Held by a reload or a live mode change from reading the snapshot
    /// to swapping in the next, so that two of them never build on the
    /// same one.
    pub changing: tokio::sync::Mutex<()>,
}
