//! `max_connections` and `max_connections_per_ip` as RAII permits: taken
//! before the upgrade (so a refusal is an HTTP status), held by the session,
//! and released exactly when the session ends by dropping them.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    global: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: DashMap<IpAddr, usize>,
}

impl ConnectionLimits {
    /// `per_ip_max` 0 means no per-address limit.
    pub(crate) fn new(max: usize, per_ip_max: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            global: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            per_ip_max,
            per_ip: DashMap::new(),
        })
    }

    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<ConnectionPermit, LimitRefusal> {
        if self.per_ip_max > 0 {
            // The entry guard locks a shard: it must be gone before
            // `release_ip` below touches the map again.
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.per_ip_max {
                return Err(LimitRefusal::PerIp);
            }
            *count += 1;
            drop(count);
        }
        let permit = match Arc::clone(&self.global).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.release_ip(ip);
                return Err(LimitRefusal::Global);
            }
        };
        Ok(ConnectionPermit {
            limits: Arc::clone(self),
            ip,
            global: Some(permit),
        })
    }

    fn release_ip(&self, ip: IpAddr) {
        if self.per_ip_max == 0 {
            return;
        }
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
    /// `None` once released.
    global: Option<OwnedSemaphorePermit>,
}

impl ConnectionPermit {
    /// Frees the slot now: the client's connection is over, though the
    /// session may still be closing its upstream. Idempotent.
    pub(crate) fn release(&mut self) {
        if self.global.take().is_some() {
            self.limits.release_ip(self.ip);
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
}
