//! A client session of a multiplexed upstream (mux-protocol.md §2, §5, §6).
//!
//! One task owns the client socket. Client messages go to the bound mux
//! connection's write queue; while it is full the task stops reading the
//! client (backpressure, §6), holding at most one message. Upstream messages
//! arrive on the session's own bounded queue and are written to the client
//! in bursts.
//!
//! Re-binding (§5): when its connection dies, the session gets back the
//! messages that connection never wrote, keeps them with anything it reads
//! meanwhile (at most `resume_buffer`), binds to another live connection,
//! sends `open` with `resumed: true` and then those messages in order. No
//! live connection within `resume_timeout`, or an overflowing buffer, closes
//! the client with 1013.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use muxgate_backend::protocol::{Open, Payload};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::conn::ConnCmd;
use super::inbox::{inbox, Control, Inbox, Next, ToClient};
use super::pool::{Binding, Tenancy};
use crate::close;
use crate::config::WebSocketSettings;
use crate::limits::ConnectionPermit;
use crate::metrics::Metrics;
use crate::session::alarms::{Alarm, Alarms};
use crate::session::client::ClientDeflate;
use crate::session::ending::{log_ended, log_opened, plugin_reason, LegSummary};
use crate::session::keepalive::{Due, Keepalive, Liveness};
use crate::session::side::{Direction, Side};
use crate::session::SessionGuard;
use crate::upstream::Upstream;
use muxgate_backend::deflate::stream::{self as deflate_stream, DeflateSettings};
use muxgate_plugins::{SessionHooks, Verdict};

/// A close code and reason.
type CloseCode = (u16, String);

/// Queued upstream messages written to the client per flush.
const WRITE_BURST: usize = 64;

/// Everything a multiplexed session owns.
pub(crate) struct MuxSession {
    pub guard: SessionGuard,
    /// Message plugins: `pre_request` on client messages, `post_response`
    /// on upstream ones.
    pub hooks: SessionHooks,
    /// Held for its drop, which frees the session's slot.
    pub _permit: ConnectionPermit,
    pub upstream: Arc<Upstream>,
    pub pool: Tenancy,
    pub metrics: Arc<Metrics>,
    pub open: Arc<Open>,
    /// permessage-deflate as agreed with the client, which the broker
    /// terminates (the mux connection carries the messages uncompressed).
    pub deflate: Option<DeflateSettings>,
}

/// Where the session stands with the pool.
enum Bound {
    Yes(Binding),
    /// Its connection refused a send; `ConnLost` will bring the unsent rest.
    AwaitingLost,
    /// Not bound; must be by `deadline`.
    No {
        deadline: Instant,
    },
}

