//! How a session ends: the rules both modes share.
//!
//! A direct session's relays (frames or messages) stop for a [`Stop`];
//! [`decide`] turns it into what each side is told and [`conclude`] records
//! what it says about the target's health. Multiplexed sessions end by the
//! rules of the mux protocol (`crate::mux::session`), and share with direct
//! ones the plugin close reasons ([`plugin_reason`]) and the two log lines
//! every session writes ([`log_opened`], [`log_ended`]).

use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::info;

use super::side::Side;
use super::SessionHandle;
use crate::close;
use crate::metrics::Metrics;
use crate::upstream::{Target, Upstream};
use muxgate_backend::deflate::stream as deflate_stream;

/// Why a direct session's relay stopped.
#[derive(Debug)]
pub(crate) enum Stop {
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
    /// Cancelled by `drain_timeout` (see `session::drain`).
    Drained,
}

impl Stop {
    /// What a cancelled session stops for: a drain that ran out, or shutdown.
    pub(crate) fn cancelled(handle: &super::SessionHandle) -> Stop {
        if handle.is_draining() {
            Stop::Drained
        } else {
            Stop::Shutdown
        }
    }
}

/// What each side is told when the session ends.
pub(crate) struct Ending {
    /// Close frame for the client; `None` with `drop_client` means no close
    /// handshake is possible.
    pub client: Option<CloseFrame>,
    pub upstream: Option<CloseFrame>,
    pub drop_client: bool,
    pub drop_upstream: bool,
    /// Short cause for the log line.
    pub cause: String,
    /// The upstream failed: counts against the target's passive health.
    pub upstream_failed: bool,
}

/// A plugin's close reason, or a generic one without `return_error_details`.
pub(crate) fn plugin_reason(code: u16, reason: &str, details: bool) -> String {
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

pub(crate) fn decide(stop: &Stop, details: bool) -> Ending {
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
        Stop::Drained => Ending {
            client: Some(close::frame(close::GOING_AWAY, close::DRAINED_REASON)),
            upstream: Some(close::frame(close::GOING_AWAY, close::DRAINED_REASON)),
            drop_client: false,
            drop_upstream: false,
            cause: "drained: drain_timeout ran out".into(),
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
                // A compressed message that could not be inflated.
                e if deflate_stream::close_for(e).is_some() => {
                    deflate_stream::close_for(e).expect("checked")
                }
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

/// Decides how a direct session ends and records what `stop` says about
/// its target's health.
pub(crate) fn conclude(
    stop: &Stop,
    upstream: &Upstream,
    target: &Target,
    metrics: &Metrics,
) -> Ending {
    let name = &upstream.name;
    let ending = decide(stop, upstream.config.websocket_config.return_error_details);
    if let Stop::PingTimeout { side } = stop {
        metrics.ping_timeout(name, *side);
    }
    if ending.upstream_failed {
        target.report_passive(name, metrics, Err(&ending.cause));
    }
    ending
}

/// What the "session ended" log line reports of one side.
pub(crate) struct LegSummary {
    pub side: Side,
    /// Messages read from this side.
    pub messages_read: u64,
    /// Of those, the messages the session's end kept from the other side.
    pub messages_dropped: u64,
    /// The code of the close frame the broker wrote to this side.
    pub sent_close: Option<u16>,
}

/// Logs a session's start. `target`: a direct session's target; `relay`:
/// which relay serves it, where that is worth saying.
pub(crate) fn log_opened(handle: &SessionHandle, target: Option<&Target>, relay: Option<&str>) {
    info!(
        session = %handle.id,
        upstream = %handle.upstream,
        target_url = target.map(|t| tracing::field::display(&t.label)),
        mode = handle.mode.as_str(),
        relay,
        http_version = handle.http_version.as_str(),
        remote = %handle.remote,
        request_id = %handle.request_id,
        "session opened"
    );
}

/// Logs a session's end. The caller drops the session next, before its
/// sockets: that releases its permit and registry entry first, so a client
/// that sees its connection end can reconnect into the freed slot.
pub(crate) fn log_ended(
    handle: &SessionHandle,
    target: Option<&Target>,
    cause: &str,
    client: LegSummary,
    upstream: LegSummary,
) {
    info!(
        session = %handle.id,
        upstream = %handle.upstream,
        target_url = target.map(|t| tracing::field::display(&t.label)),
        mode = handle.mode.as_str(),
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
