//! The muxgate multiplexing protocol, version 1 (`shared/mux-protocol.md`):
//! the frames and their two encodings, for both ends of a mux connection.
//!
//! This is the one place where bytes become frames and back (§3 JSON,
//! §4 binary). The broker uses it to speak to upstreams; [`crate::mux`]
//! uses it to serve them. Frames that break the page are not errors that end
//! a connection: [`decode`] returns a [`DropReason`] that the caller counts.
//!
//! Hot-path notes: message payloads are never copied on decode in the binary
//! encoding (the payload is a slice of the frame) nor in JSON when the text
//! has no escapes; encoding writes one buffer per frame.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use uuid::Uuid;

/// `muxgate.v1.json`.
pub const SUBPROTOCOL_JSON: &str = "muxgate.v1.json";
/// `muxgate.v1.binary`.
pub const SUBPROTOCOL_BINARY: &str = "muxgate.v1.binary";
/// The protocol version in `hello`.
pub const VERSION: u32 = 1;

const T_HELLO: u8 = 0x00;
const T_OPEN: u8 = 0x01;
const T_TEXT: u8 = 0x02;
const T_BINARY: u8 = 0x03;
const T_CLOSE: u8 = 0x04;
const T_BROADCAST_TEXT: u8 = 0x05;
const T_BROADCAST_BINARY: u8 = 0x06;
const HEADER: usize = 17;

/// Which encoding a mux connection speaks (its subprotocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Json,
    Binary,
}

impl Encoding {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::Binary => SUBPROTOCOL_BINARY,
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name {
            SUBPROTOCOL_JSON => Some(Encoding::Json),
            SUBPROTOCOL_BINARY => Some(Encoding::Binary),
            _ => None,
        }
    }
}

/// The subprotocols offered in a handshake's `Sec-WebSocket-Protocol`
/// headers, in order (comma-separated lists split, blanks skipped).
pub fn offered_subprotocols(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// A client message carried in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The WebSocket message a client receives.
    pub fn into_message(self) -> Message {
        match self {
            Payload::Text(t) => Message::Text(t),
            Payload::Binary(b) => Message::Binary(b),
        }
    }

    /// A client's data message as a payload; `None` for control messages.
    pub fn from_message(msg: Message) -> Option<Payload> {
        match msg {
            Message::Text(t) => Some(Payload::Text(t)),
            Message::Binary(b) => Some(Payload::Binary(b)),
            _ => None,
        }
    }
}

/// `hello`: the broker's first frame on every mux connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub broker: String,
    pub instance: Uuid,
    pub connection: Uuid,
}

/// `open`: a client session starts (or is re-bound, `resumed`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Open {
    /// The external route that matched.
    pub route: String,
    /// The internal path with the client's query string.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    /// The upstream's `forward_headers`, lower-case names.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// What the client offered.
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// Verified JWT claims, when the route authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Value>,
    #[serde(default)]
    pub resumed: bool,
}

/// One mux frame, either direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Open {
        session: Uuid,
        open: Open,
    },
    Message {
        session: Uuid,
        payload: Payload,
    },
    Close {
        session: Uuid,
        code: u16,
        reason: String,
    },
    /// `sessions: None` means every session on the connection.
    Broadcast {
        sessions: Option<Vec<Uuid>>,
        payload: Payload,
    },
}

/// Why a frame was dropped: a bounded label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A text frame in the binary encoding or the reverse (or a control frame).
    WrongFrameKind,
    InvalidJson,
    /// `type`, `session`, `code` or a payload field missing or mistyped.
    MissingField,
    UnknownType,
    InvalidSession,
    InvalidBase64,
    InvalidUtf8,
    /// A binary frame shorter than 17 bytes, or a short close/broadcast payload.
    ShortFrame,
    /// A message with both or neither of `text` and `binary`.
    InvalidPayload,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::WrongFrameKind => "wrong_frame_kind",
            DropReason::InvalidJson => "invalid_json",
            DropReason::MissingField => "missing_field",
            DropReason::UnknownType => "unknown_type",
            DropReason::InvalidSession => "invalid_session",
            DropReason::InvalidBase64 => "invalid_base64",
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::ShortFrame => "short_frame",
            DropReason::InvalidPayload => "invalid_payload",
        }
    }
}

// === encoding ===

