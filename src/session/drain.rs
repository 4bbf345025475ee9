//! Draining: the sessions whose route, upstream or target a reload or an
//! operator took away. They are not cut: each goes on until it ends, up to
//! `server.drain_timeout`, and only one still open then is closed with
//! 1001, the close a client sees when a server goes away. Meanwhile
//! `muxgate_sessions_draining{upstream}` counts them.
//!
//! A drain marks the sessions it takes in their registry entry and leaves
//! one timer task behind, owned by the shutdown tracker, that holds weak
//! references to them: a session that ends on its own frees its entry as
//! before. Undraining (a target put back in rotation) clears the mark, and
//! the timer passes over what is no longer marked.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::info;

use super::{SessionHandle, SessionManager};

impl SessionManager {
    /// Starts draining the open sessions `selects` picks that are not
    /// draining already; those still open and draining after `timeout`
    /// are closed with 1001. Returns how many began draining.
    pub(crate) fn drain(
        self: &Arc<Self>,
        selects: impl Fn(&SessionHandle) -> bool,
        timeout: Duration,
    ) -> usize {
        let mut taken: Vec<Weak<SessionHandle>> = Vec::new();
        // A session is marked while its shard is read-locked, so its guard
        // (which removes it, then clears the mark) cannot be half-way
        // through dropping: the gauge goes up and down once each.
        for s in self.sessions.iter() {
            if selects(s.value()) && !s.draining.swap(true, Ordering::AcqRel) {
                self.metrics.sessions_draining(&s.upstream, 1);
                taken.push(Arc::downgrade(s.value()));
            }
        }
        let count = taken.len();
        if count == 0 {
            return 0;
        }
        let stop = self.shutdown.token();
        self.shutdown.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(timeout) => {}
            }
            let mut closed = 0usize;
            for s in taken.iter().filter_map(Weak::upgrade) {
                if s.is_draining() {
                    s.cancel.cancel();
                    closed += 1;
                }
            }
            if closed > 0 {
                info!(
                    closed,
                    drain_timeout = %humantime::format_duration(timeout),
                    "drain_timeout ran out; closing drained sessions with 1001"
                );
            }
        });
        count
    }

    /// Stops draining the sessions `selects` picks: they stay open as if
    /// never drained. Returns how many there were.
    pub(crate) fn undrain(&self, selects: impl Fn(&SessionHandle) -> bool) -> usize {
        let mut count = 0;
        for s in self.sessions.iter() {
            if selects(s.value()) && s.draining.swap(false, Ordering::AcqRel) {
                self.metrics.sessions_draining(&s.upstream, -1);
                count += 1;
            }
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::config::Mode;
    use crate::metrics::Metrics;
    use crate::session::{Placement, SessionManager};
    use crate::shutdown::Shutdown;

    fn placement(upstream: &str, target: &str) -> Placement {
        Placement {
            upstream: upstream.into(),
            route: "/ws".into(),
            mode: Mode::Direct,
            target: Some(target.into()),
            compressed: false,
            http_version: crate::handshake::HttpVersion::Http1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_session_is_closed_only_after_the_timeout_and_an_undrained_one_never() {
        let manager = SessionManager::new(Arc::new(Metrics::new()), Shutdown::new());
        let remote = "127.0.0.1:1".parse().unwrap();
        let a = manager.open(placement("u", "ws://a"), remote, "1".into());
        let b = manager.open(placement("u", "ws://b"), remote, "2".into());
        let c = manager.open(placement("u", "ws://b"), remote, "3".into());
        let on_b = |s: &crate::session::SessionHandle| s.target.as_deref() == Some("ws://b");
        assert_eq!(manager.drain(on_b, Duration::from_secs(60)), 2);
        // Already draining: not taken twice.
        assert_eq!(manager.drain(on_b, Duration::from_secs(60)), 0);
        assert_eq!(manager.count_for("u"), (3, 2));
        let c_id = c.handle.id;
        assert_eq!(manager.undrain(|s| s.id == c_id), 1);

        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!b.handle.cancel.is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(b.handle.cancel.is_cancelled(), "drained and timed out");
        assert!(!c.handle.cancel.is_cancelled(), "undrained");
        assert!(!a.handle.cancel.is_cancelled(), "never drained");
        drop(b);
        assert_eq!(manager.count_for("u"), (2, 0));
    }
}
