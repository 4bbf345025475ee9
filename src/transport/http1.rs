//! The client listeners' HTTP server: hyper's HTTP/1 server on the
//! broker's own sockets.
//!
//! `axum::serve` runs hyper-util's automatic server, which reads the first
//! bytes of each connection to tell HTTP/1 from HTTP/2 and then puts them
//! back behind a rewind layer of its own. An upgraded client connection
//! then sits in a box, behind two rewind layers, one of them of a private
//! type: it cannot be taken back out, and every read and write of a
//! relayed session pays for the layers. Clients reach the broker over
//! HTTP/1 only (WebSockets over HTTP/2 are not served), so this module
//! serves each connection with hyper's HTTP/1 server directly, on a
//! [`ClientStream`] that [`crate::transport::upgraded`] takes back out after the 101.
//!
//! It does what `axum::serve` would: accepts through axum's
//! [`Listener`] (with its back-off on errors such as running out of file
//! descriptors), gives each request its peer's address as [`ConnectInfo`],
//! and serves upgrades. When the listeners close (shutdown begins, or a
//! restart's handover closes them first) it stops accepting, and each
//! connection finishes the request it is serving and closes (an idle
//! keep-alive connection closes at once; one that has not sent its first
//! request yet is served that one). In a handover the listener is then
//! closed for good, and the connections it had already taken are served
//! too ([`HandOver`]). The connections' tasks belong to the shutdown
//! tracker's listeners group, which the broker waits for after the drain
//! (and, in a handover, before it); one still open once the drain is over
//! is dropped.
//!
//! Why not hyper-util's `GracefulShutdown`, which does this signal-and-wait
//! for a set of connections: it watches only connections that implement
//! its sealed `GracefulConnection` trait, and hyper-util 0.1.21 implements
//! that for `http1::Connection` but not for the `UpgradeableConnection`
//! that `with_upgrades` makes (only for the automatic server's, whose
//! rewind layers this module exists to avoid). So each connection calls
//! hyper's own `graceful_shutdown` when the shutdown token fires, and the
//! tracker's group does the waiting.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use axum::serve::Listener;
use axum::Router;
use http::StatusCode;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::debug;

use crate::shutdown::Shutdown;
use crate::transport::accept::HandOver;
use crate::transport::tls::{ClientStream, MaybeTls};

/// The smallest read buffer hyper takes.
const MIN_HYPER_BUF: usize = 8192;

/// What a client connection is allowed before it is closed.
#[derive(Clone)]
pub(crate) struct Limits {
    /// For a whole request head, from the connection's start or the end of
    /// its last response (`server.header_read_timeout`): a connection that
    /// sends nothing, or a head byte by byte, holds a file descriptor
    /// only this long.
    pub header_read_timeout: Duration,
    /// Counts the connections closed for it.
    pub header_timeouts: IntCounter,
    /// The most a request head may take (`server.max_request_head_size`);
    /// hyper reads no more than this for one and answers a larger one 431.
    pub max_head: usize,
    /// Counts the heads answered 431.
    pub heads_too_large: IntCounter,
}

/// Serves client connections: one per event loop, for its listener's
/// whole life.
pub(crate) struct Server {
    router: Router,
    limits: Limits,
    /// Counts the connections served (TLS ones once their TLS handshake
    /// is done).
    accepted: IntCounter,
    shutdown: Shutdown,
    // One token of each for all connections: clones, not a child apiece.
    tokens: Tokens,
}

impl Server {
    pub(crate) fn new(
        router: Router,
        limits: Limits,
        accepted: IntCounter,
        shutdown: Shutdown,
    ) -> Server {
        Server {
            router,
            limits,
            accepted,
            tokens: Tokens {
                closed: shutdown.closed_token(),
                begun: shutdown.token(),
                released: shutdown.released_token(),
            },
            shutdown,
        }
    }

    /// Serves every connection `listener` accepts until the listeners
    /// close; then, in a handover, closes `listener` and serves what it
    /// had taken. Each connection runs on the shutdown's listeners group
    /// until it closes or is upgraded (an upgraded one belongs to its
    /// session).
    pub(crate) async fn run<L>(&self, mut listener: L)
    where
        L: HandOver<Addr = SocketAddr>,
        L::Io: Into<ClientStream>,
    {
        self.serve(&mut listener).await;
        if self.shutdown.has_begun() {
            // A plain shutdown: the listener closes with what it holds.
            return;
        }
        listener.close();
        loop {
            let next = tokio::select! {
                next = listener.rest() => next,
                () = self.tokens.begun.cancelled() => return,
            };
            let Some((io, remote)) = next else {
                return;
            };
            self.spawn(io.into(), remote);
        }
    }

