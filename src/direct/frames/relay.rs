//! The relay loop of a frame-relay session: it opens the session, pumps
//! both directions and runs the ping and silence timers until the session
//! stops, then hands the ending to the close sequence.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::{debug, info};

use hyper::upgrade::OnUpgrade;

use super::super::{conclude, log_end, DirectSession, LegSummary, Stop};
use super::scan::{own_frame, ping_payload, Kind, Out, Scanner, Seen};
use crate::limits::ConnectionPermit;
use crate::metrics::{MessageCounters, Metrics};
use crate::session::alarms::{Alarm, Alarms};
use crate::session::side::{Direction, Side};
use crate::transport::chunked;
use crate::transport::upgraded::{self, ClientIo};
use crate::upstream::{Connected, Upstream, UpstreamIo};

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
enum PumpEnd {
    Eof,
    Read(io::Error),
    Write(io::Error),
    /// The source broke a rule (see [`Scanner::check`]).
    Bad(WsError),
}

/// One direction: frames read from the `scan.from` side, written to the
/// other.
struct Pump {
    scan: Scanner,
    /// Bytes read but not yet written. Empty and unallocated when idle.
    spill: Vec<u8>,
    /// Where each message whose last byte is still in `spill` ends, from
    /// the spill's start: the messages that are lost if the destination
    /// fails before taking them. Empty and unallocated unless the spill
    /// holds the end of a message.
    spill_ends: Vec<usize>,
    /// Bytes read per call ([`chunked::read_chunk`]).
    chunk: usize,
    unflushed: bool,
    /// The last poll ended on a read of the source that returned `Pending`
    /// with the task's waker registered on the socket (not for want of
    /// coop budget); see [`Pump::asleep`].
    armed: bool,
    /// When a timer wake last found that something had arrived from the
    /// source (set lazily: a clock read per read costs 5% of user time).
    last_seen: Instant,
    /// Something arrived since the last timer wake.
    heard: bool,
    counters: Arc<MessageCounters>,
    messages_read: u64,
    /// Messages read from the source that the session's end kept from the
    /// destination (each also counted in `muxgate_messages_dropped_total`).
    messages_dropped: u64,
    /// Closes written toward the destination (by the source or the broker).
    sent_close: Option<u16>,
}

impl Pump {
    fn new(from: Side, max_message: u64, chunk: usize, counters: Arc<MessageCounters>) -> Self {
        Pump {
            scan: Scanner::new(from, max_message),
            spill: Vec::new(),
            spill_ends: Vec::new(),
            chunk,
            unflushed: false,
            armed: false,
            last_seen: Instant::now(),
            heard: false,
            counters,
            messages_read: 0,
            messages_dropped: 0,
            sent_close: None,
        }
    }

    /// Polling this direction now would do nothing but register the
    /// task's waker with the source again: it is still registered since
    /// the last poll, nothing waits to be written, and the source has
    /// nothing (`source_surely_pending`, see
    /// [`crate::transport::upgraded::UpgradedIo::read_surely_pending`]). Every wake
    /// of a session polled both directions, and the one that did not wake
    /// it cost a lock pair and about 150 instructions for nothing.
    fn asleep(&self, source_surely_pending: impl FnOnce() -> bool) -> bool {
        self.armed && self.spill.is_empty() && !self.unflushed && source_surely_pending()
    }

