//! Shutdown: the signal that starts it, and the handle that owns every
//! session task so they can be told to stop and waited for.
//!
//! axum's graceful shutdown does not reach upgraded WebSockets (their
//! tasks are detached, tokio-rs/axum#3003), so each session runs on this
//! handle's [`TaskTracker`] and watches a child of its root token.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
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

/// The root of every task the broker spawns.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every task finished within the grace period.
    Drained,
    /// The grace period ran out with tasks still running.
    TimedOut { remaining: usize },
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A token cancelled when shutdown begins.
    pub fn token(&self) -> CancellationToken {
        self.token.child_token()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn begun(&self) {
        self.token.cancelled().await
    }

    /// Runs `task` as an owned task: it is waited for by [`Shutdown::drain`].
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Like [`Shutdown::spawn`], on the runtime of `handle` (another
    /// event loop's).
    pub fn spawn_on<F>(&self, task: F, handle: &tokio::runtime::Handle)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, handle);
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Tells every task to stop (they close their clients with 1001).
    pub fn begin(&self) {
        self.token.cancel();
    }

    /// Begins shutdown, then waits up to `grace` for every task to end.
    pub async fn drain(&self, grace: Duration) -> DrainOutcome {
        self.begin();
        self.tracker.close();
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => DrainOutcome::Drained,
            Err(_) => DrainOutcome::TimedOut {
                remaining: self.tracker.len(),
            },
        }
    }
}