    /// Serves every connection `listener` accepts until the listeners
    /// close.
    pub(crate) async fn serve<L>(&self, listener: &mut L)
    where
        L: Listener<Addr = SocketAddr>,
        L::Io: Into<ClientStream>,
    {
        loop {
            let (io, remote) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = self.tokens.closed.cancelled() => break,
            };
            self.spawn(io.into(), remote);
        }
    }

    fn spawn(&self, io: ClientStream, remote: SocketAddr) {
        self.accepted.inc();
        if let MaybeTls::Plain(tcp) = &io {
            let _ = tcp.set_nodelay(true);
        }
        self.shutdown.listeners().spawn(connection(
            io,
            remote,
            self.router.clone(),
            self.limits.clone(),
            self.tokens.clone(),
        ));
    }
}

/// The shutdown's tokens a connection watches.
#[derive(Clone)]
struct Tokens {
    closed: CancellationToken,
    begun: CancellationToken,
    released: CancellationToken,
}

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
async fn connection(
    io: ClientStream,
    remote: SocketAddr,
    router: Router,
    limits: Limits,
    tokens: Tokens,
) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            header_timeouts: IntCounter::new("header_timeouts", "test").unwrap(),
            max_head: 16 * 1024,
            heads_too_large: IntCounter::new("heads_too_large", "test").unwrap(),
        }
    }

    /// Serves `router` on `tcp` as a task of the listeners' group.
    fn spawn_server(
        mut tcp: TcpListener,
        router: Router,
        shutdown: &Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let accepted = IntCounter::new("accepted", "test").unwrap();
        let server = Server::new(router, limits(), accepted, shutdown.clone());
        shutdown
            .listeners()
            .spawn(async move { server.serve(&mut tcp).await })
    }

    /// A keep-alive connection idle between requests is closed as soon as
    /// shutdown begins, and the listeners' group is then empty, while the
    /// drain has not ended.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_closes_when_shutdown_begins() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let router = Router::new().fallback(|| async { "ok" });
        let server = spawn_server(tcp, router, &shutdown);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !answer.ends_with(b"ok") {
            let n = client.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "closed before answering");
            answer.extend_from_slice(&chunk[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));

        shutdown.begin();
        let closed = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
        server.await.unwrap();
        assert!(shutdown.listeners_stopped(Duration::from_secs(5)).await);
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    /// In a handover, a connection taken before its client sent anything
    /// is served its first request (hyper alone would close it
    /// unanswered), without keep-alive.
    #[tokio::test]
    async fn a_connection_taken_before_a_handover_is_served_its_first_request() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let router = Router::new().fallback(|| async { "ok" });
        let accepted = IntCounter::new("accepted", "test").unwrap();
        let server = Server::new(router, limits(), accepted.clone(), shutdown.clone());
        let server = shutdown.listeners().spawn(async move {
            let mut tcp = tcp;
            server.serve(&mut tcp).await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while accepted.get() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection taken");

        shutdown.hand_over();
        server.await.unwrap();
        // The connection's task has seen the handover too.
        tokio::task::yield_now().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("ok"), "{answer:?}");
        assert!(shutdown.listeners_stopped(Duration::from_secs(5)).await);
        assert!(!shutdown.has_begun());
    }

    /// In a handover, an upgrade in progress is answered with its 101 as
    /// it would be otherwise: `Connection: upgrade`, no `close` added.
    #[tokio::test]
    async fn an_upgrade_under_way_in_a_handover_gets_its_101_intact() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let (entered, mut handling) = tokio::sync::mpsc::channel::<()>(1);
        let go = Arc::new(Notify::new());
        let router = {
            let go = Arc::clone(&go);
            Router::new().fallback(move || async move {
                entered.send(()).await.unwrap();
                go.notified().await;
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .body(axum::body::Body::empty())
                    .unwrap()
            })
        };
        let server = spawn_server(tcp, router, &shutdown);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        handling.recv().await.unwrap();

        shutdown.hand_over();
        server.await.unwrap();
        tokio::task::yield_now().await;
        go.notify_one();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
                .await
                .expect("an answer")
                .unwrap();
            assert_ne!(n, 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 101"), "{answer:?}");
        assert!(answer.contains("\r\nconnection: upgrade\r\n"), "{answer:?}");
        assert!(shutdown.listeners_stopped(Duration::from_secs(5)).await);
    }
}
