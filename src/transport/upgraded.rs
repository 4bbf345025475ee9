//! Connections taken back out of hyper after their upgrade.
//!
//! hyper hands an upgraded connection over as `Upgraded`: the socket
//! behind a box, a `dyn` call and two conversions between tokio's and
//! hyper's read buffers on every read and write, plus, on the client side,
//! a rewind layer of hyper's and one of the server that read the request:
//! work a relay would pay per read and write for nothing. The broker makes
//! both kinds of connection itself (it connects to targets, and serves
//! clients with hyper's HTTP/1 server on its own sockets, see
//! [`crate::transport::http1`]), so it knows what is inside and takes the
//! socket back out of `Upgraded`, together with whatever hyper had read
//! past the request or the 101.
//!
//! A WebSocket over HTTP/2 is a stream, not a socket: its `Upgraded` is
//! hyper's bridge to the stream's DATA frames, kept as it is
//! ([`ClientIo::Http2`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::transport::tls::{ClientStream, MaybeTls, UpstreamStream};

/// A connection after its upgrade: `S`, the socket it was made on.
pub(crate) struct UpgradedIo<S> {
    /// Bytes the peer sent right behind its request or 101, read by hyper
    /// along with them; handed out before the socket is read.
    early: Bytes,
    stream: S,
}

/// An upstream connection after its 101 response.
pub(crate) type UpstreamIo = UpgradedIo<UpstreamStream>;

/// What a client's WebSocket runs on once the broker accepted it.
pub(crate) enum ClientIo {
    /// An HTTP/1.1 connection after the broker's 101: the socket itself.
    Http1(UpgradedIo<ClientStream>),
    /// A stream of an HTTP/2 connection after the broker's 200 to its
    /// extended CONNECT; the connection is served by its own task
    /// ([`crate::transport::http2`]).
    Http2(TokioIo<Upgraded>),
}

impl ClientIo {
    /// See [`UpgradedIo::read_surely_pending`]; never over HTTP/2, whose
    /// stream's readiness is hyper's to know.
    pub(crate) fn read_surely_pending(&self) -> bool {
        match self {
            ClientIo::Http1(io) => io.read_surely_pending(),
            ClientIo::Http2(_) => false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpgradedIo<S> {
    /// Takes the socket out of `upgraded`, which must wrap the
    /// `TokioIo<S>` the HTTP exchange was made on.
    pub(crate) fn take(upgraded: Upgraded) -> io::Result<UpgradedIo<S>> {
        let parts = upgraded
            .downcast::<TokioIo<S>>()
            .map_err(|_| io::Error::other("hyper upgraded another kind of connection"))?;
        Ok(UpgradedIo {
            early: unshared(parts.read_buf),
            stream: parts.io.into_inner(),
        })
    }
}

impl<T> UpgradedIo<MaybeTls<T>> {
    /// A read now would find nothing: no early bytes are left, and the
    /// socket's read readiness is clear. After a read that returned
    /// `Pending`, this also means the task's waker is still registered
    /// with the socket (tokio takes it only when it sets the readiness),
    /// so the read need not be polled again until the task is woken with
    /// readiness set.
    pub(crate) fn read_surely_pending(&self) -> bool {
        self.early.is_empty() && self.stream.read_surely_pending()
    }
}

/// The client's connection once hyper has sent the 101 (or, over
/// HTTP/2, the 200) and handed it over.
pub(crate) async fn client(on_upgrade: OnUpgrade) -> io::Result<ClientIo> {
    let upgraded = on_upgrade.await.map_err(io::Error::other)?;
    // An HTTP/1 connection is served on the `TokioIo<ClientStream>` of
    // `transport::http1`; an HTTP/2 stream's `Upgraded` holds hyper's own.
    Ok(match upgraded.downcast::<TokioIo<ClientStream>>() {
        Ok(parts) => ClientIo::Http1(UpgradedIo {
            early: unshared(parts.read_buf),
            stream: parts.io.into_inner(),
        }),
        Err(stream) => ClientIo::Http2(TokioIo::new(stream)),
    })
}

impl AsyncRead for ClientIo {
    // Always: as for `MaybeTls`, a match on every read and write.
    #[inline(always)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Http1(io) => Pin::new(io).poll_read(cx, buf),
            ClientIo::Http2(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    #[inline(always)]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Http1(io) => Pin::new(io).poll_write(cx, buf),
            ClientIo::Http2(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    #[inline(always)]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Http1(io) => Pin::new(io).poll_flush(cx),
            ClientIo::Http2(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Http1(io) => Pin::new(io).poll_shutdown(cx),
            ClientIo::Http2(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for UpgradedIo<S> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.early.len().min(buf.remaining());
        buf.put_slice(&this.early[..n]);
        this.early.advance(n);
        this.early = unshared(std::mem::take(&mut this.early));
        Poll::Ready(Ok(()))
    }
}

/// `bytes`, or, once it is empty, nothing: hyper's read buffer is a slice
/// of an 8 KiB allocation that even an empty slice keeps alive, which would
/// double an idle session's memory.
fn unshared(bytes: Bytes) -> Bytes {
    if bytes.is_empty() {
        Bytes::new()
    } else {
        bytes
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UpgradedIo<S> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
