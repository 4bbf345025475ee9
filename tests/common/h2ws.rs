//! WebSockets over HTTP/2 (RFC 8441) for tests, on the `h2` crate: one
//! HTTP/2 connection to the broker, and WebSockets opened on it as
//! extended CONNECT streams, each a tungstenite client over the stream's
//! DATA frames.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::within;

/// What a client's receive windows are unless a test asks otherwise.
pub const STREAM_WINDOW: u32 = 1 << 20;

/// A WebSocket on one stream of an HTTP/2 connection.
pub type H2Client = WebSocketStream<H2Stream>;

/// One HTTP/2 connection to the broker; its frames are driven by a task
/// of its own, which ends with the connection.
pub struct H2Connection {
    send: SendRequest<Bytes>,
    scheme: &'static str,
    authority: String,
    /// Resolves when the connection has ended (after GOAWAY, or an error).
    pub driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl H2Connection {
    /// Prior-knowledge HTTP/2 (h2c) to `addr`.
    pub async fn cleartext(addr: std::net::SocketAddr) -> H2Connection {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).unwrap();
        H2Connection::over(tcp, "http", addr.to_string(), STREAM_WINDOW).await
    }

    /// HTTP/2 on `io`, with each stream's receive window `window` (the
    /// connection's holds 64 of them). Returns once the broker's SETTINGS
    /// have arrived and allow extended CONNECT: a PING sent after the
    /// preface is answered after the server's own preface, its SETTINGS.
    pub async fn over<T>(
        io: T,
        scheme: &'static str,
        authority: String,
        window: u32,
    ) -> H2Connection
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window.saturating_mul(64).min(i32::MAX as u32))
            .handshake::<_, Bytes>(io)
            .await
            .expect("HTTP/2 handshake");
        let mut ping = connection.ping_pong().expect("ping_pong taken once");
        let driver = tokio::spawn(connection);
        within("the broker's SETTINGS", ping.ping(h2::Ping::opaque()))
            .await
            .expect("PING answered");
        assert!(
            send.is_extended_connect_protocol_enabled(),
            "the broker's SETTINGS allow extended CONNECT"
        );
        H2Connection {
            send,
            scheme,
            authority,
            driver,
        }
    }

    /// The most streams the broker lets this connection open at once.
    pub fn max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Sends an extended CONNECT for `path` with `headers` and returns the
    /// response head and, if the broker answered 2xx, the stream.
    pub async fn connect(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(http::response::Parts, H2Stream), h2::Error> {
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{}://{}{}", self.scheme, self.authority, path))
            .extension(h2::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut send = self.send.clone().ready().await?;
        let (response, stream) = send.send_request(request.body(()).unwrap(), false)?;
        let (head, recv) = within("the CONNECT's answer", response).await?.into_parts();
        Ok((
            head,
            H2Stream {
                send: stream,
                recv,
                unread: Bytes::new(),
            },
        ))
    }

    /// Opens a WebSocket on `path`, which must be accepted (200).
    pub async fn open(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (H2Client, http::response::Parts) {
        let (head, stream) = self.connect(path, headers).await.expect("stream opened");
        assert_eq!(head.status, 200, "extended CONNECT to {path}: {head:?}");
        let ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        (ws, head)
    }

    /// Any request on a new stream (a GET, say): its status.
    pub async fn request(&self, method: http::Method, path: &str) -> u16 {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}://{}{}", self.scheme, self.authority, path))
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.expect("ready");
        let (response, _) = send.send_request(request, true).expect("request sent");
        within("the answer", response)
            .await
            .expect("answer")
            .status()
            .as_u16()
    }
}

/// A stream's DATA frames as bytes to read and write.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Part of a DATA frame a read had no room for.
    unread: Bytes,
}

fn broken(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read: the broker may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            let room = this.send.capacity();
            if room > 0 {
                let n = room.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(broken)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // END_STREAM; a stream the broker already reset has nothing to end.
        let _ = this.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
