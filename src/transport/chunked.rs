//! Socket reads into one buffer per event loop, so an idle connection holds
//! no read buffer.
//!
//! tungstenite allocates its read buffer, `read_buffer_size` bytes, when a
//! socket is wrapped and keeps it for the socket's life: 4 KiB per idle
//! client at the default, about as much again as the rest of an idle
//! multiplexed session. So client sockets that tungstenite decodes are
//! wrapped in [`ChunkedRead`] and given a small tungstenite buffer
//! ([`DECODER_BUFFER`]): each read system call still takes up to
//! [`read_chunk`] bytes, into the loop's buffer ([`with_read_buffer`]),
//! and what tungstenite has no room for yet waits in a spill buffer that
//! is freed once it has been handed over.
//!
//! The loop's buffer is a thread-local: each event loop is one thread and a
//! read is done with the buffer before the task yields, so one buffer
//! serves all of a loop's sessions. (Not a stack array: a 64 KiB stack
//! frame has its every page probed on each call, a cost paid per read
//! however small the read.)

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// tungstenite's own read buffer for wrapped sockets: room for a small
/// message, not more (it grows for larger ones as it must).
pub(crate) const DECODER_BUFFER: usize = 256;
/// The most read per system call, whatever `read_buffer_size` says.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;
/// The least read per system call: a 4 KiB message and its header fit.
const MIN_CHUNK: usize = 16 * 1024;

/// Bytes read per system call for a configured `read_buffer_size`.
pub(crate) fn read_chunk(read_buffer_size: usize) -> usize {
    read_buffer_size.clamp(MIN_CHUNK, MAX_CHUNK)
}

thread_local! {
    /// This thread's read buffer, allocated on its first read.
    static READ_BUFFER: RefCell<Box<[MaybeUninit<u8>]>> =
        RefCell::new(Box::new_uninit_slice(MAX_CHUNK));
}

/// Runs `read` with `chunk` bytes (at most [`MAX_CHUNK`]) of this thread's
/// read buffer. Its contents are garbage on entry; whatever `read` leaves
/// there is overwritten by the next caller.
pub(crate) fn with_read_buffer<R>(
    chunk: usize,
    read: impl FnOnce(&mut [MaybeUninit<u8>]) -> R,
) -> R {
    let chunk = chunk.min(MAX_CHUNK);
    READ_BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buffer) => read(&mut buffer[..chunk]),
        // A read within a read (no caller does this today): a buffer of
        // its own.
        Err(_) => read(&mut Box::new_uninit_slice(chunk)),
    })
}

/// Reads `chunk` bytes per call into the loop's buffer; see the module docs.
pub(crate) struct ChunkedRead<S> {
    inner: S,
    chunk: usize,
    /// Read but not yet handed over; empty and unallocated when idle.
    spill: Vec<u8>,
    /// How much of `spill` was handed over.
    taken: usize,
}

impl<S> ChunkedRead<S> {
    pub(crate) fn new(inner: S, read_buffer_size: usize) -> Self {
        ChunkedRead {
            inner,
            chunk: read_chunk(read_buffer_size),
            spill: Vec::new(),
            taken: 0,
        }
    }

    /// Hands over what is spilled, as much as `buf` takes; frees the
    /// spill once empty.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) {
        let n = (self.spill.len() - self.taken).min(buf.remaining());
        buf.put_slice(&self.spill[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.spill.len() {
            self.spill = Vec::new();
            self.taken = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ChunkedRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.spill.is_empty() {
            this.hand_over(buf);
            return Poll::Ready(Ok(()));
        }
        // A caller with room for a whole chunk needs no detour.
        if buf.remaining() >= this.chunk {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let inner = &mut this.inner;
        let spill = &mut this.spill;
        with_read_buffer(this.chunk, |chunk| {
            let mut read = ReadBuf::uninit(chunk);
            std::task::ready!(Pin::new(inner).poll_read(cx, &mut read))?;
            let got = read.filled();
            let n = got.len().min(buf.remaining());
            buf.put_slice(&got[..n]);
            if n < got.len() {
                spill.extend_from_slice(&got[n..]);
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ChunkedRead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_the_spill_is_freed() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = ChunkedRead::new(b, 4096);
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(
            r.spill.capacity(),
            0,
            "nothing held once all is handed over"
        );
    }

    #[test]
    fn chunks_are_clamped() {
        assert_eq!(read_chunk(4096), MIN_CHUNK);
        assert_eq!(read_chunk(32 * 1024), 32 * 1024);
        assert_eq!(read_chunk(1 << 20), MAX_CHUNK);
    }
}
