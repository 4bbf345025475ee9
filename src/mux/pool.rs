//! The pool of one multiplexed upstream (mux-protocol.md §1, §5.4):
//! `pool_size` slots, each keeping one mux connection up on a healthy target
//! picked by weight, reconnecting with exponential backoff and full jitter,
//! and reporting failures to the target's passive health.
//!
//! The slots are spread over the event loops, and a session prefers the
//! least-loaded live connection on its own loop: every message between a
//! session and a connection on another loop wakes that loop's thread (see
//! [`crate::transport::event_loops`]), a system call and often a context
//! switch per message. The preference is bounded ([`local_slack`]),
//! so a loop that took more sessions than the others does not pile them on
//! its own connection, and with it on one target. A [`Binding`] counts the
//! session on its connection until dropped.
//!
//! A reload changes a pool in two ways. [`MuxPool::retarget`] gives it the
//! upstream's new settings and target set: new connections use them at
//! once, and a connection on a target that left the set (or was drained
//! by hand) moves like one on a target out of rotation, one at a time,
//! its sessions handed over. [`MuxPool::retire`] ends a pool that is no
//! longer used (its upstream removed, or switched to direct mode) once
//! its last session has ended; every session holds a [`Tenancy`] for that.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL};
use muxgate_backend::deflate::negotiate;
use muxgate_backend::deflate::stream::DeflateSettings;
use muxgate_backend::protocol::{self, Encoding, Frame, Hello};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::conn::{ConnCmd, ConnEnd, MuxConn};
use crate::config;
use crate::metrics::Metrics;
use crate::session::side::Direction;
use crate::shutdown::Shutdown;
use crate::transport::event_loops;
use crate::upstream::{self, ConnectError, Target, TargetLease, Upstream};

/// How often each slot checks whether the pool wants its connection on
/// another target (one that came back into rotation).
const REBALANCE_PERIOD: Duration = Duration::from_secs(1);
/// Commands a mux connection's write queue holds before sessions wait.
pub(crate) const MUX_WRITE_QUEUE: usize = 1024;
/// First reconnect delay; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the backoff.
const STABLE: Duration = Duration::from_secs(5);

/// Why a pool slot has no mux connection, or lost the one it had. The
/// texts go to the slot's log lines and, but for [`PoolError::NoHealthyTarget`],
/// to the target's passive health as its last failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// Every target is out of rotation; nothing was tried.
    #[error("no healthy target")]
    NoHealthyTarget,
    /// Connecting to the target or the WebSocket handshake failed (the
    /// text names the target).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The target answered the upgrade without the offered subprotocol.
    #[error("{target} did not select the {offered} subprotocol (selected {selected:?}); dropping the connection")]
    Subprotocol {
        target: Arc<str>,
        offered: &'static str,
        selected: Option<HeaderValue>,
    },
    /// The connection's first frame, `hello`, could not be written.
    #[error("sending hello to {target}: {source}")]
    Hello {
        target: Arc<str>,
        #[source]
        source: tungstenite::Error,
    },
    /// A live connection failed, closed or missed its pong.
    #[error("mux connection to {target} lost: {cause}")]
    Lost { target: Arc<str>, cause: String },
}

/// A live mux connection, as sessions see it.
#[derive(Clone)]
pub(crate) struct MuxConnHandle {
    pub id: Uuid,
    pub target: Arc<str>,
    pub tx: mpsc::Sender<ConnCmd>,
    /// The event loop the connection runs on.
    pub event_loop: usize,
    load: Arc<AtomicUsize>,
}

/// A live connection, as the admin API shows it.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub id: Uuid,
    pub target: Arc<str>,
    pub event_loop: usize,
    pub sessions: usize,
}

