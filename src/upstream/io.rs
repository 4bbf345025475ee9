//! The upstream connection's bytes once its handshake is done.
//!
//! hyper hands an upgraded connection back as `Upgraded`: the socket
//! behind a box, a `dyn` call and two conversions between tokio's and
//! hyper's read buffers, on every read and write of a relayed session
//! (about 4% of the frame relay's user time). Since the broker made the
//! connection itself, it takes the socket back out of `Upgraded`, together
//! with whatever hyper had read past the 101 response.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tls::UpstreamStream;

/// An upstream connection after its 101 response.
pub struct UpstreamIo {
    /// Bytes the upstream sent right behind its 101, read by hyper along
    /// with the response; handed out before the socket is read.
    early: Bytes,
    stream: UpstreamStream,
}

impl UpstreamIo {
    /// Takes the socket out of `upgraded`, which must wrap the
    /// `TokioIo<UpstreamStream>` the handshake was made on.
    pub(super) fn from_upgraded(upgraded: Upgraded) -> io::Result<UpstreamIo> {
        let parts = upgraded
            .downcast::<TokioIo<UpstreamStream>>()
            .map_err(|_| io::Error::other("hyper upgraded another kind of connection"))?;
        Ok(UpstreamIo {
            early: unshared(parts.read_buf),
            stream: parts.io.into_inner(),
        })
    }
}

impl AsyncRead for UpstreamIo {
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

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
