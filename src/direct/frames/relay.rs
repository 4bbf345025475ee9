//! The relay loop of a frame-relay session: it opens the session, pumps
//! both directions and runs the ping and silence timers until the session
//! stops, then hands the ending to the close sequence.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::{debug, info};

use hyper::upgrade::OnUpgrade;

use super::super::{conclude, log_end, DirectSession, LegSummary, Stop};
use super::pump::{stop_of, Pump};
use super::scan::{Out, Seen};
use crate::limits::ConnectionPermit;
use crate::metrics::Metrics;
use crate::session::alarms::{Alarm, Alarms};
use crate::session::side::{Direction, Side};
use crate::transport::chunked;
use crate::transport::upgraded::{self, ClientIo};
use crate::upstream::{Connected, UpstreamIo};

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
    use super::*;

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
}
