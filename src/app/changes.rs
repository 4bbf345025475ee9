//! What a reload changed: upstream by upstream (added, removed, changed
//! and how, unchanged) and field by field in `server`, as the reload's log
//! lines and `POST /admin/reload`'s answer tell it; and the work a new
//! snapshot leaves for after the swap (pools to retire, probes to stop).

use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ServerConfig};
use crate::mux::pool::MuxPool;
use crate::upstream::Upstream;

/// What happened to one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    Added,
    Removed,
    Changed,
    Unchanged,
}

/// One upstream's change.
#[derive(Debug, Serialize)]
pub(crate) struct UpstreamChange {
    pub name: Arc<str>,
    pub change: Kind,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets_added: Vec<Arc<str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets_removed: Vec<Arc<str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes_added: Vec<Arc<str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes_removed: Vec<Arc<str>>,
    /// The mode before and after, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<(&'static str, &'static str)>,
    /// Open sessions the change began draining (set once applied).
    pub sessions_draining: usize,
}

impl UpstreamChange {
    pub(crate) fn unchanged(name: &Arc<str>) -> UpstreamChange {
        UpstreamChange::of(name, Kind::Unchanged)
    }

    pub(crate) fn removed(old: &Upstream) -> UpstreamChange {
        UpstreamChange {
            routes_removed: routes(old),
            targets_removed: labels(old),
            ..UpstreamChange::of(&old.name, Kind::Removed)
        }
    }

    /// `new` replacing `old` (an upstream of that name), or added.
    pub(crate) fn between(old: Option<&Upstream>, new: &Upstream) -> UpstreamChange {
        let Some(old) = old else {
            return UpstreamChange {
                routes_added: routes(new),
                targets_added: labels(new),
                ..UpstreamChange::of(&new.name, Kind::Added)
            };
        };
        let minus = |a: Vec<Arc<str>>, b: &[Arc<str>]| -> Vec<Arc<str>> {
            a.into_iter().filter(|x| !b.contains(x)).collect()
        };
        let (old_targets, new_targets) = (labels(old), labels(new));
        let (old_routes, new_routes) = (routes(old), routes(new));
        UpstreamChange {
            targets_added: minus(new_targets.clone(), &old_targets),
            targets_removed: minus(old_targets, &new_targets),
            routes_added: minus(new_routes.clone(), &old_routes),
            routes_removed: minus(old_routes, &new_routes),
            mode: (old.mode() != new.mode()).then(|| (old.mode().as_str(), new.mode().as_str())),
            ..UpstreamChange::of(&new.name, Kind::Changed)
        }
    }

    fn of(name: &Arc<str>, change: Kind) -> UpstreamChange {
        UpstreamChange {
            name: Arc::clone(name),
            change,
            targets_added: Vec::new(),
            targets_removed: Vec::new(),
            routes_added: Vec::new(),
            routes_removed: Vec::new(),
            mode: None,
            sessions_draining: 0,
        }
    }
}

fn labels(u: &Upstream) -> Vec<Arc<str>> {
    u.targets.iter().map(|t| Arc::clone(&t.label)).collect()
}

fn routes(u: &Upstream) -> Vec<Arc<str>> {
    u.config
        .routes
        .iter()
        .map(|r| Arc::from(&*r.external_path))
        .collect()
}

/// A `server` field that changed.
#[derive(Debug, Serialize)]
pub(crate) struct ServerChange {
    pub field: &'static str,
    /// Whether it applies now; if not, the old value runs until a restart.
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// Everything a reload changed, and what it leaves for after the swap.
#[derive(Serialize)]
pub(crate) struct Changes {
    pub upstreams: Vec<UpstreamChange>,
    pub server: Vec<ServerChange>,
    /// Pools no longer used: retired once the new snapshot is in.
    #[serde(skip)]
    pub retired_pools: Vec<Arc<MuxPool>>,
    /// Probes of replaced or removed upstreams, stopped after the swap.
    #[serde(skip)]
    pub stopped_probes: Vec<CancellationToken>,
}

impl Changes {
    /// Starts the changes from `old` to `new` with the `server` section's.
    pub(crate) fn new(old: Option<&Config>, new: &Config) -> Changes {
        Changes {
            upstreams: Vec::new(),
            server: old
                .map(|o| server(&o.server, &new.server))
                .unwrap_or_default(),
            retired_pools: Vec::new(),
            stopped_probes: Vec::new(),
        }
    }

