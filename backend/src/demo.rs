//! The bundled demo upstream, for both of the broker's modes.
//!
//! - A plain WebSocket (direct mode) is an echo: every text and binary
//!   message comes back unchanged, a close is answered with the same code,
//!   and the first offered subprotocol is selected. It takes
//!   permessage-deflate when offered (context takeover, full windows).
//! - A mux connection (the broker offers `muxgate.v1.json` or
//!   `muxgate.v1.binary`) serves sessions through [`crate::mux`]: a session
//!   whose path starts with `/chat` joins one chat room, where every message
//!   fans out to all members by `broadcast`; any other session is an echo.
//!   The connection itself takes permessage-deflate when the broker offers
//!   it (`mux_compression`).
//!
//! Every connection task is owned by the server's tracker and ends when the
//! server's token is cancelled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};
use uuid::Uuid;

use tokio_tungstenite::tungstenite::protocol::Role;

use crate::deflate::stream::{DeflateSettings, Deflating};
use crate::deflate::{codec, negotiate};
use crate::mux::{self, Connection, Handler, Session};
use crate::protocol::{Open, Payload};

/// The echo's compression: zlib's fastest level, messages of 256 bytes and
/// up, and tungstenite's own limit on a message (64 MiB) after inflating.
const DEMO_COMPRESSION_LEVEL: u32 = 1;
const DEMO_COMPRESSION_MIN_SIZE: usize = 256;
const DEMO_MAX_MESSAGE: usize = 64 << 20;

/// Serves the echo upstream on `listener` until `stop` is cancelled, then
/// waits for its connections to end.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    let handler = Arc::new(DemoHandler::default());
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "demo upstream listening");
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tracker.spawn(accept(tcp, peer, Arc::clone(&handler), stop.clone()));
                }
                Err(error) => debug!(%error, "demo upstream accept failed"),
            },
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Accepts one connection: a mux connection if the broker offered a mux
/// subprotocol, else a plain echo. Either takes permessage-deflate when
/// offered: a browser's, passed on by the broker's frame relay, or the
/// broker's own on a mux connection (`mux_compression`).
async fn accept(
    tcp: TcpStream,
    peer: SocketAddr,
    handler: Arc<DemoHandler>,
    stop: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let mut encoding = None;
    let mut deflate = None;
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let callback = |request: &Request, mut response: Response| {
        encoding = mux::negotiate(request, &mut response);
        if encoding.is_none() {
            select_first_protocol(request, &mut response);
        }
        deflate = accept_deflate(request, &mut response);
        Ok(response)
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(Deflating::plain(tcp), callback).await {
        Ok(ws) => ws,
        Err(error) => {
            debug!(%peer, %error, "demo upstream handshake failed");
            return;
        }
    };
    if let Some(settings) = deflate {
        ws.get_mut().enable(Role::Server, settings, Box::new(()));
    }
    match encoding {
        Some(encoding) => mux::serve_connection(ws, encoding, handler, stop).await,
        None => echo(ws, peer, stop).await,
    }
}

/// Answers the first permessage-deflate offer that fits (full windows,
/// context takeover); the settings to enable once the handshake is done.
fn accept_deflate(request: &Request, response: &mut Response) -> Option<DeflateSettings> {
    let offers = negotiate::offers(request.headers()).ok()?;
    let (agreed, answer) = negotiate::accept(
        &offers,
        &negotiate::Preferences::default(),
        codec::MIN_DEFLATE_WINDOW_BITS,
    )?;
    response
        .headers_mut()
        .insert(http::header::SEC_WEBSOCKET_EXTENSIONS, answer);
    Some(DeflateSettings {
        agreed,
        level: DEMO_COMPRESSION_LEVEL,
        min_size: DEMO_COMPRESSION_MIN_SIZE,
        max_decompressed_size: DEMO_MAX_MESSAGE,
    })
}

fn select_first_protocol(request: &Request, response: &mut Response) {
    let first = crate::protocol::offered_subprotocols(request.headers())
        .next()
        .and_then(|p| HeaderValue::from_str(p).ok());
    if let Some(p) = first {
        response.headers_mut().insert("sec-websocket-protocol", p);
    }
}

/// Echo sessions, and one chat room for sessions on `/chat...`.
#[derive(Default)]
struct DemoHandler {
    /// Chat members and the connection each is bound to now.
    room: Mutex<HashMap<Uuid, Session>>,
}

impl Handler for DemoHandler {
    fn on_open(&self, session: &Session, open: &Open) {
        if open.path.starts_with("/chat") {
            self.room
                .lock()
                .expect("room lock")
                .insert(session.id(), session.clone());
        }
    }

    fn on_message(&self, session: &Session, payload: Payload) {
        let room = self.room.lock().expect("room lock");
        if !room.contains_key(&session.id()) {
            session.send(payload);
            return;
        }
        // One broadcast per mux connection, listing that connection's members.
        let mut by_conn: HashMap<Uuid, (Connection, Vec<Uuid>)> = HashMap::new();
        for member in room.values() {
            let c = member.connection();
            by_conn
                .entry(c.id())
                .or_insert_with(|| (c.clone(), Vec::new()))
                .1
                .push(member.id());
        }
        for (conn, ids) in by_conn.into_values() {
            conn.broadcast(Some(ids), payload.clone());
        }
    }

    fn on_close(&self, session: &Session, _code: u16, _reason: &str) {
        let mut room = self.room.lock().expect("room lock");
        // Only forget the member if it is still bound where it closed.
        if room
            .get(&session.id())
            .is_some_and(|s| s.connection().id() == session.connection().id())
        {
            room.remove(&session.id());
        }
    }
}

async fn echo(
    mut ws: tokio_tungstenite::WebSocketStream<Deflating<TcpStream>>,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                return;
            }
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                if ws.send(m).await.is_err() {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                debug!(%peer, %error, "demo upstream connection failed");
                return;
            }
            None => return,
        }
    }
}
