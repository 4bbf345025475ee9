//! The permessage-deflate codec (RFC 7692 §7.2): a message's payload
//! compressed into the DEFLATE data its frames carry, and a compressed
//! message's frames inflated back, within a size bound.
//!
//! tungstenite has no permessage-deflate, so the frame-level compression is
//! ours. This module owns the compression state of one direction of one
//! session: a [`Deflater`] for the messages a socket sends, an [`Inflater`]
//! for the messages it receives. It knows nothing of frames, sockets or
//! headers: negotiation (`negotiate.rs`) decides the parameters, and the
//! stream adapters move payloads in and out.
//!
//! # Window bits
//!
//! RFC 7692 lets a window be 8 to 15 bits (§7.1.2), but nothing here can
//! *compress* with 8: flate2 panics on it (it takes 9 to 15), and zlib-rs,
//! like zlib since 1.2.9, refuses raw DEFLATE with 8 (`deflate::init`
//! answers `StreamError`; for zlib-wrapped streams it quietly uses 9, a
//! window that a peer inflating with 256 bytes cannot follow). So a
//! [`Deflater`] takes 9 to 15 ([`MIN_DEFLATE_WINDOW_BITS`]) and refuses 8
//! with [`ParamsError`], and negotiation must never agree to compress with
//! 8:
//! - as a server, an offer with `server_max_window_bits=8` is declined
//!   (RFC 7692 §7.1.2.1: the answer must carry "the same or smaller
//!   value", so answering 9 is not allowed; the next offer may fit);
//! - as a client, offer no `client_max_window_bits`, so that a server cannot
//!   answer with 8 (§7.1.2.2 lets it answer only when the offer carried it).
//!
//! An [`Inflater`] takes the peer's 8 to 15 and inflates with 15 whatever
//! they are, which takes any stream made with 15 or fewer (and the 9-bit
//! streams old zlib made when told 8). Inflating with the negotiated bits
//! would save nothing and decide nothing:
//! - zlib-rs 0.6 allocates a 32 KiB inflate window whatever the bits
//!   (`InflateAllocOffsets` sizes it by `MAX_WBITS`; the
//!   `memory_held_by_each_state` test measures the same heap for 8 to 15);
//! - nor does it reject a peer that reaches further back than its bits
//!   (C zlib does only when the caller's buffer is too small to hold that
//!   history itself), so the bits would not be enforced either.
//!
//! # The end of a message
//!
//! A sender sync-flushes at the end of each message, which ends the data
//! with an empty stored block, and removes that block's last four octets,
//! `00 00 ff ff` (§7.2.1). The [`Deflater`] does exactly that. An empty
//! message is sent as the single octet `00` (the empty stored block's
//! header, as §7.2.3.6 shows), without touching the compressor: zlib gives
//! nothing at all for a second sync flush in a row, which would leave
//! nothing to strip.
//!
//! The [`Inflater`] appends the four octets after the last frame (§7.2.2)
//! and then checks that the data ended on a block boundary, as every
//! message made by §7.2.1 does: it inflates one more empty stored block
//! (`00 00 00 ff ff`, a no-op for a stream at a boundary), and any output
//! from the tail or that probe means the message stopped inside a block:
//! [`InflateError::Corrupt`]. flate2 tells no block boundaries, so this is
//! a probe, not a proof: it catches a cut in a block's data (every cut of
//! the tests' stored, fixed and dynamic blocks), not one in a dynamic
//! block's code tables, which take the tail and the probe as more table
//! (that message ends empty, and the next one fails). It is lenient where
//! the intent is plain:
//! - a message whose payload is empty is the empty message (a sender on
//!   zlib that only sync-flushes an empty message gets nothing back after
//!   its first), and leaves the window as it was;
//! - data that already ends in `00 00 ff ff` (a sender that flushed each
//!   frame, then sent an empty final frame, or forgot to strip the tail)
//!   gets no second tail: data that ends as §7.2.1 says always ends in an
//!   octet below 0x80 (its last bits are the stored header's zeros and the
//!   padding), so it cannot be mistaken for such data;
//! - a block with BFINAL set ends the message's DEFLATE stream (§7.2.3.4);
//!   what follows may only be the one `00` octet the RFC shows, and the next
//!   message starts a new stream with an empty window.
//!
//! # Errors and close codes
//!
//! RFC 7692 names no close code for a message that cannot be inflated; the
//! connection is failed (RFC 6455 §7.1.7) with the code from
//! [`InflateError::close_code`]: 1007 for corrupt data (RFC 6455 §7.4.1,
//! "data within a message that was not consistent with the type of the
//! message"), 1009 for a message over the cap (the same code as a plain
//! message over `max_message_size`). A [`DeflateError`] is ours, not the
//! peer's: 1011.
//!
//! # Memory
//!
//! The heap one state holds between messages, measured with a counting
//! allocator (the `memory_held_by_each_state` test; zlib-rs 0.6.8 through
//! flate2 1.1.11, x86-64):
//!
//! | state | window bits | held |
//! | --- | --- | --- |
//! | deflate, any level 0-9 | 15 | 380,032 bytes (371 KiB) |
//! | deflate | 12 | 265,344 bytes (259 KiB) |
//! | deflate | 9 | 251,008 bytes (245 KiB) |
//! | inflate | any, 8-15 | 47,552 bytes (46 KiB) |
//!
//! A deflate state is 248,960 bytes plus four times its window (the window
//! twice over, and a 2-byte chain link per position): the rest is a 128 KiB
//! hash table and 112 KiB of symbol buffers, sized by zlib's `memLevel` 8,
//! which flate2 does not let us lower. An inflate state is its 32 KiB
//! window and the decoder's tables.
//!
//! So a socket that compresses both ways with context takeover holds about
//! 418 KiB (a [`Deflater`] for what it sends, an [`Inflater`] for what it
//! receives): 2.1 GB for 5,000 sessions, or 1.5 GB if we answer
//! `server_max_window_bits=9`. With `no_context_takeover` on both sides it
//! holds nothing between messages: each message takes a spare state of its
//! thread's (reset, `super::spare`) or makes one, and gives it back after;
//! one side's `no_context_takeover` lets that side's state go only.

use bytes::{Buf, Bytes};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::spare;

/// The fewest window bits a [`Deflater`] can compress with (see the module
/// doc, "Window bits").
pub const MIN_DEFLATE_WINDOW_BITS: u8 = 9;

/// The fewest window bits RFC 7692 lets a peer compress with (§7.1.2.1).
pub const MIN_WINDOW_BITS: u8 = 8;

/// The most window bits RFC 7692 allows (and DEFLATE: a 32 KiB window).
pub const MAX_WINDOW_BITS: u8 = 15;

/// The window bits the [`Inflater`] inflates with, whatever the peer's
/// (see the module doc).
const INFLATE_WINDOW_BITS: u8 = MAX_WINDOW_BITS;

/// The size of the buffer an adapter should hand [`Inflater::read`]: one
/// read writes at most its buffer, so this bounds what inflating a frame
/// holds at once, however far the frame inflates.
pub const READ_PIECE: usize = 16 * 1024;

/// RFC 6455 §7.4.1's codes for a message that cannot be inflated.
const MESSAGE_TOO_BIG: u16 = 1009;
const INVALID_PAYLOAD: u16 = 1007;

/// The last four octets of a sync flush (the LEN and NLEN of an empty
/// stored block), which a sender removes and a receiver appends (RFC 7692
/// §7.2.1, §7.2.2).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The compressed payload of an empty message: an empty stored block's
/// header and padding, its [`SYNC_TAIL`] removed (RFC 7692 §7.2.3.6).
const EMPTY_MESSAGE: [u8; 1] = [0x00];

/// What the [`Inflater`] feeds after a message's last frame: the
/// [`SYNC_TAIL`], then a whole empty stored block as the boundary probe.
/// Neither produces output from a stream that ended on a block boundary.
const MESSAGE_ENDING: [u8; 9] = [0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0xff, 0xff];

/// Where the probe starts in [`MESSAGE_ENDING`].
const PROBE_START: usize = SYNC_TAIL.len();

/// How much spare room the deflater makes in the output `Vec` before each
/// zlib call that lacks it (the `Vec` grows by doubling past that).
const DEFLATE_OUTPUT_STEP: usize = 8 * 1024;

/// A parameter that negotiation should have kept out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("compression level {0} is not in 0..=9")]
    Level(u32),
    #[error("{bits} window bits are not in {min}..=15")]
    WindowBits { bits: u8, min: u8 },
}

/// Compressing failed: a fault of ours or of zlib-rs, never of the peer.
/// The caller closes with 1011; the deflater has dropped its state, and
/// with context takeover the peer's window no longer matches ours.
#[derive(Debug, thiserror::Error)]
pub enum DeflateError {
    #[error("deflate failed: {0}")]
    Zlib(#[from] flate2::CompressError),
    #[error("the sync flush did not end in 00 00 ff ff")]
    NoSyncTail,
}

/// A compressed message that cannot be inflated. The connection fails with
/// [`InflateError::close_code`]; the inflater has dropped its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The message inflates to more than `max_size` bytes (a compression
    /// bomb, or just a big message). Inflating stopped one byte past the cap.
    #[error("the inflated message exceeds {max_size} bytes")]
    TooLarge { max_size: usize },
    /// The data is not DEFLATE, or does not end a message as RFC 7692
    /// §7.2.1 makes one end.
    #[error("corrupt compressed message at byte {at}: {detail}")]
    Corrupt {
        /// Compressed bytes of the message taken before the fault was seen.
        at: u64,
        detail: String,
    },
}

