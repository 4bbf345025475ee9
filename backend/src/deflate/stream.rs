//! A socket that speaks permessage-deflate, seen by tungstenite as one that
//! does not: where the broker must read messages (the message relay,
//! multiplexed sessions) it terminates compression here, below
//! tungstenite, which has no extension support.
//!
//! [`Deflating`] wraps the socket's byte stream. Reading, it follows the
//! peer's frames: a compressed message (RSV1 on its first frame) is
//! inflated by `codec::Inflater` and handed up as plain frames of at most
//! [`READ_PIECE`](super::codec::READ_PIECE) bytes each; every other frame
//! (uncompressed messages, control frames, and frames breaking the rules,
//! which tungstenite then refuses) passes up as it came. Writing, it
//! follows tungstenite's frames: a whole data message of at least
//! `min_size` bytes goes out compressed by `codec::Deflater`, one frame
//! with RSV1; every other frame goes out as written.
//!
//! A session without permessage-deflate holds only an empty `Option`; a
//! compressed one holds its codec states (made on first use, see
//! `codec`) and buffers that are freed whenever they empty, so an idle one
//! holds none (reads land on the stack first). Its compressor's window is
//! let go too once a ping it sends finds no compressed message sent since
//! the ping before (a sender may always start afresh; the next message
//! compresses from an empty window): an idle session keeps only the
//! inflater that its peer's context takeover requires. Frames handed
//! up to tungstenite keep the peer's masking rule: toward a server role
//! they carry a mask (the zero key, which leaves the payload as it is), so
//! tungstenite still refuses a client's unmasked frame as it would without
//! compression.
//!
//! A message that cannot be inflated (over `max_decompressed_size`, or
//! corrupt) fails the read with an `io::Error` that carries the
//! `InflateError`; [`close_for`] gives its close code, which the sessions'
//! endings send.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::codec::{Deflater, InflateError, Inflated, Inflater, READ_PIECE};
use super::negotiate::Agreed;

/// Where a compressed socket's byte counts go: the broker's metrics; `()`
/// counts nothing.
pub trait CompressionCounts: Send + Sync {
    /// `n` compressed payload bytes read.
    fn read_compressed(&self, n: u64);
    /// `n` message bytes inflated from them.
    fn read_inflated(&self, n: u64);
    /// A message of `message` bytes written as `compressed` payload bytes.
    fn written(&self, message: u64, compressed: u64);
    /// A message refused for inflating past `max_decompressed_size`.
    fn too_large(&self);
}

impl CompressionCounts for () {
    fn read_compressed(&self, _: u64) {}
    fn read_inflated(&self, _: u64) {}
    fn written(&self, _: u64, _: u64) {}
    fn too_large(&self) {}
}

/// A compressed socket's [`CompressionCounts`].
pub type Counts = Box<dyn CompressionCounts>;

/// The longest frame header (RFC 6455 §5.2).
const MAX_HEADER: usize = 14;
/// Encoded bytes held for the socket before a write waits for it to take
/// some: the bound on what one direction buffers beyond a message.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// What the broker's side of a compressed session is configured with.
#[derive(Debug, Clone, Copy)]
pub struct DeflateSettings {
    pub agreed: Agreed,
    pub level: u32,
    pub min_size: usize,
    pub max_decompressed_size: usize,
}

/// A byte stream with permessage-deflate taken off (reading) and put on
/// (writing); a plain pass-through when none was agreed.
pub struct Deflating<S> {
    inner: S,
    state: Option<Box<State>>,
}

struct State {
    role: Role,
    read: ReadSide,
    write: WriteSide,
    counters: Counts,
}

impl<S> Deflating<S> {
    /// `inner` as it is: nothing agreed.
    pub fn plain(inner: S) -> Self {
        Deflating { inner, state: None }
    }

    /// `inner` with permessage-deflate as `settings` say, this end being
    /// `role` on the connection.
    pub fn new(inner: S, role: Role, settings: DeflateSettings, counters: Counts) -> Self {
        let mut stream = Deflating::plain(inner);
        stream.enable(role, settings, counters);
        stream
    }

