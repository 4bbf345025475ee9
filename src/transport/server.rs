//! The client listeners' HTTP server: hyper's, on the broker's own
//! sockets, speaking HTTP/1.1 to each connection and, where
//! `server.http2` is on, HTTP/2.
//!
//! `axum::serve` (and hyper-util's automatic connection builder under it)
//! reads the first bytes of each connection to tell HTTP/1 from HTTP/2 and
//! then puts them back behind a rewind layer of its own. An upgraded
//! HTTP/1 connection then sits in a box, behind two rewind layers, one of
//! them of a private type: it cannot be taken back out, and every read and
//! write of a relayed session pays for the layers. So this module makes
//! the same choice without wrapping the socket: on TLS by the protocol the
//! client picked by ALPN, on cleartext by peeking at the socket for
//! HTTP/2's connection preface (prior knowledge, h2c). An HTTP/1
//! connection is then served by [`crate::transport::http1`] on a plain
//! [`ClientStream`] that [`crate::transport::upgraded`] takes back out
//! after the 101; an HTTP/2 one by [`crate::transport::http2`], hyper's
//! HTTP/2 server with extended CONNECT (RFC 8441).
//!
//! It does what `axum::serve` would: accepts through axum's
//! [`Listener`] (with its back-off on errors such as running out of file
//! descriptors), gives each request its peer's address as
//! [`axum::extract::ConnectInfo`], and serves upgrades. When the listeners
//! close (shutdown begins, or a restart's handover closes them first) it
//! stops accepting; each HTTP/1 connection finishes the request it is
//! serving and closes, each HTTP/2 one sends GOAWAY and ends with its last
//! stream. In a handover the listener is then closed for good, and the
//! connections it had already taken are served too ([`HandOver`]). The
//! connections' tasks belong to the shutdown tracker's listeners group,
//! which the broker waits for after the drain (and, in a handover, before
//! it); one still open once the drain is over is dropped.

use std::net::SocketAddr;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::shutdown::Shutdown;
use crate::transport::accept::HandOver;
use crate::transport::client_conn::{Connection, Limits, Tokens};
use crate::transport::tls::{ClientStream, MaybeTls};
use crate::transport::{http1, http2};

/// Serves client connections: one per event loop, for its listener's
/// whole life.
pub(crate) struct Server {
    router: Router,
    limits: Limits,
    /// `None` where `server.http2` is off.
    http2: Option<http2::Settings>,
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
        http2: Option<http2::Settings>,
        accepted: IntCounter,
        shutdown: Shutdown,
    ) -> Server {
        Server {
            router,
            limits,
            http2,
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
    /// until it closes or is upgraded (an upgraded HTTP/1 one belongs to
    /// its session; an HTTP/2 one runs until its last stream ends).
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
        let connection = Connection {
            remote,
            router: self.router.clone(),
            limits: self.limits.clone(),
            tokens: self.tokens.clone(),
        };
        let Some(settings) = self.http2 else {
            if let MaybeTls::Plain(tcp) = &io {
                let _ = tcp.set_nodelay(true);
            }
            self.shutdown
                .listeners()
                .spawn(http1::serve(io, connection));
            return;
        };
        let streams = self.shutdown.listeners().clone();
        self.shutdown.listeners().spawn(async move {
            let http2 = match &io {
                MaybeTls::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
                MaybeTls::Plain(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let deadline = Instant::now() + connection.limits.header_read_timeout;
                    let opened = tokio::select! {
                        opened = opens_with_preface(tcp, deadline) => opened,
                        // Nothing was asked yet: nothing is lost.
                        () = connection.tokens.begun.cancelled() => return,
                    };
                    match opened {
                        Some(http2) => http2,
                        None => {
                            connection.limits.header_timeouts.inc();
                            debug!(%remote, "client sent no request in time; closed");
                            return;
                        }
                    }
                }
            };
            if http2 {
                http2::serve(io, connection, settings, streams).await;
            } else {
                http1::serve(io, connection).await;
            }
        });
    }
}

/// HTTP/2's connection preface (RFC 9113 §3.4), which a client with prior
/// knowledge sends first; no HTTP/1 request starts with it.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a cleartext connection opens with HTTP/2's preface, by peeking
/// (the bytes stay in the socket for whichever server reads them); `None`
/// if too little arrives before `deadline`. One byte that differs from the
/// preface decides for HTTP/1, as does a connection closed early (whose
/// end hyper's HTTP/1 server then sees).
async fn opens_with_preface(tcp: &TcpStream, deadline: Instant) -> Option<bool> {
    let mut first = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if n == 0 || first[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // A preface in pieces (clients send it whole, in one segment): a
        // peek finds the same bytes at once while the socket stays
        // readable, so wait a little for the rest rather than spin.
        let pause = Instant::now() + Duration::from_millis(1);
        if pause >= deadline {
            return None;
        }
        tokio::time::sleep_until(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::Response;
    use http::StatusCode;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Notify;

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
        let server = Server::new(router, limits(), None, accepted, shutdown.clone());
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
        let server = Server::new(router, limits(), None, accepted.clone(), shutdown.clone());
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

    /// The first bytes decide: HTTP/2's preface (whole, or in pieces) is
    /// HTTP/2, a request line is HTTP/1, and a client that sends nothing
    /// by the deadline gets neither.
    #[tokio::test]
    async fn the_first_bytes_tell_http2_from_http1() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let soon = || Instant::now() + Duration::from_secs(5);
        for (pieces, expected) in [
            (vec![&PREFACE[..]], Some(true)),
            (vec![&PREFACE[..10], &PREFACE[10..]], Some(true)),
            (vec![&b"GET / HTTP/1.1\r\n\r\n"[..]], Some(false)),
            (vec![&b"PRI * HTTP/1.1\r\n"[..]], Some(false)),
        ] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = tcp.accept().await.unwrap();
            let decided = async {
                for piece in &pieces {
                    client.write_all(piece).await.unwrap();
                    tokio::task::yield_now().await;
                }
            };
            let (opened, ()) = tokio::join!(opens_with_preface(&server, soon()), decided);
            assert_eq!(opened, expected, "{pieces:?}");
        }
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = tcp.accept().await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(opens_with_preface(&server, deadline).await, None);
    }
}
