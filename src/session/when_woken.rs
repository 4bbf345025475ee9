//! A future that is polled only after it has been woken itself.
//!
//! A relay task waits on several futures at once in `select!`, and every
//! wake of the task polls all of them. In a session that is one wake per
//! read, while its shutdown branch (a `CancellationToken` future) fires at
//! most once in the session's life, yet takes two mutexes on each poll
//! (tokio-util's `is_cancelled` and tokio's `Notified`), a cost paid on
//! every read for an event that almost never comes. [`WhenWoken`] hands
//! the inner future a waker of its own, and skips polling it until that
//! waker has fired, at the cost of one atomic load per poll (and a
//! registration of the task's waker when it changes, which on the
//! broker's single-threaded event loops is never, and after each wake of
//! the inner future).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;

pin_project! {
    /// `inner`, polled only when the waker it was last given has fired
    /// (and on the first poll).
    pub(crate) struct WhenWoken<F> {
        #[pin]
        inner: F,
        gate: Arc<Gate>,
        // The task waker last registered with `gate`: registering costs two
        // compare-and-swaps, comparing with this costs none. (A wake of the
        // gate uses up the registration; the poll that sees it registers
        // again.)
        registered: Option<Waker>,
    }
}

/// Set by the inner future's waker, read and reset by the next poll.
struct Gate {
    woken: AtomicBool,
    /// The task to wake on the inner future's behalf.
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    pub(crate) fn new(inner: F) -> Self {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        WhenWoken {
            inner,
            gate,
            registered: None,
        }
    }

    /// The inner future, to change (a timer's deadline, say); it is polled
    /// on the next poll whether or not it was woken, so that it can
    /// register what the change needs.
    pub(crate) fn inner_mut(self: Pin<&mut Self>) -> Pin<&mut F> {
        let this = self.project();
        this.gate.woken.store(true, Ordering::Release);
        this.inner
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered (if the task's waker changed) before the flag is read:
        // a wake in between both sets the flag and wakes the task again.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            this.gate.task.register(cx.waker());
            *this.registered = Some(cx.waker().clone());
        }
        // Mostly the flag is down: a plain load sees that without the
        // locked read-modify-write a swap is.
        if !this.gate.woken.load(Ordering::Acquire)
            || !this.gate.woken.swap(false, Ordering::AcqRel)
        {
            return Poll::Pending;
        }
        // The wake that set the flag took the registration with it: make it
        // again before polling the inner future. A wake between the swap and
        // this finds no task to wake, but the poll below sees its cause.
        this.gate.task.register(cx.waker());
        // Made anew (a reference count) rather than kept: it is needed
        // rarely, and the future lives in every idle session. Each one
        // wakes the same gate, so the inner future sees the same waker.
        let waker = Waker::from(Arc::clone(this.gate));
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, waking the waker it
    /// was last polled with when `fire` is called.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probe {
        fn fire(&self) {
            self.ready.store(true, Ordering::SeqCst);
            self.wake();
        }

        /// Wakes without becoming ready (a timer moved, say).
        fn wake(&self) {
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    struct ProbeFuture(Arc<Probe>);

    impl Future for ProbeFuture {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wakes.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A probe behind a gate, and the task (and its waker) polling it.
    struct Gated {
        probe: Arc<Probe>,
        task: Arc<Task>,
        waker: Waker,
        fut: Pin<Box<WhenWoken<ProbeFuture>>>,
    }

    impl Gated {
        /// Polls the gate as the task would.
        fn poll(&mut self) -> Poll<()> {
            self.fut
                .as_mut()
                .poll(&mut Context::from_waker(&self.waker))
        }

        /// How many times the task was woken.
        fn wakes(&self) -> usize {
            self.task.0.load(Ordering::SeqCst)
        }
    }

    fn gated_probe() -> Gated {
        let probe = Arc::new(Probe::default());
        let task = Arc::new(Task::default());
        let waker = Waker::from(Arc::clone(&task));
        let fut = Box::pin(WhenWoken::new(ProbeFuture(Arc::clone(&probe))));
        Gated {
            probe,
            task,
            waker,
            fut,
        }
    }

    #[test]
    fn polls_the_inner_future_only_after_its_own_wake() {
        let mut gated = gated_probe();

        assert!(gated.poll().is_pending());
        assert_eq!(
            gated.probe.polls.load(Ordering::SeqCst),
            1,
            "the first poll goes through"
        );
        // Wakes of the task by anything else do not reach the inner future.
        for _ in 0..10 {
            assert!(gated.poll().is_pending());
        }
        assert_eq!(gated.probe.polls.load(Ordering::SeqCst), 1);

        gated.probe.fire();
        assert_eq!(gated.wakes(), 1, "its wake wakes the task");
        assert!(gated.poll().is_ready());
        assert_eq!(gated.probe.polls.load(Ordering::SeqCst), 2);
    }

    /// The inner future may wake the task any number of times: each wake
    /// consumes the task's registration, so it must be made again.
    #[test]
    fn every_wake_of_the_inner_future_reaches_the_task() {
        let mut gated = gated_probe();

        assert!(gated.poll().is_pending());
        for wakes in 1..=3 {
            gated.probe.wake();
            assert_eq!(gated.wakes(), wakes, "wake {wakes} reaches the task");
            assert!(gated.poll().is_pending());
        }
        gated.probe.fire();
        assert_eq!(gated.wakes(), 4);
        assert!(gated.poll().is_ready());
    }

    #[tokio::test]
    async fn a_cancellation_still_ends_a_select_that_polls_others_often() {
        let token = tokio_util::sync::CancellationToken::new();
        let cancelled = WhenWoken::new(token.clone().cancelled_owned());
        tokio::pin!(cancelled);
        let mut ticks = 0u32;
        let mut ended = false;
        while !ended {
            tokio::select! {
                biased;
                _ = &mut cancelled => ended = true,
                _ = tokio::task::yield_now() => {
                    ticks += 1;
                    if ticks == 100 {
                        token.cancel();
                    }
                }
            }
        }
        assert_eq!(ticks, 100, "the cancellation is seen at the next poll");
    }
}
