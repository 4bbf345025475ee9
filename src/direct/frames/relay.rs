//! The relay loop of a frame-relay session: it opens the session, pumps
//! both directions and runs the ping and silence timers until the session
//! stops, then hands the ending to the close sequence.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Cursor};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::{debug, info};

use hyper::upgrade::OnUpgrade;

use super::super::{conclude, log_end, DirectSession, LegSummary, Stop};
use crate::close;
use crate::limits::ConnectionPermit;
use crate::metrics::{MessageCounters, Metrics};
use crate::session::alarms::{Alarm, Alarms};
use crate::session::side::{Direction, Side};
use crate::transport::chunked;
use crate::transport::upgraded::{self, ClientIo};
use crate::upstream::{Connected, Upstream, UpstreamIo};

/// Reads per direction before yielding, so one busy direction cannot
/// starve the other or the timers.
const READS_PER_TURN: usize = 16;
/// The longest frame header (RFC 6455 §5.2).
const MAX_HEADER: usize = 14;
/// The largest control frame payload.
const MAX_CONTROL_PAYLOAD: u64 = 125;
/// The payload of the broker's pings, by which their pongs are known and
/// kept from the other side. Random per process, so that no peer's own
/// ping can carry it by chance and lose its pong (a fixed `muxgate` did).
fn ping_payload() -> &'static [u8] {
    static PAYLOAD: OnceLock<String> = OnceLock::new();
    PAYLOAD
        .get_or_init(|| format!("muxgate:{:016x}", rand::random::<u64>()))
        .as_bytes()
}

thread_local! {
    /// Where the messages of the chunk being relayed end ([`Seen::Message`]'s
    /// `end`), for the rare chunk that the destination does not take whole.
    /// One per event loop, as the read buffer is: a session holds none.
    static MESSAGE_ENDS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The data message a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    Binary,
}

/// Something the scanner saw complete.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Message {
        kind: Kind,
        len: u64,
        /// Where the message's last byte ends in what is written on for
        /// the chunk (see [`Out::len`]).
        end: usize,
    },
    /// A close frame passed on, with its code (1005: none given).
    Close { code: u16 },
}

/// The frame being passed through.
#[derive(Debug)]
struct InFrame {
    /// Payload bytes still to come.
    left: u64,
    /// The frame ends a data message.
    ends_message: bool,
    /// A close or pong frame is held whole (header and payload) rather
    /// than passed on as it comes; this is it so far.
    held: Option<Vec<u8>>,
    /// How many of the held bytes are the header (at most [`MAX_HEADER`]).
    header_len: u8,
    mask: Option<[u8; 4]>,
    /// The payload is text, checked as it passes.
    text: bool,
    /// Payload bytes passed so far, modulo 4: where the mask's cycle
    /// stands. (The fields of a session's scanners are kept small: two
    /// of them are in every idle session.)
    offset: u8,
    /// A close frame (held, unless it is too big to be valid).
    close: bool,
    /// Some of the frame has been written on: until it ends, no frame of
    /// the broker's may go to the destination. (A frame refused at its
    /// header, or held, has written nothing.)
    passing: bool,
}

/// Follows the frames of one direction's byte stream.
#[derive(Debug)]
struct Scanner {
    /// Frames from this side must be masked (it is the client), and must
    /// not be otherwise.
    from: Side,
    max_message: u64,
    /// Header bytes of the next frame, held until the header is whole.
    head: [u8; MAX_HEADER],
    head_len: u8,
    frame: Option<InFrame>,
    /// The data message in progress and its size so far.
    message: Option<(Kind, u64)>,
    /// The close code this side sent, once its close frame has been read:
    /// passed on, or refused (1002 for one that breaks a rule itself; see
    /// `poisoned`).
    closed: Option<u16>,
    utf8: Utf8Check,
    /// A frame broke the rules: nothing is passed on any more, but frames
    /// are still followed, so the side's answer to the broker's close is
    /// recognised behind the rest of the bad frame.
    poisoned: bool,
    /// The rule broken in the current [`Scanner::scan`], reported at its
    /// end (boxed: it is rare, and every idle session carries the field).
    error: Option<Box<WsError>>,
    /// The stream cannot be followed any more (an unparseable header).
    lost: bool,
    /// A frame was refused after its start had been written on: the
    /// destination is left inside it for good.
    cut: bool,
    /// Tests turn [`Scanner::whole_data_frame`] off to compare.
    #[cfg(test)]
    shortcut: bool,
}

/// Checks text that arrives in pieces: the end of a piece may cut a
/// character, whose first bytes wait here for the rest.
#[derive(Debug, Default, Clone)]
struct Utf8Check {
    partial: [u8; 4],
    partial_len: u8,
}

