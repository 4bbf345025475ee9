//! The applied configuration as every handshake sees it: one immutable
//! [`Snapshot`] of the routes, the upstreams and their pools. A reload
//! builds the next snapshot beside the running one and swaps it in whole
//! (`AppState::current`), so a handshake sees the old config or the new
//! one, never a mix.
//!
//! Building the next snapshot is where a reload's diff is made, upstream
//! by upstream ([`Snapshot::next`]): an upstream whose settings did not
//! change is carried over as it is (the same object, pool and probes, so
//! its sessions and mux connections are not touched); a changed one is
//! built anew, sharing its kept targets' run-time state with the old one,
//! and its pool is given the new settings in place when its shape
//! (`pool_size`, `envelope`) allows, or replaced. What must wait until the
//! swap (retiring pools, stopping probes, draining sessions) is returned
//! as [`Changes`] for `app::reload` to carry out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::changes::{Changes, UpstreamChange};
use crate::config::{Config, Mode, UpstreamConfig};
use crate::metrics::Metrics;
use crate::mux::pool::MuxPool;
use crate::routing::RouteTable;
use crate::shutdown::Shutdown;
use crate::upstream::Upstream;

/// What building a snapshot needs of the running broker.
pub(crate) struct Runtime {
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Identifies this broker process in every mux `hello`.
    pub instance: Uuid,
    /// The event loops mux pools spread their slots over.
    pub loops: Vec<Handle>,
}

/// One applied configuration (see the module docs).
pub(crate) struct Snapshot {
    /// The file as it was loaded: the source of truth, without overrides.
    pub config: Config,
    /// Modes set by `PUT /admin/upstreams/{name}/mode`, which last until
    /// the next reload.
    pub overrides: BTreeMap<String, Mode>,
    pub routes: RouteTable,
    /// In the file's order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The pool of each multiplexed upstream, by name.
    pub pools: HashMap<Arc<str>, Arc<MuxPool>>,
    /// Each upstream's active probes stop when its token is cancelled.
    probes: HashMap<Arc<str>, CancellationToken>,
}

impl Snapshot {
    /// The snapshot a broker starts with: every upstream new.
    pub(crate) fn first(config: Config, runtime: &Runtime) -> Snapshot {
        Snapshot::build(config, BTreeMap::new(), None, runtime).0
    }

    /// The snapshot that follows this one with `config` and `overrides`,
    /// and what the change does to running sessions and tasks (see the
    /// module docs). Nothing running is changed yet, but for pools given
    /// their new settings and new pools and probes started.
    pub(crate) fn next(
        &self,
        config: Config,
        overrides: BTreeMap<String, Mode>,
        runtime: &Runtime,
    ) -> (Snapshot, Changes) {
        Snapshot::build(config, overrides, Some(self), runtime)
    }

    pub(crate) fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }

    /// `upstream`'s config as it runs: the file's, with its mode overridden.
    fn effective(config: &UpstreamConfig, overrides: &BTreeMap<String, Mode>) -> UpstreamConfig {
        let mut effective = config.clone();
        if let Some(mode) = overrides.get(&*config.name) {
            effective.websocket_config.enable_direct_communication = *mode == Mode::Direct;
        }
        effective
    }

    fn build(
        config: Config,
        overrides: BTreeMap<String, Mode>,
        previous: Option<&Snapshot>,
        runtime: &Runtime,
    ) -> (Snapshot, Changes) {
        let mut changes = Changes::new(previous.map(|p| &p.config), &config);
        let jwt = config.jwt.as_ref();
        let jwt_changed = previous.is_some_and(|p| p.config.jwt != config.jwt);
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        let mut pools = HashMap::new();
        let mut probes = HashMap::new();
        for file_config in &config.upstreams {
            let wanted = Snapshot::effective(file_config, &overrides);
            let old = previous.and_then(|p| p.upstream(&wanted.name));
            let unchanged =
                old.is_some_and(|o| o.config == wanted && !(wanted.auth_required && jwt_changed));
            let (upstream, pool, probe) = match (old, unchanged) {
                (Some(old), true) => {
                    let previous = previous.expect("an old upstream has a snapshot");
                    changes.upstreams.push(UpstreamChange::unchanged(&old.name));
                    (
                        Arc::clone(old),
                        previous.pools.get(&old.name).cloned(),
                        previous.probes.get(&old.name).cloned(),
                    )
                }
                _ => {
                    let upstream = Arc::new(Upstream::new(wanted, jwt, old.map(|o| &**o)));
                    let old_pool = previous.and_then(|p| p.pools.get(&upstream.name));
                    let pool = match (old_pool, upstream.mode()) {
                        (Some(pool), Mode::Multiplexed)
                            if same_pool_shape(old.expect("a pool's upstream"), &upstream) =>
                        {
                            pool.retarget(Arc::clone(&upstream));
                            Some(Arc::clone(pool))
                        }
                        (old_pool, mode) => {
                            changes.retired_pools.extend(old_pool.cloned());
                            (mode == Mode::Multiplexed).then(|| start_pool(&upstream, runtime))
                        }
                    };
                    if let Some(stop) = previous.and_then(|p| p.probes.get(&upstream.name)) {
                        changes.stopped_probes.push(stop.clone());
                    }
                    changes
                        .upstreams
                        .push(UpstreamChange::between(old.map(|o| &**o), &upstream));
                    let probe = start_probes(&upstream, runtime);
                    (upstream, pool, probe)
                }
            };
            if let Some(pool) = pool {
                pools.insert(Arc::clone(&upstream.name), pool);
            }
            if let Some(probe) = probe {
                probes.insert(Arc::clone(&upstream.name), probe);
            }
            upstreams.push(upstream);
        }
        if let Some(previous) = previous {
            for old in &previous.upstreams {
                if upstreams.iter().any(|u| u.name == old.name) {
                    continue;
                }
                changes.upstreams.push(UpstreamChange::removed(old));
                changes
                    .retired_pools
                    .extend(previous.pools.get(&old.name).cloned());
                changes
                    .stopped_probes
                    .extend(previous.probes.get(&old.name).cloned());
            }
        }
        let snapshot = Snapshot {
            routes: RouteTable::new(&upstreams),
            config,
            overrides,
            upstreams,
            pools,
            probes,
        };
        (snapshot, changes)
    }
}

/// Whether a pool made for `old` can serve `new` as it is: the same
/// number of slots speaking the same envelope.
fn same_pool_shape(old: &Upstream, new: &Upstream) -> bool {
    let (o, n) = (&old.config.websocket_config, &new.config.websocket_config);
    old.mode() == Mode::Multiplexed && o.pool_size == n.pool_size && o.envelope == n.envelope
}

fn start_pool(upstream: &Arc<Upstream>, runtime: &Runtime) -> Arc<MuxPool> {
    MuxPool::start(
        Arc::clone(upstream),
        Arc::clone(&runtime.metrics),
        runtime.instance,
        &runtime.shutdown,
        &runtime.loops,
    )
}

/// Starts `upstream`'s active probes, if it has any; they stop with the
/// token returned.
fn start_probes(upstream: &Arc<Upstream>, runtime: &Runtime) -> Option<CancellationToken> {
    let stop = runtime.shutdown.token();
    crate::upstream::probe::start(upstream, &runtime.metrics, &runtime.shutdown, &stop)
        .then_some(stop)
}
