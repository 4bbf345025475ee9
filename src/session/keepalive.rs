//! Ping/pong supervision, one rule for every socket the broker keeps open
//! (both relays' two legs, a multiplexed session's client, a mux
//! connection): ping every `ping_period`; a peer not heard from for
//! `pong_wait` is gone.
//!
//! A loop keeps one [`Keepalive`] and a [`Liveness`] per peer, and asks two
//! things: when its timer must next fire ([`Keepalive::deadline`]), and,
//! when it fires, what is due ([`Keepalive::due`]). Hearing from a peer is
//! one store ([`Liveness::heard`]), not a clock read: the clock is read
//! only when the timer fires, which then stamps every peer heard since. A
//! peer is therefore judged at most one `ping_period` late, never early,
//! and a busy socket pays almost nothing per message.
//!
//! A peer the loop is not reading (its messages have nowhere to go while
//! the other side is backed up) cannot be blamed for silence: the loop
//! marks it heard before asking.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::WebSocketSettings;

/// `ping_period` and `pong_wait`, validated so that `pong_wait` is longer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timers {
    pub ping_period: Duration,
    pub pong_wait: Duration,
}

impl From<&WebSocketSettings> for Timers {
    fn from(ws: &WebSocketSettings) -> Timers {
        Timers {
            ping_period: ws.ping_period,
            pong_wait: ws.pong_wait,
        }
    }
}

/// Whether one peer has been heard from.
///
/// One word, no flag beside it: this sits in every session's future.
#[derive(Debug)]
pub(crate) struct Liveness {
    /// The timer's firing since which the peer has not been heard from
    /// (or the start); `None` once it has been, until the next firing
    /// stamps it.
    silent_since: Option<Instant>,
}

impl Liveness {
    pub(crate) fn new(now: Instant) -> Liveness {
        Liveness {
            silent_since: Some(now),
        }
    }

    /// Something arrived from the peer (or it is excused; see the module).
    #[inline]
    pub(crate) fn heard(&mut self) {
        self.silent_since = None;
    }
}

/// What the timer's firing found due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing yet: the timer fired early (or was already moved on).
    Nothing,
    /// Ping every peer.
    Ping,
    /// The peer at this index of the ones asked about has been silent for
    /// `pong_wait`: it is gone.
    Silent(usize),
}

/// A loop's ping schedule.
#[derive(Debug)]
pub(crate) struct Keepalive {
    next_ping: Instant,
}

impl Keepalive {
    /// The first ping is due one `ping_period` after `now`.
    pub(crate) fn new(now: Instant, ping_period: Duration) -> Keepalive {
        Keepalive {
            next_ping: now + ping_period,
        }
    }

    /// When the loop's timer must next fire: the next ping, or the moment
    /// the least recently heard peer will have been silent for `pong_wait`
    /// (a peer heard since the last firing cannot be, before the next).
    pub(crate) fn deadline<const N: usize>(
        &self,
        peers: [&Liveness; N],
        pong_wait: Duration,
    ) -> Instant {
        peers
            .iter()
            .filter_map(|p| p.silent_since)
            .map(|since| since + pong_wait)
            .fold(self.next_ping, Instant::min)
    }

    /// The timer fired at `now`: stamps the peers heard since its last
    /// firing, then says whether one is gone (the first, in the order
    /// given) or a ping is due. A due ping moves the schedule on.
    pub(crate) fn due<const N: usize>(
        &mut self,
        now: Instant,
        mut peers: [&mut Liveness; N],
        timers: Timers,
    ) -> Due {
        for peer in peers.iter_mut() {
            peer.silent_since.get_or_insert(now);
        }
        if let Some(silent) = peers.iter().position(|p| {
            p.silent_since
                .is_some_and(|since| now >= since + timers.pong_wait)
        }) {
            return Due::Silent(silent);
        }
        if now >= self.next_ping {
            self.next_ping = now + timers.ping_period;
            return Due::Ping;
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMERS: Timers = Timers {
        ping_period: Duration::from_secs(10),
        pong_wait: Duration::from_secs(25),
    };

    #[test]
    fn pings_every_period_while_peers_are_heard() {
        let start = Instant::now();
        let mut keepalive = Keepalive::new(start, TIMERS.ping_period);
        let (mut a, mut b) = (Liveness::new(start), Liveness::new(start));
        assert_eq!(
            keepalive.deadline([&a, &b], TIMERS.pong_wait),
            start + TIMERS.ping_period
        );
        for round in 1..=5 {
            a.heard();
            b.heard();
            let now = start + TIMERS.ping_period * round;
            assert_eq!(keepalive.due(now, [&mut a, &mut b], TIMERS), Due::Ping);
            assert_eq!(
                keepalive.deadline([&a, &b], TIMERS.pong_wait),
                now + TIMERS.ping_period,
                "the next ping comes before either peer's pong_wait"
            );
        }
    }

    #[test]
    fn a_peer_silent_for_pong_wait_is_gone_and_named() {
        let start = Instant::now();
        let mut keepalive = Keepalive::new(start, TIMERS.ping_period);
        let (mut a, mut b) = (Liveness::new(start), Liveness::new(start));
        // a answers every ping; b never does.
        let gone = loop {
            let now = keepalive.deadline([&a, &b], TIMERS.pong_wait);
            match keepalive.due(now, [&mut a, &mut b], TIMERS) {
                Due::Ping => a.heard(),
                Due::Nothing => {}
                Due::Silent(peer) => break (peer, now),
            }
            assert!(
                now < start + TIMERS.pong_wait * 2,
                "b was never found silent"
            );
        };
        assert_eq!(
            gone,
            (1, start + TIMERS.pong_wait),
            "b, at pong_wait, not a ping later"
        );
    }

    #[test]
    fn an_early_firing_finds_nothing_due_and_keeps_the_schedule() {
        let start = Instant::now();
        let mut keepalive = Keepalive::new(start, TIMERS.ping_period);
        let mut a = Liveness::new(start);
        let early = start + Duration::from_secs(3);
        assert_eq!(keepalive.due(early, [&mut a], TIMERS), Due::Nothing);
        assert_eq!(
            keepalive.deadline([&a], TIMERS.pong_wait),
            start + TIMERS.ping_period
        );
    }

    #[test]
    fn a_peer_heard_is_stamped_at_the_firing_that_finds_it() {
        // Heard just after a firing, judged from the next one: at most a
        // ping_period late, never early.
        let start = Instant::now();
        let mut keepalive = Keepalive::new(start, TIMERS.ping_period);
        let mut a = Liveness::new(start);
        a.heard();
        let first = start + TIMERS.ping_period;
        assert_eq!(keepalive.due(first, [&mut a], TIMERS), Due::Ping);
        assert_eq!(
            keepalive.deadline([&a], TIMERS.pong_wait),
            first + TIMERS.ping_period
        );
        let second = first + TIMERS.ping_period;
        assert_eq!(keepalive.due(second, [&mut a], TIMERS), Due::Ping);
        let silent_at = first + TIMERS.pong_wait;
        assert_eq!(
            keepalive.deadline([&a], TIMERS.pong_wait),
            second + TIMERS.ping_period
        );
        assert_eq!(
            keepalive.due(second + TIMERS.ping_period, [&mut a], TIMERS),
            Due::Ping
        );
        assert_eq!(
            keepalive.deadline([&a], TIMERS.pong_wait),
            silent_at,
            "silent since the first firing"
        );
        assert_eq!(keepalive.due(silent_at, [&mut a], TIMERS), Due::Silent(0));
    }
}