impl Utf8Check {
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), WsError> {
        let bad = || WsError::Utf8("invalid UTF-8 in a text message".into());
        // Finish the character cut at the end of the last piece.
        while self.partial_len > 0 {
            let Some((&b, rest)) = bytes.split_first() else {
                return Ok(());
            };
            self.partial[usize::from(self.partial_len)] = b;
            self.partial_len += 1;
            bytes = rest;
            match std::str::from_utf8(&self.partial[..self.partial_len.into()]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_some() || self.partial_len == 4 => return Err(bad()),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(bad()),
            Err(e) => {
                let rest = &bytes[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.partial_len = rest.len() as u8;
                Ok(())
            }
        }
    }

    /// The message ended: no character may be left cut.
    fn finish(&mut self) -> Result<(), WsError> {
        if std::mem::take(&mut self.partial_len) > 0 {
            return Err(WsError::Utf8("text message ends inside a character".into()));
        }
        Ok(())
    }
}

/// Where the bytes to write out of one chunk are: a range of the chunk,
/// then (rarely) bytes of the scanner's own (a held header's start, a
/// close frame).
#[derive(Default)]
struct Out {
    direct: Range<usize>,
    owned: Vec<u8>,
}

impl Out {
    fn pass(&mut self, chunk: &[u8], range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        if self.owned.is_empty() && (self.direct.is_empty() || self.direct.end == range.start) {
            if self.direct.is_empty() {
                self.direct = range;
            } else {
                self.direct.end = range.end;
            }
        } else {
            self.owned.extend_from_slice(&chunk[range]);
        }
    }

    fn own(&mut self, bytes: &[u8]) {
        self.owned.extend_from_slice(bytes);
    }

    /// How many bytes are to be written: the range, then the owned bytes.
    fn len(&self) -> usize {
        self.direct.len() + self.owned.len()
    }
}

impl Scanner {
    fn new(from: Side, max_message: u64) -> Self {
        Scanner {
            from,
            max_message,
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: None,
            message: None,
            closed: None,
            utf8: Utf8Check::default(),
            poisoned: false,
            error: None,
            lost: false,
            cut: false,
            #[cfg(test)]
            shortcut: true,
        }
    }

    /// Notes the first broken rule; from now on nothing is passed on.
    fn poison(&mut self, error: WsError) {
        if !self.poisoned {
            self.poisoned = true;
            self.error = Some(Box::new(error));
        }
    }

    /// No frame of this side's is in progress (or its header is).
    fn between_frames(&self) -> bool {
        self.frame.is_none()
    }

    /// No frame is partly written: the broker may write one of its own.
    fn at_boundary(&self) -> bool {
        !self.cut && self.frame.as_ref().is_none_or(|f| !f.passing)
    }

    /// Follows `chunk`, noting in `out` what to write on and in `seen` what
    /// completed. Returns the first broken rule; nothing from where it is
    /// found on is passed on (see `poisoned`): none of a frame whose header
    /// breaks a rule, and none of a text frame from the read that holds its
    /// first bad byte.
    fn scan(
        &mut self,
        chunk: &[u8],
        out: &mut Out,
        seen: &mut impl FnMut(Seen),
    ) -> Result<(), WsError> {
        let mut at = 0;
        while at < chunk.len() && !self.lost {
            if self.frame.is_none() {
                if let Some(next) = self.whole_data_frame(chunk, at, out, seen) {
                    at = next;
                    continue;
                }
                at = self.header(chunk, at, out);
                if self.frame.as_ref().is_some_and(|f| f.left == 0) {
                    self.end_frame(out, seen);
                }
                continue;
            }
            let frame = self.frame.as_mut().expect("checked above");
            let take = frame.left.min((chunk.len() - at) as u64) as usize;
            let piece = &chunk[at..at + take];
            let mut bad_text = None;
            if frame.text {
                if let Err(e) = check_text(&mut self.utf8, piece, frame.mask, frame.offset.into()) {
                    frame.text = false;
                    bad_text = Some(e);
                }
            }
            frame.offset = ((usize::from(frame.offset) + take) % 4) as u8;
            frame.left -= take as u64;
            let ends = frame.left == 0;
            match (&mut frame.held, bad_text) {
                (_, Some(e)) => {
                    // The frame's start went on, and its rest never will.
                    self.cut |= frame.passing;
                    self.poison(e);
                }
                (Some(held), None) => held.extend_from_slice(piece),
                (None, None) if !self.poisoned => out.pass(chunk, at..at + take),
                (None, None) => {}
            }
            at += take;
            if ends {
                self.end_frame(out, seen);
            }
        }
        self.error.take().map_or(Ok(()), |e| Err(*e))
    }

    /// The common case in one step: a data frame that breaks no rule and
    /// lies whole in `chunk` from `at`, passed on with no [`InFrame`] made
    /// for it. Returns where it ends; `None` leaves everything as it was,
    /// for [`Scanner::header`] and the payload steps of [`Scanner::scan`],
    /// which handle every frame (this is only their shortcut, and the
    /// tests check that both find the same).
    #[inline]
    fn whole_data_frame(
        &mut self,
        chunk: &[u8],
        at: usize,
        out: &mut Out,
        seen: &mut impl FnMut(Seen),
    ) -> Option<usize> {
        #[cfg(test)]
        if !self.shortcut {
            return None;
        }
        let rest = &chunk[at..];
        // Data opcodes only: control frames may be held, and tungstenite
        // refuses reserved ones without saying their length.
        if self.head_len != 0 || self.poisoned || (rest.first()? & 0x0F) > 2 {
            return None;
        }
        let mut cursor = Cursor::new(rest);
        let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
        let header_len = cursor.position() as usize;
        let end = header_len.checked_add(usize::try_from(len).ok()?)?;
        let OpCode::Data(data) = header.opcode else {
            return None;
        };
        if end > rest.len() || self.check(&header, len).is_err() {
            return None;
        }
        // A continuation with no message is `None`, but `check` refused it.
        let (kind, size) = self.message_with(data, len)?;
        if kind == Kind::Text {
            // Checked on a copy, kept only if the frame passes.
            let mut utf8 = self.utf8.clone();
            let payload = &rest[header_len..end];
            check_text(&mut utf8, payload, header.mask, 0).ok()?;
            if header.is_final {
                utf8.finish().ok()?;
            }
            self.utf8 = utf8;
        }
        out.pass(chunk, at..at + end);
        if header.is_final {
            self.message = None;
            let end = out.len();
            seen(Seen::Message {
                kind,
                len: size,
                end,
            });
        } else {
            self.message = Some((kind, size));
        }
        Some(at + end)
    }

    /// Reads header bytes from `chunk[at..]`; returns where the payload
    /// starts (or the chunk's end, with the header still incomplete).
    fn header(&mut self, chunk: &[u8], at: usize, out: &mut Out) -> usize {
        let held = usize::from(self.head_len);
        let take = (MAX_HEADER - held).min(chunk.len() - at);
        self.head[held..held + take].copy_from_slice(&chunk[at..at + take]);
        // tungstenite refuses a reserved opcode without saying the frame's
        // length, which is needed to find the frame behind it: the opcode
        // is checked here, and parsed as binary.
        let mut head = self.head;
        let opcode = head[0] & 0x0F;
        let reserved = matches!(opcode, 3..=7 | 11..=15);
        if reserved {
            head[0] = (head[0] & 0xF0) | 0x2;
        }
        let mut cursor = Cursor::new(&head[..held + take]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                self.head_len += take as u8;
                return chunk.len();
            }
            Err(e) => {
                // No length to skip by: the rest cannot be followed.
                self.poison(e);
                self.lost = true;
                return chunk.len();
            }
        };
        if reserved {
            self.poison(WsError::Protocol(ProtocolError::InvalidOpcode(opcode)));
        }
        let header_len = cursor.position() as usize;
        if !self.poisoned {
            if let Err(e) = self.check(&header, len) {
                self.poison(e);
            }
        }
        let from_chunk = header_len - held;
        let hold = matches!(
            header.opcode,
            OpCode::Control(Control::Close | Control::Pong)
        );
        let mut frame = InFrame {
            left: len,
            ends_message: false,
            held: None,
            header_len: header_len as u8,
            mask: header.mask,
            text: false,
            offset: 0,
            close: !reserved && header.opcode == OpCode::Control(Control::Close),
            passing: false,
        };
        if hold && len <= MAX_CONTROL_PAYLOAD {
            let mut bytes = Vec::with_capacity(header_len + len as usize);
            bytes.extend_from_slice(&head[..header_len]);
            frame.held = Some(bytes);
        } else if !self.poisoned {
            out.own(&self.head[..held]);
            out.pass(chunk, at..at + from_chunk);
            frame.passing = true;
        }
        if let OpCode::Data(data) = header.opcode {
            // A continuation with no message: only past a broken rule
            // (checked otherwise).
            let (kind, size) = self.message_with(data, len).unwrap_or((Kind::Binary, len));
            self.message = Some((kind, size));
            frame.ends_message = header.is_final;
            frame.text = kind == Kind::Text && !self.poisoned;
        }
        self.head_len = 0;
        self.frame = Some(frame);
        at + from_chunk
    }

    /// The data message a frame of `data` with `len` payload bytes belongs
    /// to: its kind (a continuation's is its message's) and its size with
    /// that frame. `None` for a continuation with no message to continue.
    fn message_with(&self, data: Data, len: u64) -> Option<(Kind, u64)> {
        let kind = match (data, self.message) {
            (Data::Text, _) => Kind::Text,
            (Data::Binary, _) => Kind::Binary,
            (_, Some((kind, _))) => kind,
            (_, None) => return None,
        };
        Some((kind, self.message_size_with(len)))
    }

    /// The size of the data message in progress (0 if none) with `len`
    /// more bytes.
    fn message_size_with(&self, len: u64) -> u64 {
        self.message.map_or(0, |(_, size)| size).saturating_add(len)
    }

    /// The rules the broker enforces; the peers check the rest (UTF-8,
    /// close payloads) and close with their own codes, which pass through.
    fn check(&self, header: &FrameHeader, len: u64) -> Result<(), WsError> {
        let protocol = |e: ProtocolError| Err(WsError::Protocol(e));
        match (self.from, header.mask.is_some()) {
            (Side::Client, false) => return protocol(ProtocolError::UnmaskedFrameFromClient),
            (Side::Upstream, true) => return protocol(ProtocolError::MaskedFrameFromServer),
            _ => {}
        }
        // No extension is ever negotiated through the broker.
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return protocol(ProtocolError::NonZeroReservedBits);
        }
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final {
                    return protocol(ProtocolError::FragmentedControlFrame);
                }
                if len > MAX_CONTROL_PAYLOAD {
                    return protocol(ProtocolError::ControlFrameTooBig);
                }
                Ok(())
            }
            OpCode::Data(data) => {
                match (data, self.message) {
                    (Data::Continue, None) => {
                        return protocol(ProtocolError::UnexpectedContinueFrame)
                    }
                    (Data::Text | Data::Binary, Some(_)) => {
                        return protocol(ProtocolError::ExpectedFragment(data))
                    }
                    _ => {}
                }
                let size = self.message_size_with(len);
                if size > self.max_message {
                    return Err(WsError::Capacity(CapacityError::MessageTooLong {
                        size: size as usize,
                        max_size: self.max_message as usize,
                    }));
                }
                Ok(())
            }
        }
    }

    fn end_frame(&mut self, out: &mut Out, seen: &mut impl FnMut(Seen)) {
        let frame = self.frame.take().expect("a frame in progress");
        if frame.ends_message {
            if let Some((kind, len)) = self.message.take() {
                if kind == Kind::Text {
                    if let Err(e) = self.utf8.finish() {
                        self.poison(e);
                    }
                }
                let end = out.len();
                seen(Seen::Message { kind, len, end });
            }
        }
        let Some(bytes) = frame.held else {
            if frame.close {
                // Too big to be valid, and refused: still, the side has
                // closed and awaits nothing but the broker's close and the
                // end.
                self.closed = Some(close::PROTOCOL_ERROR);
            }
            return;
        };
        let mut payload = bytes[frame.header_len.into()..].to_vec();
        if let Some(mask) = frame.mask {
            unmask(&mut payload, mask, 0);
        }
        if !frame.close {
            // A pong: the answer to one of the broker's pings goes no further.
            if payload != ping_payload() && !self.poisoned {
                out.own(&bytes);
            }
            return;
        }
        let code = match check_close(&payload) {
            Ok(code) => code,
            Err(e) => {
                self.poison(e);
                close::PROTOCOL_ERROR
            }
        };
        // The side has closed, even with a close the broker refuses (or one
        // behind a broken rule): it awaits nothing but a close and the end.
        self.closed = Some(code);
        // Only a close that is passed on is seen: a refused one is answered
        // by the broker's own (see `Closing`), and is not the destination's.
        if !self.poisoned {
            seen(Seen::Close { code });
            out.own(&bytes);
        }
    }
}

