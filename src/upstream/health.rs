//! Passive health of one target, with TrustGate's semantics: `threshold`
//! real failures (refused connects, failed or timed-out handshakes, abnormal
//! closes, missed pongs) within `interval` take the target out of rotation;
//! once `interval` has passed since the first of them the count resets and
//! the target is tried again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::HealthChecks;

#[derive(Debug)]
pub struct PassiveHealth {
    enabled: bool,
    threshold: u32,
    interval: Duration,
    /// Short, await-free critical sections only.
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    failures: u32,
    last_reason: Option<String>,
}

impl PassiveHealth {
    pub fn new(config: &HealthChecks) -> PassiveHealth {
        PassiveHealth {
            enabled: config.passive,
            threshold: config.threshold.max(1),
            interval: config.interval,
            window: Mutex::new(Window::default()),
        }
    }

    /// Counts one failure; returns true when it made the target unhealthy.
    pub fn record_failure(&self, reason: impl Into<String>) -> bool {
        if !self.enabled {
            return false;
        }
        let now = Instant::now();
        let mut w = self.window.lock().expect("health lock");
        if w.started
            .is_none_or(|s| now.duration_since(s) >= self.interval)
        {
            w.started = Some(now);
            w.failures = 0;
        }
        w.failures += 1;
        w.last_reason = Some(reason.into());
        w.failures == self.threshold
    }

    pub fn is_healthy(&self) -> bool {
        self.is_healthy_at(Instant::now())
    }

    fn is_healthy_at(&self, now: Instant) -> bool {
        if !self.enabled {
            return true;
        }
        let w = self.window.lock().expect("health lock");
        match w.started {
            Some(s) if now.duration_since(s) < self.interval => w.failures < self.threshold,
            _ => true,
        }
    }

    /// The reason given with the most recent failure.
    pub fn last_failure(&self) -> Option<String> {
        self.window.lock().expect("health lock").last_reason.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(threshold: u32, interval: Duration) -> HealthChecks {
        HealthChecks {
            threshold,
            interval,
            ..HealthChecks::default()
        }
    }

    #[test]
    fn threshold_failures_make_a_target_unhealthy_until_the_interval_passes() {
        let h = PassiveHealth::new(&checks(2, Duration::from_secs(60)));
        assert!(h.is_healthy());
        assert!(!h.record_failure("refused"));
        assert!(h.is_healthy());
        assert!(h.record_failure("refused again"));
        assert!(!h.is_healthy());
        assert_eq!(h.last_failure().as_deref(), Some("refused again"));
        let later = Instant::now() + Duration::from_secs(61);
        assert!(h.is_healthy_at(later));
    }

    #[test]
    fn disabled_passive_checks_never_mark_unhealthy() {
        let h = PassiveHealth::new(&HealthChecks {
            passive: false,
            threshold: 1,
            ..HealthChecks::default()
        });
        assert!(!h.record_failure("x"));
        assert!(h.is_healthy());
    }
}