/// Encodes a `message` frame without building a [`Frame`].
pub fn encode_message(session: Uuid, payload: &Payload, encoding: Encoding) -> Message {
    match encoding {
        Encoding::Binary => {
            let (kind, bytes) = match payload {
                Payload::Text(t) => (T_TEXT, t.as_bytes()),
                Payload::Binary(b) => (T_BINARY, &b[..]),
            };
            Message::Binary(binary_frame(kind, session.as_bytes(), bytes.len(), |buf| {
                buf.put_slice(bytes)
            }))
        }
        Encoding::Json => {
            let mut out = Vec::with_capacity(payload.len() + 80);
            out.extend_from_slice(br#"{"type":"message","session":""#);
            out.extend_from_slice(
                session
                    .hyphenated()
                    .encode_lower(&mut Uuid::encode_buffer())
                    .as_bytes(),
            );
            match payload {
                Payload::Text(t) => {
                    out.extend_from_slice(br#"","text":"#);
                    serde_json::to_writer(&mut out, t.as_str()).expect("string to JSON");
                }
                Payload::Binary(b) => {
                    out.extend_from_slice(br#"","binary":""#);
                    let start = out.len();
                    let len = base64::encoded_len(b.len(), true).expect("payload fits in memory");
                    out.resize(start + len, 0);
                    base64::engine::general_purpose::STANDARD
                        .encode_slice(b, &mut out[start..])
                        .expect("buffer sized by encoded_len");
                    out.push(b'"');
                }
            }
            out.push(b'}');
            Message::Text(Utf8Bytes::try_from(Bytes::from(out)).expect("JSON is UTF-8"))
        }
    }
}

/// Encodes any frame.
pub fn encode(frame: &Frame, encoding: Encoding) -> Message {
    match (frame, encoding) {
        (Frame::Message { session, payload }, _) => encode_message(*session, payload, encoding),
        (Frame::Hello(hello), Encoding::Json) => json_text(&tagged("hello", None, hello)),
        (Frame::Hello(hello), Encoding::Binary) => {
            let json = serde_json::to_vec(&tagged("hello", None, hello)).expect("hello to JSON");
            Message::Binary(binary_frame(T_HELLO, &[0; 16], json.len(), |b| {
                b.put_slice(&json)
            }))
        }
        (Frame::Open { session, open }, Encoding::Json) => {
            json_text(&tagged("open", Some(*session), open))
        }
        (Frame::Open { session, open }, Encoding::Binary) => {
            let json = serde_json::to_vec(open).expect("open to JSON");
            Message::Binary(binary_frame(T_OPEN, session.as_bytes(), json.len(), |b| {
                b.put_slice(&json)
            }))
        }
        (
            Frame::Close {
                session,
                code,
                reason,
            },
            Encoding::Json,
        ) => json_text(&serde_json::json!({
            "type": "close", "session": session, "code": code, "reason": reason,
        })),
        (
            Frame::Close {
                session,
                code,
                reason,
            },
            Encoding::Binary,
        ) => Message::Binary(binary_frame(
            T_CLOSE,
            session.as_bytes(),
            2 + reason.len(),
            |b| {
                b.put_u16(*code);
                b.put_slice(reason.as_bytes());
            },
        )),
        (Frame::Broadcast { sessions, payload }, Encoding::Json) => {
            let mut obj = serde_json::Map::new();
            obj.insert("type".into(), "broadcast".into());
            if let Some(ids) = sessions {
                obj.insert("sessions".into(), serde_json::to_value(ids).expect("ids"));
            }
            match payload {
                Payload::Text(t) => obj.insert("text".into(), t.as_str().into()),
                Payload::Binary(b) => obj.insert(
                    "binary".into(),
                    base64::engine::general_purpose::STANDARD.encode(b).into(),
                ),
            };
            json_text(&obj)
        }
        (Frame::Broadcast { sessions, payload }, Encoding::Binary) => {
            let (kind, bytes) = match payload {
                Payload::Text(t) => (T_BROADCAST_TEXT, t.as_bytes()),
                Payload::Binary(b) => (T_BROADCAST_BINARY, &b[..]),
            };
            let ids = sessions.as_deref().unwrap_or(&[]);
            Message::Binary(binary_frame(
                kind,
                &[0; 16],
                4 + 16 * ids.len() + bytes.len(),
                |b| {
                    b.put_u32(ids.len() as u32);
                    for id in ids {
                        b.put_slice(id.as_bytes());
                    }
                    b.put_slice(bytes);
                },
            ))
        }
    }
}

/// `value` as a JSON object with `type` (and `session`) first.
fn tagged<T: Serialize>(kind: &str, session: Option<Uuid>, value: &T) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("type".into(), kind.into());
    if let Some(s) = session {
        obj.insert("session".into(), s.to_string().into());
    }
    if let serde_json::Value::Object(fields) = serde_json::to_value(value).expect("to JSON") {
        obj.extend(fields);
    }
    serde_json::Value::Object(obj)
}

fn json_text<T: Serialize>(value: &T) -> Message {
    Message::Text(serde_json::to_string(value).expect("to JSON").into())
}

fn binary_frame(
    kind: u8,
    session: &[u8; 16],
    payload_len: usize,
    fill: impl FnOnce(&mut BytesMut),
) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER + payload_len);
    buf.put_u8(kind);
    buf.put_slice(session);
    fill(&mut buf);
    buf.freeze()
}

