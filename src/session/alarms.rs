//! The rare events a session's loop waits for beside its sockets: the
//! broker's shutdown, and the one timer that paces pings and notices
//! silence.
//!
//! Every read wakes a session's task, and each wake polls every branch of
//! its `select!`; a timer polled that way re-registers the task's waker
//! with the timer wheel each time (tokio's `Sleep`), and a shutdown future
//! takes two mutexes. [`Alarms`] holds both behind one [`WhenWoken`] gate,
//! so a wake by a socket costs them one atomic load, and the pair takes no
//! more room in the session than the two futures would apart.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::session::when_woken::WhenWoken;

/// Which alarm went off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// The broker is shutting down (or the session was cancelled).
    Shutdown,
    /// The timer reached its deadline; it stays fired until
    /// [`Alarms::reset`].
    Timer,
}

pin_project! {
    /// A session's shutdown signal and timer, polled only when one of them
    /// woke the task.
    pub(crate) struct Alarms {
        #[pin]
        gated: WhenWoken<Both>,
    }
}

pin_project! {
    struct Both {
        #[pin]
        shutdown: WaitForCancellationFutureOwned,
        #[pin]
        timer: Sleep,
    }
}

impl Alarms {
    /// Alarms for a session cancelled through `cancel`, its timer first
    /// set to `deadline`.
    pub(crate) fn new(cancel: CancellationToken, deadline: Instant) -> Alarms {
        Alarms {
            gated: WhenWoken::new(Both {
                shutdown: cancel.cancelled_owned(),
                timer: tokio::time::sleep_until(deadline),
            }),
        }
    }

    /// Moves the timer to `deadline` (re-arming it if it fired).
    pub(crate) fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.project()
            .gated
            .inner_mut()
            .project()
            .timer
            .reset(deadline);
    }
}

impl Future for Alarms {
    type Output = Alarm;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Alarm> {
        self.project().gated.poll(cx)
    }
}

impl Future for Both {
    type Output = Alarm;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Alarm> {
        let this = self.project();
        if this.shutdown.poll(cx).is_ready() {
            return Poll::Ready(Alarm::Shutdown);
        }
        this.timer.poll(cx).map(|()| Alarm::Timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_its_deadline_and_again_after_a_reset() {
        let start = Instant::now();
        let alarms = Alarms::new(CancellationToken::new(), start + Duration::from_secs(5));
        tokio::pin!(alarms);
        assert_eq!((&mut alarms).await, Alarm::Timer);
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
        alarms.as_mut().reset(start + Duration::from_secs(7));
        assert_eq!((&mut alarms).await, Alarm::Timer);
        assert_eq!(Instant::now() - start, Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_to_an_earlier_deadline_takes_effect() {
        let start = Instant::now();
        let alarms = Alarms::new(CancellationToken::new(), start + Duration::from_secs(60));
        tokio::pin!(alarms);
        // Polled once, so the timer is registered at 60 s.
        assert!(futures_util::poll!(alarms.as_mut()).is_pending());
        alarms.as_mut().reset(start + Duration::from_secs(1));
        assert_eq!((&mut alarms).await, Alarm::Timer);
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wins_over_a_pending_timer() {
        let cancel = CancellationToken::new();
        let alarms = Alarms::new(cancel.clone(), Instant::now() + Duration::from_secs(60));
        tokio::pin!(alarms);
        assert!(futures_util::poll!(alarms.as_mut()).is_pending());
        let start = Instant::now();
        cancel.cancel();
        assert_eq!((&mut alarms).await, Alarm::Shutdown);
        assert_eq!(Instant::now(), start, "no time passed");
    }
}
