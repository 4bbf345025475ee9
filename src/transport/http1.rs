//! The client listeners' HTTP/1 connections: hyper's HTTP/1 server on a
//! connection [`crate::transport::server`] found to speak it, in the
//! socket's own type, so that [`crate::transport::upgraded`] takes the
//! socket back out after the 101.
//!
//! When the listeners close, a connection finishes the request it is
//! serving and closes (an idle keep-alive connection closes at once; one
//! that has not sent its first request yet is served that one, in a
//! handover: see [`until_closable`]).
//!
//! Why not hyper-util's `GracefulShutdown`, which does this signal-and-wait
//! for a set of connections: it watches only connections that implement
//! its sealed `GracefulConnection` trait, and hyper-util 0.1.21 implements
//! that for `http1::Connection` but not for the `UpgradeableConnection`
//! that `with_upgrades` makes (only for the automatic server's, whose
//! rewind layers the broker avoids). So each connection calls hyper's own
//! `graceful_shutdown` when the shutdown token fires, and the tracker's
//! group does the waiting.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use http::StatusCode;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::debug;

use crate::transport::client_conn::{Connection, Limits};
use crate::transport::tls::ClientStream;

/// The smallest read buffer hyper takes.
const MIN_HYPER_BUF: usize = 8192;

/// Where a connection's current request stands, for a handover: shutting
/// a connection down gracefully is safe only once it has answered
/// something other than 101 (see [`until_closable`]).
struct Progress {
    state: AtomicU8,
    /// Told of each change of `state`.
    changed: Notify,
}

/// No request yet.
const NOTHING: u8 = 0;
/// A request's head read, its answer not yet given.
const ASKED: u8 = 1;
/// Answered with anything but 101.
const ANSWERED: u8 = 2;
/// Answered 101: the connection ends as it is upgraded.
const UPGRADING: u8 = 3;

impl Progress {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.changed.notify_one();
    }
}

/// Serves one client connection until it closes, is upgraded, or (after
/// the listeners closed) has answered the request in progress; drops it if
/// that takes until the drain is over.
pub(super) async fn serve(io: ClientStream, connection: Connection) {
    let Connection {
        remote,
        router,
        limits,
        tokens,
    } = connection;
    let progress = Arc::new(Progress {
        state: AtomicU8::new(NOTHING),
        changed: Notify::new(),
    });
    let service = {
        let (asked, answered) = (Arc::clone(&progress), Arc::clone(&progress));
        router
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(remote));
                asked.set(ASKED);
                request
            })
            .map_response(move |response: Response| {
                let upgrading = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                answered.set(if upgrading { UPGRADING } else { ANSWERED });
                response
            })
    };
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_head)
        // The read buffer never holds more than a head (hyper's floor is
        // 8 KiB): a connection costs at most that before its upgrade.
        .max_buf_size(limits.max_head.max(MIN_HYPER_BUF))
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = tokens.closed.cancelled() => {
            if !tokens.begun.is_cancelled() {
                // A handover: shutdown has not begun.
                if let Some(result) = until_closable(served.as_mut(), &progress, &tokens.begun).await {
                    return finished(result, remote, &limits);
                }
            }
            served.as_mut().graceful_shutdown();
            tokio::select! {
                result = served.as_mut() => result,
                // As the other loops' connections are, with their runtimes.
                () = tokens.released.cancelled() => return,
            }
        }
    };
    finished(result, remote, &limits)
}

/// In a handover, serves a connection until it can be shut down
/// gracefully without failing its client, or until shutdown begins; its
/// end, if it came first. hyper's graceful shutdown closes a connection it
/// has read nothing from unanswered (a client the kernel gave this process
/// a moment before), and adds `close` to the `Connection` header of an
/// answer it has not written yet, a 101's `Upgrade` too (which clients
/// such as tungstenite refuse). So it waits for the first request, and for
/// its answer: a 101 ends the connection by itself, anything else may
/// close it.
async fn until_closable<F>(
    mut served: Pin<&mut F>,
    progress: &Progress,
    begun: &CancellationToken,
) -> Option<F::Output>
where
    F: Future,
{
    loop {
        if progress.state.load(Ordering::Acquire) == ANSWERED {
            return None;
        }
        // A change since the load left a permit: this wakes at once.
        tokio::select! {
            result = served.as_mut() => return Some(result),
            () = progress.changed.notified() => {}
            () = begun.cancelled() => return None,
        }
    }
}

/// Counts and logs how a connection ended.
fn finished(result: hyper::Result<()>, remote: SocketAddr, limits: &Limits) {
    match result {
        Ok(()) => {}
        Err(error) if error.is_parse_too_large() => {
            limits.heads_too_large.inc();
            debug!(%remote, limit = limits.max_head, "client's request head is over max_request_head_size; answered 431 and closed");
        }
        Err(error) if error.is_timeout() => {
            limits.header_timeouts.inc();
            debug!(%remote, timeout = ?limits.header_read_timeout, "client sent no request head in time; closed");
        }
        Err(error) => debug!(%remote, %error, "client connection failed"),
    }
}
