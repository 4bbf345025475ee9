//! Direct mode (`enable_direct_communication: true`): one dedicated
//! upstream WebSocket per client.
//!
//! [`connect_upstream`] runs before the client's upgrade is accepted, so a
//! dead backend is an HTTP status, not a broken socket. [`relay`] then relays
//! between the two sockets in one task: each direction holds at most one
//! message in flight (the `outbox` of the leg it is written to), and while
//! that slot is full the source leg is not read, so a slow reader pushes back
//! on the fast writer through TCP, as `copy_bidirectional` does. Frames are
//! fed while more are ready and flushed once per burst. The same task pings
//! both legs every `ping_period` and drops a leg silent for `pong_wait`.
//!
//! That message relay serves routes with message plugins, which need whole
//! messages. Every other direct session takes the frame relay (`passthrough`), which relays
//! frames as bytes, unchanged, and holds no buffer while idle.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::{Sink, Stream, StreamExt};
use http::HeaderMap;
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::close;
use crate::limits::ConnectionPermit;
use crate::metrics::{MessageCounters, Metrics};
use crate::session::alarms::{Alarm, Alarms};
use crate::session::client::client_socket;
use crate::session::side::{Direction, Side};
use crate::session::SessionGuard;
use crate::upstream::{self, ConnectError, Connected, TargetLease, Upstream};
use muxgate_plugins::{SessionHooks, Verdict};

mod frames;

/// Messages relayed per direction before yielding, so one busy direction
/// cannot starve the other or the timers.
const BURST: usize = 64;

/// Connects to a healthy target of `upstream`, recording each outcome in
/// metrics and passive health. A target that refuses or fails its handshake
/// is passed over for the next healthy one while `handshake_timeout` lasts,
/// so one dead target does not fail clients; a timeout is not retried.
pub async fn connect_upstream(
    upstream: &Arc<Upstream>,
    hash_key: Option<&[u8]>,
    path_and_query: &str,
    headers: HeaderMap,
    metrics: &Metrics,
) -> Result<(Connected, TargetLease), UpstreamUnavailable> {
    let ws = &upstream.config.websocket_config;
    let deadline = tokio::time::Instant::now() + ws.handshake_timeout;
    let mut tried = Vec::new();
    let mut last_error = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let lease = match upstream.pick_except(hash_key, &tried) {
            Some(lease) if !left.is_zero() => lease,
            _ => {
                return Err(last_error
                    .map(UpstreamUnavailable::Connect)
                    .unwrap_or(UpstreamUnavailable::NoHealthyTarget))
            }
        };
        let target = lease.target();
        match upstream::connect(
            &target.url,
            upstream.tls.as_ref(),
            path_and_query,
            headers.clone(),
            left,
        )
        .await
        {
            Ok(connected) => {
                metrics.upstream_connected(&upstream.name, &target.label);
                metrics.target_picked(&upstream.name, &target.label);
                metrics.health_check(&upstream.name, &target.label, "passive", true);
                target.health.record_success();
                return Ok((connected, lease));
            }
            Err(error) => {
                metrics.upstream_connect_failed(&upstream.name, &target.label, error.reason());
                metrics.health_check(&upstream.name, &target.label, "passive", false);
                debug!(upstream = %upstream.name, target_url = %target.label, %error, "upstream connect failed");
                if target.health.record_failure(error.to_string()) {
                    warn!(upstream = %upstream.name, target_url = %target.label, %error, "target marked unhealthy");
                }
                let timed_out = matches!(error, ConnectError::Timeout { .. });
                tried.push(lease.index());
                last_error = Some(error);
                if timed_out {
                    return Err(UpstreamUnavailable::Connect(last_error.expect("just set")));
                }
            }
        }
    }
}

