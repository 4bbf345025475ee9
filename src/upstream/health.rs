//! The health of one target: passive verdicts from real traffic and active
//! verdicts from probes (`probe.rs`), combined so that a target is used only
//! when neither says it is unhealthy.
//!
//! Passive (TrustGate's semantics, plus a circuit breaker): `threshold`
//! failures (refused connects, failed or timed-out handshakes, abnormal
//! closes, missed pongs) within `interval` open the circuit. The target then
//! stays out for a backoff (`passive_backoff`, doubling per failed trial up
//! to `passive_backoff_max`, with jitter); after it, exactly one session or
//! mux connection is let through as a trial (half-open). Its success closes
//! the circuit; its failure opens it again for twice as long.
//!
//! Active: `unhealthy_threshold` consecutive failed probes mark the target
//! down, `healthy_threshold` consecutive good ones bring it back.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::HealthChecks;

/// A trial that never reports (its client vanished mid-connect) frees the
/// half-open slot after this long.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct TargetHealth {
    passive_enabled: bool,
    threshold: u32,
    interval: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    /// Short, await-free critical sections only.
    passive: Mutex<Passive>,
    active_enabled: bool,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
    active_up: AtomicBool,
    /// Consecutive probe results of the kind that would flip the state.
    active_streak: AtomicU32,
    last_failure: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Passive {
    /// Circuit closed; failures counted in a window of `interval`.
    Closed {
        window: Option<Instant>,
        failures: u32,
    },
    /// Circuit open until `until`; then one trial may go.
    Open { until: Instant, backoff: Duration },
    /// One trial is in flight.
    Trial { since: Instant, backoff: Duration },
}

/// The passive state, for `/admin/upstreams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PassiveState {
    Healthy,
    Unhealthy,
    HalfOpen,
}

impl TargetHealth {
    pub(crate) fn new(config: &HealthChecks) -> TargetHealth {
        TargetHealth {
            passive_enabled: config.passive,
            threshold: config.threshold.max(1),
            interval: config.interval,
            backoff_base: config.passive_backoff,
            backoff_max: config.passive_backoff_max.max(config.passive_backoff),
            passive: Mutex::new(Passive::Closed {
                window: None,
                failures: 0,
            }),
            active_enabled: !config.path.is_empty(),
            unhealthy_threshold: config.unhealthy_threshold.max(1),
            healthy_threshold: config.healthy_threshold.max(1),
            active_up: AtomicBool::new(true),
            active_streak: AtomicU32::new(0),
            last_failure: Mutex::new(None),
        }
    }

    /// May the balancer consider this target now? (A target whose backoff
    /// has run out is a candidate; [`TargetHealth::claim`] then admits one
    /// trial.)
    pub(crate) fn is_candidate(&self, now: Instant) -> bool {
        if !self.active_up.load(Ordering::Relaxed) {
            return false;
        }
        match *self.passive.lock().expect("health lock") {
            Passive::Closed { .. } => true,
            Passive::Open { until, .. } => now >= until,
            Passive::Trial { since, .. } => now.duration_since(since) >= TRIAL_TIMEOUT,
        }
    }

    /// Takes the target for one new session or connection; false if another
    /// caller just took its single half-open trial.
    pub(crate) fn claim(&self, now: Instant) -> bool {
        let mut p = self.passive.lock().expect("health lock");
        match *p {
            Passive::Closed { .. } => true,
            Passive::Open { until, backoff } if now >= until => {
                *p = Passive::Trial {
                    since: now,
                    backoff,
                };
                true
            }
            Passive::Trial { since, backoff } if now.duration_since(since) >= TRIAL_TIMEOUT => {
                *p = Passive::Trial {
                    since: now,
                    backoff,
                };
                true
            }
            _ => false,
        }
    }

    /// Is the target in rotation now (for the gauge and the admin page)?
    pub(crate) fn is_healthy(&self) -> bool {
        self.active_up.load(Ordering::Relaxed) && self.passive_state() == PassiveState::Healthy
    }

    pub(crate) fn passive_state(&self) -> PassiveState {
        match *self.passive.lock().expect("health lock") {
            Passive::Closed { .. } => PassiveState::Healthy,
            Passive::Open { .. } => PassiveState::Unhealthy,
            Passive::Trial { .. } => PassiveState::HalfOpen,
        }
    }

    pub(crate) fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub(crate) fn active_enabled(&self) -> bool {
        self.active_enabled
    }

    /// A session or connection to the target succeeded.
    pub(crate) fn record_success(&self) {
        let mut p = self.passive.lock().expect("health lock");
        if let Passive::Trial { .. } = *p {
            *p = Passive::Closed {
                window: None,
                failures: 0,
            };
        }
    }