impl InflateError {
    /// The close code to fail the connection with: 1009 for
    /// [`InflateError::TooLarge`], 1007 for [`InflateError::Corrupt`] (see
    /// the module doc).
    pub fn close_code(&self) -> u16 {
        match self {
            InflateError::TooLarge { .. } => MESSAGE_TOO_BIG,
            InflateError::Corrupt { .. } => INVALID_PAYLOAD,
        }
    }
}

// === impl Deflater ===

/// Compresses the messages one socket sends, one at a time: [`write`] the
/// payload (in as many pieces as it comes in), then [`finish`]; or
/// [`compress`] a whole one.
///
/// With context takeover the zlib state, and so the LZ77 window, carries
/// from one message to the next. With `no_context_takeover` it is dropped
/// after each message, so an idle session holds none; either way it is
/// made only when a message first has bytes to compress.
///
/// [`write`]: Deflater::write
/// [`finish`]: Deflater::finish
/// [`compress`]: Deflater::compress
pub struct Deflater {
    level: Compression,
    window_bits: u8,
    no_context_takeover: bool,
    /// The zlib state; `None` until a message has bytes to compress, and
    /// again after each message when `no_context_takeover`.
    state: Option<Compress>,
    /// Whether the message being written has had any bytes yet: an empty
    /// one is sent as [`EMPTY_MESSAGE`] without the zlib state.
    message_has_input: bool,
}

impl Deflater {
    /// A deflater at `level` (0-9) with a window of `window_bits` (9-15: 8
    /// cannot be honoured, see the module doc). `no_context_takeover` is
    /// the agreed `server_no_context_takeover` when we are the server,
    /// `client_no_context_takeover` when we are the client.
    pub fn new(
        level: u32,
        window_bits: u8,
        no_context_takeover: bool,
    ) -> Result<Self, ParamsError> {
        if level > 9 {
            return Err(ParamsError::Level(level));
        }
        if !(MIN_DEFLATE_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&window_bits) {
            return Err(ParamsError::WindowBits {
                bits: window_bits,
                min: MIN_DEFLATE_WINDOW_BITS,
            });
        }
        Ok(Deflater {
            level: Compression::new(level),
            window_bits,
            no_context_takeover,
            state: None,
            message_has_input: false,
        })
    }

    /// Compresses the next piece of the current message, appending what
    /// zlib gives out to `out` (possibly nothing yet: zlib keeps some back
    /// until [`Deflater::finish`]).
    pub fn write(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), DeflateError> {
        if input.is_empty() {
            return Ok(());
        }
        self.message_has_input = true;
        let result = run_deflate(self.state(), input, out, FlushCompress::None);
        if result.is_err() {
            self.state = None;
            self.message_has_input = false;
        }
        result
    }

    /// Ends the current message: appends the rest of its compressed data,
    /// sync-flushed and without the trailing `00 00 ff ff` (RFC 7692
    /// §7.2.1), to `out`. What `write` and `finish` appended, in order, is
    /// the message's payload; it is never empty.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), DeflateError> {
        if !std::mem::take(&mut self.message_has_input) {
            out.extend_from_slice(&EMPTY_MESSAGE);
            return Ok(());
        }
        let start = out.len();
        let result = run_deflate(self.state(), &[], out, FlushCompress::Sync).and_then(|()| {
            // The flush ends with the empty stored block's LEN and NLEN,
            // all four written by this call.
            if out.len() - start >= SYNC_TAIL.len() && out.ends_with(&SYNC_TAIL) {
                out.truncate(out.len() - SYNC_TAIL.len());
                Ok(())
            } else {
                Err(DeflateError::NoSyncTail)
            }
        });
        if result.is_err() {
            self.state = None;
        } else if self.no_context_takeover {
            self.give_back();
        }
        result
    }

    /// Compresses a whole message into `out`: [`Deflater::write`] then
    /// [`Deflater::finish`].
    pub fn compress(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<(), DeflateError> {
        self.write(message, out)?;
        self.finish(out)
    }

    /// Drops the window between messages, even with context takeover: a
    /// sender may always start afresh (only its peer's inflater must keep
    /// the window, RFC 7692 §7.1.1), so an idle socket need not hold the
    /// compressor's state. The next message compresses from an empty
    /// window. Only between messages; a message in progress keeps it.
    pub fn release(&mut self) {
        if !self.message_has_input {
            self.give_back();
        }
    }

    /// Whether the compressor's state is held now.
    pub fn holds_state(&self) -> bool {
        self.state.is_some()
    }

    /// The zlib state, taken on first use (a spare one, or new).
    fn state(&mut self) -> &mut Compress {
        let (level, window_bits) = (self.level, self.window_bits);
        self.state
            .get_or_insert_with(|| spare::compressor(level, window_bits))
    }

    /// Lets the state go between messages, as a spare for the next.
    fn give_back(&mut self) {
        if let Some(state) = self.state.take() {
            spare::give_compressor(state, self.level, self.window_bits);
        }
    }
}

/// Runs zlib over all of `input` with `flush`, growing `out` as needed.
/// Without a flush it returns once the input is taken (zlib may hold some
/// output back); with one, once zlib leaves room in `out` unused, which is
/// how it says the flush is complete.
fn run_deflate(
    state: &mut Compress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    flush: FlushCompress,
) -> Result<(), DeflateError> {
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(DEFLATE_OUTPUT_STEP);
        }
        let taken_before = state.total_in();
        // `BufError` only says zlib had nothing to do (a flush already
        // complete), which the checks below see as done.
        state.compress_vec(input, out, flush)?;
        input = &input[(state.total_in() - taken_before) as usize..];
        let room_left = out.len() < out.capacity();
        if input.is_empty() && (flush == FlushCompress::None || room_left) {
            return Ok(());
        }
    }
}

// === impl Inflater ===

/// What one [`Inflater::read`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflated {
    /// This many bytes of the message were written to the start of `out`
    /// (never 0, unless `out` was empty).
    Bytes(usize),
    /// The frame pushed last is used up and it was not the message's last:
    /// push the next one.
    NeedFrame,
    /// The message is complete: all of it was read. The next frame pushed
    /// starts the next message.
    MessageEnd,
}

/// Inflates the compressed messages one socket receives, frame by frame,
/// into buffers the caller provides, never past `max_size` bytes a message.
///
/// A message is read as: [`push_frame`] its first frame, then [`read`]
/// until it answers [`Inflated::NeedFrame`] (push the next frame) or
/// [`Inflated::MessageEnd`]. Each read writes at most `out.len()` bytes,
/// and the inflater keeps no output of its own, so a caller that is not
/// ready for more simply stops reading and resumes later: the pushed frame
/// and the zlib state wait in the inflater. Output that comes before an
/// error belongs to a message that failed, and must not be passed on as a
/// whole message.
///
/// With the peer's context takeover the zlib state carries the window from
/// one message to the next; with `peer_no_context_takeover` it is dropped
/// at each message's end. Either way it is made only when a message has
/// bytes to inflate.
///
/// [`push_frame`]: Inflater::push_frame
/// [`read`]: Inflater::read
pub struct Inflater {
    peer_no_context_takeover: bool,
    max_size: usize,
    /// The zlib state; `None` until a message has bytes to inflate, and
    /// again after each message when `peer_no_context_takeover`, and after
    /// a message that ended its DEFLATE stream.
    state: Option<Decompress>,
    /// What zlib has not yet taken of the frame pushed last; let go (so
    /// its memory with it) once used up.
    frame: Bytes,
    stage: Stage,
    /// Bytes of the current message written out so far (at most
    /// `max_size + 1`, which is the error).
    message_len: usize,
    /// Compressed bytes of the current message pushed so far.
    message_input: u64,
    /// The current message's last four compressed bytes (fewer at its
    /// start), to see whether it already ends in [`SYNC_TAIL`].
    last_input: [u8; 4],
}

/// Where the [`Inflater`] is in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No message in progress (or one whose next frame is awaited): the
    /// next [`Inflater::push_frame`] provides input.
    Idle,
    /// Inflating the pushed frame; `last` if it ends the message.
    Payload { last: bool },
    /// After the last frame: feeding [`MESSAGE_ENDING`] from `fed` on.
    Ending { fed: usize },
    /// The peer's DEFLATE stream ended (a block with BFINAL set): the rest
    /// of the message may only be one `00` octet (§7.2.3.4); `padding_seen`
    /// once it came. `last` as in `Payload`.
    AfterFinalBlock { last: bool, padding_seen: bool },
}

/// What one zlib call did.
struct Step {
    taken: usize,
    produced: usize,
    stream_end: bool,
}

impl Inflater {
    /// An inflater for a peer that compresses with `peer_window_bits`
    /// (8-15; checked, then inflated with 15, see the module doc), failing
    /// any message that inflates to more than `max_size`.
    /// `peer_no_context_takeover` is the agreed `client_no_context_takeover`
    /// when we are the server, `server_no_context_takeover` when we are the
    /// client.
    pub fn new(
        peer_window_bits: u8,
        peer_no_context_takeover: bool,
        max_size: usize,
    ) -> Result<Self, ParamsError> {
        if !(MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&peer_window_bits) {
            return Err(ParamsError::WindowBits {
                bits: peer_window_bits,
                min: MIN_WINDOW_BITS,
            });
        }
        Ok(Inflater {
            peer_no_context_takeover,
            max_size,
            state: None,
            frame: Bytes::new(),
            stage: Stage::Idle,
            message_len: 0,
            message_input: 0,
            last_input: [0; 4],
        })
    }