    /// Turns compression on for what follows: for a stream that carried a
    /// handshake (tungstenite's, through [`Deflating::plain`]) that agreed
    /// on it.
    pub fn enable(&mut self, role: Role, settings: DeflateSettings, counters: Counts) {
        let a = settings.agreed;
        // Ours compresses by the bits of our role's direction, and inflates
        // by the peer's.
        let (ours, peers) = match role {
            Role::Server => (
                (a.server_max_window_bits, a.server_no_context_takeover),
                (a.client_max_window_bits, a.client_no_context_takeover),
            ),
            Role::Client => (
                (a.client_max_window_bits, a.client_no_context_takeover),
                (a.server_max_window_bits, a.server_no_context_takeover),
            ),
        };
        let deflater = Deflater::new(settings.level, ours.0, ours.1)
            .expect("negotiation agrees only to windows the deflater keeps to");
        let inflater = Inflater::new(peers.0, peers.1, settings.max_decompressed_size)
            .expect("negotiated window bits are 8 to 15");
        self.state = Some(Box::new(State {
            role,
            read: ReadSide::new(inflater),
            write: WriteSide::new(deflater, settings.min_size),
            counters,
        }));
    }
}

/// The close code and reason for a read that failed on a message that
/// could not be inflated; `None` for any other error.
pub fn close_for(error: &WsError) -> Option<(u16, &'static str)> {
    let WsError::Io(error) = error else {
        return None;
    };
    let inflate = error.get_ref()?.downcast_ref::<InflateError>()?;
    Some(match inflate {
        InflateError::TooLarge { .. } => (inflate.close_code(), "decompressed message too big"),
        InflateError::Corrupt { .. } => (inflate.close_code(), "invalid compressed data"),
    })
}

// === reading ===

/// The frame being read from the peer.
#[derive(Debug)]
struct InFrame {
    /// Payload bytes still to come.
    left: u64,
    /// Part of a compressed message: its payload goes to the inflater.
    inflate: bool,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes taken so far, modulo 4 (where the mask stands).
    offset: usize,
}

struct ReadSide {
    /// Bytes read from the socket and not yet followed.
    raw: BytesMut,
    /// Bytes ready for tungstenite.
    up: BytesMut,
    head: Option<InFrame>,
    inflater: Inflater,
    /// A compressed message is being read: its opcode (text or binary)
    /// until its first plain frame has gone up, then `None`.
    message: Option<Option<u8>>,
    /// The inflater holds input to read out.
    inflating: bool,
    /// The peer's stream ended.
    eof: bool,
    /// A message failed to inflate; every later read fails with it.
    failed: Option<InflateError>,
}

impl ReadSide {
    fn new(inflater: Inflater) -> Self {
        ReadSide {
            raw: BytesMut::new(),
            up: BytesMut::new(),
            head: None,
            inflater,
            message: None,
            inflating: false,
            eof: false,
            failed: None,
        }
    }

