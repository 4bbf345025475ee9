//! One mux connection (mux-protocol.md §1, §5, §6): the only owner of an
//! upstream socket shared by many sessions.
//!
//! A single task reads and writes. Reading never waits: each decoded frame
//! is handed to its session's bounded queue with `try_send`, and a full queue
//! closes that session as a slow consumer (§6), so one slow client cannot
//! stall the others. Writing drains the connection's bounded command queue
//! (the "mux write queue"), feeding frames while more are ready and flushing
//! once per burst; when the queue is full, sessions wait for room, which is
//! the backpressure that stops them reading their clients.
//!
//! When the connection dies, the commands it accepted but never wrote are
//! handed back to their sessions, in order, with `ConnLost` (§5.1); frames
//! already given to the socket are never resent (§5.3).
//!
//! When the pool moves the connection to another target, it *hands its
//! sessions over* instead: it leaves the pool (no session binds to it any
//! more) and stops taking commands, writes every command it had taken,
//! closes the socket with 1000 and goes on reading, delivering the
//! upstream's frames to their sessions, until the upstream's close comes
//! back. Only then does it tell its sessions to re-bind, by the same
//! `ConnLost` (with nothing unsent) as a failure: everything a session sent
//! on this connection reached the upstream before its resumed `open`
//! elsewhere, and everything the upstream sent here reached the session, so
//! a move loses, repeats and reorders nothing.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream};
use muxgate_backend::protocol::{self, Encoding, Frame, Open, Payload};
use tokio::sync::mpsc;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::inbox::{Control, SendError, ToClient};
use crate::close;
use crate::metrics::{ConnMetrics, Metrics};
use crate::session::keepalive::{Due, Keepalive, Liveness, Timers};
use crate::session::SessionId;
use crate::upstream::UpstreamSocket;

/// Frames handled per wake-up in each direction before yielding.
const BURST: usize = 128;

/// What a session asks of its mux connection.
pub(crate) enum ConnCmd {
    /// Bind the session here and send `open`.
    Open {
        session: SessionId,
        open: Arc<Open>,
        resumed: bool,
        link: SessionLink,
    },
    Message {
        session: SessionId,
        payload: Payload,
    },
    /// Send `close` and forget the session.
    Close {
        session: SessionId,
        code: u16,
        reason: String,
    },
    /// From the pool: hand every session over to other connections (see
    /// the module docs). Queued behind the commands already taken, which
    /// are written first.
    HandOver,
}

/// How a connection reaches a session: its inbox, `client_queue` deep
/// (full means slow consumer), with signals that pass the queue.
pub(crate) type SessionLink = super::inbox::InboxSender;

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum ConnEnd {
    /// The socket failed, closed or missed its pong.
    Lost(String),
    /// Shutdown: every session had left.
    Drained,
    /// Moved: every session was handed over, the close handshake is done.
    HandedOver,
}

/// What [`MuxConn::poll_io`] stopped for.
enum Step {
    End(ConnEnd),
    /// The pool asked for a hand-over (while serving).
    HandOver,
}

/// What the connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutdown: ends once its last session has left.
    Draining,
    /// Writing what it took, then closing, then reading until the
    /// upstream's close (see the module docs).
    HandingOver {
        close_sent: bool,
    },
}

pub(crate) struct MuxConn {
    pub upstream: Arc<str>,
    pub encoding: Encoding,
    pub ws: UpstreamSocket,
    pub rx: mpsc::Receiver<ConnCmd>,
    pub metrics: Arc<Metrics>,
    pub counters: ConnMetrics,
    /// `ping_period` and `pong_wait` of the upstream.
    pub timers: Timers,
}

/// The connection's working state.
struct State {
    bound: HashMap<SessionId, SessionLink>,
    /// Taken from the queue, not yet written.
    pending: Option<ConnCmd>,
    ping_due: bool,
    unflushed: bool,
    /// Whether the upstream has been heard from (keepalive).
    liveness: Liveness,
}

impl MuxConn {
    /// Runs the connection until it dies, or after `stop` until its last
    /// session has left, or after [`ConnCmd::HandOver`] until it has handed
    /// its sessions over. `withdraw` runs as soon as it stops serving new
    /// sessions, before any of them is told to re-bind.
    pub(crate) async fn run(mut self, stop: CancellationToken, withdraw: impl FnOnce()) -> ConnEnd {
        let mut withdraw = Some(withdraw);
        let timers = self.timers;
        let now = Instant::now();
        let mut st = State {
            bound: HashMap::new(),
            pending: None,
            ping_due: false,
            unflushed: false,
            liveness: Liveness::new(now),
        };
        let mut keepalive = Keepalive::new(now, timers.ping_period);
        let mut phase = Phase::Serving;
        let end = loop {
            let wake = keepalive.deadline([&st.liveness], timers.pong_wait);
            tokio::select! {
                biased;
                _ = stop.cancelled(), if phase == Phase::Serving => phase = Phase::Draining,
                step = poll_fn(|cx| self.poll_io(&mut st, &mut phase, cx)) => match step {
                    Step::End(end) => break end,
                    Step::HandOver => {
                        if let Some(withdraw) = withdraw.take() {
                            withdraw();
                        }
                        self.rx.close();
                        phase = Phase::HandingOver { close_sent: false };
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    match keepalive.due(Instant::now(), [&mut st.liveness], timers) {
                        Due::Silent(_) => break ConnEnd::Lost("missed its pong".into()),
                        Due::Ping => st.ping_due = true,
                        Due::Nothing => {}
                    }
                }
            }
        };
        if let Some(withdraw) = withdraw.take() {
            withdraw();
        }
        match &end {
            ConnEnd::Drained => {
                let frame = close::frame(close::GOING_AWAY, "server shutting down");
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.ws.close(Some(frame))).await;
            }
            // Handed over: nothing is left unwritten, so the sessions just
            // re-bind.
            ConnEnd::Lost(_) | ConnEnd::HandedOver => self.hand_back(st),
        }
        self.counters.queue_depth.set(0);
        end
    }

