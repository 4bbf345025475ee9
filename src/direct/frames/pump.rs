//! One direction of a frame-relay session: the pump reads the source into
//! the event loop's buffer, has the scanner follow it, and writes on what
//! passes, keeping what the destination cannot take yet in a spill buffer
//! that holds the source back until it drains. It also counts the
//! direction's messages, and says what a direction's end means for the
//! session.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;

use super::scan::{own_frame, ping_payload, Kind, Out, Scanner, Seen};
use crate::metrics::{MessageCounters, Metrics};
use crate::session::ending::Stop;
use crate::session::keepalive::Liveness;
use crate::session::side::{Direction, Side};
use crate::upstream::Upstream;

/// Reads per direction before yielding, so one busy direction cannot
/// starve the other or the timers.
const READS_PER_TURN: usize = 16;

thread_local! {
    /// Where the messages of the chunk being relayed end ([`Seen::Message`]'s
    /// `end`), for the rare chunk that the destination does not take whole.
    /// One per event loop, as the read buffer is: a session holds none.
    static MESSAGE_ENDS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// How a direction stopped.
pub(super) enum PumpEnd {
    Eof,
    Read(io::Error),
    Write(io::Error),
    /// The source broke a rule (see [`Scanner::check`]).
    Bad(WsError),
}

/// One direction: frames read from the `scan.from` side, written to the
/// other.
pub(super) struct Pump {
    pub(super) scan: Scanner,
    /// Bytes read but not yet written. Empty and unallocated when idle.
    pub(super) spill: Vec<u8>,
    /// Where each message whose last byte is still in `spill` ends, from
    /// the spill's start: the messages that are lost if the destination
    /// fails before taking them. Empty and unallocated unless the spill
    /// holds the end of a message.
    spill_ends: Vec<usize>,
    /// Bytes read per call ([`chunked::read_chunk`]).
    ///
    /// [`chunked::read_chunk`]: crate::transport::chunked::read_chunk
    pub(super) chunk: usize,
    unflushed: bool,
    /// The last poll ended on a read of the source that returned `Pending`
    /// with the task's waker registered on the socket (not for want of
    /// coop budget); see [`Pump::asleep`].
    armed: bool,
    /// The source ended its side after its close frame passed (an HTTP/2
    /// client ends its stream with its close, as Chromium does; an HTTP/1.1
    /// one may shut its socket's write side down) while the other side's
    /// answer is still to come: nothing more is read from it, and what it
    /// is owed still goes.
    pub(super) source_finished: bool,
    /// Whether the source has been heard from (keepalive; noted with a
    /// store, not a clock read, on the relay's hottest path).
    pub(super) liveness: Liveness,
    counters: Arc<MessageCounters>,
    pub(super) messages_read: u64,
    /// Messages read from the source that the session's end kept from the
    /// destination (each also counted in `muxgate_messages_dropped_total`).
    pub(super) messages_dropped: u64,
    /// Closes written toward the destination (by the source or the broker).
    pub(super) sent_close: Option<u16>,
}

impl Pump {
    pub(super) fn new(
        from: Side,
        max_message: u64,
        chunk: usize,
        counters: Arc<MessageCounters>,
    ) -> Self {
        Pump {
            scan: Scanner::new(from, max_message),
            spill: Vec::new(),
            spill_ends: Vec::new(),
            chunk,
            unflushed: false,
            armed: false,
            source_finished: false,
            liveness: Liveness::new(Instant::now()),
            counters,
            messages_read: 0,
            messages_dropped: 0,
            sent_close: None,
        }
    }

    /// The peers agreed permessage-deflate: see [`Scanner::allow_compressed`].
    pub(super) fn allow_compressed(&mut self) {
        self.scan.allow_compressed();
    }

    /// Polling this direction now would do nothing but register the
    /// task's waker with the source again: it is still registered since
    /// the last poll, nothing waits to be written, and the source has
    /// nothing (`source_surely_pending`, see
    /// [`crate::transport::upgraded::UpgradedIo::read_surely_pending`]).
    /// Each wake is caused by one direction; polling the other as well
    /// would take tokio's waiters lock for nothing.
    pub(super) fn asleep(&self, source_surely_pending: impl FnOnce() -> bool) -> bool {
        self.armed && self.spill.is_empty() && !self.unflushed && source_surely_pending()
    }

    fn to(&self) -> Side {
        match self.scan.from {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// Queues a ping of the broker's own; see [`Pump::inject`].
    pub(super) fn ping(&mut self) -> bool {
        self.inject(Frame::ping(ping_payload()))
    }

    /// Queues a frame of the broker's own; only at a frame boundary.
    pub(super) fn inject(&mut self, frame: Frame) -> bool {
        if !self.scan.at_boundary() {
            return false;
        }
        let to = self.to();
        own_frame(frame, to, &mut self.spill);
        true
    }

    /// Scans `chunk` (see [`Scanner::scan`]), counting what completes as
    /// it goes, and noting in `ends` where each message ends in `out`.
    fn scan(
        &mut self,
        chunk: &[u8],
        out: &mut Out,
        ends: &mut Vec<usize>,
        metrics: &Metrics,
        upstream: &str,
    ) -> Result<(), WsError> {
        let to = self.to();
        let Pump {
            scan,
            counters,
            messages_read,
            sent_close,
            ..
        } = self;
        scan.scan(chunk, out, &mut |seen| match seen {
            Seen::Message { kind, len, end } => {
                *messages_read += 1;
                ends.push(end);
                match kind {
                    Kind::Text => counters.text(len as usize),
                    Kind::Binary => counters.binary(len as usize),
                }
            }
            // Only valid codes pass (see `check_close`).
            Seen::Close { code } => {
                *sent_close = Some(code);
                metrics.close_sent(upstream, to, code);
            }
        })
    }

    /// Writes the spill to `dst` as far as it will take it.
    #[inline]
    pub(super) fn poll_drain<W>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        // Nearly always: checked before every read.
        if self.spill.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.poll_drain_spill(dst, cx)
    }

    fn poll_drain_spill<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        while !self.spill.is_empty() {
            let n = std::task::ready!(Pin::new(&mut *dst).poll_write(cx, &self.spill))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.spill.drain(..n);
            self.spill_ends.retain_mut(|end| {
                *end = end.saturating_sub(n);
                *end > 0
            });
            self.unflushed = true;
        }
        // Give the memory back: an idle session holds no buffer.
        if self.spill.capacity() > 0 {
            self.spill = Vec::new();
            self.spill_ends = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bytes` to `dst`, spilling what it will not take now (or,
    /// after an error, cannot: it is then counted as lost at the session's
    /// end). The spill must be empty.
    fn write_or_spill<W>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
        mut bytes: &[u8],
    ) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let mut result = Ok(());
        while !bytes.is_empty() && self.spill.is_empty() {
            match Pin::new(&mut *dst).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => result = Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    bytes = &bytes[n..];
                    self.unflushed = true;
                    continue;
                }
                Poll::Ready(Err(e)) => result = Err(e),
                Poll::Pending => {}
            }
            break;
        }
        self.spill.extend_from_slice(bytes);
        result
    }

    /// Writes what scanning a chunk put in `out` (the chunk's messages
    /// ending at `ends`), spilling what `dst` does not take, and notes
    /// which messages end in the spill.
    fn write_out<W>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
        chunk: &[u8],
        out: &Out,
        ends: &[usize],
    ) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let mut written = self.write_or_spill(dst, cx, &chunk[out.direct.clone()]);
        if !out.owned.is_empty() {
            // After a partial or failed write the spill holds the rest, and
            // the owned bytes join it behind that.
            written = written.and(self.write_or_spill(dst, cx, &out.owned));
        }
        if !self.spill.is_empty() {
            let taken = out.len() - self.spill.len();
            self.spill_ends.extend(
                ends.iter()
                    .filter(|&&end| end > taken)
                    .map(|end| end - taken),
            );
        }
        written
    }

    /// Counts the messages still in the spill as dropped: the session has
    /// ended, and the destination will not take them.
    pub(super) fn drop_spill(&mut self, metrics: &Metrics, upstream: &str) {
        let lost = self.spill_ends.len() as u64;
        self.spill = Vec::new();
        self.spill_ends = Vec::new();
        self.count_dropped(lost, metrics, upstream);
    }

    /// Counts `n` messages from the source that the session's end kept
    /// from the destination.
    pub(super) fn count_dropped(&mut self, n: u64, metrics: &Metrics, upstream: &str) {
        self.messages_dropped += n;
        let direction = Direction::read_from(self.scan.from);
        metrics.messages_dropped(upstream, direction, "session_closed", n);
    }

    pub(super) fn poll_flush<W>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(Pin::new(&mut *dst).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// Moves bytes from `src` to `dst` until neither can make progress,
    /// reading into `buf` (the loop's buffer, so that it costs an idle
    /// session nothing; see [`chunked::with_read_buffer`]).
    ///
    /// [`chunked::with_read_buffer`]: crate::transport::chunked::with_read_buffer
    pub(super) fn poll_pump<R, W>(
        &mut self,
        src: &mut R,
        dst: &mut W,
        cx: &mut Context<'_>,
        buf: &mut [MaybeUninit<u8>],
        metrics: &Metrics,
        upstream: &Upstream,
    ) -> Poll<PumpEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let chunk = self.chunk.min(buf.len());
        let buf = &mut buf[..chunk];
        self.armed = false;
        for _ in 0..READS_PER_TURN {
            match self.poll_drain(dst, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::Write(e)),
                // `dst` is full: leave `src` unread.
                Poll::Pending => return self.flush_then_pending(dst, cx),
            }
            let mut read = ReadBuf::uninit(&mut *buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Registered with the socket, unless the task ran out
                    // of coop budget: tokio then woke it instead.
                    self.armed = tokio::task::coop::has_budget_remaining();
                    return self.flush_then_pending(dst, cx);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::Read(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    return Poll::Ready(PumpEnd::Eof)
                }
                Poll::Ready(Ok(())) => {}
            }
            self.liveness.heard();
            let chunk = read.filled();
            let mut out = Out::default();
            let (scanned, written) = MESSAGE_ENDS.with_borrow_mut(|ends| {
                ends.clear();
                let scanned = self.scan(chunk, &mut out, ends, metrics, &upstream.name);
                // What came before a bad frame is still written.
                (scanned, self.write_out(dst, cx, chunk, &out, ends))
            });
            if let Err(e) = written {
                return Poll::Ready(PumpEnd::Write(e));
            }
            if let Err(e) = scanned {
                return Poll::Ready(PumpEnd::Bad(e));
            }
        }
        cx.waker().wake_by_ref();
        self.flush_then_pending(dst, cx)
    }

    fn flush_then_pending<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<PumpEnd>
    where
        W: AsyncWrite + Unpin,
    {
        match self.poll_flush(dst, cx) {
            Poll::Ready(Err(e)) => Poll::Ready(PumpEnd::Write(e)),
            _ => Poll::Pending,
        }
    }
}

/// The stop a direction's end means for the session.
pub(super) fn stop_of(end: PumpEnd, from: Side, to: Side, closed: bool) -> Stop {
    match end {
        PumpEnd::Eof if closed => Stop::Ended {
            side: from,
            clean: true,
        },
        PumpEnd::Eof => Stop::ReadFailed {
            side: from,
            error: WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        },
        PumpEnd::Read(e) => Stop::ReadFailed {
            side: from,
            error: WsError::Io(e),
        },
        PumpEnd::Write(e) => Stop::WriteFailed {
            side: to,
            error: WsError::Io(e),
        },
        PumpEnd::Bad(error) => Stop::ReadFailed { side: from, error },
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{wire, MASK};
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    /// A destination socket that takes `room` more bytes, then waits (or
    /// fails, if `fails`).
    struct Destination {
        room: usize,
        fails: bool,
        taken: Vec<u8>,
    }

    impl AsyncWrite for Destination {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.room == 0 {
                return match self.fails {
                    true => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    false => Poll::Pending,
                };
            }
            let n = self.room.min(buf.len());
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn dropped(metrics: &Metrics) -> String {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("muxgate_messages_dropped_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Three 16-byte client frames relayed into a destination that takes
    /// 20 bytes: the second and third end in the spill. As the spill
    /// drains, the second is delivered; when the session ends, the third
    /// is counted as dropped.
    #[test]
    fn messages_left_in_the_spill_at_the_end_are_counted_as_dropped() {
        for fails in [false, true] {
            let metrics = Metrics::new();
            let counters = metrics.message_counters("u", Direction::ClientToUpstream);
            let mut pump = Pump::new(Side::Client, 1024, 4096, counters);
            let mut chunk = Vec::new();
            for i in 0..3u8 {
                let frame = Frame::message(vec![i; 10], OpCode::Data(Data::Binary), true);
                chunk.extend(wire(frame, MASK));
            }
            assert_eq!(chunk.len(), 48);
            let (mut out, mut ends) = (Out::default(), Vec::new());
            pump.scan(&chunk, &mut out, &mut ends, &metrics, "u")
                .unwrap();
            assert_eq!(ends, [16, 32, 48]);
            let mut dst = Destination {
                room: 20,
                fails,
                taken: Vec::new(),
            };
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let written = pump.write_out(&mut dst, &mut cx, &chunk, &out, &ends);
            assert_eq!(written.is_err(), fails);
            assert_eq!(pump.spill, chunk[20..]);
            assert_eq!(pump.spill_ends, [12, 28], "fails: {fails}");
            if !fails {
                dst.room = 15;
                assert!(pump.poll_drain(&mut dst, &mut cx).is_pending());
                assert_eq!(pump.spill_ends, [13], "the second message went out");
            }
            pump.drop_spill(&metrics, "u");
            let lost = if fails { 2 } else { 1 };
            assert_eq!(pump.messages_dropped, lost);
            assert_eq!(
                dropped(&metrics),
                format!(
                    "muxgate_messages_dropped_total{{direction=\"client_to_upstream\",\
                     reason=\"session_closed\",upstream=\"u\"}} {lost}"
                )
            );
            assert!(pump.spill.is_empty() && pump.spill_ends.is_empty());
        }
    }

    /// A destination that takes the whole chunk leaves nothing to count.
    #[test]
    fn a_chunk_written_whole_leaves_no_message_in_the_spill() {
        let metrics = Metrics::new();
        let counters = metrics.message_counters("u", Direction::UpstreamToClient);
        let mut pump = Pump::new(Side::Upstream, 1024, 4096, counters);
        let chunk = wire(
            Frame::message(vec![1; 10], OpCode::Data(Data::Binary), true),
            None,
        );
        let (mut out, mut ends) = (Out::default(), Vec::new());
        pump.scan(&chunk, &mut out, &mut ends, &metrics, "u")
            .unwrap();
        let mut dst = Destination {
            room: 100,
            fails: false,
            taken: Vec::new(),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        pump.write_out(&mut dst, &mut cx, &chunk, &out, &ends)
            .unwrap();
        assert_eq!(dst.taken, chunk);
        assert!(pump.spill.is_empty() && pump.spill_ends.is_empty());
        pump.drop_spill(&metrics, "u");
        assert_eq!(pump.messages_dropped, 0);
        assert_eq!(dropped(&metrics), "");
    }
}
