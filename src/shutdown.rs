//! Shutdown: the signal that starts it, and the handle that owns every task
//! the broker spawns, so that each can be told to stop and waited for.
//!
//! An HTTP server's graceful shutdown does not reach upgraded WebSockets
//! (their tasks are detached from the server's, see tokio-rs/axum#3003),
//! so each session runs on this handle's tracker and watches a child of
//! its tokens.
//!
//! # One tree of cancellation
//!
//! Four tokens, each a child of the one above it, so that cancelling the
//! root reaches every task:
//!
//! ```text
//! root            cancelled last (`stop`): the admin listener
//! └─ released     cancelled once the drain is over (`release`): the event
//!    │            loops, and any client HTTP connection still open
//!    └─ begun     cancelled when shutdown begins (`begin`): new upgrades
//!       │         get 503, sessions close with 1001, the mux pools and
//!       │         the probes end
//!       └─ closed cancelled when the client listeners close (`hand_over`,
//!                 or with `begun`): accepting stops, each connection
//!                 finishes the request it serves without keep-alive, and
//!                 `/readyz` turns 503
//! ```
//!
//! A plain shutdown cancels `begun`, and `closed` with it. A restart's
//! handover (`server.reuse_port`, see `app`) cancels `closed` first: the
//! old process stops taking connections, which the kernel then gives the
//! new one, while those it has taken still complete their upgrades; only
//! then does it begin.
//!
//! Tasks hold children of these ([`Shutdown::token`] and its siblings), never
//! the tokens themselves, so no task can cancel more than its own.
//!
//! # One tracker
//!
//! Every task is counted by one [`TaskTracker`]. Two groups of its tasks are
//! waited for on their own, each task of a group being one of the
//! tracker's as well ([`TaskGroup`]):
//! - the sessions, the mux pools and the probes, which [`Shutdown::drain`]
//!   waits for up to `shutdown_grace` ([`Shutdown::spawn`]);
//! - the client listeners: their servers, HTTP connections and TLS
//!   handshakes ([`Shutdown::listeners`]), waited for after the drain (and,
//!   in a handover, before it: until every connection taken is upgraded
//!   or closed).
//!
//! What belongs to neither group (the admin listener) runs on the tracker
//! itself ([`Shutdown::spawn_last`]).

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received, shutting down");
    }
}

