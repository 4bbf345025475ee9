//! The client listeners' HTTP/2 connections: hyper's HTTP/2 server with
//! extended CONNECT (RFC 8441), so that a client opens WebSockets as
//! streams of one connection.
//!
//! Unlike an HTTP/1 upgrade, which hands the whole socket to its session,
//! an HTTP/2 connection goes on serving all its streams: its future runs
//! (on the listeners group) until the last stream ends, and each
//! WebSocket's session reads and writes its stream's DATA frames through
//! the `Upgraded` hyper gives it (see [`crate::transport::upgraded`]).
//! hyper runs each stream's request, and each upgraded stream's writer, as
//! a task of its own, spawned here on the listeners group too, so that
//! every one of them has an owner the shutdown waits for.
//!
//! Flow control is the backpressure, stream by stream: a session that
//! stops reading its stream (its upstream is slow) leaves the client's
//! bytes in that stream's receive window, at most [`STREAM_WINDOW`], and
//! the connection's window is large enough for every stream's to be full
//! at once, so a stalled stream never takes its neighbours' credit. The
//! other way, a client that stops reading one stream stops only the
//! writes to it (hyper's writer waits for the client's window).
//!
//! When the listeners close, the connection sends GOAWAY (hyper's
//! graceful shutdown: the client opens no new streams on it) and ends once
//! its open streams have: their sessions close with 1001 in the drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Notify;
use tower::ServiceExt;
use tracing::debug;

use crate::shutdown::TaskGroup;
use crate::transport::client_conn::Connection;
use crate::transport::tls::ClientStream;

/// Each stream's receive window: what a client may send on one stream
/// before the broker reads it. 256 KiB keeps one stream at full speed on
/// a LAN and bounds what a stalled session leaves buffered.
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;

/// A connection the client has sent nothing on for this long is sent a
/// PING; one that does not answer within [`KEEP_ALIVE_TIMEOUT`] is closed.
/// Its sessions' own pings find a dead client too, but not once they have
/// ended: this is what closes an idle connection whose peer is gone.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// `server.http2*`, for every HTTP/2 connection of a listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// `server.http2_max_concurrent_streams`.
    pub max_concurrent_streams: u32,
}

impl Settings {
    /// The connection's receive window: every stream's, full at once.
    fn connection_window(&self) -> u32 {
        // HTTP/2 windows are at most 2^31 - 1.
        let most = (1u64 << 31) - 1;
        u64::from(STREAM_WINDOW)
            .saturating_mul(u64::from(self.max_concurrent_streams))
            .min(most) as u32
    }
}

/// Spawns hyper's tasks for a connection's streams on the listeners group.
#[derive(Clone)]
struct GroupExecutor(TaskGroup);

impl<F> hyper::rt::Executor<F> for GroupExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, task: F) {
        self.0.spawn(task);
    }
}

/// Serves one HTTP/2 client connection until its last stream ends after
/// the client (or, once the listeners closed, the broker) ended it;
/// dropped if that takes until the drain is over.
pub(super) async fn serve(
    io: ClientStream,
    connection: Connection,
    settings: Settings,
    streams: TaskGroup,
) {
    let Connection {
        remote,
        router,
        limits,
        tokens,
    } = connection;
    let asked = Arc::new(Notify::new());
    let service = {
        let asked = Arc::clone(&asked);
        router.map_request(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(remote));
            asked.notify_one();
            request
        })
    };
    let max_head = u32::try_from(limits.max_head).unwrap_or(u32::MAX);
    let served = http2::Builder::new(GroupExecutor(streams))
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(max_head)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(settings.connection_window())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(served);
    // The preface and a first request within header_read_timeout, as an
    // HTTP/1 connection's first head: after that the client may keep an
    // idle connection for its next streams.
    let first_request = async {
        if tokio::time::timeout(limits.header_read_timeout, asked.notified())
            .await
            .is_ok()
        {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = first_request => {
            limits.header_timeouts.inc();
            debug!(%remote, timeout = ?limits.header_read_timeout, "client sent no HTTP/2 request in time; closed");
            return;
        }
        () = tokens.closed.cancelled() => {
            // GOAWAY: no new streams; the open ones end in the drain.
            served.as_mut().graceful_shutdown();
            tokio::select! {
                result = served.as_mut() => result,
                () = tokens.released.cancelled() => return,
            }
        }
    };
    if let Err(error) = result {
        debug!(%remote, %error, "client HTTP/2 connection failed");
    }
}
