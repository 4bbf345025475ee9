//! The upstream side of muxgate.
//!
//! - [`deflate`]: permessage-deflate (RFC 7692), which tungstenite lacks;
//! - [`protocol`]: the mux frames and both encodings of
//!   `shared/mux-protocol.md` (the broker uses the same code);
//! - [`mux`]: serve mux connections from a Rust backend with a session API
//!   (on open, on message, on close; send, close, broadcast);
//! - [`demo`]: the bundled demo upstream the README's run command starts next
//!   to the broker: an echo for direct mode, echo and a chat room over mux;
//! - `h2ws` (feature `h2-client`): WebSocket clients over HTTP/2 (RFC 8441)
//!   for the broker's tests and benchmarks.

#![forbid(unsafe_code)]

pub mod deflate;
pub mod demo;
#[cfg(feature = "h2-client")]
pub mod h2ws;
pub mod mux;
pub mod protocol;
