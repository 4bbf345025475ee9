//! The relay loop of a frame-relay session: it opens the session, pumps
//! both directions and runs the ping and silence timers until the session
//! stops, then hands the ending to the close sequence.

use std::future::poll_fn;
use std::task::Poll;

use tokio::time::Instant;

use hyper::upgrade::OnUpgrade;

use super::super::DirectSession;
use super::closing::end;
use super::pump::{stop_of, Pump, PumpEnd};
use crate::session::alarms::{Alarm, Alarms};
use crate::session::ending::{log_opened, Stop};
use crate::session::keepalive::{Due, Keepalive};
use crate::session::side::{Direction, Side};
use crate::transport::chunked;
use crate::transport::upgraded;
use crate::upstream::Connected;

/// Relays between `client` and `upstream` frame by frame until the session
/// ends, then closes both sides as [`crate::session::ending::decide`] says.
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
        log_opened(
            &session.guard.handle,
            Some(session.lease.target()),
            Some("frames"),
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
    // The peers agreed permessage-deflate between them (the upstream
    // answered the client's offer): compressed messages pass as they are.
    if session.guard.handle.compressed {
        up.allow_compressed();
        down.allow_compressed();
    }
    // Both sides are pinged together.
    let mut keepalive = Keepalive::new(
        Instant::now(),
        session.upstream.config.websocket_config.ping_period,
    );
    // The timer is moved only when it fires.
    let alarms = Alarms::new(
        session.guard.handle.cancel.clone(),
        timer_deadline(&session, &keepalive, &up, &down),
    );
    tokio::pin!(alarms);
    let stop = loop {
        tokio::select! {
            biased;
            alarm = &mut alarms => {
                if alarm == Alarm::Shutdown {
                    break Stop::cancelled(&session.guard.handle);
                }
                let ws = &session.upstream.config.websocket_config;
                // A side left unread because the other is backed up cannot
                // be blamed for silence.
                for pump in [&mut up, &mut down] {
                    if !pump.spill.is_empty() {
                        pump.liveness.heard();
                    }
                }
                match keepalive.due(Instant::now(), [&mut up.liveness, &mut down.liveness], ws.into()) {
                    Due::Silent(0) => break Stop::PingTimeout { side: Side::Client },
                    Due::Silent(_) => break Stop::PingTimeout { side: Side::Upstream },
                    Due::Ping => {
                        down.ping();
                        up.ping();
                    }
                    Due::Nothing => {}
                }
                alarms.as_mut().reset(timer_deadline(&session, &keepalive, &up, &down));
            }
            // Both directions read into the loop's one buffer.
            // A direction whose source did not wake the task is skipped.
            stop = poll_fn(|cx| chunked::with_read_buffer(up.chunk.max(down.chunk), |buf| {
                let polled = if up.source_finished {
                    // Only what the upstream is still owed (the close) goes.
                    match up.poll_drain(&mut upstream, cx) {
                        Poll::Ready(Ok(())) => match up.poll_flush(&mut upstream, cx) {
                            Poll::Ready(Err(e)) => Poll::Ready(PumpEnd::Write(e)),
                            _ => Poll::Pending,
                        },
                        Poll::Ready(Err(e)) => Poll::Ready(PumpEnd::Write(e)),
                        Poll::Pending => Poll::Pending,
                    }
                } else if up.asleep(|| client.read_surely_pending()) {
                    Poll::Pending
                } else {
                    up.poll_pump(&mut client, &mut upstream, cx, buf, &session.metrics, &session.upstream)
                };
                if let Poll::Ready(end) = polled {
                    let closed = up.scan.closed.is_some();
                    if matches!(end, PumpEnd::Eof) && closed && down.scan.closed.is_none() {
                        up.source_finished = true;
                    } else {
                        return Poll::Ready(stop_of(end, Side::Client, Side::Upstream, closed));
                    }
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

/// When a relay's timer is next due (see [`Keepalive::deadline`]).
fn timer_deadline(
    session: &DirectSession,
    keepalive: &Keepalive,
    up: &Pump,
    down: &Pump,
) -> Instant {
    let pong_wait = session.upstream.config.websocket_config.pong_wait;
    keepalive.deadline([&up.liveness, &down.liveness], pong_wait)
}

/// The value in `boxed`, freeing the box now (moving out with `*boxed`
/// frees it only at the end of the scope, in a future at its very end).
#[allow(clippy::boxed_local)] // taking the box is the point
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
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
        // direct::frames::relay::run()}, ..>>, ..>`.
        fn size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(run);
        assert!(size <= 1_008, "the session's future grew to {size} B");
    }
}