    fn to(&self) -> Side {
        match self.scan.from {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// Queues a ping of the broker's own; see [`Pump::inject`].
    fn ping(&mut self) -> bool {
        self.inject(Frame::ping(ping_payload()))
    }

    /// Queues a frame of the broker's own; only at a frame boundary.
    fn inject(&mut self, frame: Frame) -> bool {
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
    fn poll_drain<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
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
    fn drop_spill(&mut self, metrics: &Metrics, upstream: &str) {
        let lost = self.spill_ends.len() as u64;
        self.spill = Vec::new();
        self.spill_ends = Vec::new();
        self.count_dropped(lost, metrics, upstream);
    }

    /// Counts `n` messages from the source that the session's end kept
    /// from the destination.
    fn count_dropped(&mut self, n: u64, metrics: &Metrics, upstream: &str) {
        self.messages_dropped += n;
        let direction = Direction::read_from(self.scan.from);
        metrics.messages_dropped(upstream, direction, "session_closed", n);
    }

    fn poll_flush<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
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
    fn poll_pump<R, W>(
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
            self.heard = true;
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
fn stop_of(end: PumpEnd, from: Side, to: Side, closed: bool) -> Stop {
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

/// Relays between `client` and `upstream` frame by frame until the session
/// ends, then closes both sides as [`super::super::decide`] says.
///
/// This future is most of an idle session's memory, so what it holds
/// across awaits is kept small: the upstream connection comes boxed (an
/// async fn keeps its arguments for its whole life, and copies them once
/// more into locals), and the rare ending is a boxed future of its own.
pub(in crate::direct) async fn run(
    session: Box<DirectSession>,
    on_upgrade: OnUpgrade,
    connected: Box<Connected>,
) {
    let mut client = match upgraded::client(on_upgrade).await {
        Ok(client) => client,
        Err(error) => return Box::pin(super::super::abandon(session, *connected, error)).await,
    };
    // Out of its box, which is freed here rather than when this future ends.
    let mut upstream = unbox(connected).io;
    // Settings, names and metrics are looked up through `session` where
    // they are used rather than held in locals of their own, which would
    // be kept for the session's life.
    let (mut up, mut down) = {
        let ws = &session.upstream.config.websocket_config;
        let name = &*session.upstream.name;
        let metrics = &*session.metrics;
        let max = ws.max_message_size.bytes() as u64;
        let chunk = chunked::read_chunk(ws.read_buffer_size.bytes());
        let counters = |direction| metrics.message_counters(name, direction);
        info!(
            session = %session.guard.handle.id,
            upstream = %name,
            target_url = %session.lease.target().label,
            mode = "direct",
            relay = "frames",
            remote = %session.guard.handle.remote,
            request_id = %session.guard.handle.request_id,
            "session opened"
        );
        (
            Pump::new(
                Side::Client,
                max,
                chunk,
                counters(Direction::ClientToUpstream),
            ),
            Pump::new(
                Side::Upstream,
                max,
                chunk,
                counters(Direction::UpstreamToClient),
            ),
        )
    };
    // When both sides are next pinged.
    let mut next_ping = Instant::now() + session.upstream.config.websocket_config.ping_period;
    // The timer is the next ping, or the moment a silent side will have gone
    // unheard for pong_wait; it is moved only when it fires.
    let alarms = Alarms::new(
        session.guard.handle.cancel.clone(),
        timer_deadline(&session, &up, &down, next_ping),
    );
    tokio::pin!(alarms);
    let stop = loop {
        tokio::select! {
            biased;
            alarm = &mut alarms => {
                if alarm == Alarm::Shutdown {
                    break Stop::Shutdown;
                }
                let ws = &session.upstream.config.websocket_config;
                let now = Instant::now();
                // A side left unread because the other is backed up cannot
                // be blamed for silence.
                for pump in [&mut up, &mut down] {
                    if std::mem::take(&mut pump.heard) || !pump.spill.is_empty() {
                        pump.last_seen = now;
                    }
                }
                if now >= up.last_seen + ws.pong_wait {
                    break Stop::PingTimeout { side: Side::Client };
                }
                if now >= down.last_seen + ws.pong_wait {
                    break Stop::PingTimeout { side: Side::Upstream };
                }
                if now >= next_ping {
                    down.ping();
                    up.ping();
                    next_ping = now + ws.ping_period;
                }
                alarms.as_mut().reset(timer_deadline(&session, &up, &down, next_ping));
            }
            // Both directions read into the loop's one buffer.
            // A direction whose source did not wake the task is skipped.
            stop = poll_fn(|cx| chunked::with_read_buffer(up.chunk.max(down.chunk), |buf| {
                let polled = if up.asleep(|| client.read_surely_pending()) {
                    Poll::Pending
                } else {
                    up.poll_pump(&mut client, &mut upstream, cx, buf, &session.metrics, &session.upstream)
                };
                if let Poll::Ready(end) = polled {
                    let closed = up.scan.closed.is_some();
                    return Poll::Ready(stop_of(end, Side::Client, Side::Upstream, closed));
                }
                if handshake_done(&up, &down) {
                    return Poll::Ready(Stop::Ended { side: Side::Client, clean: true });
                }
                let polled = if down.asleep(|| upstream.read_surely_pending()) {
                    Poll::Pending
                } else {
                    down.poll_pump(&mut upstream, &mut client, cx, buf, &session.metrics, &session.upstream)
                };
                if let Poll::Ready(end) = polled {
                    let closed = down.scan.closed.is_some();
                    return Poll::Ready(stop_of(end, Side::Upstream, Side::Client, closed));
                }
                if handshake_done(&up, &down) {
                    return Poll::Ready(Stop::Ended { side: Side::Upstream, clean: true });
                }
                Poll::Pending
            })) => break stop,
        }
    };
    Box::pin(end(session, client, upstream, up, down, stop)).await;
}

/// Both sides' close frames have passed: the closing handshake is done, and
/// the relay ends without waiting for either side to drop its connection
/// (a server closes it first, RFC 6455 §7.1.1: the broker does so toward
/// the client, and gives the upstream `close_timeout` to do so).
fn handshake_done(up: &Pump, down: &Pump) -> bool {
    up.scan.closed.is_some() && down.scan.closed.is_some()
}

/// When a relay's timer is next due: the next ping, or the moment a side
/// last heard at `last_seen` has been silent for `pong_wait`.
fn timer_deadline(session: &DirectSession, up: &Pump, down: &Pump, next_ping: Instant) -> Instant {
    let pong_wait = session.upstream.config.websocket_config.pong_wait;
    next_ping
        .min(up.last_seen + pong_wait)
        .min(down.last_seen + pong_wait)
}

/// The value in `boxed`, freeing the box now (moving out with `*boxed`
/// frees it only at the end of the scope, in a future at its very end).
#[allow(clippy::boxed_local)] // taking the box is the point
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Closes both sides of a relay that stopped for `stop`, then logs the
/// session's end.
async fn end(
    mut session: Box<DirectSession>,
    mut client: ClientIo,
    mut upstream: UpstreamIo,
    mut up: Pump,
    mut down: Pump,
    stop: Stop,
) {
    let ending = conclude(&session, &stop);
    let DirectSession {
        permit,
        upstream: config,
        metrics,
        ..
    } = &mut *session;
    let (ws, name) = (&config.config.websocket_config, &*config.name);
    let mut client_end = Closing::new(Side::Client, ending.client, ending.drop_client);
    let mut upstream_end = Closing::new(Side::Upstream, ending.upstream, ending.drop_upstream);
    let close_both = poll_fn(|cx| {
        let c = client_end.poll(
            &mut client,
            &mut down,
            &mut up,
            cx,
            (metrics, name),
            Some(permit),
        );
        let u = upstream_end.poll(&mut upstream, &mut up, &mut down, cx, (metrics, name), None);
        match (c, u) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    });
    let timed_out = tokio::time::timeout(ws.close_timeout, close_both)
        .await
        .is_err();
    // What the destination did not take before the end is lost.
    up.drop_spill(metrics, name);
    down.drop_spill(metrics, name);
    if timed_out {
        debug!(session = %session.guard.handle.id, "close handshake timed out");
    }
    let client_summary = LegSummary {
        side: Side::Client,
        messages_read: up.messages_read,
        messages_dropped: up.messages_dropped,
        sent_close: down.sent_close,
    };
    let upstream_summary = LegSummary {
        side: Side::Upstream,
        messages_read: down.messages_read,
        messages_dropped: down.messages_dropped,
        sent_close: up.sent_close,
    };
    log_end(&session, &ending.cause, client_summary, upstream_summary);
    // Before the sockets (see `log_end`).
    drop(session);
}

/// Where the end of one side stands.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Writing what is owed to the side, then the broker's close.
    Writing,
    /// Reading until the side answers the close (or, for the upstream,
    /// until it closes the connection, as a server does).
    Reading,
    ShuttingDown,
    /// Reading what the side still sends after the broker shut its
    /// connection down, until it closes its own (see [`Closing::poll`]).
    Draining,
    Done,
}

/// Ends one side: see [`Closing::poll`].
struct Closing {
    side: Side,
    frame: Option<CloseFrame>,
    phase: Phase,
    /// The side was owed the broker's close but is in the middle of a
    /// frame from the other side: it is shut down without one, at once,
    /// rather than read for an answer that cannot come (until
    /// `close_timeout`).
    unanswerable: bool,
    /// After shutting the connection down, read until the side closes its
    /// own (rather than drop it with unread bytes, which resets it).
    drain: bool,
}

impl Closing {
    fn new(side: Side, frame: Option<CloseFrame>, drop: bool) -> Self {
        Closing {
            side,
            frame,
            unanswerable: false,
            drain: false,
            phase: if drop {
                Phase::ShuttingDown
            } else {
                Phase::Writing
            },
        }
    }

    /// Writes what `toward` still owes the side and the close frame (if no
    /// close has passed either way and no frame is half written), then
    /// reads the side (through `from`, writing nothing on: the session is
    /// over, so its messages are counted as dropped) until it answers,
    /// then shuts the connection down. `permit` (the client side's) is
    /// released first, so a client that sees its connection end finds its
    /// slot free, even while the upstream side is still closing.
    fn poll<X>(
        &mut self,
        x: &mut X,
        toward: &mut Pump,
        from: &mut Pump,
        cx: &mut Context<'_>,
        (metrics, upstream): (&Metrics, &str),
        mut permit: Option<&mut ConnectionPermit>,
    ) -> Poll<()>
    where
        X: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            match self.phase {
                Phase::Writing => {
                    if let Some(frame) = self.frame.take() {
                        let code = u16::from(frame.code);
                        // A side whose close passed awaits the other
                        // side's answer; one whose close was refused (or
                        // came behind a broken rule) gets the broker's.
                        let owed = from.scan.closed.is_none() || from.scan.poisoned;
                        if toward.sent_close.is_none() && owed {
                            if toward.inject(Frame::close(Some(frame))) {
                                toward.sent_close = Some(code);
                                metrics.close_sent(upstream, self.side, code);
                            } else {
                                // In the middle of a frame toward the side:
                                // no close can go, so none will be answered.
                                self.unanswerable = true;
                            }
                        }
                    }
                    let written = match std::task::ready!(toward.poll_drain(x, cx)) {
                        Ok(()) => std::task::ready!(toward.poll_flush(x, cx)),
                        Err(e) => Err(e),
                    };
                    self.phase = match written {
                        Ok(()) if !self.unanswerable => Phase::Reading,
                        _ => Phase::ShuttingDown,
                    };
                }
                Phase::Reading => {
                    let answered = from.scan.closed.is_some() && self.side == Side::Client;
                    // A client refused inside a frame of its own cannot
                    // answer recognisably (its close lands inside that
                    // frame): the broker, a server, closes first and reads
                    // on until the client closes too.
                    let unrecognisable = from.scan.poisoned && !from.scan.between_frames();
                    if answered || (unrecognisable && self.side == Side::Client) {
                        self.phase = Phase::ShuttingDown;
                        self.drain = unrecognisable && !answered;
                        continue;
                    }
                    match std::task::ready!(poll_discard(x, from, cx, metrics, upstream)) {
                        true => {}
                        false => self.phase = Phase::ShuttingDown,
                    }
                }
                Phase::ShuttingDown => {
                    if let Some(permit) = permit.as_deref_mut() {
                        permit.release();
                    }
                    let _ = std::task::ready!(Pin::new(&mut *x).poll_shutdown(cx));
                    self.phase = if self.drain {
                        Phase::Draining
                    } else {
                        Phase::Done
                    };
                }
                Phase::Draining => {
                    if !std::task::ready!(poll_discard(x, from, cx, metrics, upstream)) {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Reads what `x` sends after the session ended, through `from`'s scanner,
/// counting its messages as dropped. Ready(true) once something was read,
/// Ready(false) at the end of the stream or on an error.
fn poll_discard<X>(
    x: &mut X,
    from: &mut Pump,
    cx: &mut Context<'_>,
    metrics: &Metrics,
    upstream: &str,
) -> Poll<bool>
where
    X: AsyncRead + Unpin,
{
    let mut dropped = 0u64;
    let scanned = chunked::with_read_buffer(from.chunk, |buf| {
        let mut read = ReadBuf::uninit(buf);
        match Pin::new(&mut *x).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {}
            Poll::Ready(_) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
        Poll::Ready(Some(from.scan.scan(
            read.filled(),
            &mut Out::default(),
            &mut |seen| dropped += u64::from(matches!(seen, Seen::Message { .. })),
        )))
    });
    let Some(scanned) = std::task::ready!(scanned) else {
        return Poll::Ready(false);
    };
    from.count_dropped(dropped, metrics, upstream);
    Poll::Ready(scanned.is_ok())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{wire, MASK};
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    #[test]
    fn a_sessions_future_does_not_grow_unnoticed() {
        // tokio allocates a task in 128-byte steps, and this future is most
        // of an idle session's memory. In release builds it is 984 B, in a
        // task of 1,152 B. Debug builds lay it out a little larger. Before
        // raising the bound, check the release task's size:
        // `RUSTC_BOOTSTRAP=1 cargo rustc --release --lib -- -Zprint-type-sizes`,
        // the `Cell<TrackedFuture<Either<{async fn body of
        // direct::passthrough::run()}, ..>>, ..>`.
        fn size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(run);
        assert!(size <= 1_008, "the session's future grew to {size} B");
    }

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
