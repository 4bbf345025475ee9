//! The message relay: direct sessions whose message plugins need whole
//! messages (`pre_request`, `post_response`).
//!
//! One task relays between the two sockets: each direction holds at most
//! one message in flight (the `outbox` of the leg it is written to), and
//! while that slot is full the source leg is not read, so a slow reader
//! pushes back on the fast writer through TCP, as `copy_bidirectional`
//! does. Frames are fed while more are ready and flushed once per burst.
//! The same task pings both legs every `ping_period` and drops a leg
//! silent for `pong_wait`.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream, StreamExt};
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::DirectSession;
use crate::close;
use crate::metrics::{MessageCounters, Metrics};
use crate::session::alarms::{Alarm, Alarms};
use crate::session::client::{client_socket, ClientDeflate};
use crate::session::ending::{conclude, log_ended, log_opened, LegSummary, Stop};
use crate::session::keepalive::{Due, Keepalive, Liveness};
use crate::session::side::{Direction, Side};
use crate::upstream::{self, Connected};
use muxgate_plugins::{SessionHooks, Verdict};

/// Messages relayed per direction before yielding, so one busy direction
/// cannot starve the other or the timers.
const BURST: usize = 64;

pub(super) async fn run(
    mut session: Box<DirectSession>,
    on_upgrade: OnUpgrade,
    upstream: Connected,
) {
    let config = session.upstream.socket_config;
    let deflate = ClientDeflate::agreed(
        session.client_deflate.take(),
        &session.metrics,
        &session.upstream.name,
    );
    let client = match client_socket(on_upgrade, config, deflate).await {
        Ok(client) => client,
        Err(error) => return super::abandon(session, upstream, error).await,
    };
    let upstream_ws = upstream.websocket(config).await;
    relay_messages(session, client, upstream_ws).await
}

/// One socket of a session, with the relay's state for it.
struct Leg<S> {
    side: Side,
    ws: WebSocketStream<S>,
    /// The next message to write to this leg. One slot: while it is full,
    /// the other leg is not read (backpressure).
    outbox: Option<Message>,
    /// A plugin's reply to this leg's own message, written before `outbox`;
    /// while it waits, this leg is not read.
    reply: Option<Message>,
    unflushed: bool,
    /// This leg sent us a close frame (tungstenite has answered it).
    got_close: bool,
    /// The code of the close frame we wrote to this leg (1005: none given).
    sent_close: Option<u16>,
    /// Whether this leg has been heard from (keepalive).
    liveness: Liveness,
    /// Counters for messages read from this leg.
    counters: Arc<MessageCounters>,
    messages_read: u64,
    /// Messages read from this leg that the session's end kept from the
    /// other (counted in `muxgate_messages_dropped_total` at the end).
    messages_dropped: u64,
}

impl<S> Leg<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn new(
        side: Side,
        ws: WebSocketStream<S>,
        counters: Arc<MessageCounters>,
        now: Instant,
    ) -> Self {
        Leg {
            side,
            ws,
            outbox: None,
            reply: None,
            unflushed: false,
            got_close: false,
            sent_close: None,
            liveness: Liveness::new(now),
            counters,
            messages_read: 0,
            messages_dropped: 0,
        }
    }

    /// Writes a plugin's reply, then the outbox, as far as the socket
    /// will take them.
    fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        metrics: &Metrics,
        upstream: &str,
    ) -> Poll<Result<(), WsError>> {
        std::task::ready!(self.poll_write_slot(cx, |leg| &mut leg.reply, metrics, upstream))?;
        self.poll_write_slot(cx, |leg| &mut leg.outbox, metrics, upstream)
    }

    /// Writes the message in `slot`, if any, once the socket is ready.
    fn poll_write_slot(
        &mut self,
        cx: &mut Context<'_>,
        slot: fn(&mut Self) -> &mut Option<Message>,
        metrics: &Metrics,
        upstream: &str,
    ) -> Poll<Result<(), WsError>> {
        if slot(self).is_none() {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(Pin::new(&mut self.ws).poll_ready(cx))?;
        let msg = slot(self).take().expect("checked above");
        if let Message::Close(frame) = &msg {
            let code = close_code_of(frame);
            self.sent_close = Some(code);
            metrics.close_sent(upstream, self.side, code);
        }
        Pin::new(&mut self.ws).start_send(msg)?;
        self.unflushed = true;
        Poll::Ready(Ok(()))
    }

    /// Takes a data message out of the outbox, which the ending session
    /// will not deliver (a close stays, to be written): 1 if there was one.
    fn discard_outbox(&mut self) -> u64 {
        match self.outbox.take() {
            Some(close @ Message::Close(_)) => {
                self.outbox = Some(close);
                0
            }
            Some(Message::Text(_) | Message::Binary(_)) => 1,
            _ => 0,
        }
    }

    fn summary(&self) -> LegSummary {
        LegSummary {
            side: self.side,
            messages_read: self.messages_read,
            messages_dropped: self.messages_dropped,
            sent_close: self.sent_close,
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.ws).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            self.unflushed = false;
        }
        r
    }
}

