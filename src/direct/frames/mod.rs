//! The frame relay of direct mode, for sessions with no message plugin.
//!
//! Nothing in such a session needs a message's payload, so each socket's
//! bytes are read into the event loop's buffer and written on unchanged: a
//! client's frames keep the client's own masking key (valid toward the
//! upstream) and an upstream's frames stay unmasked (valid toward the
//! client). Only frame headers are read, with tungstenite's parser, to
//! enforce masking and `max_message_size`, count messages, and know where
//! frames begin, which is where the broker may put frames of its own (its
//! pings, and the closes [`crate::session::ending::decide`] chooses). Text
//! is checked to be UTF-8 as it passes, so bad input gets the same 1007 as
//! in the message relay. Close and pong frames are held whole: a close that breaks a rule
//! (a code no endpoint may send, a one-byte payload, a reason that is not
//! UTF-8) fails the session as any bad frame does, valid close codes reach
//! the metrics, and the pongs that answer the broker's own pings go no
//! further.
//!
//! An idle session owns no buffer. Bytes the destination cannot take at
//! once go to that direction's spill buffer, which is freed once written;
//! while it holds anything the source is not read, so a slow reader pushes
//! back on the fast writer through TCP, as `copy_bidirectional` does.
//!
//! The relay holds four ideas, one to a file, with the unit tests beside
//! the code they exercise; a file uses only those listed above it:
//!
//! - `scan`: the frame scanner, which follows one direction's bytes frame by
//!   frame, enforces the rules above and says what to write on; also the
//!   broker's own frames (its pings' payload, masking toward the upstream).
//! - `pump`: one direction, read through its scanner and written on, with
//!   its spill buffer and its message counts, and the stop its end means.
//! - `closing`: the close sequence once the relay has stopped: the broker's
//!   closes, reading for the answers, shutting down, logging the end.
//! - `relay`: [`run`], the loop that pumps both directions and keeps the
//!   ping and silence timers, then hands over to `closing`.
//!
//! `testing` holds what the tests of `scan` and `pump` share.

mod closing;
mod pump;
mod relay;
mod scan;
#[cfg(test)]
mod testing;

pub(super) use relay::run;