/// How the session ended.
enum Ending {
    /// The client sent a close frame (code 1005 when it had none).
    ClientClosed {
        code: u16,
        reason: String,
    },
    /// The client vanished or missed its pong: no close handshake.
    ClientGone {
        cause: String,
        ping_timeout: bool,
    },
    /// The client broke the rules; it gets `code`.
    ClientFault {
        code: u16,
        reason: String,
    },
    /// The upstream closed the session.
    UpstreamClosed {
        code: u16,
        reason: String,
    },
    SlowConsumer,
    /// A message plugin closed the session.
    PluginClose {
        code: u16,
        reason: String,
    },
    /// No connection within resume_timeout, or the resume buffer overflowed.
    ResumeFailed(&'static str),
    Shutdown,
}

/// Reads one client message: `Ok(Some)` data, `Ok(None)` nothing to relay.
fn client_event(
    msg: Option<Result<Message, WsError>>,
    details: bool,
) -> Result<Option<Payload>, Ending> {
    match msg {
        Some(Ok(Message::Text(t))) => Ok(Some(Payload::Text(t))),
        Some(Ok(Message::Binary(b))) => Ok(Some(Payload::Binary(b))),
        Some(Ok(Message::Close(frame))) => Err(match frame {
            Some(f) => Ending::ClientClosed {
                code: f.code.into(),
                reason: f.reason.to_string(),
            },
            None => Ending::ClientClosed {
                code: 1005,
                reason: String::new(),
            },
        }),
        Some(Ok(_)) => Ok(None),
        Some(Err(error)) => Err(match &error {
            // A compressed message that could not be inflated.
            e if deflate_stream::close_for(e).is_some() => {
                let (code, generic) = deflate_stream::close_for(e).expect("checked");
                Ending::ClientFault {
                    code,
                    reason: close::reason(generic, Some(&error), details),
                }
            }
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => Ending::ClientFault {
                code: close::MESSAGE_TOO_BIG,
                reason: close::reason("message too big", Some(&error), details),
            },
            WsError::Utf8(_) => Ending::ClientFault {
                code: close::INVALID_PAYLOAD,
                reason: close::reason("invalid UTF-8", Some(&error), details),
            },
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => {
                Ending::ClientGone {
                    cause: error.to_string(),
                    ping_timeout: false,
                }
            }
            _ => Ending::ClientFault {
                code: close::PROTOCOL_ERROR,
                reason: close::reason("protocol error", Some(&error), details),
            },
        }),
        None => Err(Ending::ClientGone {
            cause: "connection closed without a close handshake".into(),
            ping_timeout: false,
        }),
    }
}

/// Why a write to the client stopped before it was done.
enum Interrupted {
    Shutdown,
    /// A signal that ends the session (any but `ConnLost`).
    Ending(Control),
    /// The client took nothing for `pong_wait`.
    Stalled,
}

impl Interrupted {
    fn ending(
        self,
        carry: &mut VecDeque<Payload>,
        bound: &mut Bound,
        ws: &WebSocketSettings,
    ) -> Ending {
        match self {
            Interrupted::Shutdown => Ending::Shutdown,
            Interrupted::Ending(ctl) => {
                on_control(ctl, carry, bound, ws).expect("ends the session")
            }
            Interrupted::Stalled => Ending::ClientGone {
                cause: "stopped reading".into(),
                ping_timeout: true,
            },
        }
    }
}

/// What arrived during a write and waits until it is done.
#[derive(Default)]
struct Beside {
    /// The bound connection was lost: the session re-binds after the write.
    lost: Option<Control>,
    /// The timer fired.
    timer_fired: bool,
}

impl Beside {
    /// The ending a guarded write's `outcome` means, in order: what
    /// interrupted it, what the write itself returned (`done`), or what
    /// waited beside it (a lost connection). A timer that fired fires
    /// again at once, for the session's loop.
    fn settle<R>(
        self,
        outcome: Result<R, Interrupted>,
        done: impl FnOnce(R) -> Option<Ending>,
        alarms: Pin<&mut Alarms>,
        carry: &mut VecDeque<Payload>,
        bound: &mut Bound,
        ws: &WebSocketSettings,
    ) -> Option<Ending> {
        let ending = match outcome {
            Err(interrupted) => return Some(interrupted.ending(carry, bound, ws)),
            Ok(r) => done(r),
        };
        if ending.is_some() {
            return ending;
        }
        if self.timer_fired {
            alarms.reset(Instant::now());
        }
        self.lost.and_then(|ctl| on_control(ctl, carry, bound, ws))
    }
}

/// Drives `write` to the client while still hearing what must not wait
/// behind it: a client that stops reading must not hide the shutdown or
/// the signals that end its session (slow consumer, upstream close) behind
/// a stuck write. A lost connection and the timer wait in `beside`.
///
/// This future is part of every multiplexed session's task, so it is kept
/// small: `write` comes pinned by the caller, an async block holds the
/// arguments once (an async fn holds them twice), and the stall timer is
/// made and boxed only once the write has had to wait.
#[allow(clippy::manual_async_fn)] // an async fn would hold its arguments twice
fn guarded<'a, F: Future>(
    mut write: Pin<&'a mut F>,
    mut alarms: Pin<&'a mut Alarms>,
    inbox: &'a Inbox,
    beside: &'a mut Beside,
    pong_wait: Duration,
) -> impl Future<Output = Result<F::Output, Interrupted>> + 'a {
    async move {
        let mut stalled: Option<Pin<Box<Sleep>>> = None;
        loop {
            tokio::select! {
                biased;
                alarm = alarms.as_mut() => match alarm {
                    Alarm::Shutdown => return Err(Interrupted::Shutdown),
                    Alarm::Timer => beside.timer_fired = true,
                },
                ctl = inbox.signal(), if beside.lost.is_none() => match ctl {
                    Control::ConnLost { .. } => beside.lost = Some(ctl),
                    other => return Err(Interrupted::Ending(other)),
                },
                r = write.as_mut() => return Ok(r),
                // Polled only while the write waits: a write done at once
                // (nearly all of them) never starts this timer.
                () = async {
                    stalled
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(pong_wait)))
                        .as_mut()
                        .await
                } => return Err(Interrupted::Stalled),
            }
        }
    }
}