fn close_code_of(frame: &Option<CloseFrame>) -> u16 {
    frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005)
}

/// Moves messages from `from` to `to` until neither can make progress.
///
/// Whatever this writes, it writes itself, and whatever it leaves waiting
/// is left behind a socket that will wake the task: `to`'s outbox (written
/// first, and `from` is not read while it waits), and a plugin's reply to
/// `from` itself (written before `from` is read on). Every write is then
/// flushed here. So no message ever waits for the other direction to be
/// polled, which nothing might wake: otherwise a reply set last in a turn
/// would wait until the upstream sent something, and with the client
/// unread meanwhile the session would stop for good, its close unanswered.
fn poll_direction<A, B>(
    from: &mut Leg<A>,
    to: &mut Leg<B>,
    hooks: &mut SessionHooks,
    cx: &mut Context<'_>,
    metrics: &Metrics,
    upstream: &str,
) -> Poll<Stop>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut budget = BURST;
    loop {
        match to.poll_write_outbox(cx, metrics, upstream) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => {
                return Poll::Ready(Stop::WriteFailed {
                    side: to.side,
                    error,
                })
            }
            // `to` is full: leave `from` unread; its flush is in progress.
            Poll::Pending => return Poll::Pending,
        }
        // A plugin's reply to the sender goes out before it is read on.
        match from.poll_write_slot(cx, |leg| &mut leg.reply, metrics, upstream) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => {
                return Poll::Ready(Stop::WriteFailed {
                    side: from.side,
                    error,
                })
            }
            Poll::Pending => break,
        }
        if budget == 0 {
            cx.waker().wake_by_ref();
            break;
        }
        budget -= 1;
        match Pin::new(&mut from.ws).poll_next(cx) {
            Poll::Ready(Some(Ok(msg))) => {
                from.liveness.heard();
                match msg {
                    Message::Text(_) | Message::Binary(_) => {
                        match &msg {
                            Message::Text(t) => from.counters.text(t.len()),
                            Message::Binary(b) => from.counters.binary(b.len()),
                            _ => {}
                        }
                        from.messages_read += 1;
                        let verdict = match from.side {
                            Side::Client if hooks.has_pre_request() => hooks.pre_request(msg),
                            Side::Upstream if hooks.has_post_response() => hooks.post_response(msg),
                            _ => Verdict::Pass(msg),
                        };
                        match verdict {
                            Verdict::Pass(m) => to.outbox = Some(m),
                            Verdict::Drop(reason) => {
                                let direction = Direction::read_from(from.side);
                                metrics.messages_dropped(upstream, direction, reason, 1);
                                debug!(upstream, reason, "message dropped by a plugin");
                            }
                            // Replies always go to the client.
                            Verdict::Reply(m) => match from.side {
                                Side::Client => from.reply = Some(m),
                                Side::Upstream => to.outbox = Some(m),
                            },
                            Verdict::Close { code, reason } => {
                                return Poll::Ready(Stop::PluginClose { code, reason })
                            }
                        }
                    }
                    // Pings are hop-by-hop: tungstenite has queued the pong.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    Message::Close(frame) => {
                        from.got_close = true;
                        // tungstenite has answered the close: a reply still
                        // waiting can no longer go out. Its message is
                        // counted as dropped at the end.
                        if from.reply.take().is_some() {
                            from.messages_dropped += 1;
                        }
                        // A close from `to` already started the handshake:
                        // this one is its answer and goes nowhere.
                        if !to.got_close && to.sent_close.is_none() {
                            let frame = match to.side {
                                Side::Client => frame.map(|f| {
                                    close::frame(close::client_code(f.code.into()), &f.reason)
                                }),
                                Side::Upstream => frame,
                            };
                            to.outbox = Some(Message::Close(frame));
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(error))) => {
                return Poll::Ready(Stop::ReadFailed {
                    side: from.side,
                    error,
                })
            }
            Poll::Ready(None) => {
                return Poll::Ready(Stop::Ended {
                    side: from.side,
                    clean: from.got_close,
                })
            }
            Poll::Pending => break,
        }
    }
    for (leg, flushed) in [
        (to.side, to.poll_flush(cx)),
        (from.side, from.poll_flush(cx)),
    ] {
        if let Poll::Ready(Err(error)) = flushed {
            return Poll::Ready(Stop::WriteFailed { side: leg, error });
        }
    }
    Poll::Pending
}

