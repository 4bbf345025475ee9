//! The end of a frame-relay session: once the relay loop has stopped, each
//! side is written what it is owed and the broker's close (where one may
//! still go), read until it answers, and shut down, within
//! `close_timeout`; then the session's end is logged. It drives the same
//! pumps the loop did.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::debug;

use super::super::DirectSession;
use super::pump::Pump;
use super::scan::{Out, Seen};
use crate::limits::ConnectionPermit;
use crate::metrics::Metrics;
use crate::session::ending::{conclude, log_ended, LegSummary, Stop};
use crate::session::side::Side;
use crate::transport::chunked;
use crate::transport::upgraded::ClientIo;
use crate::upstream::UpstreamIo;

/// Closes both sides of a relay that stopped for `stop`, then logs the
/// session's end.
pub(super) async fn end(
    mut session: Box<DirectSession>,
    mut client: ClientIo,
    mut upstream: UpstreamIo,
    mut up: Pump,
    mut down: Pump,
    stop: Stop,
) {
    let ending = conclude(
        &stop,
        &session.upstream,
        session.lease.target(),
        &session.metrics,
    );
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
    let target = Some(session.lease.target());
    log_ended(
        &session.guard.handle,
        target,
        &ending.cause,
        client_summary,
        upstream_summary,
    );
    // Before the sockets (see `log_ended`).
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