/// Applies a control signal; `Some` when it ends the session.
fn on_control(
    ctl: Control,
    carry: &mut VecDeque<Payload>,
    bound: &mut Bound,
    ws: &WebSocketSettings,
) -> Option<Ending> {
    match ctl {
        Control::SlowConsumer => Some(Ending::SlowConsumer),
        Control::Close { code, reason } => Some(Ending::UpstreamClosed { code, reason }),
        Control::ConnLost { unsent } => {
            // Unwritten messages are older than anything still held here.
            for p in unsent.into_iter().rev() {
                carry.push_front(p);
            }
            *bound = Bound::No {
                deadline: Instant::now() + ws.resume_timeout,
            };
            (carry.len() > ws.resume_buffer)
                .then_some(Ending::ResumeFailed("resume buffer overflow"))
        }
    }
}

/// Takes the client's upgraded connection and runs the session until it
/// ends. The client's socket is made here, not passed in, so that the
/// task's future holds it once.
pub(crate) async fn run(mut session: Box<MuxSession>, on_upgrade: hyper::upgrade::OnUpgrade) {
    let config = session.upstream.socket_config;
    let deflate = ClientDeflate::agreed(
        session.deflate.take(),
        &session.metrics,
        &session.upstream.name,
    );
    let mut client = match crate::session::client::client_socket(on_upgrade, config, deflate).await
    {
        Ok(client) => client,
        Err(error) => {
            debug!(session = %session.guard.handle.id, %error, "client upgrade failed");
            return;
        }
    };
    let mut hooks = std::mem::take(&mut session.hooks);
    let ws: &WebSocketSettings = &session.upstream.config.websocket_config;
    let name = Arc::clone(&session.upstream.name);
    let id = session.guard.handle.id;
    let metrics = &session.metrics;
    let up_counters = metrics.message_counters(&name, Direction::ClientToUpstream);
    let down_counters = metrics.message_counters(&name, Direction::UpstreamToClient);
    let (link, inbox) = inbox(ws.client_queue);
    log_opened(&session.guard.handle, None, None);

    let mut bound = Bound::No {
        deadline: Instant::now() + ws.resume_timeout,
    };
    let mut opened = false;
    // Accepted from the client, not yet in any connection's queue; oldest first.
    let mut carry: VecDeque<Payload> = VecDeque::new();
    let (mut sent_up, mut sent_down) = (0u64, 0u64);
    // `client_liveness` is noted when the client is heard from, or not
    // read (so not to blame). (`now` in a block: a local in scope is kept
    // in the future across every await.)
    let (mut client_liveness, mut keepalive) = {
        let now = Instant::now();
        (Liveness::new(now), Keepalive::new(now, ws.ping_period))
    };
    // Shutdown and the timer are polled only when one of them fires, not on
    // every message (see `Alarms`).
    let alarms = Alarms::new(
        session.guard.handle.cancel.clone(),
        keepalive.deadline([&client_liveness], ws.pong_wait),
    );
    tokio::pin!(alarms);

    let ending = loop {
        // Read the client only while its messages have somewhere to go.
        let may_read = match &bound {
            Bound::Yes(_) => carry.is_empty(),
            _ => carry.len() <= ws.resume_buffer,
        };
        if !may_read {
            client_liveness.heard();
        }
        // The select's futures must not borrow `bound`, which its handlers
        // change; they get owned handles, made only on the rare paths.
        let bind = match &bound {
            Bound::No { deadline } => Some((Arc::clone(session.pool.pool()), *deadline)),
            _ => None,
        };
        let room = match &bound {
            Bound::Yes(b) if !carry.is_empty() => Some(b.conn.tx.clone()),
            _ => None,
        };
        tokio::select! {
            biased;
            alarm = &mut alarms => {
                if alarm == Alarm::Shutdown {
                    break Ending::Shutdown;
                }
                let ping_due = match keepalive.due(Instant::now(), [&mut client_liveness], ws.into()) {
                    Due::Silent(_) => break Ending::ClientGone { cause: "missed its pong".into(), ping_timeout: true },
                    Due::Ping => true,
                    Due::Nothing => false,
                };
                alarms.as_mut().reset(keepalive.deadline([&client_liveness], ws.pong_wait));
                if ping_due {
                    // Boxed: pings are rare. Guarded as every write is: a
                    // client that stopped reading must not hold a ping,
                    // and the shutdown or signals behind it, for pong_wait.
                    let mut beside = Beside::default();
                    let ping = Box::pin(async {
                        let ping = std::pin::pin!(client.send(Message::Ping(Default::default())));
                        guarded(ping, alarms.as_mut(), &inbox, &mut beside, ws.pong_wait).await
                    });
                    let outcome = ping.await;
                    let sent = |r: Result<(), WsError>| r.err().map(|e| Ending::ClientGone { cause: format!("pinging client: {e}"), ping_timeout: false });
                    if let Some(ending) = beside.settle(outcome, sent, alarms.as_mut(), &mut carry, &mut bound, ws) {
                        break ending;
                    }
                }
            }
            next = inbox.recv() => {
                let item = match next {
                    Next::Signal(ctl) => {
                        if let Some(ending) = on_control(ctl, &mut carry, &mut bound, ws) {
                            break ending;
                        }
                        debug!(session = %id, held = carry.len(), "mux connection lost; re-binding");
                        continue;
                    }
                    Next::Item(item) => item,
                };
                let write = write_burst(&mut client, item, &inbox, &mut hooks, &down_counters, &mut sent_down);
                tokio::pin!(write);
                let mut beside = Beside::default();
                let outcome = guarded(write, alarms.as_mut(), &inbox, &mut beside, ws.pong_wait).await;
                let written = |r| match r {
                    Ok(None) => None,
                    Ok(Some(BurstEnd::Upstream(code, reason))) => Some(Ending::UpstreamClosed { code, reason }),
                    Ok(Some(BurstEnd::Plugin(code, reason))) => Some(Ending::PluginClose { code, reason }),
                    Err(e) => Some(Ending::ClientGone { cause: format!("writing to client: {e}"), ping_timeout: false }),
                };
                if let Some(ending) = beside.settle(outcome, written, alarms.as_mut(), &mut carry, &mut bound, ws) {
                    break ending;
                }
            }
            // Bind (or re-bind) to a live connection.
            // Boxed: binding is rare, and its future is large.
            binding = async {
                match bind {
                    Some((pool, deadline)) => Box::pin(async move { pool.bind_by(deadline).await }).await,
                    None => std::future::pending().await,
                }
            }, if matches!(bound, Bound::No { .. }) => {
                let Some(binding) = binding else {
                    break Ending::ResumeFailed("no upstream connection");
                };
                let cmd = ConnCmd::Open { session: id, open: Arc::clone(&session.open), resumed: opened, link: link.clone() };
                if binding.conn.tx.send(cmd).await.is_ok() {
                    if opened {
                        metrics.session_rebound(&name);
                    }
                    opened = true;
                    bound = Bound::Yes(binding);
                }
                // A refused open leaves the session unbound: try again.
            }
            // Move held messages into the bound connection's queue, in order.
            permit = async {
                match room {
                    Some(tx) => tx.reserve_owned().await,
                    None => std::future::pending().await,
                }
            }, if matches!(bound, Bound::Yes(_)) && !carry.is_empty() => match permit {
                Ok(permit) => {
                    let payload = carry.pop_front().expect("carry is not empty");
                    permit.send(ConnCmd::Message { session: id, payload });
                    sent_up += 1;
                }
                Err(_) => bound = Bound::AwaitingLost,
            },
            msg = client.next(), if may_read => {
                client_liveness.heard();
                match client_event(msg, ws.return_error_details) {
                    Err(ending) => break ending,
                    Ok(None) => {}
                    Ok(Some(payload)) => {
                        match &payload {
                            Payload::Text(t) => up_counters.text(t.len()),
                            Payload::Binary(b) => up_counters.binary(b.len()),
                        }
                        let payload = if hooks.has_pre_request() {
                            match hooks.pre_request(payload.into_message()) {
                                Verdict::Pass(m) => match Payload::from_message(m) {
                                    Some(p) => p,
                                    None => continue,
                                },
                                Verdict::Drop(reason) => {
                                    metrics.messages_dropped(&name, Direction::ClientToUpstream, reason, 1);
                                    debug!(session = %id, reason, "message dropped by a plugin");
                                    continue;
                                }
                                Verdict::Reply(m) => {
                                    // Boxed: replies are rare; guarded as every write is.
                                    let mut beside = Beside::default();
                                    let reply = Box::pin(async {
                                        let reply = std::pin::pin!(client.send(m));
                                        guarded(reply, alarms.as_mut(), &inbox, &mut beside, ws.pong_wait).await
                                    });
                                    let outcome = reply.await;
                                    let sent = |r: Result<(), WsError>| r.err().map(|e| Ending::ClientGone { cause: format!("writing a plugin reply: {e}"), ping_timeout: false });
                                    match beside.settle(outcome, sent, alarms.as_mut(), &mut carry, &mut bound, ws) {
                                        Some(ending) => break ending,
                                        None => continue,
                                    }
                                }
                                Verdict::Close { code, reason } => break Ending::PluginClose { code, reason },
                            }
                        } else {
                            payload
                        };
                        // Fast path: straight into the connection's queue.
                        let queued = match (&bound, carry.is_empty()) {
                            (Bound::Yes(b), true) => match b.conn.tx.try_send(ConnCmd::Message { session: id, payload }) {
                                Ok(()) => { sent_up += 1; None }
                                Err(mpsc::error::TrySendError::Full(ConnCmd::Message { payload, .. })) => Some(payload),
                                Err(mpsc::error::TrySendError::Closed(ConnCmd::Message { payload, .. })) => {
                                    bound = Bound::AwaitingLost;
                                    Some(payload)
                                }
                                Err(_) => unreachable!("a message command comes back as sent"),
                            },
                            _ => Some(payload),
                        };
                        if let Some(p) = queued {
                            carry.push_back(p);
                            if !matches!(bound, Bound::Yes(_)) && carry.len() > ws.resume_buffer {
                                break Ending::ResumeFailed("resume buffer overflow");
                            }
                        }
                    }
                }
            }
        }
    };

    // Boxed: the end's futures need not weigh on every idle session.
    Box::pin(finish(
        session,
        client,
        inbox,
        bound,
        carry,
        ending,
        (sent_up, sent_down),
    ))
    .await;
}