/// A session's claim on a connection; dropping it lowers the load.
pub(crate) struct Binding {
    pub conn: MuxConnHandle,
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.conn.load.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct MuxPool {
    /// The upstream's name, the same for every `upstream` it is given.
    name: Arc<str>,
    /// The upstream's settings and targets, as the last reload left them.
    upstream: ArcSwap<Upstream>,
    metrics: Arc<Metrics>,
    instance: Uuid,
    encoding: Encoding,
    /// Read on every bind, written on connect and loss; never held across an await.
    live: RwLock<Vec<MuxConnHandle>>,
    live_count: watch::Sender<usize>,
    /// A slot is moving its connection to another target ([`MoveTurn`]).
    moving: AtomicBool,
    /// Owns the tasks of connections handing their sessions over.
    shutdown: Shutdown,
    /// Stops the slots: cancelled on shutdown, or by [`MuxPool::retire`]
    /// once the last session has left.
    stop: CancellationToken,
    /// Sessions holding a [`Tenancy`].
    tenants: AtomicUsize,
    retired: AtomicBool,
}

/// A session's hold on its pool: a retired pool ends once the last is dropped.
pub(crate) struct Tenancy(Arc<MuxPool>);

impl Tenancy {
    pub(crate) fn new(pool: Arc<MuxPool>) -> Tenancy {
        pool.tenants.fetch_add(1, Ordering::AcqRel);
        Tenancy(pool)
    }

    pub(crate) fn pool(&self) -> &Arc<MuxPool> {
        &self.0
    }
}

impl std::ops::Deref for Tenancy {
    type Target = MuxPool;
    fn deref(&self) -> &MuxPool {
        &self.0
    }
}

impl Drop for Tenancy {
    fn drop(&mut self) {
        if self.0.tenants.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.retired.load(Ordering::Acquire)
        {
            self.0.stop.cancel();
        }
    }
}

impl MuxPool {
    /// Starts `pool_size` slot tasks on `shutdown`'s tracker, slot `i` on
    /// the event loop `loops[i % loops.len()]`.
    pub(crate) fn start(
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        instance: Uuid,
        shutdown: &Shutdown,
        loops: &[Handle],
    ) -> Arc<MuxPool> {
        let encoding = match upstream.config.websocket_config.envelope {
            config::Envelope::Json => Encoding::Json,
            config::Envelope::Binary => Encoding::Binary,
        };
        let pool = Arc::new(MuxPool {
            name: Arc::clone(&upstream.name),
            upstream: ArcSwap::new(upstream),
            metrics,
            instance,
            encoding,
            live: RwLock::new(Vec::new()),
            live_count: watch::channel(0).0,
            moving: AtomicBool::new(false),
            shutdown: shutdown.clone(),
            stop: shutdown.token(),
            tenants: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        });
        for slot in 0..pool.upstream.load().config.websocket_config.pool_size {
            let task = Arc::clone(&pool).run_slot(slot, pool.stop.clone());
            match loops.get(slot % loops.len().max(1)) {
                Some(event_loop) => shutdown.spawn_on(task, event_loop),
                None => shutdown.spawn(task),
            }
        }
        pool
    }

    /// Gives the pool its upstream's settings and targets after a reload
    /// (the same name; `pool_size` and `envelope` unchanged, see
    /// `app::changes`): new connections use them, and connections on
    /// targets no longer in the set move off them one at a time.
    pub(crate) fn retarget(&self, upstream: Arc<Upstream>) {
        debug_assert_eq!(upstream.name, self.name);
        self.upstream.store(upstream);
    }