    /// Follows what `raw` holds, inflating into `up`, until `up` has bytes
    /// or `raw` has too few to go on. `Err` for a message that could not
    /// be inflated.
    fn follow(&mut self, role: Role, counters: &dyn CompressionCounts) -> Result<(), InflateError> {
        loop {
            if self.inflating {
                self.drain_inflater(role, counters)?;
                if self.inflating || !self.up.is_empty() {
                    return Ok(());
                }
            }
            match self.head.take() {
                None => {
                    if !self.read_header(role) {
                        return Ok(());
                    }
                }
                Some(mut frame) => {
                    let take = frame.left.min(self.raw.len() as u64) as usize;
                    if take == 0 && frame.left > 0 {
                        self.head = Some(frame);
                        return Ok(());
                    }
                    let mut piece = self.raw.split_to(take);
                    frame.left -= take as u64;
                    if frame.inflate {
                        if let Some(mask) = frame.mask {
                            unmask(&mut piece, mask, frame.offset);
                        }
                        frame.offset = (frame.offset + take) % 4;
                        counters.read_compressed(take as u64);
                        let last = frame.left == 0 && frame.fin;
                        if take > 0 || last {
                            self.inflater.push_frame(piece.freeze(), last);
                            self.inflating = true;
                        }
                    } else {
                        self.up.extend_from_slice(&piece);
                    }
                    if frame.left > 0 {
                        self.head = Some(frame);
                    }
                    if !self.up.is_empty() && !self.inflating {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Parses the next frame header in `raw`, if whole. A plain frame's
    /// header goes up as it is; a compressed message's frames are followed
    /// for the inflater. Returns whether a header was taken.
    fn read_header(&mut self, role: Role) -> bool {
        let Some((len, header_len, first, mask)) = parse_header(&self.raw) else {
            return false;
        };
        let opcode = first & 0x0F;
        let fin = first & 0x80 != 0;
        let rsv1 = first & 0x40 != 0;
        let starts_compressed = rsv1 && (opcode == 1 || opcode == 2) && self.message.is_none();
        let continues_compressed = opcode == 0 && self.message.is_some() && !rsv1;
        // Masking is tungstenite's to check on what goes up; a frame taken
        // for the inflater must carry the mask its sender's role requires.
        let masked_right = mask.is_some() == (role == Role::Server);
        if (starts_compressed || continues_compressed) && masked_right {
            if starts_compressed {
                self.message = Some(Some(opcode));
            }
            self.raw.advance(header_len);
            self.head = Some(InFrame {
                left: len,
                inflate: true,
                fin,
                mask,
                offset: 0,
            });
        } else {
            // Anything else goes up untouched: a plain message, a control
            // frame (also between a compressed message's frames), or a
            // frame that breaks a rule, which tungstenite refuses.
            self.up.extend_from_slice(&self.raw[..header_len]);
            self.raw.advance(header_len);
            self.head = Some(InFrame {
                left: len,
                inflate: false,
                fin,
                mask: None,
                offset: 0,
            });
        }
        true
    }

    /// Reads the inflater out into frames for tungstenite, at most one
    /// piece at a time so that `up` stays bounded.
    fn drain_inflater(
        &mut self,
        role: Role,
        counters: &dyn CompressionCounts,
    ) -> Result<(), InflateError> {
        let mut piece = [0u8; READ_PIECE];
        loop {
            match self.inflater.read(&mut piece) {
                Err(e) => {
                    if matches!(e, InflateError::TooLarge { .. }) {
                        counters.too_large();
                    }
                    self.failed = Some(e.clone());
                    self.inflating = false;
                    return Err(e);
                }
                Ok(Inflated::Bytes(n)) => {
                    counters.read_inflated(n as u64);
                    let opcode = self.take_opcode();
                    push_frame(&mut self.up, opcode, false, &piece[..n], role);
                    if self.up.len() >= READ_PIECE {
                        return Ok(());
                    }
                }
                Ok(Inflated::NeedFrame) => {
                    self.inflating = false;
                    return Ok(());
                }
                Ok(Inflated::MessageEnd) => {
                    let opcode = self.take_opcode();
                    push_frame(&mut self.up, opcode, true, &[], role);
                    self.message = None;
                    self.inflating = false;
                    return Ok(());
                }
            }
        }
    }

    /// The opcode of the next plain frame of the compressed message: its
    /// own for the first, continuation after.
    fn take_opcode(&mut self) -> u8 {
        match &mut self.message {
            Some(first) => first.take().unwrap_or(0),
            None => 0,
        }
    }
}

/// A frame header at the start of `bytes`: payload length, header length,
/// first byte, masking key. `None` until the header is whole.
fn parse_header(bytes: &[u8]) -> Option<(u64, usize, u8, Option<[u8; 4]>)> {
    let [first, second, ..] = *bytes else {
        return None;
    };
    let masked = second & 0x80 != 0;
    let (len, mut at) = match second & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let key: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    Some((len, at, first, mask))
}

/// Appends a frame with `opcode` and `payload`: masked with the zero key
/// when the broker is the server (the frame stands for one its client
/// masked), unmasked when it is the client (the server's frames are not).
fn push_frame(out: &mut BytesMut, opcode: u8, fin: bool, payload: &[u8], role: Role) {
    let mask = (role == Role::Server).then_some([0; 4]);
    push_header(
        out,
        opcode | if fin { 0x80 } else { 0 },
        payload.len(),
        mask,
    );
    out.extend_from_slice(payload);
}

fn push_header(out: &mut BytesMut, first: u8, len: usize, mask: Option<[u8; 4]>) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.extend_from_slice(&[first]);
    match len {
        0..=125 => out.extend_from_slice(&[mask_bit | len as u8]),
        126..=0xFFFF => {
            out.extend_from_slice(&[mask_bit | 126]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[mask_bit | 127]);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

fn unmask(bytes: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

// === writing ===

/// The frame tungstenite is writing.
#[derive(Debug)]
struct OutFrame {
    left: u64,
    /// Compressed: the payload goes to the deflater, and the frame out
    /// once whole; else passed on as it comes.
    compress: Option<u8>,
    mask: Option<[u8; 4]>,
    offset: usize,
}

struct WriteSide {
    /// Header bytes of the next frame, until the header is whole.
    head: [u8; MAX_HEADER],
    head_len: usize,
    frame: Option<OutFrame>,
    deflater: Deflater,
    min_size: usize,
    /// The compressed payload of the message being written.
    compressed: Vec<u8>,
    /// Bytes for the socket, in order.
    down: BytesMut,
    /// The payload bytes of the message being compressed (for the count).
    message_len: u64,
    /// A masked payload piece, unmasked before it is compressed.
    unmasked: Vec<u8>,
    /// A message went out compressed since the last ping this end sent.
    compressed_since_ping: bool,
}

impl WriteSide {
    fn new(deflater: Deflater, min_size: usize) -> Self {
        WriteSide {
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: None,
            deflater,
            min_size,
            compressed: Vec::new(),
            down: BytesMut::new(),
            message_len: 0,
            unmasked: Vec::new(),
            compressed_since_ping: false,
        }
    }

    /// Follows all of `data` (tungstenite's frames), putting what is to be
    /// written in `down`.
    fn follow(
        &mut self,
        mut data: &[u8],
        role: Role,
        counters: &dyn CompressionCounts,
    ) -> io::Result<()> {
        while !data.is_empty() {
            let Some(frame) = self.frame.as_mut() else {
                let take = (MAX_HEADER - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                let held = self.head_len;
                self.head_len += take;
                match parse_header(&self.head[..self.head_len]) {
                    None => {
                        data = &data[take..];
                        continue;
                    }
                    Some((len, header_len, first, mask)) => {
                        data = &data[header_len - held..];
                        self.head_len = 0;
                        self.start_frame(len, header_len, first, mask);
                        if self.frame.as_ref().is_some_and(|f| f.left == 0) {
                            self.end_frame(role, counters)?;
                        }
                        continue;
                    }
                }
            };
            let take = frame.left.min(data.len() as u64) as usize;
            let piece = &data[..take];
            data = &data[take..];
            frame.left -= take as u64;
            match (frame.compress, frame.mask) {
                (Some(_), mask) => {
                    let plain = match mask {
                        // The broker as a client: tungstenite masked it.
                        Some(mask) => {
                            self.unmasked.clear();
                            self.unmasked.extend_from_slice(piece);
                            unmask(&mut self.unmasked, mask, frame.offset);
                            &self.unmasked[..]
                        }
                        None => piece,
                    };
                    frame.offset = (frame.offset + take) % 4;
                    self.message_len += take as u64;
                    self.deflater
                        .write(plain, &mut self.compressed)
                        .map_err(io::Error::other)?;
                }
                (None, _) => self.down.extend_from_slice(piece),
            }
            if frame.left == 0 {
                self.end_frame(role, counters)?;
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, len: u64, header_len: usize, first: u8, mask: Option<[u8; 4]>) {
        let opcode = first & 0x0F;
        // This end's keepalive pings mark time: a socket that sent no
        // compressed message between two of them is idle, and its
        // compressor's window (hundreds of KiB) is let go.
        if opcode == 9 && !std::mem::take(&mut self.compressed_since_ping) {
            self.deflater.release();
        }
        let whole_data_message = first & 0x80 != 0 && (opcode == 1 || opcode == 2);
        let compress = (whole_data_message && first & 0x70 == 0 && len >= self.min_size as u64)
            .then_some(opcode);
        if compress.is_none() {
            self.down.extend_from_slice(&self.head[..header_len]);
        }
        self.frame = Some(OutFrame {
            left: len,
            compress,
            mask,
            offset: 0,
        });
    }

    fn end_frame(&mut self, role: Role, counters: &dyn CompressionCounts) -> io::Result<()> {
        let frame = self.frame.take().expect("a frame in progress");
        let Some(opcode) = frame.compress else {
            return Ok(());
        };
        self.deflater
            .finish(&mut self.compressed)
            .map_err(io::Error::other)?;
        counters.written(
            std::mem::take(&mut self.message_len),
            self.compressed.len() as u64,
        );
        self.compressed_since_ping = true;
        // A client masks every frame with a key of its own (RFC 6455 §5.3).
        let mask = (role == Role::Client).then(rand::random::<[u8; 4]>);
        push_header(
            &mut self.down,
            0x80 | 0x40 | opcode,
            self.compressed.len(),
            mask,
        );
        if let Some(key) = mask {
            unmask(&mut self.compressed, key, 0);
        }
        self.down.extend_from_slice(&self.compressed);
        self.compressed = Vec::new();
        self.unmasked = Vec::new();
        Ok(())
    }
}

// === the stream ===

impl<S: AsyncRead + Unpin> AsyncRead for Deflating<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(state) = this.state.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let State {
            role,
            read,
            counters,
            ..
        } = &mut **state;
        loop {
            if let Some(e) = &read.failed {
                if read.up.is_empty() {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())));
                }
            }
            if !read.up.is_empty() {
                let n = read.up.len().min(buf.remaining());
                buf.put_slice(&read.up[..n]);
                read.up.advance(n);
                if read.up.is_empty() {
                    // An idle session keeps no buffer.
                    read.up = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if read.failed.is_none() {
                if read.follow(*role, &**counters).is_err() {
                    // The failure is handed up at once: what `up` holds is
                    // the failed message's start (and perhaps a control
                    // frame), which must not reach tungstenite as a message.
                    read.up.clear();
                    continue;
                }
                if !read.up.is_empty() {
                    continue;
                }
            }
            if read.eof {
                return Poll::Ready(Ok(()));
            }
            if read.raw.is_empty() {
                // An idle session keeps no buffer (what went to the
                // inflater was split off and is its own).
                read.raw = BytesMut::new();
            }
            // More bytes from the socket, read on the stack and kept only
            // as far as they are not followed yet.
            let mut chunk = [0u8; READ_PIECE];
            let mut filled = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut filled))?;
            if filled.filled().is_empty() {
                read.eof = true;
            } else {
                read.raw.extend_from_slice(filled.filled());
            }
        }
    }
}

/// Writes what `down` holds to `inner` until it is empty (`Ready`) or the
/// socket takes no more for now (`Pending`, the waker registered).
fn poll_drain<S: AsyncWrite + Unpin>(
    inner: &mut S,
    down: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !down.is_empty() {
        let n = ready!(Pin::new(&mut *inner).poll_write(cx, down))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        down.advance(n);
    }
    // An idle session keeps no buffer.
    *down = BytesMut::new();
    Poll::Ready(Ok(()))
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deflating<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(state) = this.state.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        };
        // Room first: the socket must take some of what waits.
        while state.write.down.len() >= WRITE_HIGH_WATER {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &state.write.down))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            state.write.down.advance(n);
        }
        state.write.follow(data, state.role, &*state.counters)?;
        // On to the socket at once, as a write to it would: tungstenite
        // counts a frame it wrote as sent (a close's reply, say), flushed
        // or not. What the socket cannot take yet waits for the next write
        // or flush.
        if let Poll::Ready(Err(e)) = poll_drain(&mut this.inner, &mut state.write.down, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(state) = this.state.as_mut() {
            ready!(poll_drain(&mut this.inner, &mut state.write.down, cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