/// Closes both sides as `ending` says and logs the session's end.
async fn finish<C>(
    session: Box<MuxSession>,
    mut client: WebSocketStream<C>,
    inbox: Inbox,
    bound: Bound,
    carry: VecDeque<Payload>,
    ending: Ending,
    (sent_up, sent_down): (u64, u64),
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let ws: &WebSocketSettings = &session.upstream.config.websocket_config;
    let name = Arc::clone(&session.upstream.name);
    let id = session.guard.handle.id;
    let metrics = &session.metrics;
    let details = ws.return_error_details;
    let (to_client_frame, to_upstream, cause): (Option<CloseCode>, Option<CloseCode>, String) =
        match ending {
            Ending::ClientClosed { code, reason } => {
                (None, Some((code, reason)), "client closed".into())
            }
            Ending::ClientGone {
                cause,
                ping_timeout,
            } => {
                if ping_timeout {
                    metrics.ping_timeout(&name, Side::Client);
                }
                (
                    None,
                    Some((1006, String::new())),
                    format!("client gone: {cause}"),
                )
            }
            Ending::ClientFault { code, reason } => (
                Some((code, reason.clone())),
                Some((code, reason.clone())),
                format!("client fault: {reason}"),
            ),
            Ending::UpstreamClosed { code, reason } => {
                (Some((code, reason)), None, "upstream closed".into())
            }
            Ending::PluginClose { code, reason } => {
                let r = plugin_reason(code, &reason, details);
                (
                    Some((code, r.clone())),
                    Some((code, r)),
                    format!("closed by a plugin: {code} {reason}"),
                )
            }
            Ending::SlowConsumer => {
                metrics.slow_consumer_closed(&name);
                let r = "slow consumer".to_string();
                (
                    Some((close::POLICY_VIOLATION, r.clone())),
                    Some((close::POLICY_VIOLATION, r.clone())),
                    r,
                )
            }
            Ending::ResumeFailed(why) => {
                let reason = close::reason("try again later", Some(&why), details);
                (
                    Some((close::TRY_AGAIN_LATER, reason)),
                    None,
                    why.to_string(),
                )
            }
            Ending::Shutdown if session.guard.handle.is_draining() => {
                let r = close::DRAINED_REASON.to_string();
                (
                    Some((close::GOING_AWAY, r.clone())),
                    Some((close::GOING_AWAY, r)),
                    "drained: drain_timeout ran out".into(),
                )
            }
            Ending::Shutdown => {
                let r = "server shutting down".to_string();
                (
                    Some((close::GOING_AWAY, r.clone())),
                    Some((close::GOING_AWAY, r)),
                    "shutdown".into(),
                )
            }
        };
    let dropped_down = inbox.close() as u64;
    metrics.messages_dropped(
        &name,
        Direction::UpstreamToClient,
        "session_closed",
        dropped_down,
    );
    let dropped_up = carry.len() as u64;
    metrics.messages_dropped(
        &name,
        Direction::ClientToUpstream,
        "session_closed",
        dropped_up,
    );
    let closing = async {
        let tell_upstream = async {
            if let (Some((code, reason)), Bound::Yes(b)) = (&to_upstream, &bound) {
                let cmd = ConnCmd::Close {
                    session: id,
                    code: *code,
                    reason: close::truncate_reason(reason).to_owned(),
                };
                let _ = b.conn.tx.send(cmd).await;
            }
        };
        let tell_client = async {
            if let Some((code, reason)) = &to_client_frame {
                metrics.close_sent(&name, Side::Client, *code);
                let _ = client.close(Some(close::frame(*code, reason))).await;
            }
            while let Some(Ok(_)) = client.next().await {}
        };
        tokio::join!(tell_upstream, tell_client);
    };
    if tokio::time::timeout(ws.close_timeout, closing)
        .await
        .is_err()
    {
        debug!(session = %id, "close handshake timed out");
    }
    if let Some((code, _)) = &to_upstream {
        if matches!(bound, Bound::Yes(_)) {
            metrics.close_sent(&name, Side::Upstream, *code);
        }
    }
    let client_summary = LegSummary {
        side: Side::Client,
        messages_read: sent_up,
        messages_dropped: dropped_up,
        sent_close: to_client_frame.as_ref().map(|c| c.0),
    };
    let upstream_summary = LegSummary {
        side: Side::Upstream,
        messages_read: sent_down,
        messages_dropped: dropped_down,
        sent_close: to_upstream.as_ref().map(|c| c.0),
    };
    let handle = &session.guard.handle;
    log_ended(handle, None, &cause, client_summary, upstream_summary);
    // Free the slot before the client sees its connection end.
    drop(bound);
    drop(session);
    drop(client);
}

