//! A test upstream that speaks the UPSTREAM side of the muxgate multiplexing
//! protocol, version 1.
//!
//! This module is written from `shared/mux-protocol.md` alone, without reading
//! (or importing) anything from the broker's own source. The point is that a
//! codec bug in the broker cannot hide by being symmetric with the test peer:
//! every frame the broker sends is decoded here exactly as the page describes,
//! and anything the page does not allow is reported as
//! [`PeerEvent::Malformed`] (the mux connection stays up, as the page
//! requires of a receiver).
//!
//! Decisions where the page leaves room (all of them err on the strict side,
//! so that a broker deviation shows up as a `Malformed` event with a reason):
//! - JSON session ids must be the hyphenated lowercase form; the session id
//!   of an `open` must be a version 4 UUID.
//! - `open` must carry `route`, `path` (strings), `headers` (an object with
//!   lower-case names), `subprotocols` (an array of strings) and `resumed` (a
//!   boolean). `remote_addr` may be absent, else it is a string; `claims` may
//!   be absent, else it is an object.
//! - `close` must carry an integer `code` that fits in a u16 and a string
//!   `reason` (possibly empty).
//! - In the binary encoding the `hello` payload is the complete JSON `hello`
//!   object, `type` included; the `open` payload must not carry `type` or
//!   `session`; `hello` must have an all-zero session id.
//! - Frames the broker never sends (`broadcast`, unknown types) and a first
//!   frame that is not `hello` are reported as `Malformed` too (the page says
//!   a receiver drops unknown types; the peer drops them as well, but records
//!   that it did). Frames of the wrong WebSocket kind for the negotiated
//!   encoding (text on binary, binary on JSON) are `Malformed`.
//! - A message for a session id the peer does not know is still recorded as a
//!   `Message` event, so tests can see that the broker sent it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// The subprotocol of the JSON encoding.
pub const JSON_SUBPROTOCOL: &str = "muxgate.v1.json";
/// The subprotocol of the binary encoding.
pub const BINARY_SUBPROTOCOL: &str = "muxgate.v1.binary";

/// How long `next_event`, `wait_for` and `send` wait before panicking.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Capacity of the event queue (bounded; events are never dropped).
const EVENT_CAPACITY: usize = 65536;
/// Capacity of each mux connection's outgoing frame queue.
const OUTGOING_CAPACITY: usize = 4096;

/// Binary frame types (section 4 of the page).
const T_HELLO: u8 = 0x00;
const T_OPEN: u8 = 0x01;
const T_TEXT: u8 = 0x02;
const T_BINARY: u8 = 0x03;
const T_CLOSE: u8 = 0x04;
const T_BROADCAST_TEXT: u8 = 0x05;
const T_BROADCAST_BINARY: u8 = 0x06;
/// Type byte + 16-byte session id.
const HEADER_LEN: usize = 17;

/// The envelope encoding of a mux connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `muxgate.v1.json`: one JSON object per text frame.
    Json,
    /// `muxgate.v1.binary`: one binary frame per mux frame.
    Binary,
}

/// The peer's number for one accepted mux connection: 1, 2, 3... in the order
/// their WebSocket handshakes completed.
pub type ConnId = u64;

/// The payload of a session message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A text message (JSON `text`, binary type 0x02).
    Text(String),
    /// A binary message (JSON `binary`, binary type 0x03).
    Binary(Vec<u8>),
}

/// Something the peer observed, in the order it observed it.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// A mux connection was accepted. `subprotocol` is what the broker offered (the peer selects it if it is muxgate.v1.json or muxgate.v1.binary).
    Connected {
        conn: ConnId,
        path: String,
        subprotocol: Option<String>,
    },
    /// The hello frame (its full JSON object).
    Hello { conn: ConnId, hello: Value },
    /// An `open` frame (a new session, or a resumed one when `resumed`).
    Open {
        conn: ConnId,
        session: Uuid,
        route: String,
        path: String,
        remote_addr: Option<String>,
        headers: Value,
        subprotocols: Vec<String>,
        claims: Option<Value>,
        resumed: bool,
    },
    /// A client message the broker forwarded.
    Message {
        conn: ConnId,
        session: Uuid,
        payload: Payload,
    },
    /// The broker ended a session.
    Close {
        conn: ConnId,
        session: Uuid,
        code: u16,
        reason: String,
    },
    /// A frame the peer could not decode (it keeps the connection up).
    Malformed { conn: ConnId, why: String },
    /// The broker answered a WebSocket ping the test sent ([`MuxPeer::send_raw`]).
    Pong { conn: ConnId },
    /// A mux connection ended (either side, or `kill`).
    Disconnected { conn: ConnId },
}