/// The message relay: see the module documentation.
async fn relay_messages<C>(
    mut session: Box<DirectSession>,
    client: WebSocketStream<C>,
    upstream_ws: upstream::UpstreamSocket,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut hooks = std::mem::take(&mut session.hooks);
    let ws = &session.upstream.config.websocket_config;
    let name = Arc::clone(&session.upstream.name);
    let metrics = Arc::clone(&session.metrics);
    let now = Instant::now();
    let mut c = Leg::new(
        Side::Client,
        client,
        metrics.message_counters(&name, Direction::ClientToUpstream),
        now,
    );
    let mut u = Leg::new(
        Side::Upstream,
        upstream_ws,
        metrics.message_counters(&name, Direction::UpstreamToClient),
        now,
    );
    let mut keepalive = Keepalive::new(now, ws.ping_period);
    log_opened(&session.guard.handle, Some(session.lease.target()), None);

    // The timer is moved only when it fires.
    let deadline = |keepalive: &Keepalive, c: &Leg<_>, u: &Leg<_>| {
        keepalive.deadline([&c.liveness, &u.liveness], ws.pong_wait)
    };
    let alarms = Alarms::new(
        session.guard.handle.cancel.clone(),
        deadline(&keepalive, &c, &u),
    );
    tokio::pin!(alarms);
    let stop = loop {
        tokio::select! {
            biased;
            alarm = &mut alarms => {
                if alarm == Alarm::Shutdown {
                    break Stop::cancelled(&session.guard.handle);
                }
                // A leg that is not being read because the other side is
                // backed up cannot be blamed for silence.
                if u.outbox.is_some() { c.liveness.heard(); }
                if c.outbox.is_some() { u.liveness.heard(); }
                match keepalive.due(Instant::now(), [&mut c.liveness, &mut u.liveness], ws.into()) {
                    Due::Silent(0) => break Stop::PingTimeout { side: Side::Client },
                    Due::Silent(_) => break Stop::PingTimeout { side: Side::Upstream },
                    // A leg with a message waiting needs no ping.
                    Due::Ping => for outbox in [&mut c.outbox, &mut u.outbox] {
                        outbox.get_or_insert(Message::Ping(Bytes::new()));
                    },
                    Due::Nothing => {}
                }
                alarms.as_mut().reset(deadline(&keepalive, &c, &u));
            }
            stop = poll_fn(|cx| {
                if let Poll::Ready(s) = poll_direction(&mut c, &mut u, &mut hooks, cx, &metrics, &name) {
                    return Poll::Ready(s);
                }
                poll_direction(&mut u, &mut c, &mut hooks, cx, &metrics, &name)
            }) => break stop,
        }
    };

    finish(session, c, u, stop).await;
}

async fn finish<C, U>(session: Box<DirectSession>, mut c: Leg<C>, mut u: Leg<U>, stop: Stop)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let ws = &session.upstream.config.websocket_config;
    let name = &session.upstream.name;
    let metrics = &session.metrics;
    let ending = conclude(&stop, &session.upstream, session.lease.target(), metrics);
    // A message waiting in one leg's outbox was read from the other.
    u.messages_dropped += c.discard_outbox();
    c.messages_dropped += u.discard_outbox();
    let close_both = async {
        tokio::join!(
            close_leg(&mut c, ending.client, ending.drop_client, metrics, name),
            close_leg(&mut u, ending.upstream, ending.drop_upstream, metrics, name),
        )
    };
    if tokio::time::timeout(ws.close_timeout, close_both)
        .await
        .is_err()
    {
        debug!(session = %session.guard.handle.id, "close handshake timed out");
    }
    let (client, upstream) = (c.summary(), u.summary());
    for leg in [&client, &upstream] {
        let direction = Direction::read_from(leg.side);
        metrics.messages_dropped(name, direction, "session_closed", leg.messages_dropped);
    }
    let target = Some(session.lease.target());
    log_ended(
        &session.guard.handle,
        target,
        &ending.cause,
        client,
        upstream,
    );
    drop(session);
    drop(c);
    drop(u);
}

/// Ends one leg: writes a pending close (or `frame`), then reads until
/// the peer finishes the close handshake. What it reads meanwhile can no
/// longer be delivered: it is counted in the leg's `messages_dropped`.
async fn close_leg<S>(
    leg: &mut Leg<S>,
    frame: Option<CloseFrame>,
    drop: bool,
    metrics: &Metrics,
    upstream: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if drop {
        return;
    }
    if leg.outbox.is_none() && leg.sent_close.is_none() && !leg.got_close {
        if let Some(f) = frame {
            leg.outbox = Some(Message::Close(Some(f)));
        }
    }
    let wrote = poll_fn(|cx| match leg.poll_write_outbox(cx, metrics, upstream) {
        Poll::Ready(Ok(())) => leg.poll_flush(cx),
        other => other,
    })
    .await;
    if wrote.is_err() {
        return;
    }
    // Read until the peer answers the close and the stream ends.
    while let Some(Ok(msg)) = leg.ws.next().await {
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            leg.messages_dropped += 1;
        }
    }
}
