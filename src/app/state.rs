//! What every handler of a running broker shares: the routes, the
//! upstreams and their pools, the limits, the session registry, the
//! metrics and the shutdown handle. Built once by `Broker::bind`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::mux::pool::MuxPool;
use crate::routing::RouteTable;
use crate::session::SessionManager;
use crate::shutdown::Shutdown;
use crate::upstream::Upstream;

/// State shared by every handler.
pub(crate) struct AppState {
    pub routes: RouteTable,
    /// The mux pool of each multiplexed upstream, by name.
    pub pools: HashMap<Arc<str>, Arc<MuxPool>>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub limits: Arc<ConnectionLimits>,
    pub sessions: Arc<SessionManager>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Clients connect with TLS (`wss://`): `X-Forwarded-Proto: https`.
    pub secure: bool,
    /// The applied config's generation (`Config::generation`).
    pub generation: u64,
}
