//! Picking a target for a new session (direct mode) or mux connection:
//! NGINX's smooth weighted round robin, weighted least connections, or a
//! consistent-hash ring of virtual nodes, always over the targets whose
//! health admits them (see `health.rs`).

use std::sync::Mutex;
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use super::Target;
use crate::config::LoadBalancing;

/// Virtual nodes on the ring per unit of weight: enough that keys spread
/// evenly, few enough that the ring stays small.
const VNODES_PER_WEIGHT: u32 = 160;

#[derive(Debug)]
pub(crate) struct Balancer {
    kind: LoadBalancing,
    /// Smooth weighted round robin's current weights, one per target.
    /// Held only for the O(targets) pick, never across an await.
    current: Mutex<Vec<i64>>,
    /// (hash, target index), sorted by hash; empty unless consistent_hash.
    ring: Vec<(u64, usize)>,
}

impl Balancer {
    pub(crate) fn new(kind: LoadBalancing, targets: &[Target]) -> Balancer {
        let mut ring = Vec::new();
        if kind == LoadBalancing::ConsistentHash {
            for (i, t) in targets.iter().enumerate() {
                for v in 0..t.weight.saturating_mul(VNODES_PER_WEIGHT) {
                    ring.push((xxh3_64(format!("{}#{v}", t.label).as_bytes()), i));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            kind,
            current: Mutex::new(vec![0; targets.len()]),
            ring,
        }
    }

    /// Chooses a target and claims it from its health (one half-open trial
    /// at a time). `key` is the consistent-hash key; ignored otherwise, and
    /// round robin is used when a hashing upstream gets none.
    /// Targets listed in `skip` (already tried for this session) are passed over.
    pub(crate) fn pick(
        &self,
        targets: &[Target],
        key: Option<&[u8]>,
        skip: &[usize],
    ) -> Option<usize> {
        let now = Instant::now();
        let mut excluded = vec![false; targets.len()];
        for &i in skip {
            excluded[i] = true;
        }
        loop {
            let candidate = |i: usize| !excluded[i] && targets[i].in_rotation(now);
            let chosen = match (self.kind, key) {
                (LoadBalancing::ConsistentHash, Some(key)) => self.on_ring(key, candidate),
                (LoadBalancing::LeastConnections, _) => {
                    (0..targets.len())
                        .filter(|&i| candidate(i))
                        .min_by(|&a, &b| {
                            // active/weight compared without division.
                            let la = targets[a].active() as u128 * targets[b].weight as u128;
                            let lb = targets[b].active() as u128 * targets[a].weight as u128;
                            la.cmp(&lb)
                        })
                }
                _ => self.smooth_round_robin(targets, candidate),
            }?;
            if targets[chosen].health.claim(now) {
                return Some(chosen);
            }
            excluded[chosen] = true;
        }
    }

    /// The first candidate clockwise from the key's point on the ring, so a
    /// target that leaves moves only its own keys.
    fn on_ring(&self, key: &[u8], candidate: impl Fn(usize) -> bool) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let h = xxh3_64(key);
        let start = self.ring.partition_point(|&(v, _)| v < h);
        (0..self.ring.len())
            .map(|k| self.ring[(start + k) % self.ring.len()].1)
            .find(|&i| candidate(i))
    }

    fn smooth_round_robin(
        &self,
        targets: &[Target],
        candidate: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut current = self.current.lock().expect("balancer lock");
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in (0..targets.len()).filter(|&i| candidate(i)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthChecks;
    use crate::upstream::{TargetHealth, TargetUrl};
    use std::sync::Arc;

    fn target(port: u16, weight: u32) -> Target {
        let url = TargetUrl::parse(&format!("ws://127.0.0.1:{port}")).unwrap();
        Target {
            label: url.to_string().into(),
            url,
            weight,
            health: Arc::new(TargetHealth::new(&HealthChecks {
                threshold: 1,
                ..HealthChecks::default()
            })),
            active: Default::default(),
            drained: Default::default(),
        }
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let targets = vec![target(1, 5), target(2, 1), target(3, 1)];
        let b = Balancer::new(LoadBalancing::RoundRobin, &targets);
        let picks: Vec<usize> = (0..7)
            .map(|_| b.pick(&targets, None, &[]).unwrap())
            .collect();
        // NGINX's published sequence for weights 5,1,1: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn unhealthy_targets_are_skipped_and_none_means_no_target() {
        let targets = vec![target(1, 1), target(2, 1)];
        let b = Balancer::new(LoadBalancing::RoundRobin, &targets);
        targets[0].health.record_failure("down");
        assert!((0..4).all(|_| b.pick(&targets, None, &[]) == Some(1)));
        targets[1].health.record_failure("down");
        assert_eq!(b.pick(&targets, None, &[]), None);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_by_weight() {
        let targets = vec![target(1, 2), target(2, 1)];
        let b = Balancer::new(LoadBalancing::LeastConnections, &targets);
        targets[0]
            .active
            .store(3, std::sync::atomic::Ordering::Relaxed);
        targets[1]
            .active
            .store(1, std::sync::atomic::Ordering::Relaxed);
        // 3/2 > 1/1: the second target is less loaded.
        assert_eq!(b.pick(&targets, None, &[]), Some(1));
        targets[1]
            .active
            .store(2, std::sync::atomic::Ordering::Relaxed);
        // 3/2 < 2/1.
        assert_eq!(b.pick(&targets, None, &[]), Some(0));
    }

    #[test]
    fn consistent_hash_is_stable_and_a_leaving_target_moves_only_its_keys() {
        let targets: Vec<Target> = (1..=4).map(|p| target(p, 1)).collect();
        let b = Balancer::new(LoadBalancing::ConsistentHash, &targets);
        let keys: Vec<String> = (0..4000).map(|k| format!("user-{k}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&targets, Some(k.as_bytes()), &[]).unwrap())
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&targets, Some(k.as_bytes()), &[]).unwrap())
            .collect();
        assert_eq!(before, again, "the same key always reaches the same target");
        for t in 0..4 {
            let share = before.iter().filter(|&&i| i == t).count();
            assert!(
                (800..1200).contains(&share),
                "target {t} holds {share} of 4000 keys"
            );
        }
        targets[2].health.record_failure("gone");
        let after: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(&targets, Some(k.as_bytes()), &[]).unwrap())
            .collect();
        for (k, (x, y)) in before.iter().zip(&after).enumerate() {
            if *x != 2 {
                assert_eq!(x, y, "key {k} moved although its target stayed");
            } else {
                assert_ne!(*y, 2);
            }
        }
    }
}