/// A frame the upstream sends to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A message for one session.
    Message { session: Uuid, payload: Payload },
    /// Ends one session.
    Close {
        session: Uuid,
        code: u16,
        reason: String,
    },
    /// `sessions: None` = every session on that connection (binary: count 0; JSON: field absent).
    Broadcast {
        sessions: Option<Vec<Uuid>>,
        payload: Payload,
    },
}

/// How the peer reacts to what the broker sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// Replies to every message with the same payload, to the same session, on the same connection.
    /// A text message "close:CODE:REASON" is answered with a close frame for that session instead.
    Echo,
    /// Only records events; the test sends frames itself.
    Manual,
    /// Accepts the WebSocket but does NOT select the offered subprotocol (for the broker's "must select it" rule).
    RejectSubprotocol,
}

/// A running test upstream. Serves until dropped or [`MuxPeer::kill`]ed.
pub struct MuxPeer {
    /// The address it listens on (127.0.0.1, an ephemeral port unless `start_on`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    events: mpsc::Receiver<PeerEvent>,
    kill_tx: watch::Sender<bool>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

/// State shared by the handle, the accept loop and the connection tasks.
struct Shared {
    behavior: Behavior,
    events: mpsc::Sender<PeerEvent>,
    next_conn: AtomicU64,
    total: AtomicUsize,
    /// Live mux connections.
    conns: Mutex<BTreeMap<ConnId, ConnEntry>>,
    /// The encoding of every connection ever accepted (kept after it ends).
    encodings: Mutex<HashMap<ConnId, Encoding>>,
}

struct ConnEntry {
    encoding: Encoding,
    out: mpsc::Sender<Outgoing>,
    sessions: HashSet<Uuid>,
}

/// One WebSocket message for a connection task to write; `done` reports
/// whether it was written and flushed.
struct Outgoing {
    msg: Message,
    done: oneshot::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    async fn emit(&self, event: PeerEvent) {
        // The receiver lives as long as `MuxPeer`; when it is gone nobody cares.
        let _ = self.events.send(event).await;
    }

    fn add_session(&self, conn: ConnId, session: Uuid) {
        if let Some(entry) = lock(&self.conns).get_mut(&conn) {
            entry.sessions.insert(session);
        }
    }

