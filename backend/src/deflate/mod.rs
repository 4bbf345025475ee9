//! permessage-deflate (RFC 7692), which every browser offers, for the
//! broker and for Rust upstreams alike: tungstenite has none, so the
//! frame-level pieces are here, in three parts and a store.
//!
//! - [`negotiate`]: the `Sec-WebSocket-Extensions` offers and answers.
//! - [`codec`]: one direction's compression state: a message deflated, a
//!   compressed message inflated within a size bound.
//! - [`stream`]: a socket's byte stream with compression taken off and put
//!   on, below tungstenite, which then sees plain frames.
//! - `spare`: the codec's zlib states given back between messages, kept
//!   per thread for the next message to take.
//!
//! The broker uses all three where it must read messages, and only
//! `negotiate` where it relays compressed frames untouched (direct mode's
//! frame relay); the demo upstream uses them to answer browsers.

pub mod codec;
pub mod negotiate;
mod spare;
pub mod stream;