    /// Hands over the payload of the current message's next frame (the
    /// first frame starts a message); `is_final` if the frame has FIN set.
    /// Call it on a new inflater, or after [`Inflater::read`] answered
    /// [`Inflated::NeedFrame`] or [`Inflated::MessageEnd`].
    pub fn push_frame(&mut self, payload: Bytes, is_final: bool) {
        debug_assert!(self.frame.is_empty(), "the previous frame is not used up");
        let tail = &payload[payload.len().saturating_sub(4)..];
        for &byte in tail {
            self.last_input.rotate_left(1);
            self.last_input[3] = byte;
        }
        self.message_input += payload.len() as u64;
        self.frame = payload;
        self.stage = match self.stage {
            Stage::AfterFinalBlock { padding_seen, .. } => Stage::AfterFinalBlock {
                last: is_final,
                padding_seen,
            },
            Stage::Idle | Stage::Payload { .. } => Stage::Payload { last: is_final },
            Stage::Ending { .. } => {
                debug_assert!(false, "a frame pushed after the message's last");
                Stage::Payload { last: is_final }
            }
        };
    }

    /// Inflates what comes next of the current message into `out` (see
    /// [`Inflated`]). Once a message has given `max_size` bytes, the read
    /// that finds one more fails with [`InflateError::TooLarge`], having
    /// written that one byte to `out` and no more. After an error the
    /// inflater is spent: fail the connection.
    pub fn read(&mut self, out: &mut [u8]) -> Result<Inflated, InflateError> {
        let result = self.read_inner(out);
        if result.is_err() {
            self.end_message();
            self.state = None;
        }
        result
    }

    fn read_inner(&mut self, out: &mut [u8]) -> Result<Inflated, InflateError> {
        if out.is_empty() {
            return Ok(Inflated::Bytes(0));
        }
        loop {
            match self.stage {
                Stage::Idle => return Ok(Inflated::NeedFrame),
                Stage::Payload { last } => {
                    if self.message_input == 0 {
                        // Nothing pushed yet: nothing to inflate.
                        if !last {
                            self.stage = Stage::Idle;
                            return Ok(Inflated::NeedFrame);
                        }
                        // An empty payload: the empty message.
                        return Ok(self.end_message());
                    }
                    let frame = std::mem::take(&mut self.frame);
                    let frame_at = self.message_input - frame.len() as u64;
                    let step = self.inflate(&frame, frame_at, out);
                    self.frame = frame;
                    let step = step?;
                    self.frame.advance(step.taken);
                    if step.stream_end {
                        self.stage = Stage::AfterFinalBlock {
                            last,
                            padding_seen: false,
                        };
                    }
                    if step.produced > 0 {
                        return Ok(Inflated::Bytes(step.produced));
                    }
                    if step.stream_end {
                        continue;
                    }
                    if !self.frame.is_empty() {
                        // zlib stops short only for want of output room,
                        // and `out` had room.
                        let at = self.message_input - self.frame.len() as u64;
                        return Err(corrupt(at, "inflate made no progress"));
                    }
                    // The frame is used up, and so is zlib's output.
                    self.frame = Bytes::new();
                    if !last {
                        self.stage = Stage::Idle;
                        return Ok(Inflated::NeedFrame);
                    }
                    let fed = if self.message_input >= 4 && self.last_input == SYNC_TAIL {
                        PROBE_START
                    } else {
                        0
                    };
                    self.stage = Stage::Ending { fed };
                }
                Stage::Ending { fed } => {
                    if fed == MESSAGE_ENDING.len() {
                        return Ok(self.end_message());
                    }
                    let step = self.inflate(&MESSAGE_ENDING[fed..], self.message_input, out)?;
                    if step.produced > 0 || step.stream_end || step.taken == 0 {
                        return Err(corrupt(
                            self.message_input,
                            "the message does not end on a DEFLATE block boundary",
                        ));
                    }
                    self.stage = Stage::Ending {
                        fed: fed + step.taken,
                    };
                }
                Stage::AfterFinalBlock { last, padding_seen } => {
                    let padding = std::mem::take(&mut self.frame);
                    let padding_seen = match (padding_seen, &padding[..]) {
                        (seen, []) => seen,
                        (false, [0x00]) => true,
                        _ => {
                            let at = self.message_input - padding.len() as u64;
                            return Err(corrupt(at, "data after the final DEFLATE block"));
                        }
                    };
                    if !last {
                        self.stage = Stage::AfterFinalBlock { last, padding_seen };
                        return Ok(Inflated::NeedFrame);
                    }
                    // The peer's stream ended; its next message starts a
                    // new one.
                    self.give_back();
                    return Ok(self.end_message());
                }
            }
        }
    }

    /// One zlib call over `input` (which starts at compressed byte
    /// `input_at` of the message) into `out`, cut to what the message's cap
    /// leaves, or to one byte once the cap is reached (a byte there is the
    /// error).
    fn inflate(
        &mut self,
        input: &[u8],
        input_at: u64,
        out: &mut [u8],
    ) -> Result<Step, InflateError> {
        let room = match self.max_size - self.message_len {
            0 => 1,
            left => out.len().min(left),
        };
        let state = self
            .state
            .get_or_insert_with(|| spare::decompressor(INFLATE_WINDOW_BITS));
        let (in_before, out_before) = (state.total_in(), state.total_out());
        let status = state.decompress(input, &mut out[..room], FlushDecompress::None);
        let taken = (state.total_in() - in_before) as usize;
        let produced = (state.total_out() - out_before) as usize;
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                let detail = err.message().unwrap_or("invalid DEFLATE data").to_owned();
                // Past the peer's data only when the tail or probe failed.
                let at = (input_at + taken as u64).min(self.message_input);
                return Err(corrupt(at, detail));
            }
        };
        self.message_len += produced;
        if self.message_len > self.max_size {
            return Err(InflateError::TooLarge {
                max_size: self.max_size,
            });
        }
        Ok(Step {
            taken,
            produced,
            stream_end: status == Status::StreamEnd,
        })
    }

    /// Lets the state go between messages, as a spare for the next.
    fn give_back(&mut self) {
        if let Some(state) = self.state.take() {
            spare::give_decompressor(state);
        }
    }

    /// Ends the current message and readies the next.
    fn end_message(&mut self) -> Inflated {
        if self.peer_no_context_takeover {
            self.give_back();
        }
        self.frame = Bytes::new();
        self.stage = Stage::Idle;
        self.message_len = 0;
        self.message_input = 0;
        self.last_input = [0; 4];
        Inflated::MessageEnd
    }
}