    fn remove_session(&self, conn: ConnId, session: Uuid) {
        if let Some(entry) = lock(&self.conns).get_mut(&conn) {
            entry.sessions.remove(&session);
        }
    }
}

impl MuxPeer {
    /// Listens on 127.0.0.1:0 and serves until dropped or killed.
    pub async fn start(behavior: Behavior) -> MuxPeer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), behavior).await
    }

    /// Listens on `addr` (e.g. the address of a killed peer, to bring a target
    /// back) and serves until dropped or killed.
    pub async fn start_on(addr: SocketAddr, behavior: Behavior) -> MuxPeer {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("MuxPeer: cannot listen on {addr}: {e}"));
        let addr = listener.local_addr().expect("MuxPeer: local_addr");
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            behavior,
            events: events_tx,
            next_conn: AtomicU64::new(1),
            total: AtomicUsize::new(0),
            conns: Mutex::new(BTreeMap::new()),
            encodings: Mutex::new(HashMap::new()),
        });
        let (kill_tx, kill_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), kill_rx));
        MuxPeer {
            addr,
            shared,
            events: events_rx,
            kill_tx,
            accept_task: Mutex::new(Some(task)),
        }
    }

    /// The next recorded event; panics after 10 s with a clear message.
    pub async fn next_event(&mut self) -> PeerEvent {
        match timeout(TIMEOUT, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("MuxPeer: the event queue closed"),
            Err(_) => panic!(
                "MuxPeer: no event within {TIMEOUT:?} (open connections: {}, open sessions: {})",
                self.open_connections(),
                self.open_sessions()
            ),
        }
    }

    /// The next recorded event if one is queued right now, without waiting.
    pub fn try_next_event(&mut self) -> Option<PeerEvent> {
        self.events.try_recv().ok()
    }

    /// Skips events until the next `open`; returns (connection, session, resumed).
    pub async fn next_open(&mut self) -> (ConnId, Uuid, bool) {
        match self
            .wait_for("an open", |e| matches!(e, PeerEvent::Open { .. }))
            .await
        {
            PeerEvent::Open {
                conn,
                session,
                resumed,
                ..
            } => (conn, session, resumed),
            _ => unreachable!("wait_for returned a non-open event"),
        }
    }

    /// Skips events until one matches `pred`; returns it (10 s timeout, panics with `what`).
    pub async fn wait_for(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&PeerEvent) -> bool,
    ) -> PeerEvent {
        let deadline = Instant::now() + TIMEOUT;
        let mut skipped: Vec<PeerEvent> = Vec::new();
        let mut skipped_count = 0usize;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if pred(&event) => return event,
                Ok(Some(event)) => {
                    skipped_count += 1;
                    if skipped.len() == 20 {
                        skipped.remove(0);
                    }
                    skipped.push(event);
                }
                Ok(None) => panic!("MuxPeer: the event queue closed while waiting for {what}"),
                Err(_) => panic!(
                    "MuxPeer: timed out after {TIMEOUT:?} waiting for {what}; skipped {skipped_count} \
                     event(s), the last ones: {skipped:#?}"
                ),
            }
        }
    }

    /// Mux connections open right now.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Mux connections accepted (WebSocket handshake completed) since start.
    pub fn total_connections(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// Sessions currently open per this peer's bookkeeping (opened and not closed, on live connections).
    pub fn open_sessions(&self) -> usize {
        lock(&self.shared.conns)
            .values()
            .map(|c| c.sessions.len())
            .sum()
    }

    /// The ids of the mux connections open right now, ascending.
    pub fn connections(&self) -> Vec<ConnId> {
        lock(&self.shared.conns).keys().copied().collect()
    }

    /// The encoding a connection negotiated (also after it ended).
    pub fn encoding(&self, conn: ConnId) -> Option<Encoding> {
        lock(&self.shared.encodings).get(&conn).copied()
    }

    /// Encodes and sends one frame on connection `conn` (panics if it is gone).
    /// Returns once the frame has been written and flushed.
    pub async fn send(&self, conn: ConnId, frame: OutFrame) {
        let encoding = {
            let conns = lock(&self.shared.conns);
            match conns.get(&conn) {
                Some(entry) => entry.encoding,
                None => panic!("MuxPeer::send: mux connection {conn} is gone"),
            }
        };
        let msg = encode_frame(encoding, &frame);
        if let OutFrame::Close { session, .. } = &frame {
            self.shared.remove_session(conn, *session);
        }
        self.transmit(conn, msg).await;
    }

    /// Sends a raw WebSocket message on `conn`, for malformed-frame tests.
    pub async fn send_raw(&self, conn: ConnId, msg: Message) {
        self.transmit(conn, msg).await;
    }

    async fn transmit(&self, conn: ConnId, msg: Message) {
        let out = {
            let conns = lock(&self.shared.conns);
            match conns.get(&conn) {
                Some(entry) => entry.out.clone(),
                None => panic!("MuxPeer::send: mux connection {conn} is gone"),
            }
        };
        let (done_tx, done_rx) = oneshot::channel();
        let sent = async {
            out.send(Outgoing { msg, done: done_tx }).await.ok()?;
            done_rx.await.ok()
        };
        match timeout(TIMEOUT, sent).await {
            Ok(Some(true)) => {}
            Ok(_) => panic!("MuxPeer::send: mux connection {conn} is gone"),
            Err(_) => panic!(
                "MuxPeer::send: the frame for mux connection {conn} was not written within \
                 {TIMEOUT:?} (is the broker reading its mux connection?)"
            ),
        }
    }

    /// Drops every connection abruptly (TCP closed without a WebSocket close handshake) and stops listening,
    /// so the broker sees the target die. The port is freed.
    ///
    /// A `Disconnected` event is recorded for every connection that was open.
    pub async fn kill(&self) {
        self.kill_tx.send_replace(true);
        let task = lock(&self.accept_task).take();
        if let Some(task) = task {
            // The accept loop drops the listener, then waits for every
            // connection task to drop its socket and record `Disconnected`.
            let _ = task.await;
        }
    }
}

