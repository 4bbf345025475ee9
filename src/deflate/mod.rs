//! permessage-deflate (RFC 7692): compression of each message, which every
//! browser offers.
//!
//! Where the broker need not read messages (direct mode's frame relay) the
//! client's offers go to the upstream and compressed frames pass through as
//! bytes; the broker only checks the upstream's answer (`negotiate`) and
//! lets RSV1 through. Where it must read them, it terminates compression
//! with the client itself.
//!
//! - `negotiate`: the `Sec-WebSocket-Extensions` offers and answers.

pub(crate) mod negotiate;