// === decoding ===

/// Decodes one WebSocket message of a mux connection. Ping, pong and close
/// messages are not frames and are never passed here.
pub fn decode(msg: Message, encoding: Encoding) -> Result<Frame, DropReason> {
    match (msg, encoding) {
        (Message::Text(t), Encoding::Json) => decode_json(t),
        (Message::Binary(b), Encoding::Binary) => decode_binary(b),
        _ => Err(DropReason::WrongFrameKind),
    }
}

/// A JSON string borrowed from the frame unless it has escapes. (serde
/// does not borrow through `Option<Cow<str>>` directly; a newtype does.)
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Str<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize)]
struct JsonWire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Str<'a>>,
    #[serde(borrow)]
    session: Option<Str<'a>>,
    #[serde(borrow)]
    sessions: Option<Vec<Str<'a>>>,
    #[serde(borrow)]
    text: Option<Str<'a>>,
    #[serde(borrow)]
    binary: Option<Str<'a>>,
    code: Option<u16>,
    #[serde(borrow)]
    reason: Option<Str<'a>>,
}

fn decode_json(frame: Utf8Bytes) -> Result<Frame, DropReason> {
    let raw: &[u8] = frame.as_bytes();
    let value: serde_json::Value;
    let wire: JsonWire = serde_json::from_slice(raw).map_err(|e| {
        if e.is_data() {
            DropReason::MissingField
        } else {
            DropReason::InvalidJson
        }
    })?;
    let kind = wire.kind.as_deref().ok_or(DropReason::MissingField)?;
    let session = || -> Result<Uuid, DropReason> {
        let s = wire.session.as_deref().ok_or(DropReason::MissingField)?;
        Uuid::parse_str(s).map_err(|_| DropReason::InvalidSession)
    };
    // A payload slice borrowed from the frame needs no copy.
    let text_payload = |s: &Str| -> Utf8Bytes {
        match &s.0 {
            Cow::Borrowed(b) => {
                let start = b.as_ptr() as usize - raw.as_ptr() as usize;
                let bytes: Bytes = Bytes::from(frame.clone()).slice(start..start + b.len());
                Utf8Bytes::try_from(bytes).expect("slice of a str")
            }
            Cow::Owned(o) => Utf8Bytes::from(o.clone()),
        }
    };
    let payload = || -> Result<Payload, DropReason> {
        match (&wire.text, &wire.binary) {
            (Some(t), None) => Ok(Payload::Text(text_payload(t))),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map(|v| Payload::Binary(Bytes::from(v)))
                .map_err(|_| DropReason::InvalidBase64),
            _ => Err(DropReason::InvalidPayload),
        }
    };
    match kind {
        "message" => Ok(Frame::Message {
            session: session()?,
            payload: payload()?,
        }),
        "close" => Ok(Frame::Close {
            session: session()?,
            code: wire.code.unwrap_or(1000),
            reason: wire.reason.as_deref().unwrap_or("").to_owned(),
        }),
        "broadcast" => {
            let sessions = match &wire.sessions {
                None => None,
                Some(ids) => Some(
                    ids.iter()
                        .map(|s| Uuid::parse_str(s).map_err(|_| DropReason::InvalidSession))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            Ok(Frame::Broadcast {
                sessions,
                payload: payload()?,
            })
        }
        "hello" | "open" => {
            value = serde_json::from_slice(raw).map_err(|_| DropReason::InvalidJson)?;
            if kind == "hello" {
                serde_json::from_value(value)
                    .map(Frame::Hello)
                    .map_err(|_| DropReason::MissingField)
            } else {
                let session = session()?;
                serde_json::from_value(value)
                    .map(|open| Frame::Open { session, open })
                    .map_err(|_| DropReason::MissingField)
            }
        }
        _ => Err(DropReason::UnknownType),
    }
}

fn decode_binary(frame: Bytes) -> Result<Frame, DropReason> {
    if frame.len() < HEADER {
        return Err(DropReason::ShortFrame);
    }
    let kind = frame[0];
    let session = Uuid::from_slice(&frame[1..HEADER]).expect("16 bytes");
    let body = frame.slice(HEADER..);
    let text = |b: Bytes| Utf8Bytes::try_from(b).map_err(|_| DropReason::InvalidUtf8);
    match kind {
        T_HELLO => serde_json::from_slice(&body)
            .map(Frame::Hello)
            .map_err(|_| DropReason::InvalidJson),
        T_OPEN => serde_json::from_slice(&body)
            .map(|open| Frame::Open { session, open })
            .map_err(|_| DropReason::InvalidJson),
        T_TEXT => Ok(Frame::Message {
            session,
            payload: Payload::Text(text(body)?),
        }),
        T_BINARY => Ok(Frame::Message {
            session,
            payload: Payload::Binary(body),
        }),
        T_CLOSE => {
            if body.len() < 2 {
                return Err(DropReason::ShortFrame);
            }
            let code = u16::from_be_bytes([body[0], body[1]]);
            let reason = std::str::from_utf8(&body[2..]).map_err(|_| DropReason::InvalidUtf8)?;
            Ok(Frame::Close {
                session,
                code,
                reason: reason.to_owned(),
            })
        }
        T_BROADCAST_TEXT | T_BROADCAST_BINARY => {
            if body.len() < 4 {
                return Err(DropReason::ShortFrame);
            }
            let n = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
            let ids_end = n
                .checked_mul(16)
                .and_then(|l| l.checked_add(4))
                .filter(|&end| end <= body.len())
                .ok_or(DropReason::ShortFrame)?;
            let sessions = (n > 0).then(|| {
                body[4..ids_end]
                    .chunks_exact(16)
                    .map(|c| Uuid::from_slice(c).expect("16 bytes"))
                    .collect()
            });
            let data = body.slice(ids_end..);
            let payload = if kind == T_BROADCAST_TEXT {
                Payload::Text(text(data)?)
            } else {
                Payload::Binary(data)
            };
            Ok(Frame::Broadcast { sessions, payload })
        }
        _ => Err(DropReason::UnknownType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: 1,
                broker: "muxgate/0.1.0".into(),
                instance: id(1),
                connection: id(2),
            }),
            Frame::Open {
                session: id(3),
                open: Open {
                    route: "/ws/chat".into(),
                    path: "/ws?room=7".into(),
                    remote_addr: Some("203.0.113.9:53122".into()),
                    headers: [("user-agent".to_string(), "t".to_string())].into(),
                    subprotocols: vec!["chat.v2".into()],
                    claims: Some(serde_json::json!({"sub": "alice"})),
                    resumed: true,
                },
            },
            Frame::Message {
                session: id(4),
                payload: Payload::Text("hé \"quoted\"\n".into()),
            },
            Frame::Message {
                session: id(4),
                payload: Payload::Text("".into()),
            },
            Frame::Message {
                session: id(5),
                payload: Payload::Binary(Bytes::from_static(&[0, 1, 2, 255])),
            },
            Frame::Message {
                session: id(5),
                payload: Payload::Binary(Bytes::new()),
            },
            Frame::Close {
                session: id(6),
                code: 4001,
                reason: "kicked".into(),
            },
            Frame::Close {
                session: id(6),
                code: 1005,
                reason: String::new(),
            },
            Frame::Broadcast {
                sessions: Some(vec![id(7), id(8)]),
                payload: Payload::Text("tick".into()),
            },
            Frame::Broadcast {
                sessions: None,
                payload: Payload::Binary(Bytes::from_static(b"AAEC")),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_in_both_encodings() {
        for encoding in [Encoding::Json, Encoding::Binary] {
            for frame in all_frames() {
                let wire = encode(&frame, encoding);
                assert_eq!(decode(wire, encoding), Ok(frame.clone()), "{encoding:?}");
            }
        }
    }

    #[test]
    fn json_matches_the_page() {
        let m = encode_message(id(4), &Payload::Text("hello".into()), Encoding::Json);
        assert_eq!(
            m.to_text().unwrap(),
            r#"{"type":"message","session":"04040404-0404-0404-0404-040404040404","text":"hello"}"#
        );
        let m = encode_message(
            id(4),
            &Payload::Binary(Bytes::from_static(&[0, 1, 2, 3])),
            Encoding::Json,
        );
        assert!(m.to_text().unwrap().ends_with(r#""binary":"AAECAw=="}"#));
        let hello = encode(&all_frames()[0], Encoding::Json);
        let v: serde_json::Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
        assert_eq!(v["type"], "hello");
        assert_eq!(v["version"], 1);
    }

    #[test]
    fn binary_matches_the_page() {
        let Message::Binary(b) =
            encode_message(id(9), &Payload::Text("hi".into()), Encoding::Binary)
        else {
            panic!()
        };
        assert_eq!(b[0], 0x02);
        assert_eq!(&b[1..17], &[9; 16]);
        assert_eq!(&b[17..], b"hi");
        let close = Frame::Close {
            session: id(9),
            code: 4001,
            reason: "x".into(),
        };
        let Message::Binary(b) = encode(&close, Encoding::Binary) else {
            panic!()
        };
        assert_eq!(
            &b[..],
            &[&[4u8][..], &[9; 16], &[0x0f, 0xa1, b'x']].concat()[..]
        );
    }

    #[test]
    fn malformed_frames_are_reasons_not_panics() {
        let j = |s: &str| decode(Message::text(s), Encoding::Json);
        assert_eq!(j("not json"), Err(DropReason::InvalidJson));
        assert_eq!(j(r#"{"session":"x"}"#), Err(DropReason::MissingField));
        assert_eq!(j(r#"{"type":"nope"}"#), Err(DropReason::UnknownType));
        assert_eq!(
            j(r#"{"type":"message","text":"a"}"#),
            Err(DropReason::MissingField)
        );
        assert_eq!(
            j(r#"{"type":"message","session":"zz","text":"a"}"#),
            Err(DropReason::InvalidSession)
        );
        let s = "04040404-0404-0404-0404-040404040404";
        assert_eq!(
            j(&format!(
                r#"{{"type":"message","session":"{s}","binary":"!!"}}"#
            )),
            Err(DropReason::InvalidBase64)
        );
        assert_eq!(
            j(&format!(r#"{{"type":"message","session":"{s}"}}"#)),
            Err(DropReason::InvalidPayload)
        );
        assert_eq!(
            j(&format!(
                r#"{{"type":"message","session":"{s}","text":"a","binary":"AA=="}}"#
            )),
            Err(DropReason::InvalidPayload)
        );
        // Unknown fields are ignored.
        assert!(j(&format!(
            r#"{{"type":"message","session":"{s}","text":"a","extra":1}}"#
        ))
        .is_ok());
        let b = |v: &[u8]| decode(Message::binary(v.to_vec()), Encoding::Binary);
        assert_eq!(b(&[2; 16]), Err(DropReason::ShortFrame));
        assert_eq!(
            b(&[[9u8].as_slice(), &[0; 16]].concat()),
            Err(DropReason::UnknownType)
        );
        assert_eq!(
            b(&[[2u8].as_slice(), &[0; 16], &[0xff]].concat()),
            Err(DropReason::InvalidUtf8)
        );
        assert_eq!(
            b(&[[5u8].as_slice(), &[0; 16], &[0, 0, 0, 9]].concat()),
            Err(DropReason::ShortFrame)
        );
        assert_eq!(
            decode(Message::text("{}"), Encoding::Binary),
            Err(DropReason::WrongFrameKind)
        );
    }

    #[test]
    fn json_text_without_escapes_is_not_copied() {
        let raw = r#"{"type":"message","session":"04040404-0404-0404-0404-040404040404","text":"zero copy"}"#;
        let frame = Utf8Bytes::from(raw.to_string());
        let base = frame.as_bytes().as_ptr() as usize;
        let Ok(Frame::Message {
            payload: Payload::Text(t),
            ..
        }) = decode_json(frame)
        else {
            panic!()
        };
        assert_eq!(t.as_str(), "zero copy");
        let at = t.as_bytes().as_ptr() as usize;
        assert!(
            at > base && at < base + raw.len(),
            "payload points into the frame"
        );
    }
}
