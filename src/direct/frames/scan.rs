//! The frame scanner: it follows one direction's byte stream frame by
//! frame, reading only headers (and the close and pong frames it holds
//! whole), to enforce the rules the broker keeps, check text for UTF-8 as
//! it passes, and say what to write on and what completed. It reads and
//! writes no socket; the pump feeds it.

use std::io::Cursor;
use std::ops::Range;
use std::sync::OnceLock;

use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::close;
use crate::session::side::Side;

/// The longest frame header (RFC 6455 §5.2).
const MAX_HEADER: usize = 14;
/// The largest control frame payload.
const MAX_CONTROL_PAYLOAD: u64 = 125;
/// The payload of the broker's pings, by which their pongs are known and
/// kept from the other side. Random per process, so that no peer's own
/// ping can carry it by chance and lose its pong, as a fixed payload
/// could.
pub(super) fn ping_payload() -> &'static [u8] {
    static PAYLOAD: OnceLock<String> = OnceLock::new();
    PAYLOAD
        .get_or_init(|| format!("muxgate:{:016x}", rand::random::<u64>()))
        .as_bytes()
}

/// The data message a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Binary,
}

/// Something the scanner saw complete.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
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
pub(super) struct Scanner {
    /// Frames from this side must be masked (it is the client), and must
    /// not be otherwise.
    pub(super) from: Side,
    max_message: u64,
    /// Header bytes of the next frame, held until the header is whole.
    head: [u8; MAX_HEADER],
    head_len: u8,
    frame: Option<InFrame>,
    /// The data message in progress and its size so far.
    message: Option<(Kind, u64)>,
    /// permessage-deflate was agreed between the peers: the first frame of
    /// a data message may set RSV1.
    deflate: bool,
    /// The message in progress is compressed (RSV1 on its first frame): its
    /// bytes are not text to check, and its size is the compressed one.
    compressed: bool,
    /// The close code this side sent, once its close frame has been read:
    /// passed on, or refused (1002 for one that breaks a rule itself; see
    /// `poisoned`).
    pub(super) closed: Option<u16>,
    utf8: Utf8Check,
    /// A frame broke the rules: nothing is passed on any more, but frames
    /// are still followed, so the side's answer to the broker's close is
    /// recognised behind the rest of the bad frame.
    pub(super) poisoned: bool,
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
pub(super) struct Out {
    pub(super) direct: Range<usize>,
    pub(super) owned: Vec<u8>,
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
    pub(super) fn len(&self) -> usize {
        self.direct.len() + self.owned.len()
    }
}

impl Scanner {
    pub(super) fn new(from: Side, max_message: u64) -> Self {
        Scanner {
            from,
            max_message,
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: None,
            message: None,
            deflate: false,
            compressed: false,
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

    /// The peers agreed permessage-deflate (RFC 7692): compressed messages
    /// pass as they are.
    pub(super) fn allow_compressed(&mut self) {
        self.deflate = true;
    }

    /// Notes the first broken rule; from now on nothing is passed on.
    fn poison(&mut self, error: WsError) {
        if !self.poisoned {
            self.poisoned = true;
            self.error = Some(Box::new(error));
        }
    }

    /// No frame of this side's is in progress (or its header is).
    pub(super) fn between_frames(&self) -> bool {
        self.frame.is_none()
    }

    /// No frame is partly written: the broker may write one of its own.
    pub(super) fn at_boundary(&self) -> bool {
        !self.cut && self.frame.as_ref().is_none_or(|f| !f.passing)
    }

    /// Follows `chunk`, noting in `out` what to write on and in `seen` what
    /// completed. Returns the first broken rule; nothing from where it is
    /// found on is passed on (see `poisoned`): none of a frame whose header
    /// breaks a rule, and none of a text frame from the read that holds its
    /// first bad byte.
    pub(super) fn scan(
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
        let compressed = self.compressed_with(data, &header);
        if kind == Kind::Text && !compressed {
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
        self.compressed = compressed;
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
            self.compressed = self.compressed_with(data, &header);
            frame.ends_message = header.is_final;
            frame.text = kind == Kind::Text && !self.compressed && !self.poisoned;
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

    /// Whether the message a data frame with `header` belongs to is
    /// compressed: its first frame says so, and its continuations follow.
    fn compressed_with(&self, data: Data, header: &FrameHeader) -> bool {
        match data {
            Data::Continue => self.compressed,
            _ => header.rsv1,
        }
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
        // permessage-deflate is the one extension passed through: RSV1, on
        // a data message's first frame only (RFC 7692 §6.1).
        let compressed_start =
            self.deflate && matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        if (header.rsv1 && !compressed_start) || header.rsv2 || header.rsv3 {
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
pub(super) fn encode(frame: Frame, out: &mut Vec<u8>) {
    frame.format(out).expect("writing to a Vec cannot fail");
}

/// A frame of the broker's own toward `to`: masked when `to` is the
/// upstream (the broker is its client).
pub(super) fn own_frame(mut frame: Frame, to: Side, out: &mut Vec<u8>) {
    if to == Side::Upstream {
        frame.header_mut().mask = Some(rand::random());
    }
    encode(frame, out);
}

#[cfg(test)]
mod tests {
    use super::super::testing::{wire, MASK};
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

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

    /// A data frame with RSV1 set: the first frame of a compressed message.
    fn compressed(payload: &[u8], opcode: OpCode, fin: bool, mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut frame = Frame::message(payload.to_vec(), opcode, fin);
        frame.header_mut().rsv1 = true;
        wire(frame, mask)
    }

    /// With permessage-deflate agreed, compressed messages pass whole and
    /// unchanged, in one frame or several, the shortcut and the slow path
    /// alike; their bytes (not text) are not checked as UTF-8, and their
    /// size is what crosses the wire.
    #[test]
    fn compressed_messages_pass_as_bytes_once_agreed() {
        // Not UTF-8 (compressed "Hello", RFC 7692 §7.2.3.1).
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let mut stream = compressed(&hello, OpCode::Data(Data::Text), true, MASK);
        let first_end = stream.len();
        stream.extend(compressed(
            &hello[..3],
            OpCode::Data(Data::Text),
            false,
            MASK,
        ));
        stream.extend(wire(
            Frame::message(hello[3..].to_vec(), OpCode::Data(Data::Continue), true),
            MASK,
        ));
        let second_end = stream.len();
        // An uncompressed text message between is still checked.
        stream.extend(text("plain".as_bytes(), true, MASK));
        let plain_end = stream.len();
        stream.extend(compressed(&[0x00], OpCode::Data(Data::Binary), true, MASK));
        for shortcut in [true, false] {
            for step in [1, 2, 5, stream.len()] {
                let mut s = Scanner::new(Side::Client, 1024);
                s.shortcut = shortcut;
                s.allow_compressed();
                let (written, seen, r) = scan_in_steps(&mut s, &stream, step);
                r.unwrap();
                assert_eq!(written, stream, "step {step}");
                assert_eq!(
                    seen,
                    vec![
                        Seen::Message {
                            kind: Kind::Text,
                            len: 7,
                            end: first_end
                        },
                        Seen::Message {
                            kind: Kind::Text,
                            len: 7,
                            end: second_end
                        },
                        Seen::Message {
                            kind: Kind::Text,
                            len: 5,
                            end: plain_end
                        },
                        Seen::Message {
                            kind: Kind::Binary,
                            len: 1,
                            end: stream.len()
                        },
                    ],
                    "step {step}, shortcut {shortcut}"
                );
            }
        }
        // An uncompressed text message is still checked once agreed.
        let mut s = Scanner::new(Side::Client, 1024);
        s.allow_compressed();
        let r = scan_in_steps(&mut s, &text(&[0xff], true, MASK), 64).2;
        assert!(matches!(r, Err(WsError::Utf8(_))));
        // The compressed size is the one held to max_message_size.
        let mut s = Scanner::new(Side::Upstream, 6);
        s.allow_compressed();
        let r = scan_in_steps(
            &mut s,
            &compressed(&hello, OpCode::Data(Data::Binary), true, None),
            64,
        )
        .2;
        assert!(matches!(r, Err(WsError::Capacity(_))));
    }

    /// RSV1 is refused where permessage-deflate allows none: without the
    /// extension, on a continuation, on a control frame; RSV2 and RSV3
    /// always.
    #[test]
    fn reserved_bits_outside_permessage_deflate_fail_the_session() {
        let refused = |agreed: bool, bytes: &[u8]| {
            for shortcut in [true, false] {
                let mut s = Scanner::new(Side::Client, 1024);
                s.shortcut = shortcut;
                if agreed {
                    s.allow_compressed();
                }
                let (written, _, r) = scan_in_steps(&mut s, bytes, 64);
                if !matches!(
                    r,
                    Err(WsError::Protocol(ProtocolError::NonZeroReservedBits))
                ) {
                    return false;
                }
                assert!(written.len() < bytes.len());
            }
            true
        };
        let first = compressed(b"ab", OpCode::Data(Data::Text), true, MASK);
        assert!(refused(false, &first), "RSV1 with no extension agreed");
        let mut continuation = text(b"a", false, MASK);
        let mut frame = Frame::message(b"b".to_vec(), OpCode::Data(Data::Continue), true);
        frame.header_mut().rsv1 = true;
        continuation.extend(wire(frame, MASK));
        assert!(refused(true, &continuation), "RSV1 on a continuation");
        let mut ping = Frame::ping(b"p".to_vec());
        ping.header_mut().rsv1 = true;
        assert!(refused(true, &wire(ping, MASK)), "RSV1 on a ping");
        for bit in [2, 3] {
            let mut frame = Frame::message(b"x".to_vec(), OpCode::Data(Data::Binary), true);
            match bit {
                2 => frame.header_mut().rsv2 = true,
                _ => frame.header_mut().rsv3 = true,
            }
            assert!(refused(true, &wire(frame, MASK)), "RSV{bit}");
        }
    }
}