/// The code of a close frame with `payload` (1005: none given), or the
/// rule it breaks (RFC 6455 §5.5.1, §7.4.1): one byte long, a code no
/// endpoint may send, or a reason that is not UTF-8. The message relay's
/// tungstenite refuses the same, with the same errors.
fn check_close(payload: &[u8]) -> Result<u16, WsError> {
    match payload {
        [] => Ok(1005),
        [_] => Err(WsError::Protocol(ProtocolError::InvalidCloseSequence)),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::is_valid(code) {
                return Err(WsError::Protocol(ProtocolError::InvalidCloseSequence));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::Utf8("invalid UTF-8 in a close reason".into()));
            }
            Ok(code)
        }
    }
}

/// Checks a piece of a text frame's payload, `offset` bytes into it.
fn check_text(
    utf8: &mut Utf8Check,
    piece: &[u8],
    mask: Option<[u8; 4]>,
    offset: usize,
) -> Result<(), WsError> {
    let Some(mask) = mask else {
        return utf8.feed(piece);
    };
    let mut plain = [0u8; 512];
    for (i, part) in piece.chunks(plain.len()).enumerate() {
        let plain = &mut plain[..part.len()];
        plain.copy_from_slice(part);
        unmask(plain, mask, offset + i * 512);
        utf8.feed(plain)?;
    }
    Ok(())
}