impl Drop for MuxPeer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task (and so closes their sockets).
        if let Some(task) = lock(&self.accept_task).take() {
            task.abort();
        }
    }
}

/// Resolves once `kill` was called. When the `MuxPeer` is dropped it never
/// resolves: `Drop` aborts the tasks instead, in the order `Serving` sets.
async fn killed(kill: &mut watch::Receiver<bool>) {
    if kill.wait_for(|killed| *killed).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What the accept loop owns. Fields drop in declaration order, so when the
/// loop is aborted the port is freed before any connection is dropped.
struct Serving {
    listener: TcpListener,
    tasks: JoinSet<()>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut kill: watch::Receiver<bool>) {
    let mut serving = Serving {
        listener,
        tasks: JoinSet::new(),
    };
    let for_tasks = kill.clone();
    loop {
        tokio::select! {
            _ = killed(&mut kill) => break,
            accepted = serving.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let task = serve_connection(stream, Arc::clone(&shared), for_tasks.clone());
                    serving.tasks.spawn(task);
                }
                // Out of file descriptors or the like: back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = serving.tasks.join_next(), if !serving.tasks.is_empty() => {}
        }
    }
    let Serving {
        listener,
        mut tasks,
    } = serving;
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut kill: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let mut conn_id = None;
    tokio::select! {
        // Dropping the `run_connection` future drops the socket: the TCP
        // connection closes without a WebSocket close handshake.
        _ = killed(&mut kill) => {}
        _ = run_connection(stream, &shared, &mut conn_id) => {}
    }
    if let Some(conn) = conn_id {
        let removed = lock(&shared.conns).remove(&conn).is_some();
        if removed {
            shared.emit(PeerEvent::Disconnected { conn }).await;
        }
    }
}

