//! The upstream side of muxgate.
//!
//! For now this crate holds the bundled demo upstream ([`demo`]) that the
//! README's run command starts next to the broker, so a newcomer can connect
//! to `ws://127.0.0.1:8080/ws/echo` at once.

pub mod demo;