/// Why no upstream socket could be had for a new session.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamUnavailable {
    #[error("no healthy target")]
    NoHealthyTarget,
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Everything a direct session owns; dropping it releases the connection
/// permit, the target lease and the registry entry. Passed around boxed:
/// each layer of the session's future would otherwise hold its own copy.
pub struct DirectSession {
    pub guard: SessionGuard,
    /// Message plugins, `pre_request` on client messages and
    /// `post_response` on upstream ones.
    pub hooks: SessionHooks,
    pub permit: ConnectionPermit,
    pub lease: TargetLease,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
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
    /// Last time anything arrived from this leg.
    last_seen: Instant,
    next_ping: Instant,
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
        ping: Duration,
    ) -> Self {
        let now = Instant::now();
        Leg {
            side,
            ws,
            outbox: None,
            reply: None,
            unflushed: false,
            got_close: false,
            sent_close: None,
            last_seen: now,
            next_ping: now + ping,
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

/// Why the relay stopped.
#[derive(Debug)]
enum Stop {
    /// `side`'s stream ended: after its close handshake (`clean`) or not.
    Ended {
        side: Side,
        clean: bool,
    },
    ReadFailed {
        side: Side,
        error: WsError,
    },
    WriteFailed {
        side: Side,
        error: WsError,
    },
    PingTimeout {
        side: Side,
    },
    /// A message plugin closed the session; the client gets this.
    PluginClose {
        code: u16,
        reason: String,
    },
    Shutdown,
}

/// Moves messages from `from` to `to` until neither can make progress.
///
/// Whatever this writes, it writes itself, and whatever it leaves waiting
/// is left behind a socket that will wake the task: `to`'s outbox (written
/// first, and `from` is not read while it waits), and a plugin's reply to
/// `from` itself (written before `from` is read on). Every write is then
/// flushed here. So no message ever waits for the other direction to be
/// polled, which nothing might wake: a reply set last in a turn used to
/// wait until the upstream sent something, and with the client unread
/// meanwhile the session stopped for good, its close unanswered.
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
                from.last_seen = Instant::now();
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

/// The session's task, ready to spawn: it relays between the client, once
/// its upgrade completes, and the upstream until the session ends, then
/// closes both sides with the right codes. Frame by frame when no message
/// plugin needs whole messages, else message by message (boxed: its
/// larger future must not set the size of every session's task).
pub fn relay(
    session: Box<DirectSession>,
    on_upgrade: OnUpgrade,
    upstream: Connected,
) -> impl Future<Output = ()> + Send + 'static {
    let hooks = &session.hooks;
    if hooks.has_pre_request() || hooks.has_post_response() {
        Either::Right(Box::pin(relay_messages_after_upgrade(
            session, on_upgrade, upstream,
        )))
    } else {
        Either::Left(frames::run(session, on_upgrade, Box::new(upstream)))
    }
}

async fn relay_messages_after_upgrade(
    session: Box<DirectSession>,
    on_upgrade: OnUpgrade,
    upstream: Connected,
) {
    let config = session.upstream.socket_config;
    let client = match client_socket(on_upgrade, config).await {
        Ok(client) => client,
        Err(error) => return abandon(session, upstream, error).await,
    };
    let upstream_ws = upstream.websocket(config).await;
    relay_messages(session, client, upstream_ws).await
}

/// The client's upgrade failed after the upstream was connected: closes
/// the upstream with 1001.
pub async fn abandon(session: Box<DirectSession>, upstream: Connected, error: std::io::Error) {
    debug!(session = %session.guard.handle.id, %error, "client upgrade failed");
    let mut socket = upstream.websocket(session.upstream.socket_config).await;
    let close = close::frame(close::GOING_AWAY, "client went away");
    let timeout = session.upstream.config.websocket_config.close_timeout;
    let _ = tokio::time::timeout(timeout, socket.close(Some(close))).await;
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
    let mut c = Leg::new(
        Side::Client,
        client,
        metrics.message_counters(&name, Direction::ClientToUpstream),
        ws.ping_period,
    );
    let mut u = Leg::new(
        Side::Upstream,
        upstream_ws,
        metrics.message_counters(&name, Direction::UpstreamToClient),
        ws.ping_period,
    );
    info!(
        session = %session.guard.handle.id,
        upstream = %name,
        target_url = %session.lease.target().label,
        mode = "direct",
        remote = %session.guard.handle.remote,
        request_id = %session.guard.handle.request_id,
        "session opened"
    );

    // The timer is the next ping, or the moment a silent side will have gone
    // unheard for pong_wait; it is moved only when it fires.
    let deadline = |c: &Leg<_>, u: &Leg<_>| {
        c.next_ping
            .min(u.next_ping)
            .min(c.last_seen + ws.pong_wait)
            .min(u.last_seen + ws.pong_wait)
    };
    let alarms = Alarms::new(session.guard.handle.cancel.clone(), deadline(&c, &u));
    tokio::pin!(alarms);
    let stop = loop {
        tokio::select! {
            biased;
            alarm = &mut alarms => {
                if alarm == Alarm::Shutdown {
                    break Stop::Shutdown;
                }
                let now = Instant::now();
                // A leg that is not being read because the other side is
                // backed up cannot be blamed for silence.
                if u.outbox.is_some() { c.last_seen = now; }
                if c.outbox.is_some() { u.last_seen = now; }
                if now >= c.last_seen + ws.pong_wait {
                    break Stop::PingTimeout { side: Side::Client };
                }
                if now >= u.last_seen + ws.pong_wait {
                    break Stop::PingTimeout { side: Side::Upstream };
                }
                for (next_ping, outbox) in [(&mut c.next_ping, &mut c.outbox), (&mut u.next_ping, &mut u.outbox)] {
                    if now >= *next_ping {
                        if outbox.is_none() {
                            *outbox = Some(Message::Ping(Bytes::new()));
                        }
                        *next_ping = now + ws.ping_period;
                    }
                }
                alarms.as_mut().reset(deadline(&c, &u));
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

/// What each side is told when the session ends.
struct Ending {
    /// Close frame for the client; `None` with `drop_client` means no close
    /// handshake is possible.
    client: Option<CloseFrame>,
    upstream: Option<CloseFrame>,
    drop_client: bool,
    drop_upstream: bool,
    /// Short cause for the log line.
    cause: String,
    /// The upstream failed: counts against the target's passive health.
    upstream_failed: bool,
}

/// A plugin's close reason, or a generic one without `return_error_details`.
pub fn plugin_reason(code: u16, reason: &str, details: bool) -> String {
    if details {
        return reason.to_owned();
    }
    match code {
        close::MESSAGE_TOO_BIG => "message too big",
        close::POLICY_VIOLATION => "policy violation",
        _ => "closed by policy",
    }
    .to_owned()
}

fn decide(stop: &Stop, details: bool) -> Ending {
    let gone_client = |cause: String| Ending {
        client: None,
        upstream: Some(close::frame(close::GOING_AWAY, "client went away")),
        drop_client: true,
        drop_upstream: false,
        cause,
        upstream_failed: false,
    };
    let gone_upstream = |cause: String| Ending {
        client: Some(close::frame(
            close::BAD_GATEWAY,
            &close::reason("upstream went away", Some(&cause), details),
        )),
        upstream: None,
        drop_client: false,
        drop_upstream: true,
        cause,
        upstream_failed: true,
    };
    match stop {
        Stop::Ended { clean: true, side } => Ending {
            client: None,
            upstream: None,
            drop_client: false,
            drop_upstream: false,
            cause: format!("{} closed", side.as_str()),
            upstream_failed: false,
        },
        Stop::Ended {
            clean: false,
            side: Side::Client,
        } => gone_client("client vanished without a close handshake".into()),
        Stop::Ended {
            clean: false,
            side: Side::Upstream,
        } => gone_upstream("upstream vanished without a close handshake".into()),
        Stop::WriteFailed {
            side: Side::Client,
            error,
        } => gone_client(format!("writing to client: {error}")),
        Stop::WriteFailed {
            side: Side::Upstream,
            error,
        } => gone_upstream(format!("writing to upstream: {error}")),
        Stop::PingTimeout { side: Side::Client } => gone_client("client missed its pong".into()),
        Stop::PingTimeout {
            side: Side::Upstream,
        } => gone_upstream("upstream missed its pong".into()),
        Stop::PluginClose { code, reason } => Ending {
            client: Some(close::frame(*code, &plugin_reason(*code, reason, details))),
            upstream: Some(close::frame(close::GOING_AWAY, "client closed")),
            drop_client: false,
            drop_upstream: false,
            cause: format!("closed by a plugin: {code} {reason}"),
            upstream_failed: false,
        },
        Stop::Shutdown => Ending {
            client: Some(close::frame(close::GOING_AWAY, "server shutting down")),
            upstream: Some(close::frame(close::GOING_AWAY, "server shutting down")),
            drop_client: false,
            drop_upstream: false,
            cause: "shutdown".into(),
            upstream_failed: false,
        },
        Stop::ReadFailed { side, error } => {
            let (code, generic) = match error {
                WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                    (close::MESSAGE_TOO_BIG, "message too big")
                }
                WsError::Utf8(_) => (close::INVALID_PAYLOAD, "invalid UTF-8"),
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => {
                    let cause = format!("reading from {}: {error}", side.as_str());
                    return match side {
                        Side::Client => gone_client(cause),
                        Side::Upstream => gone_upstream(cause),
                    };
                }
                _ => (close::PROTOCOL_ERROR, "protocol error"),
            };
            let own = close::frame(code, &close::reason(generic, Some(error), details));
            let cause = format!("{} sent a bad message: {error}", side.as_str());
            match side {
                Side::Client => Ending {
                    client: Some(own),
                    upstream: Some(close::frame(close::GOING_AWAY, "client closed")),
                    drop_client: false,
                    drop_upstream: false,
                    cause,
                    upstream_failed: false,
                },
                Side::Upstream => Ending {
                    client: Some(close::frame(
                        close::BAD_GATEWAY,
                        &close::reason("upstream failed", Some(error), details),
                    )),
                    upstream: Some(own),
                    drop_client: false,
                    drop_upstream: false,
                    cause,
                    upstream_failed: true,
                },
            }
        }
    }
}

/// Decides how the session ends and records what `stop` says about the
/// upstream's health.
fn conclude(session: &DirectSession, stop: &Stop) -> Ending {
    let name = &session.upstream.name;
    let metrics = &session.metrics;
    let ending = decide(
        stop,
        session
            .upstream
            .config
            .websocket_config
            .return_error_details,
    );
    if let Stop::PingTimeout { side } = stop {
        metrics.ping_timeout(name, *side);
    }
    if ending.upstream_failed {
        let target = session.lease.target();
        metrics.health_check(name, &target.label, "passive", false);
        if target.health.record_failure(ending.cause.clone()) {
            warn!(upstream = %name, target_url = %target.label, cause = %ending.cause, "target marked unhealthy");
        }
    }
    ending
}

/// What the "session ended" log line reports of each side.
struct LegSummary {
    side: Side,
    messages_read: u64,
    /// Of those, the messages the session's end kept from the other side.
    messages_dropped: u64,
    sent_close: Option<u16>,
}

/// Logs the end of `session`. The caller drops the session next, before the
/// sockets: that releases its permit and registry entry first, so a client
/// that sees its connection end can reconnect into the freed slot.
fn log_end(session: &DirectSession, cause: &str, client: LegSummary, upstream: LegSummary) {
    let handle = &session.guard.handle;
    info!(
        session = %handle.id,
        upstream = %session.upstream.name,
        target_url = %session.lease.target().label,
        mode = "direct",
        duration_ms = handle.started.elapsed().as_millis() as u64,
        client_messages = client.messages_read,
        upstream_messages = upstream.messages_read,
        client_messages_dropped = client.messages_dropped,
        upstream_messages_dropped = upstream.messages_dropped,
        client_close_code = client.sent_close,
        upstream_close_code = upstream.sent_close,
        cause = %cause,
        "session ended"
    );
}

async fn finish<C, U>(session: Box<DirectSession>, mut c: Leg<C>, mut u: Leg<U>, stop: Stop)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let ws = &session.upstream.config.websocket_config;
    let name = &session.upstream.name;
    let metrics = &session.metrics;
    let ending = conclude(&session, &stop);
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
    log_end(&session, &ending.cause, client, upstream);
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