/// Undoes (or applies) `mask` on bytes that start `offset` bytes into a
/// payload.
fn unmask(bytes: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

/// Appends `frame` to `out`, masked if its header carries a mask.
fn encode(frame: Frame, out: &mut Vec<u8>) {
    frame.format(out).expect("writing to a Vec cannot fail");
}

/// A frame of the broker's own toward `to`: masked when `to` is the
/// upstream (the broker is its client).
fn own_frame(mut frame: Frame, to: Side, out: &mut Vec<u8>) {
    if to == Side::Upstream {
        frame.header_mut().mask = Some(rand::random());
    }
    encode(frame, out);
}

/// How a direction stopped.
enum PumpEnd {
    Eof,
    Read(io::Error),
    Write(io::Error),
    /// The source broke a rule (see [`Scanner::check`]).
    Bad(WsError),
}

/// One direction: frames read from the `scan.from` side, written to the
/// other.
struct Pump {
    scan: Scanner,
    /// Bytes read but not yet written. Empty and unallocated when idle.
    spill: Vec<u8>,
    /// Where each message whose last byte is still in `spill` ends, from
    /// the spill's start: the messages that are lost if the destination
    /// fails before taking them. Empty and unallocated unless the spill
    /// holds the end of a message.
    spill_ends: Vec<usize>,
    /// Bytes read per call ([`chunked::read_chunk`]).
    chunk: usize,
    unflushed: bool,
    /// The last poll ended on a read of the source that returned `Pending`
    /// with the task's waker registered on the socket (not for want of
    /// coop budget); see [`Pump::asleep`].
    armed: bool,
    /// When a timer wake last found that something had arrived from the
    /// source (set lazily: a clock read per read costs 5% of user time).
    last_seen: Instant,
    /// Something arrived since the last timer wake.
    heard: bool,
    counters: Arc<MessageCounters>,
    messages_read: u64,
    /// Messages read from the source that the session's end kept from the
    /// destination (each also counted in `muxgate_messages_dropped_total`).
    messages_dropped: u64,
    /// Closes written toward the destination (by the source or the broker).
    sent_close: Option<u16>,
}

impl Pump {
    fn new(from: Side, max_message: u64, chunk: usize, counters: Arc<MessageCounters>) -> Self {
        Pump {
            scan: Scanner::new(from, max_message),
            spill: Vec::new(),
            spill_ends: Vec::new(),
            chunk,
            unflushed: false,
            armed: false,
            last_seen: Instant::now(),
            heard: false,
            counters,
            messages_read: 0,
            messages_dropped: 0,
            sent_close: None,
        }
    }

    /// Polling this direction now would do nothing but register the
    /// task's waker with the source again: it is still registered since
    /// the last poll, nothing waits to be written, and the source has
    /// nothing (`source_surely_pending`, see
    /// [`crate::transport::upgraded::UpgradedIo::read_surely_pending`]). Every wake
    /// of a session polled both directions, and the one that did not wake
    /// it cost a lock pair and about 150 instructions for nothing.
    fn asleep(&self, source_surely_pending: impl FnOnce() -> bool) -> bool {
        self.armed && self.spill.is_empty() && !self.unflushed && source_surely_pending()
    }

    fn to(&self) -> Side {
        match self.scan.from {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// Queues a ping of the broker's own; see [`Pump::inject`].
    fn ping(&mut self) -> bool {
        self.inject(Frame::ping(ping_payload()))
    }

    /// Queues a frame of the broker's own; only at a frame boundary.
    fn inject(&mut self, frame: Frame) -> bool {
        if !self.scan.at_boundary() {
            return false;
        }
        let to = self.to();
        own_frame(frame, to, &mut self.spill);
        true
    }

    /// Scans `chunk` (see [`Scanner::scan`]), counting what completes as
    /// it goes, and noting in `ends` where each message ends in `out`.
    fn scan(
        &mut self,
        chunk: &[u8],
        out: &mut Out,
        ends: &mut Vec<usize>,
        metrics: &Metrics,
        upstream: &str,
    ) -> Result<(), WsError> {
        let to = self.to();
        let Pump {
            scan,
            counters,
            messages_read,
            sent_close,
            ..
        } = self;
        scan.scan(chunk, out, &mut |seen| match seen {
            Seen::Message { kind, len, end } => {
                *messages_read += 1;
                ends.push(end);
                match kind {
                    Kind::Text => counters.text(len as usize),
                    Kind::Binary => counters.binary(len as usize),
                }
            }
            // Only valid codes pass (see `check_close`).
            Seen::Close { code } => {
                *sent_close = Some(code);
                metrics.close_sent(upstream, to, code);
            }
        })
    }

    /// Writes the spill to `dst` as far as it will take it.
    #[inline]
    fn poll_drain<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        // Nearly always: checked before every read.
        if self.spill.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.poll_drain_spill(dst, cx)
    }

    fn poll_drain_spill<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        while !self.spill.is_empty() {
            let n = std::task::ready!(Pin::new(&mut *dst).poll_write(cx, &self.spill))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.spill.drain(..n);
            self.spill_ends.retain_mut(|end| {
                *end = end.saturating_sub(n);
                *end > 0
            });
            self.unflushed = true;
        }
        // Give the memory back: an idle session holds no buffer.
        if self.spill.capacity() > 0 {
            self.spill = Vec::new();
            self.spill_ends = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bytes` to `dst`, spilling what it will not take now (or,
    /// after an error, cannot: it is then counted as lost at the session's
    /// end). The spill must be empty.
    fn write_or_spill<W>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
        mut bytes: &[u8],
    ) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let mut result = Ok(());
        while !bytes.is_empty() && self.spill.is_empty() {
            match Pin::new(&mut *dst).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => result = Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    bytes = &bytes[n..];
                    self.unflushed = true;
                    continue;
                }
                Poll::Ready(Err(e)) => result = Err(e),
                Poll::Pending => {}
            }
            break;
        }
        self.spill.extend_from_slice(bytes);
        result
    }

    /// Writes what scanning a chunk put in `out` (the chunk's messages
    /// ending at `ends`), spilling what `dst` does not take, and notes
    /// which messages end in the spill.
    fn write_out<W>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
        chunk: &[u8],
        out: &Out,
        ends: &[usize],
    ) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let mut written = self.write_or_spill(dst, cx, &chunk[out.direct.clone()]);
        if !out.owned.is_empty() {
            // After a partial or failed write the spill holds the rest, and
            // the owned bytes join it behind that.
            written = written.and(self.write_or_spill(dst, cx, &out.owned));
        }
        if !self.spill.is_empty() {
            let taken = out.len() - self.spill.len();
            self.spill_ends.extend(
                ends.iter()
                    .filter(|&&end| end > taken)
                    .map(|end| end - taken),
            );
        }
        written
    }

    /// Counts the messages still in the spill as dropped: the session has
    /// ended, and the destination will not take them.
    fn drop_spill(&mut self, metrics: &Metrics, upstream: &str) {
        let lost = self.spill_ends.len() as u64;
        self.spill = Vec::new();
        self.spill_ends = Vec::new();
        self.count_dropped(lost, metrics, upstream);
    }

    /// Counts `n` messages from the source that the session's end kept
    /// from the destination.
    fn count_dropped(&mut self, n: u64, metrics: &Metrics, upstream: &str) {
        self.messages_dropped += n;
        let direction = Direction::read_from(self.scan.from);
        metrics.messages_dropped(upstream, direction, "session_closed", n);
    }

    fn poll_flush<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(Pin::new(&mut *dst).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// Moves bytes from `src` to `dst` until neither can make progress,
    /// reading into `buf` (the loop's buffer, so that it costs an idle
    /// session nothing; see [`chunked::with_read_buffer`]).
    fn poll_pump<R, W>(
        &mut self,
        src: &mut R,
        dst: &mut W,
        cx: &mut Context<'_>,
        buf: &mut [MaybeUninit<u8>],
        metrics: &Metrics,
        upstream: &Upstream,
    ) -> Poll<PumpEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let chunk = self.chunk.min(buf.len());
        let buf = &mut buf[..chunk];
        self.armed = false;
        for _ in 0..READS_PER_TURN {
            match self.poll_drain(dst, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::Write(e)),
                // `dst` is full: leave `src` unread.
                Poll::Pending => return self.flush_then_pending(dst, cx),
            }
            let mut read = ReadBuf::uninit(&mut *buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Registered with the socket, unless the task ran out
                    // of coop budget: tokio then woke it instead.
                    self.armed = tokio::task::coop::has_budget_remaining();
                    return self.flush_then_pending(dst, cx);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::Read(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    return Poll::Ready(PumpEnd::Eof)
                }
                Poll::Ready(Ok(())) => {}
            }
            self.heard = true;
            let chunk = read.filled();
            let mut out = Out::default();
            let (scanned, written) = MESSAGE_ENDS.with_borrow_mut(|ends| {
                ends.clear();
                let scanned = self.scan(chunk, &mut out, ends, metrics, &upstream.name);
                // What came before a bad frame is still written.
                (scanned, self.write_out(dst, cx, chunk, &out, ends))
            });
            if let Err(e) = written {
                return Poll::Ready(PumpEnd::Write(e));
            }
            if let Err(e) = scanned {
                return Poll::Ready(PumpEnd::Bad(e));
            }
        }
        cx.waker().wake_by_ref();
        self.flush_then_pending(dst, cx)
    }

    fn flush_then_pending<W>(&mut self, dst: &mut W, cx: &mut Context<'_>) -> Poll<PumpEnd>
    where
        W: AsyncWrite + Unpin,
    {
        match self.poll_flush(dst, cx) {
            Poll::Ready(Err(e)) => Poll::Ready(PumpEnd::Write(e)),
            _ => Poll::Pending,
        }
    }
}

/// The stop a direction's end means for the session.
fn stop_of(end: PumpEnd, from: Side, to: Side, closed: bool) -> Stop {
    match end {
        PumpEnd::Eof if closed => Stop::Ended {
            side: from,
            clean: true,
        },
        PumpEnd::Eof => Stop::ReadFailed {
            side: from,
            error: WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        },
        PumpEnd::Read(e) => Stop::ReadFailed {
            side: from,
            error: WsError::Io(e),
        },
        PumpEnd::Write(e) => Stop::WriteFailed {
            side: to,
            error: WsError::Io(e),
        },
        PumpEnd::Bad(error) => Stop::ReadFailed { side: from, error },
    }
}

/// Relays between `client` and `upstream` frame by frame until the session
/// ends, then closes both sides as [`super::super::decide`] says.
///
/// This future is most of an idle session's memory, so what it holds
/// across awaits is kept small: the upstream connection comes boxed (an
/// async fn keeps its arguments for its whole life, and copies them once
/// more into locals), and the rare ending is a boxed future of its own.
pub(in crate::direct) async fn run(
    session: Box<DirectSession>,
    on_upgrade: OnUpgrade,
    connected: Box<Connected>,
) {
    let mut client = match upgraded::client(on_upgrade).await {
        Ok(client) => client,
        Err(error) => return Box::pin(super::super::abandon(session, *connected, error)).await,
    };
    // Out of its box, which is freed here rather than when this future ends.
    let mut upstream = unbox(connected).io;
    // Settings, names and metrics are looked up through `session` where
    // they are used rather than held in locals of their own, which would
    // be kept for the session's life.
    let (mut up, mut down) = {
        let ws = &session.upstream.config.websocket_config;
        let name = &*session.upstream.name;
        let metrics = &*session.metrics;
        let max = ws.max_message_size.bytes() as u64;
        let chunk = chunked::read_chunk(ws.read_buffer_size.bytes());
        let counters = |direction| metrics.message_counters(name, direction);
        info!(
            session = %session.guard.handle.id,
            upstream = %name,
            target_url = %session.lease.target().label,
            mode = "direct",
            relay = "frames",
            remote = %session.guard.handle.remote,
            request_id = %session.guard.handle.request_id,
            "session opened"
        );
        (
            Pump::new(
                Side::Client,
                max,
                chunk,
                counters(Direction::ClientToUpstream),
            ),
            Pump::new(
                Side::Upstream,
                max,
                chunk,
                counters(Direction::UpstreamToClient),
            ),
        )
    };
    // When both sides are next pinged.
    let mut next_ping = Instant::now() + session.upstream.config.websocket_config.ping_period;
    // The timer is the next ping, or the moment a silent side will have gone
    // unheard for pong_wait; it is moved only when it fires.
    let alarms = Alarms::new(
        session.guard.handle.cancel.clone(),
        timer_deadline(&session, &up, &down, next_ping),
    );
    tokio::pin!(alarms);
    let stop = loop {
        tokio::select! {
            biased;
            alarm = &mut alarms => {
                if alarm == Alarm::Shutdown {
                    break Stop::Shutdown;
                }
                let ws = &session.upstream.config.websocket_config;
                let now = Instant::now();
                // A side left unread because the other is backed up cannot
                // be blamed for silence.
                for pump in [&mut up, &mut down] {
                    if std::mem::take(&mut pump.heard) || !pump.spill.is_empty() {
                        pump.last_seen = now;
                    }
                }
                if now >= up.last_seen + ws.pong_wait {
                    break Stop::PingTimeout { side: Side::Client };
                }
                if now >= down.last_seen + ws.pong_wait {
                    break Stop::PingTimeout { side: Side::Upstream };
                }
                if now >= next_ping {
                    down.ping();
                    up.ping();
                    next_ping = now + ws.ping_period;
                }
                alarms.as_mut().reset(timer_deadline(&session, &up, &down, next_ping));
            }
            // Both directions read into the loop's one buffer.
            // A direction whose source did not wake the task is skipped.
            stop = poll_fn(|cx| chunked::with_read_buffer(up.chunk.max(down.chunk), |buf| {
                let polled = if up.asleep(|| client.read_surely_pending()) {
                    Poll::Pending
                } else {
                    up.poll_pump(&mut client, &mut upstream, cx, buf, &session.metrics, &session.upstream)
                };
                if let Poll::Ready(end) = polled {
                    let closed = up.scan.closed.is_some();
                    return Poll::Ready(stop_of(end, Side::Client, Side::Upstream, closed));
                }
                if handshake_done(&up, &down) {
                    return Poll::Ready(Stop::Ended { side: Side::Client, clean: true });
                }
                let polled = if down.asleep(|| upstream.read_surely_pending()) {
                    Poll::Pending
                } else {
                    down.poll_pump(&mut upstream, &mut client, cx, buf, &session.metrics, &session.upstream)
                };
                if let Poll::Ready(end) = polled {
                    let closed = down.scan.closed.is_some();
                    return Poll::Ready(stop_of(end, Side::Upstream, Side::Client, closed));
                }
                if handshake_done(&up, &down) {
                    return Poll::Ready(Stop::Ended { side: Side::Upstream, clean: true });
                }
                Poll::Pending
            })) => break stop,
        }
    };
    Box::pin(end(session, client, upstream, up, down, stop)).await;
}

/// Both sides' close frames have passed: the closing handshake is done, and
/// the relay ends without waiting for either side to drop its connection
/// (a server closes it first, RFC 6455 §7.1.1: the broker does so toward
/// the client, and gives the upstream `close_timeout` to do so).
fn handshake_done(up: &Pump, down: &Pump) -> bool {
    up.scan.closed.is_some() && down.scan.closed.is_some()
}

/// When a relay's timer is next due: the next ping, or the moment a side
/// last heard at `last_seen` has been silent for `pong_wait`.
fn timer_deadline(session: &DirectSession, up: &Pump, down: &Pump, next_ping: Instant) -> Instant {
    let pong_wait = session.upstream.config.websocket_config.pong_wait;
    next_ping
        .min(up.last_seen + pong_wait)
        .min(down.last_seen + pong_wait)
}

/// The value in `boxed`, freeing the box now (moving out with `*boxed`
/// frees it only at the end of the scope, in a future at its very end).
#[allow(clippy::boxed_local)] // taking the box is the point
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Closes both sides of a relay that stopped for `stop`, then logs the
/// session's end.
async fn end(
    mut session: Box<DirectSession>,
    mut client: ClientIo,
    mut upstream: UpstreamIo,
    mut up: Pump,
    mut down: Pump,
    stop: Stop,
) {
    let ending = conclude(&session, &stop);
    let DirectSession {
        permit,
        upstream: config,
        metrics,
        ..
    } = &mut *session;
    let (ws, name) = (&config.config.websocket_config, &*config.name);
    let mut client_end = Closing::new(Side::Client, ending.client, ending.drop_client);
    let mut upstream_end = Closing::new(Side::Upstream, ending.upstream, ending.drop_upstream);
    let close_both = poll_fn(|cx| {
        let c = client_end.poll(
            &mut client,
            &mut down,
            &mut up,
            cx,
            (metrics, name),
            Some(permit),
        );
        let u = upstream_end.poll(&mut upstream, &mut up, &mut down, cx, (metrics, name), None);
        match (c, u) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    });
    let timed_out = tokio::time::timeout(ws.close_timeout, close_both)
        .await
        .is_err();
    // What the destination did not take before the end is lost.
    up.drop_spill(metrics, name);
    down.drop_spill(metrics, name);
    if timed_out {
        debug!(session = %session.guard.handle.id, "close handshake timed out");
    }
    let client_summary = LegSummary {
        side: Side::Client,
        messages_read: up.messages_read,
        messages_dropped: up.messages_dropped,
        sent_close: down.sent_close,
    };
    let upstream_summary = LegSummary {
        side: Side::Upstream,
        messages_read: down.messages_read,
        messages_dropped: down.messages_dropped,
        sent_close: up.sent_close,
    };
    log_end(&session, &ending.cause, client_summary, upstream_summary);
    // Before the sockets (see `log_end`).
    drop(session);
}

/// Where the end of one side stands.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Writing what is owed to the side, then the broker's close.
    Writing,
    /// Reading until the side answers the close (or, for the upstream,
    /// until it closes the connection, as a server does).
    Reading,
    ShuttingDown,
    /// Reading what the side still sends after the broker shut its
    /// connection down, until it closes its own (see [`Closing::poll`]).
    Draining,
    Done,
}

/// Ends one side: see [`Closing::poll`].
struct Closing {
    side: Side,
    frame: Option<CloseFrame>,
    phase: Phase,
    /// The side was owed the broker's close but is in the middle of a
    /// frame from the other side: it is shut down without one, at once,
    /// rather than read for an answer that cannot come (until
    /// `close_timeout`).
    unanswerable: bool,
    /// After shutting the connection down, read until the side closes its
    /// own (rather than drop it with unread bytes, which resets it).
    drain: bool,
}

impl Closing {
    fn new(side: Side, frame: Option<CloseFrame>, drop: bool) -> Self {
        Closing {
            side,
            frame,
            unanswerable: false,
            drain: false,
            phase: if drop {
                Phase::ShuttingDown
            } else {
                Phase::Writing
            },
        }
    }

    /// Writes what `toward` still owes the side and the close frame (if no
    /// close has passed either way and no frame is half written), then
    /// reads the side (through `from`, writing nothing on: the session is
    /// over, so its messages are counted as dropped) until it answers,
    /// then shuts the connection down. `permit` (the client side's) is
    /// released first, so a client that sees its connection end finds its
    /// slot free, even while the upstream side is still closing.
    fn poll<X>(
        &mut self,
        x: &mut X,
        toward: &mut Pump,
        from: &mut Pump,
        cx: &mut Context<'_>,
        (metrics, upstream): (&Metrics, &str),
        mut permit: Option<&mut ConnectionPermit>,
    ) -> Poll<()>
    where
        X: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            match self.phase {
                Phase::Writing => {
                    if let Some(frame) = self.frame.take() {
                        let code = u16::from(frame.code);
                        // A side whose close passed awaits the other
                        // side's answer; one whose close was refused (or
                        // came behind a broken rule) gets the broker's.
                        let owed = from.scan.closed.is_none() || from.scan.poisoned;
                        if toward.sent_close.is_none() && owed {
                            if toward.inject(Frame::close(Some(frame))) {
                                toward.sent_close = Some(code);
                                metrics.close_sent(upstream, self.side, code);
                            } else {
                                // In the middle of a frame toward the side:
                                // no close can go, so none will be answered.
                                self.unanswerable = true;
                            }
                        }
                    }
                    let written = match std::task::ready!(toward.poll_drain(x, cx)) {
                        Ok(()) => std::task::ready!(toward.poll_flush(x, cx)),
                        Err(e) => Err(e),
                    };
                    self.phase = match written {
                        Ok(()) if !self.unanswerable => Phase::Reading,
                        _ => Phase::ShuttingDown,
                    };
                }
                Phase::Reading => {
                    let answered = from.scan.closed.is_some() && self.side == Side::Client;
                    // A client refused inside a frame of its own cannot
                    // answer recognisably (its close lands inside that
                    // frame): the broker, a server, closes first and reads
                    // on until the client closes too.
                    let unrecognisable = from.scan.poisoned && !from.scan.between_frames();
                    if answered || (unrecognisable && self.side == Side::Client) {
                        self.phase = Phase::ShuttingDown;
                        self.drain = unrecognisable && !answered;
                        continue;
                    }
                    match std::task::ready!(poll_discard(x, from, cx, metrics, upstream)) {
                        true => {}
                        false => self.phase = Phase::ShuttingDown,
                    }
                }
                Phase::ShuttingDown => {
                    if let Some(permit) = permit.as_deref_mut() {
                        permit.release();
                    }
                    let _ = std::task::ready!(Pin::new(&mut *x).poll_shutdown(cx));
                    self.phase = if self.drain {
                        Phase::Draining
                    } else {
                        Phase::Done
                    };
                }
                Phase::Draining => {
                    if !std::task::ready!(poll_discard(x, from, cx, metrics, upstream)) {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Reads what `x` sends after the session ended, through `from`'s scanner,
/// counting its messages as dropped. Ready(true) once something was read,
/// Ready(false) at the end of the stream or on an error.
fn poll_discard<X>(
    x: &mut X,
    from: &mut Pump,
    cx: &mut Context<'_>,
    metrics: &Metrics,
    upstream: &str,
) -> Poll<bool>
where
    X: AsyncRead + Unpin,
{
    let mut dropped = 0u64;
    let scanned = chunked::with_read_buffer(from.chunk, |buf| {
        let mut read = ReadBuf::uninit(buf);
        match Pin::new(&mut *x).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {}
            Poll::Ready(_) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
        Poll::Ready(Some(from.scan.scan(
            read.filled(),
            &mut Out::default(),
            &mut |seen| dropped += u64::from(matches!(seen, Seen::Message { .. })),
        )))
    });
    let Some(scanned) = std::task::ready!(scanned) else {
        return Poll::Ready(false);
    };
    from.count_dropped(dropped, metrics, upstream);
    Poll::Ready(scanned.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    /// The wire bytes of `frame`, masked with `mask` when given.
    fn wire(mut frame: Frame, mask: Option<[u8; 4]>) -> Vec<u8> {
        frame.header_mut().mask = mask;
        let mut out = Vec::new();
        encode(frame, &mut out);
        out
    }

    fn text(s: &[u8], fin: bool, mask: Option<[u8; 4]>) -> Vec<u8> {
        wire(
            Frame::message(s.to_vec(), OpCode::Data(Data::Text), fin),
            mask,
        )
    }

    /// Scans `bytes` split into pieces of `step`, returning what would be
    /// written on and what was seen.
    fn scan_in_steps(
        scanner: &mut Scanner,
        bytes: &[u8],
        step: usize,
    ) -> (Vec<u8>, Vec<Seen>, Result<(), WsError>) {
        let (mut written, mut seen) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(step) {
            let mut out = Out::default();
            // Message ends as positions in everything written on.
            let base = written.len();
            let r = scanner.scan(piece, &mut out, &mut |s| {
                seen.push(match s {
                    Seen::Message { kind, len, end } => Seen::Message {
                        kind,
                        len,
                        end: base + end,
                    },
                    close => close,
                })
            });
            written.extend_from_slice(&piece[out.direct.clone()]);
            written.extend_from_slice(&out.owned);
            if r.is_err() {
                return (written, seen, r);
            }
        }
        (written, seen, Ok(()))
    }

    const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    #[test]
    fn a_sessions_future_does_not_grow_unnoticed() {
        // tokio allocates a task in 128-byte steps, and this future is most
        // of an idle session's memory. In release builds it is 984 B, in a
        // task of 1,152 B. Debug builds lay it out a little larger. Before
        // raising the bound, check the release task's size:
        // `RUSTC_BOOTSTRAP=1 cargo rustc --release --lib -- -Zprint-type-sizes`,
        // the `Cell<TrackedFuture<Either<{async fn body of
        // direct::passthrough::run()}, ..>>, ..>`.
        fn size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(run);
        assert!(size <= 1_008, "the session's future grew to {size} B");
    }

    #[test]
    fn passes_frames_unchanged_however_the_reads_cut_them() {
        let mut stream = text("héllo".as_bytes(), false, MASK);
        stream.extend(wire(Frame::ping(b"p".to_vec()), MASK));
        stream.extend(wire(
            Frame::message(
                "wörld".as_bytes().to_vec(),
                OpCode::Data(Data::Continue),
                true,
            ),
            MASK,
        ));
        let text_end = stream.len();
        stream.extend(wire(
            Frame::message(vec![7u8; 70_000], OpCode::Data(Data::Binary), true),
            MASK,
        ));
        let binary_end = stream.len();
        stream.extend(wire(
            Frame::close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })),
            MASK,
        ));
        for step in [1, 2, 3, 7, 13, 100, 4096, stream.len()] {
            let mut s = Scanner::new(Side::Client, 1 << 20);
            let (written, seen, r) = scan_in_steps(&mut s, &stream, step);
            r.unwrap();
            assert_eq!(written, stream, "step {step}");
            assert_eq!(
                seen,
                vec![
                    Seen::Message {
                        kind: Kind::Text,
                        len: 12,
                        end: text_end,
                    },
                    Seen::Message {
                        kind: Kind::Binary,
                        len: 70_000,
                        end: binary_end,
                    },
                    Seen::Close { code: 1000 },
                ],
                "step {step}"
            );
            assert!(s.at_boundary());
            assert_eq!(s.closed, Some(1000));
        }
    }

    #[test]
    fn enforces_masking_by_side() {
        let mut s = Scanner::new(Side::Client, 1024);
        let (_, _, r) = scan_in_steps(&mut s, &text(b"x", true, None), 64);
        assert!(matches!(
            r,
            Err(WsError::Protocol(ProtocolError::UnmaskedFrameFromClient))
        ));
        let mut s = Scanner::new(Side::Upstream, 1024);
        let (_, _, r) = scan_in_steps(&mut s, &text(b"x", true, MASK), 64);
        assert!(matches!(
            r,
            Err(WsError::Protocol(ProtocolError::MaskedFrameFromServer))
        ));
    }

    #[test]
    fn a_message_over_the_limit_passes_nothing_of_its_frame() {
        let mut stream = text(b"ok", true, None);
        let ok_len = stream.len();
        stream.extend(text(&[b'a'; 600], false, None));
        stream.extend(wire(
            Frame::message(vec![b'b'; 600], OpCode::Data(Data::Continue), true),
            None,
        ));
        let mut s = Scanner::new(Side::Upstream, 1000);
        let (written, _, r) = scan_in_steps(&mut s, &stream, 5000);
        assert!(matches!(
            r,
            Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))
        ));
        // The first fragment (600 <= 1000) passed; the second did not.
        assert_eq!(written.len(), ok_len + 2 + 2 + 600);
    }

    #[test]
    fn text_must_be_utf8_even_cut_inside_a_character() {
        let good = "a€b".as_bytes();
        for step in 1..8 {
            let mut s = Scanner::new(Side::Client, 1024);
            let (_, seen, r) = scan_in_steps(&mut s, &text(good, true, MASK), step);
            r.unwrap();
            assert_eq!(seen.len(), 1);
            let mut s = Scanner::new(Side::Client, 1024);
            let (_, _, r) = scan_in_steps(&mut s, &text(&[0x68, 0xff, 0xfe], true, MASK), step);
            assert!(matches!(r, Err(WsError::Utf8(_))), "step {step}");
        }
        // A character split across two fragments is fine; one left open at
        // the end of the message is not.
        let mut stream = text(&good[..2], false, MASK);
        stream.extend(wire(
            Frame::message(good[2..].to_vec(), OpCode::Data(Data::Continue), true),
            MASK,
        ));
        let mut s = Scanner::new(Side::Client, 1024);
        scan_in_steps(&mut s, &stream, 3).2.unwrap();
        let mut s = Scanner::new(Side::Client, 1024);
        let r = scan_in_steps(&mut s, &text(&good[..2], true, MASK), 64).2;
        assert!(matches!(r, Err(WsError::Utf8(_))));
    }

    /// A destination socket that takes `room` more bytes, then waits (or
    /// fails, if `fails`).
    struct Destination {
        room: usize,
        fails: bool,
        taken: Vec<u8>,
    }

    impl AsyncWrite for Destination {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.room == 0 {
                return match self.fails {
                    true => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    false => Poll::Pending,
                };
            }
            let n = self.room.min(buf.len());
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn dropped(metrics: &Metrics) -> String {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("muxgate_messages_dropped_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Three 16-byte client frames relayed into a destination that takes
    /// 20 bytes: the second and third end in the spill. As the spill
    /// drains, the second is delivered; when the session ends, the third
    /// is counted as dropped.
    #[test]
    fn messages_left_in_the_spill_at_the_end_are_counted_as_dropped() {
        for fails in [false, true] {
            let metrics = Metrics::new();
            let counters = metrics.message_counters("u", Direction::ClientToUpstream);
            let mut pump = Pump::new(Side::Client, 1024, 4096, counters);
            let mut chunk = Vec::new();
            for i in 0..3u8 {
                let frame = Frame::message(vec![i; 10], OpCode::Data(Data::Binary), true);
                chunk.extend(wire(frame, MASK));
            }
            assert_eq!(chunk.len(), 48);
            let (mut out, mut ends) = (Out::default(), Vec::new());
            pump.scan(&chunk, &mut out, &mut ends, &metrics, "u")
                .unwrap();
            assert_eq!(ends, [16, 32, 48]);
            let mut dst = Destination {
                room: 20,
                fails,
                taken: Vec::new(),
            };
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let written = pump.write_out(&mut dst, &mut cx, &chunk, &out, &ends);
            assert_eq!(written.is_err(), fails);
            assert_eq!(pump.spill, chunk[20..]);
            assert_eq!(pump.spill_ends, [12, 28], "fails: {fails}");
            if !fails {
                dst.room = 15;
                assert!(pump.poll_drain(&mut dst, &mut cx).is_pending());
                assert_eq!(pump.spill_ends, [13], "the second message went out");
            }
            pump.drop_spill(&metrics, "u");
            let lost = if fails { 2 } else { 1 };
            assert_eq!(pump.messages_dropped, lost);
            assert_eq!(
                dropped(&metrics),
                format!(
                    "muxgate_messages_dropped_total{{direction=\"client_to_upstream\",\
                     reason=\"session_closed\",upstream=\"u\"}} {lost}"
                )
            );
            assert!(pump.spill.is_empty() && pump.spill_ends.is_empty());
        }
    }

    /// A destination that takes the whole chunk leaves nothing to count.
    #[test]
    fn a_chunk_written_whole_leaves_no_message_in_the_spill() {
        let metrics = Metrics::new();
        let counters = metrics.message_counters("u", Direction::UpstreamToClient);
        let mut pump = Pump::new(Side::Upstream, 1024, 4096, counters);
        let chunk = wire(
            Frame::message(vec![1; 10], OpCode::Data(Data::Binary), true),
            None,
        );
        let (mut out, mut ends) = (Out::default(), Vec::new());
        pump.scan(&chunk, &mut out, &mut ends, &metrics, "u")
            .unwrap();
        let mut dst = Destination {
            room: 100,
            fails: false,
            taken: Vec::new(),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        pump.write_out(&mut dst, &mut cx, &chunk, &out, &ends)
            .unwrap();
        assert_eq!(dst.taken, chunk);
        assert!(pump.spill.is_empty() && pump.spill_ends.is_empty());
        pump.drop_spill(&metrics, "u");
        assert_eq!(pump.messages_dropped, 0);
        assert_eq!(dropped(&metrics), "");
    }

    #[test]
    fn the_brokers_own_pongs_stop_here_and_others_pass() {
        let ours = wire(Frame::pong(ping_payload().to_vec()), MASK);
        let theirs = wire(Frame::pong(b"app".to_vec()), MASK);
        let mut s = Scanner::new(Side::Client, 1024);
        let (written, _, r) = scan_in_steps(&mut s, &[ours, theirs.clone()].concat(), 3);
        r.unwrap();
        assert_eq!(written, theirs);
    }

    #[test]
    fn a_close_that_breaks_a_rule_is_refused_from_either_side() {
        let close_with = |payload: &[u8], mask| {
            let mut frame = wire(Frame::close(None), None);
            frame[1] = payload.len() as u8;
            frame.extend_from_slice(payload);
            if let Some(mask) = mask {
                frame[1] |= 0x80;
                frame.splice(2..2, mask);
                unmask(&mut frame[6..], mask, 0);
            }
            frame
        };
        let mut bad: Vec<Vec<u8>> = [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
        ]
        .iter()
        .map(|code| code.to_be_bytes().to_vec())
        .collect();
        bad.push(vec![0x03]);
        bad.push(vec![0x03, 0xE8, b'a', 0xff]);
        for (from, mask) in [(Side::Upstream, None), (Side::Client, MASK)] {
            for payload in &bad {
                for step in [1, 3, 64] {
                    let mut s = Scanner::new(from, 1024);
                    let (written, seen, r) =
                        scan_in_steps(&mut s, &close_with(payload, mask), step);
                    let expected_utf8 = payload.len() > 2;
                    match r {
                        Err(WsError::Utf8(_)) if expected_utf8 => {}
                        Err(WsError::Protocol(ProtocolError::InvalidCloseSequence))
                            if !expected_utf8 => {}
                        other => panic!("{from:?} {payload:?}: {other:?}"),
                    }
                    assert!(written.is_empty(), "{payload:?} passed");
                    assert!(seen.is_empty(), "{payload:?} seen");
                    assert_eq!(s.closed, Some(close::PROTOCOL_ERROR));
                }
            }
            // The codes an endpoint may send pass unchanged, 1014 included.
            for code in [1000u16, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999] {
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice("é".as_bytes());
                let frame = close_with(&payload, mask);
                let mut s = Scanner::new(from, 1024);
                let (written, seen, r) = scan_in_steps(&mut s, &frame, 3);
                r.unwrap();
                assert_eq!(written, frame);
                assert_eq!(seen, vec![Seen::Close { code }]);
            }
        }
    }

    #[test]
    fn a_frame_refused_at_its_header_leaves_the_destination_at_a_boundary() {
        // Header only, payload to come: with RSV1, nothing of it passed.
        let mut s = Scanner::new(Side::Upstream, 1024);
        let (written, _, r) = scan_in_steps(&mut s, &[0xc1, 10, b'a'], 1);
        assert!(r.is_err() && written.is_empty());
        assert!(s.at_boundary());
        // Refused inside its payload: its start went on.
        let mut s = Scanner::new(Side::Upstream, 1024);
        let (written, _, r) = scan_in_steps(&mut s, &[0x81, 10, b'a', 0xff], 64);
        assert!(matches!(r, Err(WsError::Utf8(_))));
        assert_eq!(written, [0x81, 10], "the header went on");
        assert!(!s.at_boundary());
        // Even once the refused frame has ended.
        let mut s = Scanner::new(Side::Upstream, 1024);
        let (written, _, r) = scan_in_steps(&mut s, &[0x81, 2, b'a', 0xff], 64);
        assert!(matches!(r, Err(WsError::Utf8(_))));
        assert_eq!(written, [0x81, 2]);
        assert!(!s.at_boundary());
    }

    #[test]
    fn past_a_broken_rule_nothing_passes_but_the_close_behind_it_is_seen() {
        let close = wire(
            Frame::close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })),
            MASK,
        );
        let bad_text = text(&[b'a', 0xff, b'b', b'c'], true, MASK);
        let oversized = wire(
            Frame::message(vec![1u8; 2000], OpCode::Data(Data::Binary), true),
            MASK,
        );
        let ok = text(b"ok", true, MASK);
        // What may pass: text before the bad byte (it went on before the
        // byte arrived), none of a frame refused by its header.
        let reserved_opcode = vec![0x83, 0x82, 1, 2, 3, 4, 9, 9];
        let too_big_close = {
            let mut f = close.clone();
            f[1] = 0x80 | 126;
            f.splice(2..2, [0, 126]);
            f.extend(vec![0u8; 126 - (f.len() - 8)]);
            f
        };
        for (bad, may_pass) in [
            (bad_text, 6 + 1),
            (oversized, 0),
            (reserved_opcode, 0),
            (too_big_close, 0),
        ] {
            let stream = [ok.clone(), bad, close.clone()].concat();
            for step in [3, 64, 5000] {
                let mut s = Scanner::new(Side::Client, 1024);
                let (mut written, mut first_error) = (Vec::new(), None);
                for piece in stream.chunks(step) {
                    let mut out = Out::default();
                    let r = s.scan(piece, &mut out, &mut |_| {});
                    written.extend_from_slice(&piece[out.direct.clone()]);
                    written.extend_from_slice(&out.owned);
                    if let Err(e) = r {
                        assert!(first_error.is_none(), "one error, reported once");
                        first_error = Some(e);
                    }
                }
                assert!(first_error.is_some(), "step {step}");
                assert!(stream.starts_with(&written), "step {step}");
                assert!(written.len() >= ok.len(), "step {step}");
                assert!(written.len() <= ok.len() + may_pass, "step {step}");
                assert_eq!(s.closed, Some(1000), "step {step}");
            }
        }
    }

    /// Frames of every kind, in an order drawn from `seed`: data frames
    /// whole and fragmented, good and bad UTF-8, over the size limit,
    /// unmasked, with reserved bits or opcodes, and control frames.
    fn random_frames(seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut stream = Vec::new();
        for _ in 0..40 {
            let len = [0, 5, 64, 125, 126, 300, 70_000][next(7) as usize];
            let fin = next(4) != 0;
            let mask = if next(30) == 0 { None } else { MASK };
            let mut frame = match next(9) {
                0..=2 => wire(
                    Frame::message(vec![b'a'; len], OpCode::Data(Data::Text), fin),
                    mask,
                ),
                3 => wire(
                    Frame::message(
                        "é".repeat(len / 2).into_bytes(),
                        OpCode::Data(Data::Text),
                        fin,
                    ),
                    mask,
                ),
                4 => {
                    // Cut inside a character, or not UTF-8 at all.
                    let bytes = [&b"ab\xC3"[..], b"\xFF\xFE"][next(2) as usize].to_vec();
                    wire(Frame::message(bytes, OpCode::Data(Data::Text), fin), mask)
                }
                5 => wire(
                    Frame::message(vec![1u8; len], OpCode::Data(Data::Binary), fin),
                    mask,
                ),
                6 => wire(
                    Frame::message(vec![b'c'; len], OpCode::Data(Data::Continue), fin),
                    mask,
                ),
                7 => wire(Frame::ping(vec![0u8; len.min(125)]), mask),
                _ => wire(Frame::pong(b"pong".to_vec()), mask),
            };
            match next(40) {
                0 => frame[0] |= 0x40,
                1 => frame[0] = (frame[0] & 0xF0) | 0x3,
                _ => {}
            }
            stream.extend(frame);
        }
        stream
    }

    #[test]
    fn the_shortcut_for_whole_data_frames_changes_nothing() {
        for seed in 1..300 {
            let stream = random_frames(seed);
            for step in [stream.len(), 100, 7] {
                let run = |shortcut| {
                    let mut s = Scanner::new(Side::Client, 1000);
                    s.shortcut = shortcut;
                    let (written, seen, r) = scan_in_steps(&mut s, &stream, step);
                    (written, seen, format!("{r:?}"), s.message, s.poisoned)
                };
                assert_eq!(run(true), run(false), "seed {seed}, step {step}");
            }
        }
    }

    #[test]
    fn rule_breaking_frames_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                wire(
                    Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true),
                    MASK,
                ),
                "continuation without a message",
            ),
            (
                [text(b"a", false, MASK), text(b"b", true, MASK)].concat(),
                "new message inside a message",
            ),
            (wire(Frame::ping(vec![0u8; 126]), MASK), "control too big"),
            (
                {
                    let mut f = text(b"x", true, MASK);
                    f[0] |= 0x40;
                    f
                },
                "reserved bit",
            ),
            (vec![0x83, 0x80, 0, 0, 0, 0], "reserved opcode"),
        ];
        for (bytes, what) in cases {
            let mut s = Scanner::new(Side::Client, 1024);
            assert!(scan_in_steps(&mut s, &bytes, 64).2.is_err(), "{what}");
        }
    }
}