    /// Ends the pool once no session holds it (at once if none does):
    /// its slots stop and its connections close.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        if self.tenants.load(Ordering::Acquire) == 0 {
            self.stop.cancel();
        }
    }

    /// Sessions holding the pool.
    pub(crate) fn tenants(&self) -> usize {
        self.tenants.load(Ordering::Relaxed)
    }

    /// The live connection `id`, if it still is.
    fn handle(&self, id: Uuid) -> Option<MuxConnHandle> {
        let live = self.live.read().expect("pool lock");
        live.iter().find(|c| c.id == id).cloned()
    }

    /// Every live connection: its id, target, event loop and sessions bound.
    pub(crate) fn connections(&self) -> Vec<ConnInfo> {
        self.live
            .read()
            .expect("pool lock")
            .iter()
            .map(|c| ConnInfo {
                id: c.id,
                target: Arc::clone(&c.target),
                event_loop: c.event_loop,
                sessions: c.load.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Binds to a live connection, if any: see [`choose`].
    pub(crate) fn bind(&self) -> Option<Binding> {
        let live = self.live.read().expect("pool lock");
        // Taken once: a connection may close while the choice is made.
        let open: Vec<&MuxConnHandle> = live.iter().filter(|c| !c.tx.is_closed()).collect();
        let loads: Vec<(usize, usize)> = open
            .iter()
            .map(|c| (c.event_loop, c.load.load(Ordering::Relaxed)))
            .collect();
        let conn = open[choose(&loads, event_loops::current())?].clone();
        conn.load.fetch_add(1, Ordering::Relaxed);
        Some(Binding { conn })
    }

    /// Binds as soon as a connection is live, or `None` at `deadline`.
    pub(crate) async fn bind_by(&self, deadline: Instant) -> Option<Binding> {
        let mut changes = self.live_count.subscribe();
        loop {
            if let Some(b) = self.bind() {
                return Some(b);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Waits until some connection is live (for the handshake's 503 rule).
    pub(crate) async fn wait_live(&self, timeout: Duration) -> bool {
        let mut changes = self.live_count.subscribe();
        tokio::time::timeout(timeout, changes.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn publish(&self, change: impl FnOnce(&mut Vec<MuxConnHandle>)) {
        let n = {
            let mut live = self.live.write().expect("pool lock");
            change(&mut live);
            live.len()
        };
        self.live_count.send_replace(n);
    }

    /// Counts `error` against `target`'s passive health; returns it.
    fn failed(&self, target: &Target, error: PoolError) -> PoolError {
        target.report_passive(&self.name, &self.metrics, Err(&error.to_string()));
        error
    }

    /// Keeps one connection up until shutdown.
    async fn run_slot(self: Arc<Self>, slot: usize, stop: CancellationToken) {
        let name = Arc::clone(&self.name);
        let mut backoff = BACKOFF_MIN;
        while !stop.is_cancelled() {
            let started = Instant::now();
            let outcome = match self.connect(slot, None).await {
                Ok(live) => self.serve(slot, live, &stop).await,
                Err(failure) => Err(failure),
            };
            if stop.is_cancelled() {
                break;
            }
            if let Err(failure) = outcome {
                warn!(upstream = %name, slot, cause = %failure, "mux connection failed");
            }
            if started.elapsed() >= STABLE {
                backoff = BACKOFF_MIN;
            }
            // Full jitter: anywhere in [backoff/2, backoff].
            let ms = backoff.as_millis() as u64;
            let delay = Duration::from_millis(rand::random_range(ms / 2..=ms));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connects to a target (`to`, or one picked by weight), sends hello
    /// and offers the connection to sessions.
    async fn connect(&self, slot: usize, to: Option<usize>) -> Result<Live, PoolError> {
        let upstream = self.upstream.load_full();
        let name = &self.name;
        let ws = &upstream.config.websocket_config;
        // Connections spread by weight (round robin); sessions then bind to
        // the least-loaded connection.
        let lease = match to {
            None => upstream.pick(None),
            Some(index) => upstream.lease(index),
        }
        .ok_or(PoolError::NoHealthyTarget)?;
        let target = lease.target();
        let label = Arc::clone(&target.label);
        let offered = self.encoding.subprotocol();
        let mut headers = HeaderMap::new();
        headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(offered));
        let compression = &ws.compression;
        if compression.mux_compression {
            // Context takeover and full windows both ways, the point of
            // compressing a connection that many sessions share; no
            // `client_max_window_bits`, so the target cannot ask for an
            // 8-bit window, which zlib cannot compress to.
            let offer =
                negotiate::offers_header(&[negotiate::Params::default()]).expect("one offer");
            headers.insert(SEC_WEBSOCKET_EXTENSIONS, offer);
        }
        let path = upstream
            .config
            .routes
            .first()
            .map(|r| r.internal_path.to_string())
            .unwrap_or_else(|| "/".into());
        self.metrics.mux_conn_state(name, &label, "connecting", 1);
        let connected = upstream::connect(
            &target.url,
            upstream.tls.as_ref(),
            &path,
            headers,
            ws.handshake_timeout,
        )
        .await;
        self.metrics.mux_conn_state(name, &label, "connecting", -1);
        let connected = match connected {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .upstream_connect_failed(name, &label, e.reason());
                return Err(self.failed(target, PoolError::Connect(e)));
            }
        };
        if connected.protocol.as_ref().and_then(|p| p.to_str().ok()) != Some(offered) {
            self.metrics
                .upstream_connect_failed(name, &label, "subprotocol");
            let why = PoolError::Subprotocol {
                target: Arc::clone(&label),
                offered,
                selected: connected.protocol,
            };
            return Err(self.failed(target, why));
        }
        self.metrics.upstream_connected(name, &label);
        self.metrics.target_picked(name, &label);
        let id = Uuid::new_v4();
        let hello = protocol::encode(
            &Frame::Hello(Hello {
                version: protocol::VERSION,
                broker: concat!("muxgate/", env!("CARGO_PKG_VERSION")).into(),
                instance: self.instance,
                connection: id,
            }),
            self.encoding,
        );
        let compressed = connected.deflate.is_some();
        let config = upstream.mux_socket_config;
        let mut socket = connected
            .compressed_websocket(config, |agreed| {
                let settings = DeflateSettings {
                    agreed,
                    level: compression.level,
                    min_size: compression.min_size.bytes(),
                    max_decompressed_size: config.max_message_size.unwrap_or(usize::MAX),
                };
                let counts = self.metrics.compression_counters(
                    name,
                    "mux",
                    Direction::UpstreamToClient,
                    Direction::ClientToUpstream,
                );
                (settings, Box::new(counts))
            })
            .await;
        if let Err(e) = futures_util::SinkExt::send(&mut socket, hello).await {
            let why = PoolError::Hello {
                target: Arc::clone(&label),
                source: e,
            };
            return Err(self.failed(target, why));
        }
        let (tx, rx) = mpsc::channel(MUX_WRITE_QUEUE);
        let handle = MuxConnHandle {
            id,
            target: Arc::clone(&label),
            tx,
            event_loop: event_loops::current(),
            load: Arc::new(AtomicUsize::new(0)),
        };
        target.report_passive(name, &self.metrics, Ok(()));
        self.publish(|live| live.push(handle));
        self.metrics.mux_conn_state(name, &label, "live", 1);
        info!(upstream = %name, target_url = %label, slot, connection = %id, encoding = offered, compressed, "mux connection live");
        let conn = MuxConn {
            upstream: Arc::clone(name),
            encoding: self.encoding,
            ws: socket,
            rx,
            counters: self.metrics.conn_counters(name, slot),
            metrics: Arc::clone(&self.metrics),
            timers: ws.into(),
        };
        Ok(Live {
            conn,
            id,
            label,
            lease,
        })
    }

    /// Serves `live` and whatever it is moved to, until the connection
    /// then serving ends. Each connection runs as a task of its own, so
    /// that its wakes (every message) do not poll the slot's timer: every
    /// [`REBALANCE_PERIOD`] the slot checks whether the pool wants its
    /// connection elsewhere ([`MuxPool::wanted_move`]); if so, and no other
    /// slot is moving one, it connects to that target while the old
    /// connection still serves, then asks the old one to hand its sessions
    /// over ([`ConnCmd::HandOver`]) and goes on with the new one.
    async fn serve(
        self: &Arc<Self>,
        slot: usize,
        mut live: Live,
        stop: &CancellationToken,
    ) -> Result<(), PoolError> {
        let name = &self.name;
        loop {
            let old = live.id;
            let from_label = Arc::clone(&live.label);
            let mut ended = self.spawn_conn(slot, live, stop);
            let mut check =
                tokio::time::interval_at(Instant::now() + REBALANCE_PERIOD, REBALANCE_PERIOD);
            check.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let next = loop {
                tokio::select! {
                    end = &mut ended => return end.unwrap_or(Ok(())),
                    _ = check.tick(), if !stop.is_cancelled() => {
                        let Some(to) = self.wanted_move(old, &from_label) else { continue };
                        let Some(_turn) = MoveTurn::take(&self.moving) else { continue };
                        match self.connect(slot, Some(to)).await {
                            Ok(next) => break next,
                            Err(failure) => {
                                warn!(upstream = %name, slot, from = %from_label, cause = %failure, "moving a mux connection failed; it stays");
                            }
                        }
                    }
                }
            };
            // The old one may have ended while the new one connected.
            if let Ok(Err(failure)) = ended.try_recv() {
                warn!(upstream = %name, slot, cause = %failure, "mux connection failed");
            }
            self.metrics
                .mux_connection_moved(name, &from_label, &next.label);
            info!(upstream = %name, slot, from = %from_label, to = %next.label, "mux connection moving to another target");
            // Through its queue: the old connection hands over once it has
            // written what it took before. One that has just left the pool
            // is ending anyway.
            if let Some(old) = self.handle(old) {
                self.shutdown.spawn(async move {
                    let _ = old.tx.send(ConnCmd::HandOver).await;
                });
            }
            live = next;
        }
    }

    /// Runs `live` as a task of its own, owned by the shutdown tracker;
    /// the receiver gets its end, unless the slot has moved on, and then
    /// the task logs a failure itself.
    fn spawn_conn(
        self: &Arc<Self>,
        slot: usize,
        live: Live,
        stop: &CancellationToken,
    ) -> oneshot::Receiver<Result<(), PoolError>> {
        let (end_tx, ended) = oneshot::channel();
        let (upstream, connection) = (Arc::clone(&self.name), live.id);
        let run = Arc::clone(self).run_conn(live, stop.clone());
        self.shutdown.spawn(async move {
            match end_tx.send(run.await) {
                Ok(()) => {}
                Err(Ok(())) => {
                    debug!(%upstream, slot, %connection, "mux connection handed its sessions over")
                }
                Err(Err(failure)) => {
                    warn!(%upstream, slot, %connection, cause = %failure, "mux connection failed while handing its sessions over")
                }
            }
        });
        ended
    }

    /// Runs one connection to its end; a loss counts against its target.
    async fn run_conn(
        self: Arc<Self>,
        live: Live,
        stop: CancellationToken,
    ) -> Result<(), PoolError> {
        let Live {
            conn,
            id,
            label,
            lease,
        } = live;
        // The handle is withdrawn before the connection tells its sessions
        // to re-bind, so none of them re-binds to it.
        let end = conn
            .run(stop, || self.publish(|live| live.retain(|c| c.id != id)))
            .await;
        self.metrics.mux_conn_state(&self.name, &label, "live", -1);
        match end {
            ConnEnd::Drained | ConnEnd::HandedOver => Ok(()),
            ConnEnd::Lost(cause) => {
                let why = PoolError::Lost {
                    target: Arc::clone(&label),
                    cause,
                };
                Err(self.failed(lease.target(), why))
            }
        }
    }

    /// The target connection `id`, on the target labelled `from`, should
    /// move to now, if any (see [`move_to`]). Of the connections on
    /// `from`, the one carrying the most sessions moves, so that its
    /// sessions spread over the new connection and the others as they
    /// re-bind. A target that a reload took out of the set counts as one
    /// more target, out of rotation.
    fn wanted_move(&self, id: Uuid, from: &str) -> Option<usize> {
        let upstream = self.upstream.load();
        let targets = &upstream.targets;
        let gone = targets.len();
        let index = |label: &str| {
            targets
                .iter()
                .position(|t| &*t.label == label)
                .unwrap_or(gone)
        };
        let from = index(from);
        let mut conns = vec![0; targets.len() + 1];
        let mut busiest: Option<(usize, Uuid)> = None;
        for c in self.live.read().expect("pool lock").iter() {
            // By label: a handle is part of every session's binding, and
            // kept as small as it is.
            let at = index(&c.target);
            conns[at] += 1;
            let load = c.load.load(Ordering::Relaxed);
            if at == from && busiest.is_none_or(|(most, _)| load > most) {
                busiest = Some((load, c.id));
            }
        }
        if busiest.map(|(_, busiest)| busiest) != Some(id) {
            return None;
        }
        let now = std::time::Instant::now();
        let weights: Vec<u32> = targets
            .iter()
            .map(|t| if t.in_rotation(now) { t.weight } else { 0 })
            .chain([0])
            .collect();
        move_to(
            &weights,
            &conns,
            from,
            upstream.config.websocket_config.pool_size,
        )
    }
}

/// A connection made, greeted and offered to sessions, not yet served.
struct Live {
    conn: MuxConn,
    id: Uuid,
    label: Arc<str>,
    /// Held for the connection's life: least_connections counts it.
    lease: TargetLease,
}

/// One move at a time in a pool: a slot holds the turn from deciding to
/// move until the old connection has been told to hand over, so that two
/// slots do not both move for the same gap.
struct MoveTurn<'a>(&'a AtomicBool);

impl<'a> MoveTurn<'a> {
    fn take(moving: &'a AtomicBool) -> Option<MoveTurn<'a>> {
        moving
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| MoveTurn(moving))
    }
}

impl Drop for MoveTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Where a pool of `pool_size` connections, `conns[t]` of them on target
/// `t`, should move one from target `from` to spread them over the targets
/// by `weights` (0 for a target out of rotation): when `from` carries more
/// than its share rounded up, to the target furthest below its share
/// rounded down (the first of those furthest below). `None` when the spread is as even as whole connections
/// allow, so that a pool never moves back and forth.
fn move_to(weights: &[u32], conns: &[usize], from: usize, pool_size: usize) -> Option<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return None;
    }
    // Target t's share of the pool is pool_size * weight / total.
    let scaled = |t: usize| pool_size as u64 * u64::from(weights[t]);
    if conns[from] as u64 <= scaled(from).div_ceil(total) {
        return None;
    }
    (0..weights.len())
        .filter(|&t| t != from && (conns[t] as u64) < scaled(t) / total)
        .max_by_key(|&t| (scaled(t) / total - conns[t] as u64, std::cmp::Reverse(t)))
}

/// How many sessions more than the least-loaded live connection the one on
/// a session's own event loop may carry and still be preferred: a quarter
/// more, plus two. Within it, a session's messages stay on its loop's
/// thread; past it, the least-loaded connection takes the session, so that
/// whatever the loops' share of sessions, the busiest connection carries
/// at most 1.25 times the least-loaded's, plus three.
fn local_slack(least: usize) -> usize {
    least / 4 + 2
}

/// Which of `conns` (each its event loop and the sessions bound to it) a
/// session on loop `here` binds to: the least-loaded on its own loop while
/// that is within [`local_slack`] of the least-loaded of all, else the
/// least-loaded of all. `None` when there is none.
fn choose(conns: &[(usize, usize)], here: usize) -> Option<usize> {
    let load = |i: &usize| conns[*i].1;
    let least = (0..conns.len()).min_by_key(load)?;
    let local = (0..conns.len())
        .filter(|&i| conns[i].0 == here)
        .min_by_key(load);
    let bound = conns[least].1 + local_slack(conns[least].1);
    Some(match local {
        Some(i) if conns[i].1 <= bound => i,
        _ => least,
    })
}

#[cfg(test)]
mod tests {
    use super::{choose, move_to, PoolError};
    use http::HeaderValue;

    /// The texts a slot logs and records as the target's last failure are
    /// those it wrote before its errors were typed.
    #[test]
    fn pool_errors_read_as_before() {
        let subprotocol = PoolError::Subprotocol {
            target: "ws://10.0.0.1:9000".into(),
            offered: "muxgate.v1.json",
            selected: Some(HeaderValue::from_static("chat")),
        };
        assert_eq!(
            subprotocol.to_string(),
            "ws://10.0.0.1:9000 did not select the muxgate.v1.json subprotocol (selected Some(\"chat\")); dropping the connection"
        );
        let lost = PoolError::Lost {
            target: "ws://10.0.0.1:9000".into(),
            cause: "missed its pong".into(),
        };
        assert_eq!(
            lost.to_string(),
            "mux connection to ws://10.0.0.1:9000 lost: missed its pong"
        );
        assert_eq!(PoolError::NoHealthyTarget.to_string(), "no healthy target");
    }

    /// The loop the i-th session arrives on.
    type Arrival = Box<dyn Fn(usize) -> usize>;

    /// Binds `sessions` sessions one after another, the i-th arriving on
    /// loop `arrival(i)`, over connections on `conn_loops`; returns each
    /// connection's load.
    fn bind_all(
        conn_loops: &[usize],
        sessions: usize,
        arrival: impl Fn(usize) -> usize,
    ) -> Vec<usize> {
        let mut conns: Vec<(usize, usize)> = conn_loops.iter().map(|&l| (l, 0)).collect();
        for i in 0..sessions {
            let chosen = choose(&conns, arrival(i)).expect("a connection");
            conns[chosen].1 += 1;
        }
        conns.iter().map(|c| c.1).collect()
    }

    #[test]
    fn sessions_of_balanced_loops_stay_on_their_own_loop() {
        assert_eq!(bind_all(&[0, 1], 200, |i| i % 2), [100, 100]);
        assert_eq!(bind_all(&[0, 1, 0, 1], 200, |i| i % 2), [50, 50, 50, 50]);
    }

    #[test]
    fn no_connection_falls_below_half_its_share_whatever_the_loops_take() {
        let patterns: [(&str, Arrival); 4] = [
            ("all on loop 0", Box::new(|_| 0)),
            (
                "three quarters on loop 1",
                Box::new(|i| usize::from(i % 4 != 0)),
            ),
            ("runs of 50", Box::new(|i| (i / 50) % 2)),
            ("a loop without a connection", Box::new(|_| 7)),
        ];
        for (name, arrival) in &patterns {
            for conn_loops in [&[0, 1][..], &[0, 1, 0], &[0, 0]] {
                let loads = bind_all(conn_loops, 200, arrival);
                let fair = 200 / conn_loops.len();
                let least = *loads.iter().min().unwrap();
                let most = *loads.iter().max().unwrap();
                assert!(least * 2 >= fair, "{name}, {conn_loops:?}: {loads:?}");
                assert!(
                    most <= least + least / 4 + 3,
                    "{name}, {conn_loops:?}: {loads:?}"
                );
            }
        }
    }

    #[test]
    fn a_pool_moves_back_to_a_target_in_rotation_and_never_back_and_forth() {
        // Both connections on target 1 while 0 was out; 0 is back.
        assert_eq!(move_to(&[1, 1], &[0, 2], 1, 2), Some(0));
        assert_eq!(move_to(&[1, 1], &[1, 1], 1, 2), None);
        // 0 still out of rotation: nowhere to go.
        assert_eq!(move_to(&[0, 1], &[0, 2], 1, 2), None);
        // An odd pool over two targets: 2/1 either way is even enough.
        assert_eq!(move_to(&[1, 1], &[0, 3], 1, 3), Some(0));
        assert_eq!(move_to(&[1, 1], &[1, 2], 1, 3), None);
        assert_eq!(move_to(&[1, 1], &[2, 1], 0, 3), None);
        // One connection, two targets: it stays where it is.
        assert_eq!(move_to(&[1, 1], &[0, 1], 1, 1), None);
        // By weight: 3 to 1 over four connections.
        assert_eq!(move_to(&[3, 1], &[0, 4], 1, 4), Some(0));
        assert_eq!(move_to(&[3, 1], &[2, 2], 1, 4), Some(0));
        assert_eq!(move_to(&[3, 1], &[3, 1], 1, 4), None);
        // A target taken out of rotation with its connection still up.
        assert_eq!(move_to(&[0, 1], &[1, 1], 0, 2), Some(1));
        // A target over its share gives to one under it; the one furthest
        // below comes first.
        assert_eq!(move_to(&[1, 1, 2], &[0, 1, 3], 2, 4), Some(0));
        assert_eq!(move_to(&[1, 1, 2], &[0, 0, 4], 2, 4), Some(0));
        assert_eq!(move_to(&[1, 2, 1], &[0, 0, 4], 2, 4), Some(1));
        assert_eq!(move_to(&[2, 1, 1], &[0, 0, 4], 2, 4), Some(0));
        assert_eq!(move_to(&[0, 0], &[0, 2], 1, 2), None);
    }

    #[test]
    fn nothing_to_bind_to() {
        assert_eq!(choose(&[], 0), None);
    }

    #[test]
    fn jitter_range_is_valid_at_the_minimum() {
        let ms = super::BACKOFF_MIN.as_millis() as u64;
        let d = rand::random_range(ms / 2..=ms);
        assert!((50..=100).contains(&d));
    }
}