/// Why a burst of writes to the client ended the session.
enum BurstEnd {
    /// The upstream's close came through the queue.
    Upstream(u16, String),
    /// A `post_response` plugin closed the session.
    Plugin(u16, String),
}

/// Writes `first` and whatever else is queued (up to a burst), through the
/// `post_response` plugins, then flushes once.
async fn write_burst<C>(
    client: &mut WebSocketStream<C>,
    first: ToClient,
    inbox: &Inbox,
    hooks: &mut SessionHooks,
    counters: &crate::metrics::MessageCounters,
    sent: &mut u64,
) -> Result<Option<BurstEnd>, WsError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut item = Some(first);
    let mut n = 0;
    while let Some(next) = item.take() {
        match next {
            ToClient::Close { code, reason } => {
                client.flush().await?;
                return Ok(Some(BurstEnd::Upstream(code, reason)));
            }
            ToClient::Message(payload) => {
                match &payload {
                    Payload::Text(t) => counters.text(t.len()),
                    Payload::Binary(b) => counters.binary(b.len()),
                }
                let msg = payload.into_message();
                let msg = if hooks.has_post_response() {
                    match hooks.post_response(msg) {
                        Verdict::Pass(m) | Verdict::Reply(m) => Some(m),
                        Verdict::Drop(_) => None,
                        Verdict::Close { code, reason } => {
                            client.flush().await?;
                            return Ok(Some(BurstEnd::Plugin(code, reason)));
                        }
                    }
                } else {
                    Some(msg)
                };
                if let Some(msg) = msg {
                    client.feed(msg).await?;
                    *sent += 1;
                }
                n += 1;
            }
        }
        if n < WRITE_BURST {
            item = inbox.try_item();
        }
    }
    client.flush().await?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::inbox::InboxSender;
    use tokio_util::sync::CancellationToken;

    const PONG_WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_sessions_future_does_not_grow_unnoticed() {
        // tokio allocates a task in 128-byte steps, and this future is most
        // of an idle session's memory. In release builds it is 1,760 B, in a
        // task of 1,920 B; a future that takes the task over a step costs
        // every idle session more RSS than the step itself. Debug builds lay
        // it out a little larger. Before raising the bound, check the release task's size:
        // `RUSTC_BOOTSTRAP=1 cargo rustc --release --lib -- -Zprint-type-sizes`,
        // the `Cell<TrackedFuture<{async fn body of mux::session::run()}>, ..>`.
        fn size<A, B, F: Future>(_: fn(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(run);
        assert!(size <= 1_768, "the session's future grew to {size} B");
    }

    /// Alarms whose timer is due in `timer`, their shutdown token, and an
    /// inbox with its sender.
    fn parts(timer: Duration) -> (Pin<Box<Alarms>>, CancellationToken, InboxSender, Inbox) {
        let cancel = CancellationToken::new();
        let alarms = Box::pin(Alarms::new(cancel.clone(), Instant::now() + timer));
        let (sender, inbox) = inbox(4);
        (alarms, cancel, sender, inbox)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_write_gives_way_to_shutdown() {
        let (mut alarms, cancel, _sender, inbox) = parts(Duration::from_secs(60));
        let mut beside = Beside::default();
        let write = std::pin::pin!(std::future::pending::<()>());
        let guarded = guarded(write, alarms.as_mut(), &inbox, &mut beside, PONG_WAIT);
        cancel.cancel();
        assert!(matches!(guarded.await, Err(Interrupted::Shutdown)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_write_gives_way_to_a_signal_that_ends_the_session() {
        let (mut alarms, _cancel, sender, inbox) = parts(Duration::from_secs(60));
        let mut beside = Beside::default();
        let write = std::pin::pin!(std::future::pending::<()>());
        assert!(sender.signal(Control::SlowConsumer));
        let start = Instant::now();
        let result = guarded(write, alarms.as_mut(), &inbox, &mut beside, PONG_WAIT).await;
        assert!(matches!(
            result,
            Err(Interrupted::Ending(Control::SlowConsumer))
        ));
        assert_eq!(Instant::now(), start, "at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_takes_nothing_for_pong_wait_has_stalled() {
        let (mut alarms, _cancel, _sender, inbox) = parts(Duration::from_secs(60));
        let mut beside = Beside::default();
        let start = Instant::now();
        let write = std::pin::pin!(std::future::pending::<()>());
        let result = guarded(write, alarms.as_mut(), &inbox, &mut beside, PONG_WAIT).await;
        assert!(matches!(result, Err(Interrupted::Stalled)));
        assert_eq!(Instant::now() - start, PONG_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_connection_and_the_timer_wait_for_the_write() {
        // The timer fires and the connection is lost while the write waits;
        // both are kept for after it, and the write still finishes.
        let (mut alarms, _cancel, sender, inbox) = parts(Duration::from_secs(1));
        let mut beside = Beside::default();
        assert!(sender.signal(Control::ConnLost { unsent: Vec::new() }));
        let write = std::pin::pin!(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "written"
        });
        let result = guarded(write, alarms.as_mut(), &inbox, &mut beside, PONG_WAIT).await;
        assert_eq!(result.ok(), Some("written"));
        assert!(beside.timer_fired);
        assert!(matches!(beside.lost, Some(Control::ConnLost { .. })));
    }
}
