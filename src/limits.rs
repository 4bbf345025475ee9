//! `max_connections` and `max_connections_per_ip` as RAII permits: taken
//! before the upgrade (so a refusal is an HTTP status), held by the session,
//! and released exactly when the session ends by dropping them. Both
//! bounds can be changed while sessions hold permits (a reload): a lower
//! bound refuses new sessions until enough have ended, and cuts none.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitRefusal {
    /// `max_connections` sessions are open: HTTP 503.
    Global,
    /// This address holds `max_connections_per_ip` sessions: HTTP 429.
    PerIp,
}

#[derive(Debug)]
pub(crate) struct ConnectionLimits {
    /// Permits held.
    open: AtomicUsize,
    max: AtomicUsize,
    per_ip_max: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

impl ConnectionLimits {
    /// `per_ip_max` 0 means no per-address limit.
    pub(crate) fn new(max: usize, per_ip_max: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            per_ip_max: AtomicUsize::new(per_ip_max),
            per_ip: DashMap::new(),
        })
    }

    /// New bounds for new sessions (a reload); held permits stay held.
    pub(crate) fn set(&self, max: usize, per_ip_max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.per_ip_max.store(per_ip_max, Ordering::Relaxed);
    }

    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<ConnectionPermit, LimitRefusal> {
        let per_ip_max = self.per_ip_max.load(Ordering::Relaxed);
        let counted_ip = per_ip_max > 0;
        if counted_ip {
            // The entry guard locks a shard: it must be gone before
            // `release_ip` below touches the map again.
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= per_ip_max {
                return Err(LimitRefusal::PerIp);
            }
            *count += 1;
            drop(count);
        }
        let max = self.max.load(Ordering::Relaxed);
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            if counted_ip {
                self.release_ip(ip);
            }
            return Err(LimitRefusal::Global);
        }
        Ok(ConnectionPermit {
            limits: Arc::clone(self),
            ip,
            counted_ip,
            held: true,
        })
    }

    fn release_ip(&self, ip: IpAddr) {
        self.per_ip.remove_if_mut(&ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }

    /// Sessions open from `ip` (0 when per-IP limits are off).
    #[cfg(test)]
    fn held_by(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map(|c| *c).unwrap_or(0)
    }
}

/// One session's slot; dropping it frees the slot, unless
/// [`ConnectionPermit::release`] already did.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
    /// Counted in `per_ip` (per-IP limits were on when it was taken).
    counted_ip: bool,
    /// `false` once released.
    held: bool,
}

impl ConnectionPermit {
    /// Frees the slot now: the client's connection is over, though the
    /// session may still be closing its upstream. Idempotent.
    pub(crate) fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.limits.open.fetch_sub(1, Ordering::AcqRel);
            if self.counted_ip {
                self.limits.release_ip(self.ip);
            }
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_released_on_drop() {
        let limits = ConnectionLimits::new(2, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let pa = limits.try_acquire(a).unwrap();
        assert_eq!(limits.try_acquire(a).unwrap_err(), LimitRefusal::PerIp);
        let _pb = limits.try_acquire(b).unwrap();
        assert_eq!(limits.try_acquire(c).unwrap_err(), LimitRefusal::Global);
        // The refused global attempt did not leak c's per-IP count.
        assert_eq!(limits.held_by(c), 0);
        drop(pa);
        assert_eq!(limits.held_by(a), 0);
        assert!(limits.try_acquire(c).is_ok());
    }

    #[test]
    fn a_released_permit_frees_its_slot_once() {
        let limits = ConnectionLimits::new(1, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut pa = limits.try_acquire(a).unwrap();
        pa.release();
        pa.release();
        assert_eq!(limits.held_by(a), 0);
        let again = limits.try_acquire(a).expect("the released slot is free");
        // Dropping the released permit frees nothing more.
        drop(pa);
        assert_eq!(limits.held_by(a), 1);
        assert_eq!(limits.try_acquire(a).unwrap_err(), LimitRefusal::PerIp);
        drop(again);
        assert_eq!(limits.held_by(a), 0);
    }

    #[test]
    fn lowered_bounds_refuse_new_sessions_and_cut_none() {
        let limits = ConnectionLimits::new(3, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| limits.try_acquire(a).unwrap()).collect();
        limits.set(2, 2);
        assert_eq!(limits.try_acquire(a).unwrap_err(), LimitRefusal::Global);
        // Taken before per-IP limits were on: not counted against them.
        assert_eq!(limits.held_by(a), 0);
        drop(held);
        let p1 = limits.try_acquire(a).unwrap();
        let _p2 = limits.try_acquire(a).unwrap();
        assert_eq!(limits.try_acquire(a).unwrap_err(), LimitRefusal::PerIp);
        limits.set(10, 0);
        let _p3 = limits.try_acquire(a).unwrap();
        drop(p1);
        assert_eq!(limits.held_by(a), 1);
    }
}
