//! Picking a healthy target for a new session: NGINX's smooth weighted
//! round robin, or the weighted least-connections rule.

use std::sync::Mutex;

use super::Target;
use crate::config::LoadBalancing;

#[derive(Debug)]
pub struct Balancer {
    kind: LoadBalancing,
    /// Smooth weighted round robin's current weights, one per target.
    /// Held only for the O(targets) pick, never across an await.
    current: Mutex<Vec<i64>>,
}

impl Balancer {
    pub fn new(kind: LoadBalancing, targets: &[Target]) -> Balancer {
        Balancer {
            kind,
            current: Mutex::new(vec![0; targets.len()]),
        }
    }

    /// The index of the chosen healthy target, or `None` if none is healthy.
    pub fn pick(&self, targets: &[Target]) -> Option<usize> {
        let healthy = |i: &usize| targets[*i].health.is_healthy();
        match self.kind {
            LoadBalancing::LeastConnections => {
                (0..targets.len()).filter(healthy).min_by(|&a, &b| {
                    // active/weight compared without division.
                    let la = targets[a].active() as u128 * targets[b].weight as u128;
                    let lb = targets[b].active() as u128 * targets[a].weight as u128;
                    la.cmp(&lb)
                })
            }
            // consistent_hash is rejected by validation until it exists.
            LoadBalancing::RoundRobin | LoadBalancing::ConsistentHash => {
                let mut current = self.current.lock().expect("balancer lock");
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for i in (0..targets.len()).filter(healthy) {
                    let w = i64::from(targets[i].weight);
                    current[i] += w;
                    total += w;
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                let chosen = best?;
                current[chosen] -= total;
                Some(chosen)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthChecks;
    use crate::upstream::{PassiveHealth, TargetUrl};
    use std::sync::atomic::AtomicUsize;

    fn target(weight: u32) -> Target {
        let url = TargetUrl::parse("ws://127.0.0.1:1").unwrap();
        Target {
            label: url.to_string(),
            url,
            weight,
            health: PassiveHealth::new(&HealthChecks {
                threshold: 1,
                ..HealthChecks::default()
            }),
            active: AtomicUsize::new(0),
        }
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let targets = vec![target(5), target(1), target(1)];
        let b = Balancer::new(LoadBalancing::RoundRobin, &targets);
        let picks: Vec<usize> = (0..7).map(|_| b.pick(&targets).unwrap()).collect();
        // NGINX's published sequence for weights 5,1,1: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn unhealthy_targets_are_skipped_and_none_means_no_target() {
        let targets = vec![target(1), target(1)];
        let b = Balancer::new(LoadBalancing::RoundRobin, &targets);
        targets[0].health.record_failure("down");
        assert!((0..4).all(|_| b.pick(&targets) == Some(1)));
        targets[1].health.record_failure("down");
        assert_eq!(b.pick(&targets), None);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_by_weight() {
        let targets = vec![target(2), target(1)];
        let b = Balancer::new(LoadBalancing::LeastConnections, &targets);
        targets[0]
            .active
            .store(3, std::sync::atomic::Ordering::Relaxed);
        targets[1]
            .active
            .store(1, std::sync::atomic::Ordering::Relaxed);
        // 3/2 > 1/1: the second target is less loaded.
        assert_eq!(b.pick(&targets), Some(1));
        targets[1]
            .active
            .store(2, std::sync::atomic::Ordering::Relaxed);
        // 3/2 < 2/1.
        assert_eq!(b.pick(&targets), Some(0));
    }
}