    /// Counts one real failure; returns true when it took the target out.
    pub(crate) fn record_failure(&self, reason: impl Into<String>) -> bool {
        *self.last_failure.lock().expect("health lock") = Some(reason.into());
        if !self.passive_enabled {
            return false;
        }
        let now = Instant::now();
        let mut p = self.passive.lock().expect("health lock");
        match *p {
            Passive::Closed { window, failures } => {
                let (window, failures) = match window {
                    Some(w) if now.duration_since(w) < self.interval => (w, failures + 1),
                    _ => (now, 1),
                };
                if failures >= self.threshold {
                    *p = self.open(now, self.backoff_base);
                    true
                } else {
                    *p = Passive::Closed {
                        window: Some(window),
                        failures,
                    };
                    false
                }
            }
            Passive::Trial { backoff, .. } => {
                *p = self.open(now, (backoff * 2).min(self.backoff_max));
                true
            }
            // Failures of sessions started before the circuit opened.
            Passive::Open { .. } => false,
        }
    }

    /// Opens the circuit for `backoff`, jittered into [backoff/2, backoff].
    fn open(&self, now: Instant, backoff: Duration) -> Passive {
        let ms = backoff.as_millis().max(1) as u64;
        let jittered = Duration::from_millis(rand::random_range(ms / 2..=ms));
        Passive::Open {
            until: now + jittered,
            backoff,
        }
    }

    /// One active probe result; returns `Some(new_state)` when it flipped.
    pub(crate) fn record_probe(&self, ok: bool, detail: &str) -> Option<bool> {
        if !ok {
            *self.last_failure.lock().expect("health lock") =
                Some(format!("active check: {detail}"));
        }
        let up = self.active_up.load(Ordering::Relaxed);
        if ok == up {
            self.active_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.active_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if up {
            self.unhealthy_threshold
        } else {
            self.healthy_threshold
        };
        if streak >= needed {
            self.active_streak.store(0, Ordering::Relaxed);
            self.active_up.store(ok, Ordering::Relaxed);
            Some(ok)
        } else {
            None
        }
    }

    /// The reason given with the most recent failure, passive or active.
    pub(crate) fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().expect("health lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(threshold: u32) -> HealthChecks {
        HealthChecks {
            threshold,
            interval: Duration::from_secs(60),
            passive_backoff: Duration::from_millis(100),
            passive_backoff_max: Duration::from_millis(400),
            ..HealthChecks::default()
        }
    }

    #[test]
    fn threshold_failures_open_the_circuit_and_one_trial_follows_the_backoff() {
        let h = TargetHealth::new(&checks(2));
        let now = Instant::now();
        assert!(h.is_candidate(now));
        assert!(!h.record_failure("refused"));
        assert!(h.is_candidate(now));
        assert!(h.record_failure("refused again"));
        assert!(!h.is_candidate(Instant::now()));
        assert_eq!(h.last_failure().as_deref(), Some("refused again"));
        // After the backoff (at most 100 ms), exactly one trial is admitted.
        let later = Instant::now() + Duration::from_millis(101);
        assert!(h.is_candidate(later));
        assert!(h.claim(later));
        assert!(!h.claim(later), "a single trial at a time");
        assert_eq!(h.passive_state(), PassiveState::HalfOpen);
        // The trial fails: out again, for up to twice as long.
        assert!(h.record_failure("trial failed"));
        assert!(!h.is_candidate(Instant::now() + Duration::from_millis(99)));
        let later = Instant::now() + Duration::from_millis(201);
        assert!(h.claim(later));
        h.record_success();
        assert_eq!(h.passive_state(), PassiveState::Healthy);
        assert!(h.is_healthy());
    }

    #[test]
    fn failures_outside_the_interval_do_not_add_up() {
        let h = TargetHealth::new(&HealthChecks {
            interval: Duration::from_millis(0),
            ..checks(2)
        });
        assert!(!h.record_failure("a"));
        assert!(!h.record_failure("b"));
        assert!(h.is_healthy());
    }

    #[test]
    fn disabled_passive_checks_never_open_the_circuit() {
        let h = TargetHealth::new(&HealthChecks {
            passive: false,
            ..checks(1)
        });
        assert!(!h.record_failure("x"));
        assert!(h.is_healthy());
    }

    #[test]
    fn active_results_flip_after_consecutive_thresholds() {
        let h = TargetHealth::new(&HealthChecks {
            path: crate::config::Text("/health".into()),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            ..checks(3)
        });
        assert_eq!(h.record_probe(false, "500"), None);
        assert_eq!(h.record_probe(false, "500"), None);
        assert_eq!(
            h.record_probe(true, "200"),
            None,
            "a success resets the streak"
        );
        assert_eq!(h.record_probe(false, "500"), None);
        assert_eq!(h.record_probe(false, "500"), None);
        assert_eq!(h.record_probe(false, "500"), Some(false));
        assert!(!h.is_candidate(Instant::now()));
        assert_eq!(h.record_probe(true, "200"), None);
        assert_eq!(h.record_probe(true, "200"), Some(true));
        assert!(h.is_healthy());
    }
}
