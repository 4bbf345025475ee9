//! WebSockets over HTTP/2 (RFC 8441) from the client's side, on the `h2`
//! crate: one HTTP/2 connection to a server, and WebSockets opened on it
//! as extended CONNECT streams, each running on its stream's DATA frames.
//! The broker's HTTP/2 tests and `loadgen --http2` share it (feature
//! `h2-client`); the broker itself serves HTTP/2 with hyper.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

/// The receive windows a client connection offers, per stream and per
/// connection: the most the server may send before the client reads.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

/// One HTTP/2 connection to a server; its frames are driven by a task of
/// its own (the [`JoinHandle`] [`Connection::handshake`] returns), which
/// ends with the connection.
pub struct Connection {
    send: SendRequest<Bytes>,
    /// `http://host:port` or `https://host:port`: the requests' `:scheme`
    /// and `:authority`.
    origin: String,
}

impl Connection {
    /// HTTP/2 on `io` to `origin`, offering `windows`. Returns once the
    /// server's SETTINGS have arrived (a PING sent after the preface is
    /// answered after the server's own preface, its SETTINGS), so that what
    /// they allow (extended CONNECT, how many streams) is known before a
    /// stream opens; and the task that drives the connection.
    pub async fn handshake<T>(
        io: T,
        origin: String,
        windows: Windows,
    ) -> Result<(Connection, JoinHandle<Result<(), h2::Error>>), h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(windows.stream)
            .initial_connection_window_size(windows.connection)
            .handshake::<_, Bytes>(io)
            .await?;
        let mut ping = connection.ping_pong().expect("ping_pong taken once");
        let driver = tokio::spawn(connection);
        ping.ping(h2::Ping::opaque()).await?;
        Ok((Connection { send, origin }, driver))
    }

    /// The server allows extended CONNECT (`SETTINGS_ENABLE_CONNECT_PROTOCOL`).
    pub fn allows_extended_connect(&self) -> bool {
        self.send.is_extended_connect_protocol_enabled()
    }

    /// The most streams the server lets this connection open at once.
    pub fn max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// `origin` (`http://IP:PORT`, say).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Sends an extended CONNECT (`:protocol websocket`,
    /// `Sec-WebSocket-Version: 13`) for `path` with `headers`; returns the
    /// response head and the stream, a WebSocket's if the head is 2xx.
    pub async fn connect(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(http::response::Parts, Stream), h2::Error> {
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("{}{path}", self.origin))
            .extension(h2::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(()).expect("a valid CONNECT request");
        let mut send = self.send.clone().ready().await?;
        let (response, send) = send.send_request(request, false)?;
        let (head, recv) = response.await?.into_parts();
        Ok((
            head,
            Stream {
                send,
                recv,
                unread: Bytes::new(),
            },
        ))
    }

    /// Any request without a body on a new stream (a GET, say): its
    /// response head.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
    ) -> Result<http::response::Parts, h2::Error> {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.origin))
            .body(())
            .expect("a valid request");
        let mut send = self.send.clone().ready().await?;
        let (response, _) = send.send_request(request, true)?;
        Ok(response.await?.into_parts().0)
    }
}

/// A stream's DATA frames as bytes to read and write: what a WebSocket
/// runs on over HTTP/2.
pub struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Part of a DATA frame a read had no room for.
    unread: Bytes,
}

fn broken(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Taken off the window: the server may send as much again.
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

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // What the server's window allows now; the rest waits for credit.
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

    /// Nothing to flush: the connection's task writes what `send_data`
    /// queued.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // END_STREAM; a stream the server already reset has nothing to end.
        let _ = this.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
