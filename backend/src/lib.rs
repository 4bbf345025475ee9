//! The upstream side of muxgate.
//!
//! - [`deflate`]: permessage-deflate (RFC 7692), which tungstenite lacks;
//! - [`protocol`]: the mux frames and both encodings of
//!   `shared/mux-protocol.md` (the broker uses the same code);
//! - [`mux`]: serve mux connections from a Rust backend with a session API
//!   (on open, on message, on close; send, close, broadcast);
//! - [`demo`]: the bundled demo upstream the README's run command starts next
//!   to the broker: an echo for direct mode, echo and a chat room over mux.

#![forbid(unsafe_code)]

pub mod deflate;
pub mod demo;
pub mod mux;
pub mod protocol;
