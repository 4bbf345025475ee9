//! Real upstream servers for tests, each on `127.0.0.1:0`.
//!
//! [`TestUpstream`] is an echo server that reports what it sees on a
//! channel and obeys commands sent as text messages:
//! `close:CODE:REASON` closes with that code, `drop` cuts the TCP connection
//! without a close handshake, `deaf` stops reading (so it never answers a
//! ping again). It selects the *last* subprotocol offered, so a test can tell
//! the upstream's choice from the client's first preference.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::within;

/// What the upstream saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A handshake: the request path and lower-cased headers.
    Handshake {
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A close frame from the broker (code 1005 when it had none).
    Close { code: u16, reason: String },
    /// The connection ended.
    Ended,
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: mpsc::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr` (a stopped target's address, to bring it back).
    pub async fn start_on(addr: SocketAddr) -> TestUpstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(serve(tcp, tx.clone()));
            }
        });
        TestUpstream { addr, seen, task }
    }

    /// The next event, skipping none.
    pub async fn next(&mut self) -> Seen {
        within("an upstream event", self.seen.recv())
            .await
            .expect("upstream channel open")
    }

    /// Skips events until a handshake arrives; returns (path, headers).
    pub async fn handshake(&mut self) -> (String, Vec<(String, String)>) {
        loop {
            if let Seen::Handshake { path, headers } = self.next().await {
                return (path, headers);
            }
        }
    }

    /// Skips events until a close frame arrives.
    pub async fn close(&mut self) -> (u16, String) {
        loop {
            if let Seen::Close { code, reason } = self.next().await {
                return (code, reason);
            }
        }
    }

    /// Skips events until a connection ends.
    pub async fn ended(&mut self) {
        while self.next().await != Seen::Ended {}
    }
}

async fn serve(tcp: tokio::net::TcpStream, tx: mpsc::Sender<Seen>) {
    let tx_hs = tx.clone();
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let last = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|p| !p.is_empty())
            .map(str::to_owned);
        if let Some(p) = last {
            resp.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        let _ = tx_hs.try_send(Seen::Handshake { path, headers });
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await
    else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(t) if t.as_str() == "drop" => {
                // Cut the connection without a close handshake.
                let mut tcp = ws.into_inner();
                let _ = tcp.shutdown().await;
                drop(tcp);
                let _ = tx.send(Seen::Ended).await;
                return;
            }
            Message::Text(t) if t.as_str() == "deaf" => {
                // Keep the socket open but never read again.
                let _ = tx.send(Seen::Ended).await;
                std::future::pending::<()>().await;
            }
            Message::Text(t) if t.as_str().starts_with("close:") => {
                let mut parts = t.as_str().splitn(3, ':').skip(1);
                let code: u16 = parts.next().unwrap().parse().unwrap();
                let reason = parts.next().unwrap_or("").to_string();
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    })))
                    .await;
            }
            m @ (Message::Text(_) | Message::Binary(_)) => {
                let Ok(()) = ws.send(m).await else { break };
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                let _ = tx.send(Seen::Close { code, reason }).await;
            }
            _ => {}
        }
    }
    let _ = tx.send(Seen::Ended).await;
}

/// A listener that accepts TCP connections and never answers (for 504).
pub async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    (addr, task)
}

/// A listener that answers every request with HTTP 500 (a failed upstream handshake).
pub async fn http_500_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, task)
}

/// A hand-written upstream that sends `greeting` as a text frame in the
/// same write as its 101 response, so the broker reads both at once, then
/// holds the connection open until the broker closes it.
pub async fn greeting_in_handshake_listener(
    greeting: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(mut reply) = switching_protocols(&mut tcp).await else {
                    return;
                };
                reply.extend_from_slice(&text_frame(greeting));
                tcp.write_all(&reply).await.unwrap();
                let mut buf = [0u8; 4096];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, task)
}

/// A hand-written upstream for one session that, once the broker sends
/// anything after the handshake (its close, at shutdown), sends `late`
/// text frames, then its own close, and closes the connection as a server
/// does; it reports when the broker has shut its side down too.
pub async fn late_talker_listener(late: usize) -> (SocketAddr, tokio::sync::oneshot::Receiver<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done, finished) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let reply = switching_protocols(&mut tcp)
            .await
            .expect("the broker hung up during the handshake");
        tcp.write_all(&reply).await.unwrap();
        // The broker's close.
        let mut buf = [0u8; 4096];
        assert!(tcp.read(&mut buf).await.unwrap() > 0);
        let mut frames = Vec::new();
        for i in 0..late {
            frames.extend_from_slice(&text_frame(&format!("late {i}")));
        }
        // Close 1000, no reason.
        frames.extend_from_slice(&[0x88, 0x02, 0x03, 0xE8]);
        tcp.write_all(&frames).await.unwrap();
        tcp.shutdown().await.unwrap();
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = done.send(());
    });
    (addr, finished)
}

/// An upstream that echoes, answers the close handshake, and then keeps its
/// connection open, which a server should close first; each such
/// connection arrives on the receiver, which holds it open while kept.
pub async fn answers_close_and_holds_listener() -> (
    SocketAddr,
    mpsc::Receiver<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (held, holding) = mpsc::channel(2);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let held = held.clone();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    ws.send(msg).await.unwrap();
                }
                // tungstenite has queued the answer to the close: send it,
                // then keep the connection open.
                let _ = ws.flush().await;
                let _ = held.send(ws).await;
            });
        }
    });
    (addr, holding)
}

/// Reads a WebSocket upgrade request from `tcp` and returns the 101
/// response that accepts it, for hand-written upstreams that then write
/// frames of their own; `None` if the peer hung up first.
pub async fn switching_protocols(tcp: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let request = super::raw::read_head(tcp).await?;
    let key = request
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .expect("a Sec-WebSocket-Key");
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    Some(reply.into_bytes())
}

/// An unmasked text frame (as a server sends) of under 126 bytes.
fn text_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126, "one short frame");
    let mut frame = vec![0x81, text.len() as u8];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// An address with nothing listening (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A target that serves both WebSocket echo and an HTTP health endpoint on
/// one port, for active checks: `GET /health` answers the status set with
/// [`HealthUpstream::set_status`], and every probe is reported.
pub struct HealthUpstream {
    pub addr: SocketAddr,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    probes: mpsc::Receiver<u16>,
    /// WebSocket sessions accepted so far.
    pub sessions: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthUpstream {
    pub async fn start() -> HealthUpstream {
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let sessions = Arc::new(AtomicUsize::new(0));
        let (probe_tx, probes) = mpsc::channel(1024);
        let (st, se) = (Arc::clone(&status), Arc::clone(&sessions));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (st, se, probe_tx) = (Arc::clone(&st), Arc::clone(&se), probe_tx.clone());
                conns.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |mut req: http::Request<hyper::body::Incoming>| {
                            let (st, se, probe_tx) =
                                (Arc::clone(&st), Arc::clone(&se), probe_tx.clone());
                            async move {
                                let mut resp = http::Response::new(http_body_util::Empty::<
                                    bytes::Bytes,
                                >::new(
                                ));
                                if req.uri().path() == "/health" {
                                    let code = st.load(Ordering::SeqCst);
                                    *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                                    let _ = probe_tx.send(code).await;
                                    return Ok::<_, std::convert::Infallible>(resp);
                                }
                                let Some(key) = req.headers().get("sec-websocket-key").cloned()
                                else {
                                    *resp.status_mut() = http::StatusCode::NOT_FOUND;
                                    return Ok(resp);
                                };
                                let upgrade = hyper::upgrade::on(&mut req);
                                se.fetch_add(1, Ordering::SeqCst);
                                tokio::spawn(async move {
                                    let Ok(upgraded) = upgrade.await else { return };
                                    let mut ws =
                                        tokio_tungstenite::WebSocketStream::from_raw_socket(
                                            hyper_util::rt::TokioIo::new(upgraded),
                                            tokio_tungstenite::tungstenite::protocol::Role::Server,
                                            None,
                                        )
                                        .await;
                                    while let Some(Ok(m)) = ws.next().await {
                                        if (m.is_text() || m.is_binary())
                                            && ws.send(m).await.is_err()
                                        {
                                            break;
                                        }
                                    }
                                });
                                *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                                let h = resp.headers_mut();
                                h.insert("upgrade", "websocket".parse().unwrap());
                                h.insert("connection", "Upgrade".parse().unwrap());
                                let accept =
                                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                                        key.as_bytes(),
                                    );
                                h.insert("sec-websocket-accept", accept.parse().unwrap());
                                Ok(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        HealthUpstream {
            addr,
            status,
            probes,
            sessions,
            task,
        }
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, std::sync::atomic::Ordering::SeqCst);
    }

    /// Awaits the next health probe; returns the status it was answered with.
    pub async fn probe(&mut self) -> u16 {
        within("a health probe", self.probes.recv())
            .await
            .expect("probe channel open")
    }
}