async fn run_connection(stream: TcpStream, shared: &Arc<Shared>, conn_slot: &mut Option<ConnId>) {
    let mut path = String::new();
    let mut offered: Option<String> = None;
    let select = shared.behavior != Behavior::RejectSubprotocol;
    // The signature is tungstenite's; its error type is what it is.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        path = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned());
        let values: Vec<String> = req
            .headers()
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        if !values.is_empty() {
            offered = Some(values.join(", "));
        }
        if let Some(p) = offered.as_deref() {
            if select && (p == JSON_SUBPROTOCOL || p == BINARY_SUBPROTOCOL) {
                resp.headers_mut().insert(
                    SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(if p == JSON_SUBPROTOCOL {
                        JSON_SUBPROTOCOL
                    } else {
                        BINARY_SUBPROTOCOL
                    }),
                );
            }
        }
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };

    let encoding = if offered.as_deref() == Some(BINARY_SUBPROTOCOL) {
        Encoding::Binary
    } else {
        Encoding::Json
    };
    let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTGOING_CAPACITY);
    lock(&shared.encodings).insert(conn, encoding);
    lock(&shared.conns).insert(
        conn,
        ConnEntry {
            encoding,
            out: out_tx,
            sessions: HashSet::new(),
        },
    );
    shared.total.fetch_add(1, Ordering::SeqCst);
    *conn_slot = Some(conn);
    shared
        .emit(PeerEvent::Connected {
            conn,
            path,
            subprotocol: offered,
        })
        .await;

    let (mut sink, mut stream) = ws.split();
    let mut seen_first = false;
    loop {
        tokio::select! {
            out = out_rx.recv() => {
                let Some(Outgoing { msg, done }) = out else { break };
                let ok = sink.send(msg).await.is_ok();
                let _ = done.send(ok);
                if !ok {
                    break;
                }
            }
            incoming = stream.next() => {
                let decoded = match incoming {
                    Some(Ok(Message::Text(text))) => match encoding {
                        Encoding::Json => decode_json(text.as_str()),
                        Encoding::Binary => Err(format!(
                            "a text frame on a muxgate.v1.binary connection: {}",
                            excerpt(text.as_bytes())
                        )),
                    },
                    Some(Ok(Message::Binary(bytes))) => match encoding {
                        Encoding::Binary => decode_binary(&bytes),
                        Encoding::Json => Err(format!(
                            "a binary frame on a muxgate.v1.json connection: {}",
                            excerpt(&bytes)
                        )),
                    },
                    Some(Ok(Message::Pong(_))) => {
                        shared.emit(PeerEvent::Pong { conn }).await;
                        continue;
                    }
                    // Pings are answered by tungstenite; a close frame is
                    // answered by tungstenite and then the stream ends.
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => break,
                };
                let first = !seen_first;
                seen_first = true;
                if let Some(reply) = handle_frame(shared, conn, encoding, decoded, first).await {
                    if sink.send(reply).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// Records one decoded (or undecodable) frame; returns the reply to send, if any.
async fn handle_frame(
    shared: &Shared,
    conn: ConnId,
    encoding: Encoding,
    decoded: Result<InFrame, String>,
    first: bool,
) -> Option<Message> {
    let frame = match decoded {
        Ok(frame) => frame,
        Err(why) => {
            shared.emit(PeerEvent::Malformed { conn, why }).await;
            return None;
        }
    };
    if first && !matches!(frame, InFrame::Hello(_)) {
        let why = format!(
            "the first frame on a mux connection must be `hello`, got `{}`",
            frame.kind()
        );
        shared.emit(PeerEvent::Malformed { conn, why }).await;
    }
    match frame {
        InFrame::Hello(hello) => {
            shared.emit(PeerEvent::Hello { conn, hello }).await;
            None
        }
        InFrame::Open { session, fields } => {
            shared.add_session(conn, session);
            shared
                .emit(PeerEvent::Open {
                    conn,
                    session,
                    route: fields.route,
                    path: fields.path,
                    remote_addr: fields.remote_addr,
                    headers: fields.headers,
                    subprotocols: fields.subprotocols,
                    claims: fields.claims,
                    resumed: fields.resumed,
                })
                .await;
            None
        }
        InFrame::Message { session, payload } => {
            let reply = if shared.behavior == Behavior::Echo {
                let out = match close_command(&payload) {
                    Some((code, reason)) => {
                        shared.remove_session(conn, session);
                        OutFrame::Close {
                            session,
                            code,
                            reason,
                        }
                    }
                    None => OutFrame::Message {
                        session,
                        payload: payload.clone(),
                    },
                };
                Some(encode_frame(encoding, &out))
            } else {
                None
            };
            shared
                .emit(PeerEvent::Message {
                    conn,
                    session,
                    payload,
                })
                .await;
            reply
        }
        InFrame::Close {
            session,
            code,
            reason,
        } => {
            // The broker forgets the session: no close is sent back.
            shared.remove_session(conn, session);
            shared
                .emit(PeerEvent::Close {
                    conn,
                    session,
                    code,
                    reason,
                })
                .await;
            None
        }
    }
}

/// `close:CODE:REASON` in a text message asks the echo peer to close the session.
fn close_command(payload: &Payload) -> Option<(u16, String)> {
    let Payload::Text(text) = payload else {
        return None;
    };
    let rest = text.strip_prefix("close:")?;
    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
    Some((code.parse().ok()?, reason.to_owned()))
}

// ---------------------------------------------------------------------------
// Decoding (broker -> upstream)
// ---------------------------------------------------------------------------

/// A frame the broker may send, decoded.
#[derive(Debug)]
enum InFrame {
    Hello(Value),
    Open {
        session: Uuid,
        fields: OpenFields,
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
}

impl InFrame {
    fn kind(&self) -> &'static str {
        match self {
            InFrame::Hello(_) => "hello",
            InFrame::Open { .. } => "open",
            InFrame::Message { .. } => "message",
            InFrame::Close { .. } => "close",
        }
    }
}

#[derive(Debug)]
struct OpenFields {
    route: String,
    path: String,
    remote_addr: Option<String>,
    headers: Value,
    subprotocols: Vec<String>,
    claims: Option<Value>,
    resumed: bool,
}

/// A short, printable excerpt of a frame for `Malformed` reasons.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 120;
    match std::str::from_utf8(bytes) {
        Ok(text) if text.chars().count() <= MAX => format!("{text:?}"),
        Ok(text) => format!(
            "{:?}... ({} bytes)",
            text.chars().take(MAX).collect::<String>(),
            bytes.len()
        ),
        Err(_) if bytes.len() <= MAX / 2 => format!("{bytes:02x?}"),
        Err(_) => format!("{:02x?}... ({} bytes)", &bytes[..MAX / 2], bytes.len()),
    }
}

/// Decodes one JSON-encoding frame (section 3).
fn decode_json(text: &str) -> Result<InFrame, String> {
    let err = |why: String| format!("{why}: {}", excerpt(text.as_bytes()));
    let value: Value =
        serde_json::from_str(text).map_err(|e| err(format!("not valid JSON ({e})")))?;
    let Value::Object(obj) = value else {
        return Err(err("not a JSON object".into()));
    };
    let kind = match obj.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => return Err(err("`type` is not a string".into())),
        None => return Err(err("lacks `type`".into())),
    };
    match kind.as_str() {
        "hello" => Ok(InFrame::Hello(Value::Object(obj))),
        "open" => {
            let session = json_session(&obj).map_err(&err)?;
            check_new_session(session).map_err(&err)?;
            let fields = open_fields(&obj).map_err(&err)?;
            Ok(InFrame::Open { session, fields })
        }
        "message" => {
            let session = json_session(&obj).map_err(&err)?;
            let payload = match (obj.get("text"), obj.get("binary")) {
                (Some(Value::String(t)), None) => Payload::Text(t.clone()),
                (None, Some(Value::String(b))) => {
                    Payload::Binary(BASE64.decode(b).map_err(|e| {
                        err(format!("`binary` is not standard padded base64 ({e})"))
                    })?)
                }
                (Some(_), Some(_)) => {
                    return Err(err("a message carries both `text` and `binary`".into()))
                }
                (None, None) => {
                    return Err(err("a message carries neither `text` nor `binary`".into()))
                }
                _ => return Err(err("`text`/`binary` is not a string".into())),
            };
            Ok(InFrame::Message { session, payload })
        }
        "close" => {
            let session = json_session(&obj).map_err(&err)?;
            let code = match obj.get("code") {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .ok_or_else(|| err(format!("close `code` {n} is not a u16 integer")))?,
                Some(_) => return Err(err("close `code` is not a number".into())),
                None => return Err(err("a close lacks `code`".into())),
            };
            let reason = match obj.get("reason") {
                Some(Value::String(r)) => r.clone(),
                Some(_) => return Err(err("close `reason` is not a string".into())),
                None => return Err(err("a close lacks `reason`".into())),
            };
            Ok(InFrame::Close {
                session,
                code,
                reason,
            })
        }
        "broadcast" => Err(err(
            "`broadcast` is an upstream-to-broker frame; the broker must not send it".into(),
        )),
        other => Err(err(format!("unknown frame type {other:?} (dropped)"))),
    }
}

/// The `session` field of a JSON frame: a UUID in hyphenated lowercase form.
fn json_session(obj: &Map<String, Value>) -> Result<Uuid, String> {
    let text = match obj.get("session") {
        Some(Value::String(text)) => text,
        Some(_) => return Err("`session` is not a string".into()),
        None => return Err("lacks `session`".into()),
    };
    let session =
        Uuid::parse_str(text).map_err(|e| format!("`session` {text:?} is not a UUID ({e})"))?;
    if session.hyphenated().to_string() != *text {
        return Err(format!(
            "`session` {text:?} is not in hyphenated lowercase form"
        ));
    }
    Ok(session)
}

/// The broker gives each session a random (v4) UUID.
fn check_new_session(session: Uuid) -> Result<(), String> {
    if session.get_version_num() != 4 {
        return Err(format!("session id {session} of an open is not a v4 UUID"));
    }
    Ok(())
}

/// The fields of `open` shared by both encodings.
fn open_fields(obj: &Map<String, Value>) -> Result<OpenFields, String> {
    let string = |name: &str| match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("open `{name}` is not a string")),
        None => Err(format!("an open lacks `{name}`")),
    };
    let route = string("route")?;
    let path = string("path")?;
    let remote_addr = match obj.get("remote_addr") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("open `remote_addr` is not a string".into()),
    };
    let headers = match obj.get("headers") {
        Some(Value::Object(h)) => {
            if let Some(name) = h.keys().find(|k| **k != k.to_ascii_lowercase()) {
                return Err(format!("open header name {name:?} is not lower-case"));
            }
            Value::Object(h.clone())
        }
        Some(_) => return Err("open `headers` is not an object".into()),
        None => return Err("an open lacks `headers`".into()),
    };
    let subprotocols = match obj.get("subprotocols") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err("open `subprotocols` holds a non-string".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("open `subprotocols` is not an array".into()),
        None => return Err("an open lacks `subprotocols`".into()),
    };
    let claims = match obj.get("claims") {
        None => None,
        Some(c @ Value::Object(_)) => Some(c.clone()),
        Some(_) => {
            return Err("open `claims` is not an object (it must be absent without auth)".into())
        }
    };
    let resumed = match obj.get("resumed") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("open `resumed` is not a boolean".into()),
        None => return Err("an open lacks `resumed`".into()),
    };
    Ok(OpenFields {
        route,
        path,
        remote_addr,
        headers,
        subprotocols,
        claims,
        resumed,
    })
}

