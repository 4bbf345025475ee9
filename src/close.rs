//! The close-code policy in one place: which codes a client may receive,
//! the codes the broker itself sends (mux-protocol.md §7), and the 123-byte
//! limit on a close reason.

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Normal closure.
pub(crate) const NORMAL: u16 = 1000;
/// Broker shutting down, or the other side of the session went away.
pub(crate) const GOING_AWAY: u16 = 1001;
/// The reason a session closed by `drain_timeout` gets with its 1001: a
/// reload or an operator took its route, upstream or target away.
pub(crate) const DRAINED_REASON: &str = "route or target removed";
/// Protocol error in the peer's frames.
pub(crate) const PROTOCOL_ERROR: u16 = 1002;
/// Invalid UTF-8 in a text message.
pub(crate) const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation (plugins, slow consumers).
pub(crate) const POLICY_VIOLATION: u16 = 1008;
/// A message over `max_message_size`.
pub(crate) const MESSAGE_TOO_BIG: u16 = 1009;
/// Internal error; also replaces codes a client may not receive.
pub(crate) const INTERNAL_ERROR: u16 = 1011;
/// Try again later (no mux connection within `resume_timeout`).
pub(crate) const TRY_AGAIN_LATER: u16 = 1013;
/// The upstream failed: lost without a close handshake, or missed its pong.
pub(crate) const BAD_GATEWAY: u16 = 1014;

/// The most bytes a close reason may have (a control frame's 125 less the code).
pub(crate) const MAX_REASON_BYTES: usize = 123;

/// A close frame may carry `code`: 1000-1003, 1007-1014 (RFC 6455 §7.4.1
/// and the IANA registry) or 3000-4999. No endpoint may send any other
/// (1005, 1006 and 1015 stand for no close frame at all), and the receiver
/// of one fails the connection with 1002 (§7.4.1, §5.5.1).
pub(crate) fn is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// `code` if a client may receive it (see [`is_valid`]), else 1011.
pub(crate) fn client_code(code: u16) -> u16 {
    if is_valid(code) {
        code
    } else {
        INTERNAL_ERROR
    }
}

/// `reason` cut to at most 123 bytes on a character boundary.
pub(crate) fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A close frame with `code` and `reason` (truncated to fit).
pub(crate) fn frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: truncate_reason(reason).to_owned().into(),
    }
}

/// The reason the broker puts in a close it originates: the generic text,
/// plus the underlying error when `return_error_details` is on.
pub(crate) fn reason(
    generic: &str,
    detail: Option<&dyn std::fmt::Display>,
    details: bool,
) -> String {
    match detail {
        Some(d) if details => format!("{generic}: {d}"),
        _ => generic.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_a_client_may_not_receive_become_1011() {
        for ok in [1000, 1001, 1003, 1007, 1014, 3000, 4001, 4999] {
            assert_eq!(client_code(ok), ok);
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000] {
            assert_eq!(client_code(bad), INTERNAL_ERROR);
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES);
        assert_eq!(cut.len(), 122);
        assert_eq!(truncate_reason("bye"), "bye");
    }
}