/// The root of every task the broker spawns (see the module docs).
#[derive(Clone)]
pub struct Shutdown {
    root: CancellationToken,
    /// A child of `root`.
    released: CancellationToken,
    /// A child of `released`.
    begun: CancellationToken,
    /// A child of `begun`.
    closed: CancellationToken,
    /// Counts every task.
    tracker: TaskTracker,
    /// Sessions, pools and probes: what [`Shutdown::drain`] waits for.
    sessions: TaskGroup,
    /// The client listeners and their connections.
    listeners: TaskGroup,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every session, pool and probe task finished within the grace period.
    Drained,
    /// The grace period ran out with some of them still running.
    TimedOut { remaining: usize },
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let root = CancellationToken::new();
        let released = root.child_token();
        let begun = released.child_token();
        let closed = begun.child_token();
        let tracker = TaskTracker::new();
        Shutdown {
            sessions: TaskGroup::of(&tracker),
            listeners: TaskGroup::of(&tracker),
            root,
            released,
            begun,
            closed,
            tracker,
        }
    }

    /// A token cancelled when shutdown begins.
    pub fn token(&self) -> CancellationToken {
        self.begun.child_token()
    }

    /// A token cancelled when the client listeners close: by
    /// [`Shutdown::hand_over`], or when shutdown begins.
    pub fn closed_token(&self) -> CancellationToken {
        self.closed.child_token()
    }

    /// A token cancelled once the drain is over ([`Shutdown::release`]),
    /// for what must keep running while sessions drain.
    pub fn released_token(&self) -> CancellationToken {
        self.released.child_token()
    }

    /// A token cancelled last ([`Shutdown::stop`]).
    pub fn root_token(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// Whether the broker is on its way out: its client listeners have
    /// closed (a handover) or shutdown has begun. `/readyz` says 503.
    pub fn is_shutting_down(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Whether shutdown has begun: new upgrades are refused and sessions
    /// close (during a handover's first step, they are not yet).
    pub fn has_begun(&self) -> bool {
        self.begun.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn begun(&self) {
        self.begun.cancelled().await
    }

    /// Runs `task` as an owned task: it is waited for by [`Shutdown::drain`].
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.sessions.spawn(task);
    }

    /// Like [`Shutdown::spawn`], on the runtime of `handle` (another
    /// event loop's).
    pub fn spawn_on<F>(&self, task: F, handle: &Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.sessions.spawn_on(task, handle);
    }

    /// The client listeners' group: their servers, HTTP connections and
    /// TLS handshakes. Waited for after the drain
    /// ([`Shutdown::listeners_stopped`]).
    pub fn listeners(&self) -> &TaskGroup {
        &self.listeners
    }

    /// Runs `task` on the tracker, in neither group: nothing waits for it
    /// but its handle's owner. For what serves until [`Shutdown::stop`]
    /// (the admin listener).
    pub fn spawn_last<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Tasks still running that [`Shutdown::drain`] waits for.
    pub fn running(&self) -> usize {
        self.sessions.len()
    }

    /// A restart's first step: the client listeners close (the kernel
    /// gives new connections to the other processes on the port), the
    /// connections they took finish their upgrades, and `/readyz` says 503;
    /// sessions go on until [`Shutdown::begin`].
    pub fn hand_over(&self) {
        self.closed.cancel();
    }

    /// Tells every task to stop (they close their clients with 1001).
    pub fn begin(&self) {
        self.begun.cancel();
    }

    /// Begins shutdown, then waits up to `grace` for every session, pool
    /// and probe task to end.
    pub async fn drain(&self, grace: Duration) -> DrainOutcome {
        self.begin();
        match tokio::time::timeout(grace, self.sessions.closed()).await {
            Ok(()) => DrainOutcome::Drained,
            Err(_) => DrainOutcome::TimedOut {
                remaining: self.sessions.len(),
            },
        }
    }

    /// Waits up to `within` for the client listeners' servers and HTTP
    /// connections to end (they stop accepting, and each connection
    /// finishes the request it serves, when the listeners close); true if
    /// they all did.
    pub async fn listeners_stopped(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.listeners.closed())
            .await
            .is_ok()
    }

    /// Ends the drain: what waited for it (the event loops, and client
    /// connections still open) stops. Begins shutdown if it had not.
    pub fn release(&self) {
        self.released.cancel();
    }

    /// Cancels the root: every task is told to stop, the admin listener
    /// last of all; no new task is expected after it.
    pub fn stop(&self) {
        self.root.cancel();
        self.tracker.close();
    }
}

/// One group of the tracker's tasks, to be waited for on its own. Each task
/// of the group is counted by the tracker too.
#[derive(Clone)]
pub struct TaskGroup {
    tracker: TaskTracker,
    group: TaskTracker,
}

/// A task's place in a [`TaskGroup`] (and in the tracker) while it is held.
pub struct GroupToken {
    _group: TaskTrackerToken,
    _tracker: TaskTrackerToken,
}

impl TaskGroup {
    fn of(tracker: &TaskTracker) -> TaskGroup {
        TaskGroup {
            tracker: tracker.clone(),
            group: TaskTracker::new(),
        }
    }