/// Decodes one binary-encoding frame (section 4).
fn decode_binary(frame: &[u8]) -> Result<InFrame, String> {
    let err = |why: String| format!("{why}: {}", excerpt(frame));
    if frame.len() < HEADER_LEN {
        return Err(err(format!(
            "a binary frame of {} bytes is shorter than 17",
            frame.len()
        )));
    }
    let kind = frame[0];
    let id: [u8; 16] = frame[1..HEADER_LEN].try_into().expect("16 bytes");
    let session = Uuid::from_bytes(id);
    let payload = &frame[HEADER_LEN..];
    let json_object = |what: &str| -> Result<Map<String, Value>, String> {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(obj)) => Ok(obj),
            Ok(_) => Err(err(format!("the {what} payload is not a JSON object"))),
            Err(e) => Err(err(format!("the {what} payload is not valid JSON ({e})"))),
        }
    };
    match kind {
        T_HELLO => {
            if !session.is_nil() {
                return Err(err("hello carries a non-zero session id".into()));
            }
            let obj = json_object("hello")?;
            match obj.get("type") {
                Some(Value::String(t)) if t == "hello" => {}
                _ => {
                    return Err(err(
                        "the hello payload must be the JSON `hello` object, with \"type\":\"hello\""
                            .into(),
                    ))
                }
            }
            Ok(InFrame::Hello(Value::Object(obj)))
        }
        T_OPEN => {
            check_new_session(session).map_err(&err)?;
            let obj = json_object("open")?;
            if obj.contains_key("type") || obj.contains_key("session") {
                return Err(err(
                    "the binary open payload must not carry `type` or `session`".into(),
                ));
            }
            let fields = open_fields(&obj).map_err(&err)?;
            Ok(InFrame::Open { session, fields })
        }
        T_TEXT => {
            let text = std::str::from_utf8(payload)
                .map_err(|e| err(format!("a text message payload is not UTF-8 ({e})")))?;
            Ok(InFrame::Message {
                session,
                payload: Payload::Text(text.to_owned()),
            })
        }
        T_BINARY => Ok(InFrame::Message {
            session,
            payload: Payload::Binary(payload.to_vec()),
        }),
        T_CLOSE => {
            if payload.len() < 2 {
                return Err(err("a close payload lacks its u16 code".into()));
            }
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|e| err(format!("a close reason is not UTF-8 ({e})")))?;
            Ok(InFrame::Close {
                session,
                code,
                reason: reason.to_owned(),
            })
        }
        T_BROADCAST_TEXT | T_BROADCAST_BINARY => Err(err(format!(
            "type 0x{kind:02x} (broadcast) is an upstream-to-broker frame; the broker must not send it"
        ))),
        other => Err(err(format!("unknown frame type 0x{other:02x} (dropped)"))),
    }
}

