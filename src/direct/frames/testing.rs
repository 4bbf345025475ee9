//! What the frame relay's unit tests share: frames as they go on the
//! wire, and the masking key the tests' client frames carry.

use tokio_tungstenite::tungstenite::protocol::frame::Frame;

use super::scan::encode;

/// The wire bytes of `frame`, masked with `mask` when given.
pub(super) fn wire(mut frame: Frame, mask: Option<[u8; 4]>) -> Vec<u8> {
    frame.header_mut().mask = mask;
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

pub(super) const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);
