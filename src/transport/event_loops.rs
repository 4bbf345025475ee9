//! Thread-per-core serving: the extra event loops that accept and run
//! client sessions next to the caller's runtime.
//!
//! A session's two sockets wake its task over and over; on tokio's
//! work-stealing runtime each wake may land on another worker, which then
//! has to be unparked (a futex call and a context switch per hop). Like
//! NGINX's worker processes and Envoy's worker threads, the broker instead
//! runs `server.workers` single-threaded loops: the caller's runtime is the
//! first, and each of the others is a thread with a current-thread runtime
//! of its own. Every loop accepts from its own duplicate of the one
//! listening socket, and the loops take the accepted connections in turn
//! ([`crate::transport::accept`]); a session stays on the loop that serves it for its
//! whole life.
//!
//! Everything shared (the session registry, pools, limits, metrics, the
//! shutdown tracker) is already thread-safe and runtime-agnostic; only the
//! sockets and timers of a session belong to the loop that accepted it.
//! A loop keeps driving its sessions after accepting stops, until the
//! broker has drained and [`ClientLoops::stop`] releases it. Each loop's
//! server is counted by the shutdown tracker's listeners group while it
//! accepts, and each loop watches a child of the shutdown's released token;
//! the threads are the loops' own, joined by [`ClientLoops::stop`].
//!
//! A message that crosses from one loop to another (a multiplexed session
//! handing it to a pool connection on another loop) costs a wake of that
//! loop's thread: a system call, often a context switch. So the loops'
//! runtimes are handed out ([`ClientLoops::handles`]) for long-lived tasks
//! to be spread over them, and [`current`] tells a task which loop it is
//! on, so that it can prefer partners on the same one.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::shutdown::{GroupToken, Shutdown};

/// What a loop runs on its listener: serving until shutdown begins.
pub(crate) type Serve = Box<dyn FnOnce(TcpListener) -> ServeFuture + Send>;
/// The caller's runtime is loop 0; the threads are loops 1 and up.
pub(crate) const FIRST_THREAD_LOOP: usize = 1;
/// The future of one loop's server.
pub(crate) type ServeFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The index of the loop this thread runs (0 for the caller's thread,
    /// and for any thread that is no loop's).
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The index of the event loop the calling task runs on.
pub(crate) fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The extra loops, started (threads running, listeners registered) but
/// not yet serving.
pub(crate) struct ClientLoops {
    starts: Vec<oneshot::Sender<Serve>>,
    threads: Vec<JoinHandle<()>>,
    /// Every loop's runtime, by index: the caller's first.
    handles: Vec<Handle>,
    /// A child of the shutdown's released token: ends every loop.
    release: CancellationToken,
}

impl ClientLoops {
    /// Starts `count` loop threads, each registering a duplicate of
    /// `listener`, counted by `shutdown`'s listeners group until it stops
    /// accepting. Fails if a thread, runtime or duplicate cannot be had.
    pub(crate) async fn spawn(
        listener: &TcpListener,
        count: usize,
        shutdown: &Shutdown,
    ) -> io::Result<ClientLoops> {
        let mut loops = ClientLoops {
            starts: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
            handles: vec![Handle::current()],
            release: shutdown.released_token(),
        };
        for index in FIRST_THREAD_LOOP..FIRST_THREAD_LOOP + count {
            let duplicate = duplicate(listener)?;
            let (start, started) = oneshot::channel::<Serve>();
            let (ready, is_ready) = oneshot::channel::<io::Result<Handle>>();
            let release = loops.release.clone();
            let accepting = shutdown.listeners().token();
            // An OS thread, not a task: the loop's own, joined by `stop`.
            let thread = std::thread::Builder::new()
                .name(format!("muxgate-loop-{index}"))
                .spawn(move || run_loop(index, duplicate, started, ready, accepting, release))
                .map_err(|e| context(e, "starting an event loop thread"))?;
            loops.threads.push(thread);
            match is_ready.await {
                Ok(Ok(handle)) => {
                    loops.starts.push(start);
                    loops.handles.push(handle);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("an event loop thread ended at start")),
            }
        }
        Ok(loops)
    }

    /// Every loop's runtime, by loop index (the caller's is 0). A task
    /// spawned on one runs until the loop is stopped, after the drain.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many extra loops there are.
    pub(crate) fn len(&self) -> usize {
        self.threads.len()
    }

    /// Has every loop serve its listener with a server made by `make`,
    /// which is given the loop's index.
    pub(crate) fn serve(&mut self, mut make: impl FnMut(usize) -> Serve) {
        for (index, start) in (FIRST_THREAD_LOOP..).zip(self.starts.drain(..)) {
            // A loop that is gone has logged why; the others still serve.
            let _ = start.send(make(index));
        }
    }

    /// Ends every loop, dropping whatever sessions they still hold, and
    /// waits for their threads. Call it once the broker has drained.
    pub(crate) async fn stop(mut self) {
        self.release.cancel();
        self.starts.clear();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(JoinHandle::join)
                .filter(Result::is_err)
                .count()
        })
        .await;
        match joined {
            Ok(0) => {}
            Ok(panicked) => error!(panicked, "event loop threads panicked"),
            Err(e) => error!(error = %e, "waiting for the event loop threads"),
        }
    }
}

impl Drop for ClientLoops {
    /// A broker dropped without running, or a stop that was not awaited:
    /// the loops end on their own (their start channels close).
    fn drop(&mut self) {
        self.release.cancel();
    }
}

/// The body of one loop thread.
fn run_loop(
    index: usize,
    listener: std::net::TcpListener,
    started: oneshot::Receiver<Serve>,
    ready: oneshot::Sender<io::Result<Handle>>,
    accepting: GroupToken,
    release: CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(context(e, "building an event loop's runtime")));
            return;
        }
    };
    let listener = {
        let _entered = runtime.enter();
        match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(context(e, "registering the client listener")));
                return;
            }
        }
    };
    CURRENT.with(|current| current.set(index));
    if ready.send(Ok(runtime.handle().clone())).is_err() {
        return;
    }
    runtime.block_on(async move {
        let Ok(serve) = started.await else {
            return;
        };
        tokio::select! {
            _ = serve(listener) => {}
            _ = release.cancelled() => {
                warn!("event loop released while still accepting");
                return;
            }
        }
        drop(accepting);
        // Accepting has stopped; the sessions on this loop still need it
        // to run until the broker has drained them.
        release.cancelled().await;
    });
}

/// A second handle on the same listening socket, for another loop's
/// reactor (each loop registers its own; the kernel hands every new
/// connection to one of them).
pub(crate) fn duplicate(listener: &TcpListener) -> io::Result<std::net::TcpListener> {
    let fd = std::os::fd::AsFd::as_fd(listener)
        .try_clone_to_owned()
        .map_err(|e| context(e, "duplicating the client listener"))?;
    let duplicate = std::net::TcpListener::from(fd);
    duplicate.set_nonblocking(true)?;
    Ok(duplicate)
}

fn context(error: io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}