// ---------------------------------------------------------------------------
// Encoding (upstream -> broker)
// ---------------------------------------------------------------------------

/// Encodes one upstream frame in `encoding` as one WebSocket message.
///
/// Panics on a binary broadcast with an empty (but present) session list: the
/// binary encoding cannot say "nobody" (count 0 means every session).
pub fn encode_frame(encoding: Encoding, frame: &OutFrame) -> Message {
    match encoding {
        Encoding::Json => Message::text(encode_json(frame).to_string()),
        Encoding::Binary => Message::binary(encode_binary(frame)),
    }
}

fn json_payload(obj: &mut Map<String, Value>, payload: &Payload) {
    match payload {
        Payload::Text(text) => obj.insert("text".into(), Value::String(text.clone())),
        Payload::Binary(bytes) => obj.insert("binary".into(), Value::String(BASE64.encode(bytes))),
    };
}

fn encode_json(frame: &OutFrame) -> Value {
    let mut obj = Map::new();
    match frame {
        OutFrame::Message { session, payload } => {
            obj.insert("type".into(), json!("message"));
            obj.insert("session".into(), json!(session.hyphenated().to_string()));
            json_payload(&mut obj, payload);
        }
        OutFrame::Close {
            session,
            code,
            reason,
        } => {
            obj.insert("type".into(), json!("close"));
            obj.insert("session".into(), json!(session.hyphenated().to_string()));
            obj.insert("code".into(), json!(code));
            obj.insert("reason".into(), json!(reason));
        }
        OutFrame::Broadcast { sessions, payload } => {
            obj.insert("type".into(), json!("broadcast"));
            if let Some(sessions) = sessions {
                let ids: Vec<Value> = sessions
                    .iter()
                    .map(|s| json!(s.hyphenated().to_string()))
                    .collect();
                obj.insert("sessions".into(), Value::Array(ids));
            }
            json_payload(&mut obj, payload);
        }
    }
    Value::Object(obj)
}