    /// Reads what is ready and writes what is queued; when draining, ends
    /// once the last session has left and its frames are flushed; when
    /// handing over, closes once the queue is written and ends when the
    /// upstream's close has come.
    fn poll_io(&mut self, st: &mut State, phase: &mut Phase, cx: &mut Context<'_>) -> Poll<Step> {
        let closing = matches!(phase, Phase::HandingOver { close_sent: true });
        for round in 0..=BURST {
            if round == BURST {
                // More may be buffered: come back after the writes.
                cx.waker().wake_by_ref();
                break;
            }
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    st.liveness.heard();
                    match msg {
                        Message::Text(_) | Message::Binary(_) => self.dispatch(st, msg),
                        Message::Close(frame) => {
                            debug!(?frame, "upstream closes the mux connection")
                        }
                        _ => {}
                    }
                }
                Poll::Ready(Some(Err(WsError::ConnectionClosed))) | Poll::Ready(None)
                    if closing =>
                {
                    return Poll::Ready(Step::End(ConnEnd::HandedOver))
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string())))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Step::End(ConnEnd::Lost(
                        "connection closed by the upstream".into(),
                    )))
                }
                Poll::Pending => break,
            }
        }
        if closing {
            // Only the close is left to flush.
            if st.unflushed {
                match Pin::new(&mut self.ws).poll_flush(cx) {
                    Poll::Ready(Ok(())) | Poll::Ready(Err(WsError::ConnectionClosed)) => {
                        st.unflushed = false
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string())))
                    }
                    Poll::Pending => {}
                }
            }
            return Poll::Pending;
        }
        let mut budget = BURST;
        loop {
            if st.pending.is_some() || st.ping_due {
                match Pin::new(&mut self.ws).poll_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string())))
                    }
                    Poll::Ready(Ok(())) => {}
                }
                let msg = match st.pending.take() {
                    Some(cmd) => self.encode(st, cmd),
                    None => {
                        st.ping_due = false;
                        Message::Ping(Default::default())
                    }
                };
                if let Err(e) = Pin::new(&mut self.ws).start_send(msg) {
                    return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string())));
                }
                st.unflushed = true;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match self.rx.poll_recv(cx) {
                // Only while serving: a connection already draining or
                // handing over ignores it.
                Poll::Ready(Some(ConnCmd::HandOver)) if *phase == Phase::Serving => {
                    return Poll::Ready(Step::HandOver)
                }
                Poll::Ready(Some(ConnCmd::HandOver)) => {}
                Poll::Ready(Some(cmd)) => {
                    if let ConnCmd::Open { session, link, .. } = &cmd {
                        st.bound.insert(*session, link.clone());
                    }
                    st.pending = Some(cmd);
                }
                Poll::Ready(None) => match phase {
                    // Everything taken is written: close, once there is room.
                    Phase::HandingOver { close_sent } => {
                        match Pin::new(&mut self.ws).poll_ready(cx) {
                            Poll::Pending => break,
                            Poll::Ready(Err(e)) => {
                                return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string())))
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                        let frame = close::frame(close::NORMAL, "moving to another target");
                        if let Err(e) =
                            Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)))
                        {
                            return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string())));
                        }
                        *close_sent = true;
                        st.unflushed = true;
                        break;
                    }
                    // The pool and every session are gone.
                    _ => return Poll::Ready(Step::End(ConnEnd::Drained)),
                },
                Poll::Pending => break,
            }
        }
        self.counters.queue_depth.set(self.rx.len() as i64);
        if st.unflushed {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => st.unflushed = false,
                Poll::Ready(Err(WsError::ConnectionClosed)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Step::End(ConnEnd::Lost(e.to_string()))),
                Poll::Pending => {}
            }
        }
        let idle =
            st.bound.is_empty() && st.pending.is_none() && !st.unflushed && self.rx.is_empty();
        if *phase == Phase::Draining && idle {
            return Poll::Ready(Step::End(ConnEnd::Drained));
        }
        Poll::Pending
    }

    /// Turns a command into the frame to write.
    fn encode(&self, st: &mut State, cmd: ConnCmd) -> Message {
        let msg = match cmd {
            ConnCmd::Open {
                session,
                open,
                resumed,
                ..
            } => {
                let mut open = (*open).clone();
                open.resumed = resumed;
                protocol::encode(
                    &Frame::Open {
                        session: session.0,
                        open,
                    },
                    self.encoding,
                )
            }
            ConnCmd::Message { session, payload } => {
                protocol::encode_message(session.0, &payload, self.encoding)
            }
            ConnCmd::Close {
                session,
                code,
                reason,
            } => {
                st.bound.remove(&session);
                protocol::encode(
                    &Frame::Close {
                        session: session.0,
                        code,
                        reason,
                    },
                    self.encoding,
                )
            }
            ConnCmd::HandOver => unreachable!("a hand-over is taken, never written"),
        };
        self.counters.frames_out.inc();
        self.counters.bytes_out.inc_by(msg.len() as u64);
        msg
    }

    /// Routes one upstream frame to its session(s).
    fn dispatch(&self, st: &mut State, msg: Message) {
        self.counters.frames_in.inc();
        self.counters.bytes_in.inc_by(msg.len() as u64);
        let frame = match protocol::decode(msg, self.encoding) {
            Ok(frame) => frame,
            Err(reason) => {
                self.metrics
                    .mux_frame_dropped(&self.upstream, reason.as_str());
                debug!(upstream = %self.upstream, reason = reason.as_str(), "mux frame dropped");
                return;
            }
        };
        match frame {
            Frame::Message { session, payload } => {
                let id = SessionId(session);
                match st.bound.get(&id) {
                    Some(link) => {
                        if !self.deliver(link, ToClient::Message(payload)) {
                            st.bound.remove(&id);
                        }
                    }
                    None => self.unknown_session(session),
                }
            }
            Frame::Close {
                session,
                code,
                reason,
            } => match st.bound.remove(&SessionId(session)) {
                Some(link) => {
                    let code = close::client_code(code);
                    let reason = close::truncate_reason(&reason).to_owned();
                    if let Err(SendError::Full(ToClient::Close { code, reason })) =
                        link.try_send(ToClient::Close { code, reason })
                    {
                        link.signal(Control::Close { code, reason });
                    }
                }
                None => self.unknown_session(session),
            },
            Frame::Broadcast { sessions, payload } => {
                let mut gone = Vec::new();
                match sessions {
                    Some(ids) => {
                        for id in ids.into_iter().map(SessionId) {
                            // Unknown here or bound elsewhere: skipped (§3).
                            if let Some(link) = st.bound.get(&id) {
                                if !self.deliver(link, ToClient::Message(payload.clone())) {
                                    gone.push(id);
                                }
                            }
                        }
                    }
                    None => {
                        for (id, link) in &st.bound {
                            if !self.deliver(link, ToClient::Message(payload.clone())) {
                                gone.push(*id);
                            }
                        }
                    }
                }
                for id in gone {
                    st.bound.remove(&id);
                }
            }
            Frame::Hello(_) | Frame::Open { .. } => {
                self.metrics
                    .mux_frame_dropped(&self.upstream, "unexpected_type");
            }
        }
    }

    /// Queues an item for a session; false when the session must be
    /// forgotten (slow consumer, or already gone).
    fn deliver(&self, link: &SessionLink, item: ToClient) -> bool {
        match link.try_send(item) {
            Ok(()) => true,
            Err(SendError::Full(_)) => {
                self.metrics
                    .mux_frame_dropped(&self.upstream, "slow_consumer");
                link.signal(Control::SlowConsumer);
                false
            }
            Err(SendError::Closed(_)) => {
                self.metrics
                    .mux_frame_dropped(&self.upstream, "session_closed");
                false
            }
        }
    }

    fn unknown_session(&self, session: uuid::Uuid) {
        self.metrics
            .mux_frame_dropped(&self.upstream, "unknown_session");
        debug!(upstream = %self.upstream, %session, "mux frame for an unknown session dropped");
    }

    /// Hands every bound session its unwritten messages (§5.1).
    fn hand_back(&mut self, mut st: State) {
        self.rx.close();
        let mut unsent: HashMap<SessionId, Vec<Payload>> = HashMap::new();
        let mut take = |cmd: ConnCmd, st: &mut State| match cmd {
            ConnCmd::Open { session, link, .. } => {
                st.bound.insert(session, link);
            }
            ConnCmd::Message { session, payload } => {
                unsent.entry(session).or_default().push(payload)
            }
            ConnCmd::Close { session, .. } => {
                st.bound.remove(&session);
            }
            ConnCmd::HandOver => {}
        };
        if let Some(cmd) = st.pending.take() {
            take(cmd, &mut st);
        }
        while let Ok(cmd) = self.rx.try_recv() {
            take(cmd, &mut st);
        }
        for (id, link) in st.bound.drain() {
            let lost = Control::ConnLost {
                unsent: unsent.remove(&id).unwrap_or_default(),
            };
            link.signal(lost);
        }
    }
}