/// An [`InflateError::Corrupt`] found at compressed byte `at` of the
/// message.
fn corrupt(at: u64, detail: impl Into<String>) -> InflateError {
    InflateError::Corrupt {
        at,
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // === helpers ===

    /// "Hello" as RFC 7692 §7.2.3.1 compresses it.
    const HELLO: &[u8] = &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

    /// The second "Hello" of RFC 7692 §7.2.3.2, which refers back to the
    /// first through the shared window.
    const SECOND_HELLO: &[u8] = &[0xf2, 0x00, 0x11, 0x00, 0x00];

    /// Inflates one message made of `frames`, reading into `piece`-byte
    /// buffers; panics if the inflater wants a frame after the last.
    fn inflate_message(
        inflater: &mut Inflater,
        frames: &[&[u8]],
        piece: usize,
    ) -> Result<Vec<u8>, InflateError> {
        let mut message = Vec::new();
        let mut buf = vec![0u8; piece];
        for (i, frame) in frames.iter().enumerate() {
            let is_final = i + 1 == frames.len();
            inflater.push_frame(Bytes::copy_from_slice(frame), is_final);
            loop {
                match inflater.read(&mut buf)? {
                    Inflated::Bytes(n) => message.extend_from_slice(&buf[..n]),
                    Inflated::NeedFrame => {
                        assert!(!is_final, "wants a frame after the final one");
                        break;
                    }
                    Inflated::MessageEnd => {
                        assert!(is_final, "ended before the final frame");
                        return Ok(message);
                    }
                }
            }
        }
        panic!("no frames");
    }

    /// `frames` inflated as the first message of a fresh 15-bit inflater.
    fn inflate_fresh(frames: &[&[u8]]) -> Result<Vec<u8>, InflateError> {
        let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
        inflate_message(&mut inflater, frames, READ_PIECE)
    }

    /// `message` compressed whole.
    fn compress(deflater: &mut Deflater, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        deflater.compress(message, &mut out).unwrap();
        out
    }

    /// A small deterministic generator (xorshift64*), so failures repeat.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A number in `1..=max`.
        fn size(&mut self, max: usize) -> usize {
            1 + (self.next() % max as u64) as usize
        }

        fn binary(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }

        fn text(&mut self, len: usize) -> Vec<u8> {
            const WORDS: &[&str] = &[
                "session", "upstream", "frame", "message", "window", "the", "a", "of", "deflate",
                "broker", "client", "mux", "close", "ping", "route", "target",
            ];
            let mut text = Vec::with_capacity(len + 16);
            while text.len() < len {
                let word = WORDS[(self.next() % WORDS.len() as u64) as usize];
                text.extend_from_slice(word.as_bytes());
                text.push(b' ');
            }
            text.truncate(len);
            text
        }

        /// `data` cut into pieces of random sizes up to `max`: a third of
        /// them up to 3 bytes, a third up to 300.
        fn pieces<'a>(&mut self, data: &'a [u8], max: usize) -> Vec<&'a [u8]> {
            let mut pieces = Vec::new();
            let mut rest = data;
            while !rest.is_empty() {
                let limit = [3, 300, max][(self.next() % 3) as usize].min(max);
                let (piece, after) = rest.split_at(self.size(limit).min(rest.len()));
                pieces.push(piece);
                rest = after;
            }
            pieces
        }
    }

    /// `skewed(300)` of scripts/deflate_vectors.py: 'a's and 'b's from a
    /// 31-bit LCG, which zlib codes in a dynamic block.
    fn skewed(len: usize) -> Vec<u8> {
        let mut x: u32 = 1;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
                b"ab"[((x >> 16) & 1) as usize]
            })
            .collect()
    }

    /// Several messages, or their payloads, in order.
    type Messages<'a> = &'a [&'a [u8]];

    /// The `TEXT` of scripts/deflate_vectors.py.
    fn text() -> Vec<u8> {
        b"permessage-deflate compresses each message; the LZ77 window may carry over. ".repeat(4)
    }

    /// The script's `BINARY`.
    fn binary() -> Vec<u8> {
        (0..100u32).map(|i| ((i * 37 + 11) % 251) as u8).collect()
    }

    // === vectors from CPython's zlib ===
    //
    // Printed by `python3 scripts/deflate_vectors.py`: for each case,
    // `c = zlib.compressobj(level, zlib.DEFLATED, -bits)` (a new one per
    // message without takeover), then `c.compress(m) + c.flush(zlib.Z_SYNC_FLUSH)`
    // with a trailing `00 00 ff ff` removed (CPython 3, zlib 1.2.13).

    const PY_L6_W15_TAKEOVER: &[&[u8]] = &[
        &[
            0x2a, 0x48, 0x2d, 0xca, 0x4d, 0x2d, 0x2e, 0x4e, 0x4c, 0x4f, 0xd5, 0x4d, 0x49, 0x4d,
            0xcb, 0x49, 0x2c, 0x49, 0x55, 0x48, 0xce, 0xcf, 0x2d, 0x28, 0x02, 0x8a, 0xa5, 0x16,
            0x2b, 0xa4, 0x26, 0x26, 0x67, 0x28, 0x40, 0xe5, 0xad, 0x15, 0x4a, 0x32, 0x52, 0x15,
            0x7c, 0xa2, 0xcc, 0xcd, 0x15, 0xca, 0x33, 0xf3, 0x52, 0xf2, 0xcb, 0x15, 0x72, 0x13,
            0x2b, 0x15, 0x92, 0x13, 0x8b, 0x8a, 0x2a, 0x15, 0xf2, 0xcb, 0x52, 0x8b, 0xf4, 0x14,
            0x0a, 0x46, 0x80, 0x59, 0x00, 0x00,
        ],
        &[0x1a, 0x35, 0x8b, 0x34, 0xb3, 0x00, 0x00],
        &[0x00],
        &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
    ];
    const PY_L9_W9_NO_TAKEOVER: &[&[u8]] = &[
        &[
            0x2a, 0x48, 0x2d, 0xca, 0x4d, 0x2d, 0x2e, 0x4e, 0x4c, 0x4f, 0xd5, 0x4d, 0x49, 0x4d,
            0xcb, 0x49, 0x2c, 0x49, 0x55, 0x48, 0xce, 0xcf, 0x2d, 0x28, 0x02, 0x8a, 0xa5, 0x16,
            0x2b, 0xa4, 0x26, 0x26, 0x67, 0x28, 0x40, 0xe5, 0xad, 0x15, 0x4a, 0x32, 0x52, 0x15,
            0x7c, 0xa2, 0xcc, 0xcd, 0x15, 0xca, 0x33, 0xf3, 0x52, 0xf2, 0xcb, 0x15, 0x72, 0x13,
            0x2b, 0x15, 0x92, 0x13, 0x8b, 0x8a, 0x2a, 0x15, 0xf2, 0xcb, 0x52, 0x8b, 0xf4, 0x14,
            0x0a, 0x46, 0x80, 0x59, 0x00, 0x00,
        ],
        &[
            0x54, 0x8f, 0x81, 0x0d, 0x00, 0x31, 0x08, 0x02, 0x67, 0xc5, 0xfd, 0x87, 0x78, 0x73,
            0x05, 0xf5, 0xb5, 0x89, 0x54, 0x11, 0x5a, 0xa9, 0x3a, 0x54, 0xea, 0x2a, 0x70, 0x17,
            0xd1, 0x02, 0xd0, 0xff, 0xf5, 0xde, 0x79, 0x54, 0x30, 0x53, 0x02, 0xa1, 0x32, 0xd5,
            0x8b, 0x37, 0x53, 0xa2, 0x30, 0xda, 0x9e, 0x65, 0xcf, 0xda, 0xb5, 0x1e, 0x96, 0x2f,
            0xbf, 0x73, 0xa9, 0x83, 0xe2, 0x1e, 0x7a, 0x00, 0x8c, 0x03, 0xed, 0x3c, 0x83, 0x25,
            0xcc, 0x7f, 0xce, 0x25, 0x66, 0x88, 0x7f, 0x00,
        ],
    ];
    const PY_L9_W15_TAKEOVER: &[&[u8]] = &[
        &[
            0x54, 0x4f, 0x81, 0x0d, 0x00, 0x20, 0x08, 0xba, 0x15, 0xfe, 0x3f, 0x22, 0x87, 0xa0,
            0x66, 0x6d, 0x92, 0x20, 0x26, 0xc0, 0x0a, 0x10, 0x95, 0x21, 0x5c, 0x09, 0x2a, 0x09,
            0xa8, 0xfe, 0xd5, 0xfa, 0xb6, 0x54, 0x58, 0xac, 0x42, 0x46, 0xb4, 0xd4, 0x8d, 0xf7,
            0x24, 0xc5, 0x61, 0xbc, 0xcd, 0xa5, 0xcf, 0xde, 0xdc, 0x19, 0xb6, 0xa7, 0xff, 0xb9,
            0xd2, 0x41, 0x99, 0x1e, 0x79, 0x80, 0x14, 0x07, 0x7a, 0xf2, 0x10, 0x2b, 0x98, 0x7d,
            0xce, 0xe3, 0x6e, 0xce, 0x07,
        ],
        &[0x4a, 0x1c, 0x0d, 0x2b, 0xa2, 0xc3, 0x0a, 0x00],
    ];
    const PY_L1_W12_TAKEOVER: &[&[u8]] = &[
        &[
            0x00, 0x64, 0x00, 0x9b, 0xff, 0x0b, 0x30, 0x55, 0x7a, 0x9f, 0xc4, 0xe9, 0x13, 0x38,
            0x5d, 0x82, 0xa7, 0xcc, 0xf1, 0x1b, 0x40, 0x65, 0x8a, 0xaf, 0xd4, 0xf9, 0x23, 0x48,
            0x6d, 0x92, 0xb7, 0xdc, 0x06, 0x2b, 0x50, 0x75, 0x9a, 0xbf, 0xe4, 0x0e, 0x33, 0x58,
            0x7d, 0xa2, 0xc7, 0xec, 0x16, 0x3b, 0x60, 0x85, 0xaa, 0xcf, 0xf4, 0x1e, 0x43, 0x68,
            0x8d, 0xb2, 0xd7, 0x01, 0x26, 0x4b, 0x70, 0x95, 0xba, 0xdf, 0x09, 0x2e, 0x53, 0x78,
            0x9d, 0xc2, 0xe7, 0x11, 0x36, 0x5b, 0x80, 0xa5, 0xca, 0xef, 0x19, 0x3e, 0x63, 0x88,
            0xad, 0xd2, 0xf7, 0x21, 0x46, 0x6b, 0x90, 0xb5, 0xda, 0x04, 0x29, 0x4e, 0x73, 0x98,
            0xbd, 0xe2, 0x0c, 0x31, 0x56, 0x7b, 0xa0, 0x00,
        ],
        &[
            0x2a, 0x48, 0x2d, 0xca, 0x4d, 0x2d, 0x2e, 0x4e, 0x4c, 0x4f, 0xd5, 0x4d, 0x49, 0x4d,
            0xcb, 0x49, 0x2c, 0x49, 0x55, 0x48, 0xce, 0xcf, 0x2d, 0x28, 0x02, 0x8a, 0xa5, 0x16,
            0x2b, 0xa4, 0x26, 0x26, 0x67, 0x28, 0x40, 0xe5, 0xad, 0x15, 0x4a, 0x32, 0x52, 0x15,
            0x7c, 0xa2, 0xcc, 0xcd, 0x15, 0xca, 0x33, 0xf3, 0x52, 0xf2, 0xcb, 0x15, 0x72, 0x13,
            0x2b, 0x15, 0x92, 0x13, 0x8b, 0x8a, 0x2a, 0x15, 0xf2, 0xcb, 0x52, 0x8b, 0xf4, 0x14,
            0x46, 0x82, 0x59, 0x00, 0x00,
        ],
        &[0xe2, 0xa6, 0x43, 0x9c, 0x00, 0x00],
    ];
    const PY_L0_W15_TAKEOVER: &[&[u8]] = &[
        &[
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ],
        &[
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ],
    ];

    // === vectors from ours, inflated by CPython's zlib ===
    //
    // Checked by `python3 scripts/deflate_vectors.py --check`, whose OURS
    // holds the same bytes: `zlib.decompressobj(-bits)` (a new one per
    // message without takeover) inflates each with 00 00 ff ff appended to
    // its message.

    const OURS_L6_W15_TAKEOVER: &[&[u8]] = &[
        &[
            0x2a, 0x48, 0x2d, 0xca, 0x4d, 0x2d, 0x2e, 0x4e, 0x4c, 0x4f, 0xd5, 0x4d, 0x49, 0x4d,
            0xcb, 0x49, 0x2c, 0x49, 0x55, 0x48, 0xce, 0xcf, 0x2d, 0x28, 0x4a, 0x2d, 0x2e, 0x4e,
            0x2d, 0x56, 0x48, 0x4d, 0x4c, 0xce, 0x50, 0x80, 0xca, 0x5b, 0x2b, 0x94, 0x64, 0xa4,
            0x2a, 0xf8, 0x44, 0x99, 0x9b, 0x2b, 0x94, 0x67, 0xe6, 0xa5, 0xe4, 0x97, 0x2b, 0xe4,
            0x26, 0x56, 0x2a, 0x24, 0x27, 0x16, 0x15, 0x55, 0x2a, 0xe4, 0x97, 0xa5, 0x16, 0xe9,
            0x29, 0x14, 0x8c, 0x00, 0xb3, 0x00, 0x00,
        ],
        &[0x1a, 0xf5, 0x63, 0x2a, 0x49, 0x69, 0x02, 0x00],
        &[0x00],
        &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
    ];
    const OURS_L1_W9_NO_TAKEOVER: &[&[u8]] = &[
        &[
            0x4a, 0x4c, 0x4c, 0x4a, 0x4a, 0x4a, 0x4a, 0x4c, 0x02, 0xd1, 0x20, 0x0c, 0xe2, 0x80,
            0xe9, 0xc4, 0xa4, 0xa4, 0xc4, 0x44, 0xa8, 0x38, 0x84, 0x09, 0x52, 0x06, 0x52, 0x07,
            0x16, 0x05, 0x6b, 0x03, 0x89, 0x27, 0x41, 0x14, 0x26, 0x82, 0x00, 0x48, 0x05, 0x44,
            0x0b, 0xc8, 0x44, 0x10, 0x0f, 0x4c, 0x27, 0xc2, 0x48, 0x28, 0x03, 0x62, 0x2e, 0x48,
            0x1f, 0x44, 0x09, 0x84, 0x0f, 0x32, 0x08, 0xc4, 0x87, 0x9a, 0x0c, 0x62, 0x82, 0x9c,
            0x06, 0xb1, 0x03, 0x64, 0x3a, 0x58, 0x02, 0xe4, 0x36, 0x90, 0x7a, 0x90, 0x3b, 0x41,
            0x3a, 0x20, 0x82, 0x20, 0x0b, 0xc0, 0xe6, 0x81, 0x08, 0x90, 0x0b, 0x20, 0xca, 0x20,
            0x3e, 0x00, 0x29, 0x05, 0x8b, 0x81, 0xd4, 0x83, 0x8c, 0x03, 0x2b, 0x02, 0xb9, 0x05,
            0xc2, 0x01, 0x19, 0x01, 0xf2, 0x13, 0xc8, 0x36, 0x30, 0x0d, 0x26, 0x20, 0xba, 0x20,
            0x2a, 0xc0, 0x6e, 0x49, 0x4c, 0x02, 0x00,
        ],
        &[
            0x2a, 0x48, 0x2d, 0xca, 0x4d, 0x2d, 0x2e, 0x4e, 0x4c, 0x4f, 0xd5, 0x4d, 0x49, 0x4d,
            0xcb, 0x49, 0x2c, 0x49, 0x55, 0x48, 0xce, 0xcf, 0x2d, 0x28, 0x4a, 0x2d, 0x2e, 0x4e,
            0x2d, 0x56, 0x48, 0x4d, 0x4c, 0xce, 0x50, 0x80, 0xca, 0x5b, 0x2b, 0x94, 0x64, 0xa4,
            0x2a, 0xf8, 0x44, 0x99, 0x9b, 0x2b, 0x94, 0x67, 0xe6, 0xa5, 0xe4, 0x97, 0x2b, 0xe4,
            0x26, 0x56, 0x2a, 0x24, 0x27, 0x16, 0x15, 0x55, 0x2a, 0xe4, 0x97, 0xa5, 0x16, 0xe9,
            0x29, 0x8c, 0x04, 0xb3, 0x00, 0x00,
        ],
    ];
    const OURS_L9_W12_TAKEOVER: &[&[u8]] = &[
        &[
            0x54, 0x4f, 0x81, 0x0d, 0x00, 0x20, 0x08, 0xba, 0x15, 0xfe, 0x3f, 0x22, 0x87, 0xa0,
            0x66, 0x6d, 0x92, 0x20, 0x26, 0xc0, 0x0a, 0x10, 0x95, 0x21, 0x5c, 0x09, 0x2a, 0x09,
            0xa8, 0xfe, 0xd5, 0xfa, 0xb6, 0x54, 0x58, 0xac, 0x42, 0x46, 0xb4, 0xd4, 0x8d, 0xf7,
            0x24, 0xc5, 0x61, 0xbc, 0xcd, 0xa5, 0xcf, 0xde, 0xdc, 0x19, 0xb6, 0xa7, 0xff, 0xb9,
            0xd2, 0x41, 0x99, 0x1e, 0x79, 0x80, 0x14, 0x07, 0x7a, 0xf2, 0x10, 0x2b, 0x98, 0x7d,
            0xce, 0xe3, 0x6e, 0xce, 0x07,
        ],
        &[0x4a, 0x1c, 0x0d, 0x2b, 0xa2, 0xc3, 0x0a, 0x00],
        &[
            0x00, 0x64, 0x00, 0x9b, 0xff, 0x0b, 0x30, 0x55, 0x7a, 0x9f, 0xc4, 0xe9, 0x13, 0x38,
            0x5d, 0x82, 0xa7, 0xcc, 0xf1, 0x1b, 0x40, 0x65, 0x8a, 0xaf, 0xd4, 0xf9, 0x23, 0x48,
            0x6d, 0x92, 0xb7, 0xdc, 0x06, 0x2b, 0x50, 0x75, 0x9a, 0xbf, 0xe4, 0x0e, 0x33, 0x58,
            0x7d, 0xa2, 0xc7, 0xec, 0x16, 0x3b, 0x60, 0x85, 0xaa, 0xcf, 0xf4, 0x1e, 0x43, 0x68,
            0x8d, 0xb2, 0xd7, 0x01, 0x26, 0x4b, 0x70, 0x95, 0xba, 0xdf, 0x09, 0x2e, 0x53, 0x78,
            0x9d, 0xc2, 0xe7, 0x11, 0x36, 0x5b, 0x80, 0xa5, 0xca, 0xef, 0x19, 0x3e, 0x63, 0x88,
            0xad, 0xd2, 0xf7, 0x21, 0x46, 0x6b, 0x90, 0xb5, 0xda, 0x04, 0x29, 0x4e, 0x73, 0x98,
            0xbd, 0xe2, 0x0c, 0x31, 0x56, 0x7b, 0xa0, 0x00,
        ],
    ];

    // === RFC 7692 §7.2.3 ===

    /// Every example of RFC 7692 §7.2.3 inflates with ours.
    #[test]
    fn inflates_every_rfc_7692_example() {
        // §7.2.3.1: one compressed block, in one frame and in two.
        assert_eq!(inflate_fresh(&[HELLO]).unwrap(), b"Hello");
        let fragments: &[&[u8]] = &[&[0xf2, 0x48, 0xcd], &[0xc9, 0xc9, 0x07, 0x00]];
        assert_eq!(inflate_fresh(fragments).unwrap(), b"Hello");
        // §7.2.3.2: the second "Hello" refers to the first through the
        // shared window...
        let mut inflater = Inflater::new(15, false, 100).unwrap();
        assert_eq!(
            inflate_message(&mut inflater, &[HELLO], 64).unwrap(),
            b"Hello"
        );
        assert_eq!(
            inflate_message(&mut inflater, &[SECOND_HELLO], 64).unwrap(),
            b"Hello"
        );
        // ...and means nothing without it.
        let err = inflate_fresh(&[SECOND_HELLO]).unwrap_err();
        assert!(
            matches!(&err, InflateError::Corrupt { detail, .. } if detail.contains("too far back")),
            "{err}"
        );
        // §7.2.3.3: a stored block.
        let stored: &[u8] = &[
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(inflate_fresh(&[stored]).unwrap(), b"Hello");
        // §7.2.3.4: a block with BFINAL set, then the padding octet.
        let bfinal: &[u8] = &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflate_fresh(&[bfinal]).unwrap(), b"Hello");
        // §7.2.3.5: two blocks in one message.
        let two_blocks: &[u8] = &[
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ];
        assert_eq!(inflate_fresh(&[two_blocks]).unwrap(), b"Hello");
        // §7.2.3.6: a sync-flushed fragment, then an empty final one.
        let flushed: &[u8] = &[
            0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        assert_eq!(inflate_fresh(&[flushed, &[0x00]]).unwrap(), b"Hello");
        // And §7.2.3.6's empty fragment as a whole message: the empty one.
        assert_eq!(inflate_fresh(&[&[0x00]]).unwrap(), b"");
    }

    /// Ours compresses "Hello" twice exactly as RFC 7692 §7.2.3.1 and
    /// §7.2.3.2 show with context takeover, and the same both times
    /// without it.
    #[test]
    fn deflates_hello_as_the_rfc_shows() {
        let mut deflater = Deflater::new(6, 15, false).unwrap();
        assert_eq!(compress(&mut deflater, b"Hello"), HELLO);
        assert_eq!(compress(&mut deflater, b"Hello"), SECOND_HELLO);
        let mut deflater = Deflater::new(6, 15, true).unwrap();
        assert_eq!(compress(&mut deflater, b"Hello"), HELLO);
        assert_eq!(compress(&mut deflater, b"Hello"), HELLO);
    }

    /// An empty message is the one octet 00 (§7.2.3.6): from a fresh
    /// deflater, after other messages (where zlib's second sync flush in a
    /// row would give nothing), with and without takeover, without making
    /// a zlib state; and it inflates to nothing, leaving the window be.
    #[test]
    fn an_empty_message_is_one_zero_octet() {
        for no_context_takeover in [false, true] {
            let mut deflater = Deflater::new(6, 15, no_context_takeover).unwrap();
            assert_eq!(compress(&mut deflater, b""), [0x00]);
            assert!(
                deflater.state.is_none(),
                "an empty message made a zlib state"
            );
            let mut inflater = Inflater::new(15, no_context_takeover, 100).unwrap();
            for message in [&b""[..], b"Hello", b"", b"", b"Hello", b""] {
                let payload = compress(&mut deflater, message);
                if message.is_empty() {
                    assert_eq!(payload, [0x00]);
                }
                assert_eq!(
                    inflate_message(&mut inflater, &[&payload], 64).unwrap(),
                    message
                );
            }
        }
        // Empty pieces are no input.
        let mut deflater = Deflater::new(6, 15, false).unwrap();
        let mut out = Vec::new();
        deflater.write(b"", &mut out).unwrap();
        deflater.finish(&mut out).unwrap();
        assert_eq!(out, [0x00]);
    }

    // === round trips ===

    /// Text and random binary of 0, 1, 255, 256 bytes, 64 KiB and 1 MiB
    /// round-trip through ours at every window from 9 to 15 bits, with and
    /// without takeover, written in pieces of 1 byte to 96 KiB, inflated
    /// from frames of 1 byte to 64 KiB into buffers of 1 byte to 16 KiB.
    #[test]
    fn round_trips_at_every_window_with_and_without_takeover() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut messages = Vec::new();
        for size in [0, 1, 255, 256, 64 * 1024, 1024 * 1024] {
            messages.push(rng.text(size));
            messages.push(rng.binary(size));
        }
        let mut payload = Vec::new();
        for bits in 9..=15 {
            for no_context_takeover in [false, true] {
                let level = if bits % 2 == 0 { 1 } else { 6 };
                let mut deflater = Deflater::new(level, bits, no_context_takeover).unwrap();
                let mut inflater = Inflater::new(bits, no_context_takeover, 1 << 21).unwrap();
                for message in &messages {
                    payload.clear();
                    for piece in rng.pieces(message, 96 * 1024) {
                        deflater.write(piece, &mut payload).unwrap();
                    }
                    deflater.finish(&mut payload).unwrap();
                    let frames = rng.pieces(&payload, 64 * 1024);
                    let read_size = if message.len() > 64 * 1024 {
                        READ_PIECE
                    } else {
                        rng.size(READ_PIECE)
                    };
                    let inflated = inflate_message(&mut inflater, &frames, read_size).unwrap();
                    assert!(
                        inflated == *message,
                        "{bits} bits, no_context_takeover {no_context_takeover}: \
                         a {}-byte message came back as {} bytes",
                        message.len(),
                        inflated.len()
                    );
                }
            }
        }
    }

    /// Every level from 0 (stored blocks) to 9 round-trips.
    #[test]
    fn round_trips_at_every_level() {
        let message = Rng(23).text(20_000);
        for level in 0..=9 {
            let mut deflater = Deflater::new(level, 15, false).unwrap();
            let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
            for _ in 0..2 {
                let payload = compress(&mut deflater, &message);
                if level == 0 {
                    assert!(payload.len() > message.len(), "level 0 compressed");
                }
                let inflated = inflate_message(&mut inflater, &[&payload], READ_PIECE).unwrap();
                assert!(inflated == message, "level {level}");
            }
        }
    }

    /// flate2 and zlib-rs cannot compress with 8 window bits, so ours
    /// refuses to; a peer that negotiated 8 is inflated (with 15, which
    /// takes the 9-bit streams old zlib made when told 8).
    #[test]
    fn window_bits_8_is_refused_for_compressing_but_inflated() {
        let refused = std::panic::catch_unwind(|| {
            Compress::new_with_window_bits(Compression::new(6), false, 8)
        });
        assert!(refused.is_err(), "flate2 now compresses with 8 window bits");
        assert_eq!(
            Deflater::new(6, 8, false).err(),
            Some(ParamsError::WindowBits { bits: 8, min: 9 })
        );
        assert_eq!(
            Deflater::new(6, 16, false).err(),
            Some(ParamsError::WindowBits { bits: 16, min: 9 })
        );
        assert_eq!(
            Deflater::new(10, 15, false).err(),
            Some(ParamsError::Level(10))
        );
        assert!(Inflater::new(7, false, 1).is_err());
        assert!(Inflater::new(16, false, 1).is_err());

        let mut inflater = Inflater::new(8, false, 1 << 20).unwrap();
        let mut deflater = Deflater::new(9, 9, false).unwrap();
        let message = Rng(29).text(10_000);
        for _ in 0..3 {
            let payload = compress(&mut deflater, &message);
            let inflated = inflate_message(&mut inflater, &[&payload], READ_PIECE).unwrap();
            assert!(inflated == message);
        }
    }

    /// With context takeover the second of two identical messages is under
    /// a tenth of the first (45 bytes after 824); without it, the very same bytes again.
    #[test]
    fn context_takeover_really_takes_over() {
        let message = Rng(11).text(4096);
        let mut with_takeover = Deflater::new(6, 15, false).unwrap();
        let first = compress(&mut with_takeover, &message);
        let second = compress(&mut with_takeover, &message);
        assert!(
            second.len() * 10 < first.len(),
            "{} bytes, then {}",
            first.len(),
            second.len()
        );
        let mut without = Deflater::new(6, 15, true).unwrap();
        assert_eq!(compress(&mut without, &message), first);
        assert_eq!(compress(&mut without, &message), first);

        // And the second needs the first's window to inflate.
        let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
        assert!(inflate_message(&mut inflater, &[&first], READ_PIECE).unwrap() == message);
        assert!(inflate_message(&mut inflater, &[&second], READ_PIECE).unwrap() == message);
        assert!(inflate_fresh(&[&second]).is_err());
    }

    /// Reads stop and resume anywhere: one-byte buffers over one-byte
    /// frames give back the message that one-piece reads give.
    #[test]
    fn reads_resume_anywhere() {
        let message = Rng(13).text(20_000);
        let payload = compress(&mut Deflater::new(6, 15, false).unwrap(), &message);
        let frames: Vec<&[u8]> = payload.chunks(1).collect();
        let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
        assert!(inflate_message(&mut inflater, &frames, 1).unwrap() == message);
    }

    // === interoperability ===

    /// What CPython's zlib compressed inflates with ours, each message in
    /// one frame and in one-byte frames.
    #[test]
    fn inflates_what_python_zlib_made() {
        let (text, binary, skewed) = (text(), binary(), skewed(300));
        let cases: &[(Messages, u8, bool, Messages)] = &[
            (PY_L6_W15_TAKEOVER, 15, true, &[&text, &text, b"", b"Hello"]),
            (PY_L9_W9_NO_TAKEOVER, 9, false, &[&text, &skewed]),
            (PY_L9_W15_TAKEOVER, 15, true, &[&skewed, &skewed]),
            (PY_L1_W12_TAKEOVER, 12, true, &[&binary, &text, &binary]),
            (PY_L0_W15_TAKEOVER, 15, true, &[b"Hello", b"Hello"]),
        ];
        for &(payloads, bits, takeover, messages) in cases {
            let mut whole = Inflater::new(bits, !takeover, 1 << 20).unwrap();
            let mut bytewise = Inflater::new(bits, !takeover, 1 << 20).unwrap();
            for (payload, message) in payloads.iter().zip(messages) {
                let inflated = inflate_message(&mut whole, &[payload], READ_PIECE).unwrap();
                assert_eq!(inflated, *message, "{bits} bits");
                let frames: Vec<&[u8]> = payload.chunks(1).collect();
                let inflated = inflate_message(&mut bytewise, &frames, 7).unwrap();
                assert_eq!(inflated, *message, "{bits} bits, one-byte frames");
            }
        }
    }

    /// Ours makes, byte for byte, the payloads CPython's zlib was shown to
    /// inflate back to these messages. If zlib-rs changes its encoder this
    /// fails: check the new bytes with the script and replace both copies.
    #[test]
    fn deflates_what_python_zlib_inflates() {
        let (text, binary, skewed) = (text(), binary(), skewed(300));
        let cases: &[(Messages, u32, u8, bool, Messages)] = &[
            (
                OURS_L6_W15_TAKEOVER,
                6,
                15,
                true,
                &[&text, &text, b"", b"Hello"],
            ),
            (OURS_L1_W9_NO_TAKEOVER, 1, 9, false, &[&skewed, &text]),
            (
                OURS_L9_W12_TAKEOVER,
                9,
                12,
                true,
                &[&skewed, &skewed, &binary],
            ),
        ];
        for &(payloads, level, bits, takeover, messages) in cases {
            let mut deflater = Deflater::new(level, bits, !takeover).unwrap();
            for (payload, message) in payloads.iter().zip(messages) {
                assert_eq!(
                    compress(&mut deflater, message),
                    *payload,
                    "level {level}, {bits} bits"
                );
            }
        }
    }

    // === endings ===

    /// A message whose data stops inside a block at its final frame (a
    /// sender that did not sync-flush, against RFC 7692 §7.2.1) fails as
    /// Corrupt rather than passing on a cut message or waiting for more:
    /// every cut of a stored, a fixed and a dynamic block. The one gap: a
    /// cut inside a dynamic block's header, which takes the tail and the
    /// probe as more header; that message ends empty (and the window is
    /// left mid-header, so the next message fails instead).
    #[test]
    fn a_message_that_ends_inside_a_block_is_corrupt() {
        let stored: &[u8] = &[
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        let cases: &[(&str, &[u8], &[usize])] = &[
            // A cut after 1 octet leaves 00: the empty message.
            ("stored", stored, &[1]),
            ("fixed", PY_L6_W15_TAKEOVER[0], &[]),
            ("dynamic", PY_L9_W15_TAKEOVER[0], &[]),
            (
                "dynamic, cut in its header",
                PY_L9_W9_NO_TAKEOVER[1],
                &[9, 10, 11, 12],
            ),
        ];
        for &(name, payload, ends_empty) in cases {
            for cut in 1..payload.len() {
                let result = inflate_fresh(&[&payload[..cut]]);
                if ends_empty.contains(&cut) {
                    assert_eq!(result, Ok(Vec::new()), "{name} cut after {cut}");
                } else {
                    assert!(
                        matches!(result, Err(InflateError::Corrupt { .. })),
                        "{name} cut after {cut}: {result:?}"
                    );
                }
            }
        }
    }

    /// A block with BFINAL set ends the peer's DEFLATE stream (§7.2.3.4):
    /// the message inflates with or without the padding octet, in one frame
    /// or two, the next message starts a new stream, and anything but that
    /// one octet after the final block is Corrupt.
    #[test]
    fn a_final_block_ends_the_stream() {
        let bfinal: &[u8] = &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        let mut inflater = Inflater::new(15, false, 100).unwrap();
        assert_eq!(
            inflate_message(&mut inflater, &[bfinal], 64).unwrap(),
            b"Hello"
        );
        assert!(inflater.state.is_none(), "the ended stream was kept");
        assert_eq!(
            inflate_message(&mut inflater, &[HELLO], 64).unwrap(),
            b"Hello"
        );

        assert_eq!(inflate_fresh(&[&bfinal[..7]]).unwrap(), b"Hello");
        assert_eq!(
            inflate_fresh(&[&bfinal[..7], &bfinal[7..]]).unwrap(),
            b"Hello"
        );
        assert_eq!(
            inflate_fresh(&[&bfinal[..7], &[], &bfinal[7..], &[]]).unwrap(),
            b"Hello"
        );
        let after_the_end: &[&[&[u8]]] = &[
            &[bfinal, &[0x00]],
            &[bfinal, &[0x01]],
            &[&bfinal[..7], &[0x00, 0x00]],
            &[&bfinal[..7], HELLO],
        ];
        for frames in after_the_end {
            let result = inflate_fresh(frames);
            assert!(
                matches!(&result, Err(InflateError::Corrupt { detail, .. }) if detail.contains("after the final")),
                "{frames:02x?}: {result:?}"
            );
        }
    }

    /// Ends the RFC leaves to good sense: an empty payload is the empty
    /// message and leaves the window be (zlib-based senders send one), and
    /// data that already ends in 00 00 ff ff (a sender that did not strip
    /// it, or sync-flushed a frame and then sent an empty final one) gets
    /// no second tail.
    #[test]
    fn lenient_endings_keep_the_window() {
        let kept_tail: &[u8] = &[
            0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        let first_messages: &[&[&[u8]]] = &[
            &[HELLO],
            &[kept_tail],
            &[kept_tail, &[]],
            &[&kept_tail[..8], &kept_tail[8..], &[]],
        ];
        for frames in first_messages {
            let mut inflater = Inflater::new(15, false, 100).unwrap();
            assert_eq!(inflate_message(&mut inflater, &[&[]], 64).unwrap(), b"");
            assert!(
                inflater.state.is_none(),
                "an empty payload made a zlib state"
            );
            assert_eq!(
                inflate_message(&mut inflater, frames, 64).unwrap(),
                b"Hello"
            );
            assert_eq!(inflate_message(&mut inflater, &[&[]], 64).unwrap(), b"");
            assert_eq!(
                inflate_message(&mut inflater, &[&[], &[]], 64).unwrap(),
                b""
            );
            // The window still holds the first "Hello".
            assert_eq!(
                inflate_message(&mut inflater, &[SECOND_HELLO], 64).unwrap(),
                b"Hello"
            );
        }
    }

    // === errors ===

    /// Data that is not DEFLATE fails as Corrupt, close code 1007, never a
    /// panic: a reserved block type, a stored block whose lengths disagree,
    /// and 2,000 random payloads (each either inflates or is Corrupt).
    #[test]
    fn corrupt_data_fails_as_corrupt() {
        // BFINAL 1, BTYPE 11 (reserved).
        let err = inflate_fresh(&[&[0x07]]).unwrap_err();
        assert!(
            matches!(&err, InflateError::Corrupt { detail, .. } if detail.contains("block type")),
            "{err}"
        );
        assert_eq!(err.close_code(), 1007);
        // A stored block of LEN 5 whose NLEN is not its complement.
        let err = inflate_fresh(&[&[0x00, 0x05, 0x00, 0x00, 0x00, b'H']]).unwrap_err();
        assert!(
            matches!(&err, InflateError::Corrupt { detail, .. } if detail.contains("stored")),
            "{err}"
        );

        let mut rng = Rng(3);
        let mut corrupt = 0;
        for _ in 0..2000 {
            let len = rng.size(64);
            let payload = rng.binary(len);
            let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
            match inflate_message(&mut inflater, &[&payload], 256) {
                Ok(_) => {}
                Err(InflateError::Corrupt { at, .. }) => {
                    assert!(at <= payload.len() as u64, "{at} past a {len}-byte payload");
                    corrupt += 1;
                }
                Err(err) => panic!("{err}"),
            }
        }
        assert!(
            corrupt > 1900,
            "only {corrupt} of 2000 random payloads were corrupt"
        );
    }

    /// Why the inflater ignores the peer's window bits: a peer that
    /// negotiated 9 but reaches 1,000 bytes back inflates with zlib-rs told
    /// 9 bits even through 64-byte buffers (C zlib fails it there with
    /// "invalid distance too far back", and passes it through a buffer that
    /// holds the history: checked with CPython's `decompressobj(-9)`), so
    /// the bits would enforce nothing. Ours inflates it whatever the read
    /// size.
    #[test]
    fn a_peer_reaching_beyond_its_window_inflates_whatever_the_read_size() {
        let block = Rng(5).binary(1000);
        let message = [&block[..], &block[..]].concat();
        let payload = compress(&mut Deflater::new(6, 15, false).unwrap(), &message);
        assert!(payload.len() < 1100, "the repeat was not a back-reference");

        let mut input = &[&payload[..], &SYNC_TAIL[..]].concat()[..];
        let mut nine_bits = Decompress::new_with_window_bits(false, 9);
        let mut small = [0u8; 64];
        for _ in 0..1000 {
            if input.is_empty() {
                break;
            }
            let before = nine_bits.total_in();
            nine_bits
                .decompress(input, &mut small, FlushDecompress::None)
                .unwrap();
            input = &input[(nine_bits.total_in() - before) as usize..];
        }
        assert!(input.is_empty() && nine_bits.total_out() == 2000);

        for read_size in [1, 64, READ_PIECE] {
            let mut inflater = Inflater::new(9, false, 1 << 20).unwrap();
            let inflated = inflate_message(&mut inflater, &[&payload], read_size).unwrap();
            assert!(inflated == message, "read size {read_size}");
        }
    }

    // === the compression bomb ===

    /// Writes DEFLATE's bit fields (RFC 1951 §3.1.1).
    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        used: u32,
    }

    impl BitWriter {
        fn bit(&mut self, bit: u32) {
            if self.used == 0 {
                self.bytes.push(0);
            }
            *self.bytes.last_mut().unwrap() |= (bit as u8) << self.used;
            self.used = (self.used + 1) % 8;
        }

        /// `n` bits of `value`, least significant first (header fields,
        /// extra bits).
        fn bits(&mut self, value: u32, n: u32) {
            (0..n).for_each(|i| self.bit((value >> i) & 1));
        }

        /// A Huffman code of `len` bits, most significant first.
        fn code(&mut self, code: u32, len: u32) {
            (0..len).rev().for_each(|i| self.bit((code >> i) & 1));
        }
    }

    /// The first 14 octets of a bomb: a dynamic block (RFC 1951 §3.2.7)
    /// whose literal/length code gives 1 bit to length 258 (symbol 285,
    /// code 0), 2 bits to literal 0 (10) and to end-of-block (11), and whose
    /// one distance code (distance 1) is the bit 0. So after one literal 0,
    /// every two zero bits inflate to 258 zero bytes: every zero octet that
    /// follows these 14 (which end with two such pairs) makes 1,032 bytes.
    /// End the block with [`BOMB_END`].
    fn bomb_head() -> Vec<u8> {
        let mut w = BitWriter::default();
        w.bits(0, 1); // BFINAL
        w.bits(2, 2); // BTYPE: dynamic
        w.bits(286 - 257, 5); // HLIT: literal/length codes up to 285
        w.bits(0, 5); // HDIST: one distance code
        w.bits(19 - 4, 4); // HCLEN: all 19 code length codes
                           // Code length code lengths, in RFC 1951's order: 18 (zeros, 11 to
                           // 138 of them) gets 1 bit (code 0), lengths 1 and 2 get 2 bits each
                           // (10 and 11).
        for symbol in [
            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
        ] {
            w.bits(
                match symbol {
                    18 => 1,
                    1 | 2 => 2,
                    _ => 0,
                },
                3,
            );
        }
        // The 286 literal/length code lengths then the one distance code
        // length: [2, 0 x 255, 2, 0 x 28, 1] and [1].
        let (length_1, length_2, zeros) = ((0b10, 2), (0b11, 2), (0b0, 1));
        w.code(length_2.0, length_2.1); // literal 0
        w.code(zeros.0, zeros.1);
        w.bits(138 - 11, 7); // literals 1..=138
        w.code(zeros.0, zeros.1);
        w.bits(117 - 11, 7); // literals 139..=255
        w.code(length_2.0, length_2.1); // end-of-block
        w.code(zeros.0, zeros.1);
        w.bits(28 - 11, 7); // lengths 257..=284
        w.code(length_1.0, length_1.1); // length 258
        w.code(length_1.0, length_1.1); // distance 1
                                        // The data: one literal 0, then (length 258, distance 1) pairs.
        w.code(0b10, 2);
        while w.used != 0 {
            w.bit(0);
        }
        w.bytes
    }

    /// End-of-block (11), then the empty stored block's header and padding
    /// that a sync flush ends with (its 00 00 ff ff removed).
    const BOMB_END: [u8; 1] = [0x03];

    /// What the bomb's head inflates to: the literal and two pairs.
    const BOMB_HEAD_BYTES: usize = 1 + 2 * 258;

    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

    /// The hand-made bomb inflates to exactly what its design says: 517
    /// zero bytes from its head and 1,032 from each zero octet after it.
    /// (CPython's zlib, checked by hand, inflates the head, 1 MiB of zeros,
    /// the end and the tail to 1,082,130,949 zero bytes: 517 + 1,032 × 2^20.)
    #[test]
    fn the_bomb_inflates_as_designed() {
        let head = bomb_head();
        assert_eq!(head.len(), 14);
        let inflated = inflate_fresh(&[&head, &[0; 100], &BOMB_END]).unwrap();
        assert_eq!(inflated.len(), BOMB_HEAD_BYTES + 100 * 1032);
        assert!(inflated.iter().all(|&b| b == 0));
    }

    /// A bomb of 14 B + 1 MiB + 1 B that inflates to 1.008 GiB, in 18
    /// frames, against a 1 MiB cap: inflating stops with TooLarge within
    /// the first KiB of its zeros, in one read past the cap's worth, the
    /// caller having received exactly the cap, and the heap at its peak
    /// holding the inflate state and nothing else: no output is buffered.
    #[test]
    fn a_compression_bomb_stops_at_the_cap() {
        const CAP: usize = 1 << 20;
        const ZERO_FRAMES: usize = 16;
        assert!(BOMB_HEAD_BYTES + ZERO_FRAMES * ZEROS.len() * 1032 > 1 << 30);
        let mut frames = vec![Bytes::from(bomb_head())];
        frames.extend(std::iter::repeat_n(Bytes::from_static(&ZEROS), ZERO_FRAMES));
        frames.push(Bytes::from_static(&BOMB_END));
        let last = frames.len() - 1;

        let mut inflater = Inflater::new(15, false, CAP).unwrap();
        let mut buf = [0u8; READ_PIECE];
        let (mut received, mut reads, mut outcome) = (0, 0, None);
        let heap = allocation_counter::measure(|| {
            'frames: for (i, frame) in frames.into_iter().enumerate() {
                inflater.push_frame(frame, i == last);
                loop {
                    reads += 1;
                    match inflater.read(&mut buf) {
                        Ok(Inflated::Bytes(n)) => received += n,
                        Ok(Inflated::NeedFrame) => continue 'frames,
                        other => {
                            outcome = Some(other);
                            break 'frames;
                        }
                    }
                }
            }
        });
        assert_eq!(outcome, Some(Err(InflateError::TooLarge { max_size: CAP })));
        assert_eq!(received, CAP);
        // The head's 517 bytes and its NeedFrame, full reads up to the cap,
        // and the read that finds a byte more.
        let to_the_cap = (CAP - BOMB_HEAD_BYTES).div_ceil(READ_PIECE);
        assert_eq!(reads, 2 + to_the_cap + 1);
        // The inflate state is 47,552 bytes (`memory_held_by_each_state`).
        assert!(
            heap.bytes_max < 64 * 1024,
            "peak heap {} bytes",
            heap.bytes_max
        );
        assert!(inflater.state.is_none(), "the failed state was kept");
    }

    // === memory ===

    /// The heap a deflater at `level` and `bits` holds after a message.
    fn deflater_heap(level: u32, bits: u8) -> i64 {
        let mut out = Vec::with_capacity(1024);
        let mut deflater = Deflater::new(level, bits, false).unwrap();
        let heap = allocation_counter::measure(|| deflater.compress(b"Hello", &mut out).unwrap());
        heap.bytes_current
    }

    /// The heap an inflater for a peer's `bits` holds after a message.
    fn inflater_heap(bits: u8) -> i64 {
        let mut inflater = Inflater::new(bits, false, 1 << 20).unwrap();
        let mut buf = [0u8; 64];
        let heap = allocation_counter::measure(|| {
            inflater.push_frame(Bytes::from_static(HELLO), true);
            while inflater.read(&mut buf).unwrap() != Inflated::MessageEnd {}
        });
        heap.bytes_current
    }

    /// The heap each state holds between messages, measured with a
    /// counting allocator: the table in the module doc. A deflate state is
    /// 248,960 bytes plus four times its window, at every level; an
    /// inflate state is 47,552 bytes whatever the peer's bits.
    #[test]
    fn memory_held_by_each_state() {
        for level in [0, 1, 6, 9] {
            assert_eq!(
                deflater_heap(level, 15),
                deflater_heap(1, 15),
                "level {level}"
            );
        }
        for bits in 9..=15 {
            let heap = deflater_heap(1, bits);
            assert_eq!(
                heap - (4 << bits),
                deflater_heap(1, 9) - (4 << 9),
                "{bits} bits"
            );
            println!("deflate, {bits} bits: {heap} bytes");
        }
        let base = deflater_heap(1, 9) - (4 << 9);
        assert!(
            (230_000..270_000).contains(&base),
            "a deflate state is {base} bytes + 4 windows"
        );
        for bits in 8..=15 {
            assert_eq!(inflater_heap(bits), inflater_heap(15), "{bits} bits");
        }
        let inflate = inflater_heap(15);
        assert!(
            (40_000..56_000).contains(&inflate),
            "an inflate state is {inflate} bytes"
        );
        println!("deflate: {base} + 4 x window; inflate: {inflate} bytes");
    }

    /// With `no_context_takeover` both states are dropped at each message's
    /// end, so nothing of them stays on the heap between messages; a new
    /// deflater or inflater holds nothing until a message has bytes.
    /// A released compressor starts the next message from an empty window,
    /// which an inflater that keeps its window (the peer's takeover) reads
    /// as it reads any other message.
    #[test]
    fn a_released_deflater_starts_afresh_and_its_peer_still_reads_it() {
        let mut deflater = Deflater::new(1, 15, false).unwrap();
        let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
        let message = b"the same words again and again, the same words again".repeat(8);
        let mut sizes = Vec::new();
        for release in [false, false, true, false] {
            if release {
                deflater.release();
                assert!(!deflater.holds_state());
            }
            let mut payload = Vec::new();
            deflater.compress(&message, &mut payload).unwrap();
            assert!(deflater.holds_state());
            sizes.push(payload.len());
            inflater.push_frame(Bytes::from(payload), true);
            let mut out = vec![0u8; 4096];
            let mut got = Vec::new();
            loop {
                match inflater.read(&mut out).unwrap() {
                    Inflated::Bytes(n) => got.extend_from_slice(&out[..n]),
                    Inflated::MessageEnd => break,
                    Inflated::NeedFrame => panic!("one frame"),
                }
            }
            assert_eq!(got, message);
        }
        // Taken over, the second message is small; released, the third is
        // as big as the first; the fourth takes the third's window over.
        assert!(sizes[1] < sizes[0] / 4, "{sizes:?}");
        assert_eq!(sizes[2], sizes[0], "{sizes:?}");
        assert_eq!(sizes[3], sizes[1], "{sizes:?}");
    }

    /// With no_context_takeover neither side holds a state between
    /// messages: the first message makes both and gives them back as its
    /// thread's spares (`super::spare`), and the next messages take those
    /// instead of allocating anew.
    #[test]
    fn no_context_takeover_holds_no_state_between_messages() {
        let mut deflater = Deflater::new(1, 15, true).unwrap();
        let mut inflater = Inflater::new(15, true, 1 << 20).unwrap();
        assert!(deflater.state.is_none() && inflater.state.is_none());
        let message = Rng(17).text(10_000);
        for round in 0..3 {
            let heap = allocation_counter::measure(|| {
                let payload = compress(&mut deflater, &message);
                let inflated = inflate_message(&mut inflater, &[&payload], READ_PIECE).unwrap();
                assert!(inflated == message);
            });
            assert!(deflater.state.is_none() && inflater.state.is_none());
            if round == 0 {
                assert!(
                    heap.bytes_current > 400_000,
                    "the states were not made and kept as spares: {heap:?}"
                );
            } else {
                assert_eq!(heap.bytes_current, 0, "left on the heap: {heap:?}");
                assert!(heap.bytes_max < 100_000, "states were made again: {heap:?}");
            }
        }
    }

    /// With context takeover, once the states exist a message allocates
    /// nothing: compressed into a reused buffer, inflated from frames into
    /// the caller's buffer.
    #[test]
    fn context_takeover_allocates_nothing_per_message() {
        let mut deflater = Deflater::new(6, 15, false).unwrap();
        let mut inflater = Inflater::new(15, false, 1 << 20).unwrap();
        let message = Rng(19).text(50_000);
        let mut payload = Vec::with_capacity(64 * 1024);
        let mut buf = [0u8; READ_PIECE];
        for round in 0..3 {
            payload.clear();
            let deflate_heap =
                allocation_counter::measure(|| deflater.compress(&message, &mut payload).unwrap());
            let frames: Vec<Bytes> = payload.chunks(4096).map(Bytes::copy_from_slice).collect();
            let last = frames.len() - 1;
            let mut inflated = 0;
            let inflate_heap = allocation_counter::measure(|| {
                for (i, frame) in frames.into_iter().enumerate() {
                    inflater.push_frame(frame, i == last);
                    loop {
                        match inflater.read(&mut buf).unwrap() {
                            Inflated::Bytes(n) => inflated += n,
                            Inflated::NeedFrame => break,
                            Inflated::MessageEnd => return,
                        }
                    }
                }
            });
            assert_eq!(inflated, message.len());
            if round > 0 {
                assert_eq!(
                    deflate_heap.count_total, 0,
                    "deflating allocated: {deflate_heap:?}"
                );
                assert_eq!(
                    inflate_heap.count_total, 0,
                    "inflating allocated: {inflate_heap:?}"
                );
            }
        }
    }
}