fn encode_binary(frame: &OutFrame) -> Vec<u8> {
    let mut out = Vec::new();
    match frame {
        OutFrame::Message { session, payload } => {
            let (kind, bytes) = match payload {
                Payload::Text(text) => (T_TEXT, text.as_bytes()),
                Payload::Binary(bytes) => (T_BINARY, bytes.as_slice()),
            };
            out.push(kind);
            out.extend_from_slice(session.as_bytes());
            out.extend_from_slice(bytes);
        }
        OutFrame::Close {
            session,
            code,
            reason,
        } => {
            out.push(T_CLOSE);
            out.extend_from_slice(session.as_bytes());
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
        OutFrame::Broadcast { sessions, payload } => {
            let (kind, bytes) = match payload {
                Payload::Text(text) => (T_BROADCAST_TEXT, text.as_bytes()),
                Payload::Binary(bytes) => (T_BROADCAST_BINARY, bytes.as_slice()),
            };
            out.push(kind);
            out.extend_from_slice(&[0u8; 16]);
            let ids: &[Uuid] = sessions.as_deref().unwrap_or(&[]);
            assert!(
                sessions.is_none() || !ids.is_empty(),
                "MuxPeer: a binary broadcast cannot carry an empty session list \
                 (count 0 means every session); use `sessions: None` or send_raw"
            );
            let count = u32::try_from(ids.len()).expect("at most u32::MAX sessions");
            out.extend_from_slice(&count.to_be_bytes());
            for id in ids {
                out.extend_from_slice(id.as_bytes());
            }
            out.extend_from_slice(bytes);
        }
    }
    out
}