    /// Spawns `task` on the current runtime, counted by the group.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.group.spawn(self.tracker.track_future(task))
    }

    /// Spawns `task` on the runtime of `handle`, counted by the group.
    pub fn spawn_on<F>(&self, task: F, handle: &Handle) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.group.spawn_on(self.tracker.track_future(task), handle)
    }

    /// `future`, counted by the group from now until it completes or is
    /// dropped: for a future that is driven some other way than by a
    /// spawn (an event loop's `block_on`, a listener's `JoinSet`).
    pub fn track_future<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        self.group.track_future(self.tracker.track_future(future))
    }

    /// A place in the group, held by work that is not one future.
    pub fn token(&self) -> GroupToken {
        GroupToken {
            _group: self.group.token(),
            _tracker: self.tracker.token(),
        }
    }

    /// The group's tasks still running.
    pub fn len(&self) -> usize {
        self.group.len()
    }

    /// Whether none of the group's tasks is running.
    pub fn is_empty(&self) -> bool {
        self.group.is_empty()
    }

    /// Resolves once every task of the group has ended; the group expects
    /// no new ones from then on.
    async fn closed(&self) {
        self.group.close();
        self.group.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cancelling the root reaches the tokens of every level.
    #[tokio::test]
    async fn the_root_reaches_every_token() {
        let shutdown = Shutdown::new();
        let tokens = [
            shutdown.closed_token(),
            shutdown.token(),
            shutdown.released_token(),
            shutdown.root_token(),
        ];
        shutdown.stop();
        assert!(tokens.iter().all(CancellationToken::is_cancelled));
        assert!(shutdown.is_shutting_down());
    }

    /// Each level stops its own tasks and those below, never those above.
    #[tokio::test]
    async fn each_level_stops_only_what_is_below_it() {
        let shutdown = Shutdown::new();
        let (begun, released, root) = (
            shutdown.token(),
            shutdown.released_token(),
            shutdown.root_token(),
        );
        shutdown.begin();
        assert!(begun.is_cancelled());
        assert!(!released.is_cancelled() && !root.is_cancelled());
        shutdown.release();
        assert!(released.is_cancelled() && !root.is_cancelled());
    }

    /// The drain waits for the sessions' group only: a listener's task
    /// still running does not hold it, and is waited for on its own.
    #[tokio::test]
    async fn the_drain_waits_for_its_group_and_the_listeners_for_theirs() {
        let shutdown = Shutdown::new();
        let session = shutdown.token();
        shutdown.spawn(async move { session.cancelled().await });
        let connection = shutdown.released_token();
        shutdown
            .listeners()
            .spawn(async move { connection.cancelled().await });
        assert_eq!(shutdown.running(), 1);
        assert_eq!(
            shutdown.drain(Duration::from_secs(5)).await,
            DrainOutcome::Drained
        );
        assert!(!shutdown.listeners_stopped(Duration::from_millis(10)).await);
        shutdown.release();
        assert!(shutdown.listeners_stopped(Duration::from_secs(5)).await);
        assert!(shutdown.tracker.is_empty());
    }

    /// A handover closes the listeners and turns `/readyz` 503 without
    /// beginning: sessions and handshakes go on.
    #[tokio::test]
    async fn a_handover_closes_the_listeners_only() {
        let shutdown = Shutdown::new();
        let (closed, begun) = (shutdown.closed_token(), shutdown.token());
        shutdown.hand_over();
        assert!(closed.is_cancelled() && shutdown.is_shutting_down());
        assert!(!begun.is_cancelled() && !shutdown.has_begun());
        let shutdown = Shutdown::new();
        let closed = shutdown.closed_token();
        shutdown.begin();
        assert!(closed.is_cancelled() && shutdown.has_begun());
    }

    /// A drain that runs out of grace says how many tasks were left.
    #[tokio::test]
    async fn a_drain_past_its_grace_counts_what_is_left() {
        let shutdown = Shutdown::new();
        shutdown.spawn(std::future::pending());
        assert_eq!(
            shutdown.drain(Duration::from_millis(10)).await,
            DrainOutcome::TimedOut { remaining: 1 }
        );
    }
}