    /// The reload's log lines: one summary, one per changed upstream, one
    /// warning per `server` field kept until a restart.
    pub(crate) fn log(&self, generation: u64) {
        let names = |kind: Kind| -> Vec<&str> {
            self.upstreams
                .iter()
                .filter(|u| u.change == kind)
                .map(|u| &*u.name)
                .collect()
        };
        let draining: usize = self.upstreams.iter().map(|u| u.sessions_draining).sum();
        info!(
            generation = %format_args!("{generation:012x}"),
            added = ?names(Kind::Added),
            removed = ?names(Kind::Removed),
            changed = ?names(Kind::Changed),
            unchanged = names(Kind::Unchanged).len(),
            sessions_draining = draining,
            "config reloaded"
        );
        for u in self
            .upstreams
            .iter()
            .filter(|u| u.change != Kind::Unchanged)
        {
            info!(
                upstream = %u.name,
                change = ?u.change,
                targets_added = ?u.targets_added,
                targets_removed = ?u.targets_removed,
                routes_added = ?u.routes_added,
                routes_removed = ?u.routes_removed,
                mode = ?u.mode,
                sessions_draining = u.sessions_draining,
                "upstream reloaded"
            );
        }
        for s in self.server.iter().filter(|s| !s.applied) {
            warn!(
                field = %format_args!("server.{}", s.field),
                note = s.note.unwrap_or(""),
                "changed in the file but not applied: the running value stays until a restart"
            );
        }
    }
}

/// The `server` fields that differ, and whether a reload applies each.
fn server(old: &ServerConfig, new: &ServerConfig) -> Vec<ServerChange> {
    const RESTART: &str =
        "bound at start; restart (with reuse_port, without downtime) to change it";
    let mut out = Vec::new();
    let mut field = |changed: bool, field, note: Option<&'static str>| {
        if changed {
            out.push(ServerChange {
                field,
                applied: note.is_none(),
                note,
            });
        }
    };
    let restart = Some(RESTART);
    field(old.listen != new.listen, "listen", restart);
    field(
        old.admin_listen != new.admin_listen,
        "admin_listen",
        restart,
    );
    field(old.workers != new.workers, "workers", restart);
    field(old.reuse_port != new.reuse_port, "reuse_port", restart);
    // Both with TLS: the files are read again (see `AppState::reload`).
    let tls_switched = old.tls.is_some() != new.tls.is_some();
    field(
        old.tls != new.tls,
        "tls",
        tls_switched.then_some("TLS on or off is decided at start; restart to change it"),
    );
    let timeout_changed = old.header_read_timeout != new.header_read_timeout;
    field(timeout_changed, "header_read_timeout", restart);
    let head_changed = old.max_request_head_size != new.max_request_head_size;
    field(head_changed, "max_request_head_size", restart);
    field(old.serves_http2() != new.serves_http2(), "http2", restart);
    let streams_changed = old.http2_max_concurrent_streams != new.http2_max_concurrent_streams;
    field(streams_changed, "http2_max_concurrent_streams", restart);
    field(
        old.max_connections != new.max_connections,
        "max_connections",
        None,
    );
    let per_ip_changed = old.max_connections_per_ip != new.max_connections_per_ip;
    field(per_ip_changed, "max_connections_per_ip", None);
    field(
        old.shutdown_grace != new.shutdown_grace,
        "shutdown_grace",
        None,
    );
    field(
        old.drain_timeout != new.drain_timeout,
        "drain_timeout",
        None,
    );
    field(old.watch_config != new.watch_config, "watch_config", None);
    out
}
