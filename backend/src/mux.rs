//! Serving mux connections from a Rust backend: the upstream side of
//! `shared/mux-protocol.md` behind a session API.
//!
//! Implement [`Handler`] (on open, on message, on close) and hand each
//! accepted WebSocket whose subprotocol [`negotiate`] chose to
//! [`serve_connection`]. A [`Session`] can send and close; a [`Connection`]
//! can broadcast. Outgoing frames go through the connection's bounded queue;
//! when it is full the connection stops reading the broker until there is
//! room, so a flood is pushed back instead of buffered.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use crate::protocol::{self, Encoding, Frame, Open, Payload};

/// Frames a connection holds for the broker before handlers see `send`
/// return false and reading pauses.
pub const OUTGOING_QUEUE: usize = 4096;

/// What a backend does with its sessions. Callbacks run on the connection's
/// task: keep them short and never block.
pub trait Handler: Send + Sync + 'static {
    /// A session opened (or was re-bound here, `open.resumed`).
    fn on_open(&self, _session: &Session, _open: &Open) {}
    /// A client message arrived.
    fn on_message(&self, session: &Session, payload: Payload);
    /// The client left; `code` is its close code (1005 none, 1006 vanished,
    /// 1001 broker shutdown).
    fn on_close(&self, _session: &Session, _code: u16, _reason: &str) {}
}

/// One mux connection, as handlers see it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Connection {
    id: Uuid,
    tx: mpsc::Sender<Frame>,
}

impl Connection {
    /// The broker's id for this connection (from `hello`).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Sends one message to `sessions` on this connection, or to every
    /// session on it when `None`. False if the queue is full or closed.
    pub fn broadcast(&self, sessions: Option<Vec<Uuid>>, payload: Payload) -> bool {
        self.tx
            .try_send(Frame::Broadcast { sessions, payload })
            .is_ok()
    }
}

/// A client session. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Session {
    id: Uuid,
    conn: Connection,
}

impl Session {
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The mux connection the session is bound to now.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Queues a message to the client. False if the queue is full or closed.
    pub fn send(&self, payload: Payload) -> bool {
        self.conn
            .tx
            .try_send(Frame::Message {
                session: self.id,
                payload,
            })
            .is_ok()
    }

    /// Closes the client with `code` and `reason`.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        self.conn
            .tx
            .try_send(Frame::Close {
                session: self.id,
                code,
                reason: reason.to_owned(),
            })
            .is_ok()
    }
}

/// A `tungstenite` accept callback helper: selects `muxgate.v1.json` or
/// `muxgate.v1.binary` if the broker offered one, and says which.
pub fn negotiate(request: &Request, response: &mut Response) -> Option<Encoding> {
    let offered =
        protocol::offered_subprotocols(request.headers()).find_map(Encoding::from_subprotocol)?;
    response.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(offered.subprotocol()),
    );
    Some(offered)
}

/// Serves one accepted mux connection until the broker closes it or `stop`
/// is cancelled. Sessions still open when it ends get `on_close` with 1006.
pub async fn serve_connection<S, H>(
    ws: WebSocketStream<S>,
    encoding: Encoding,
    handler: Arc<H>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Frame>(OUTGOING_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.feed(protocol::encode(&frame, encoding)).await.is_err() {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if sink.feed(protocol::encode(&frame, encoding)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let mut conn = Connection {
        id: Uuid::nil(),
        tx: tx.clone(),
    };
    let mut sessions: std::collections::HashMap<Uuid, Session> = Default::default();
    loop {
        // Pause reading while the broker is not taking our frames.
        if tx.capacity() == 0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                permit = tx.reserve() => match permit {
                    Ok(p) => drop(p),
                    Err(_) => break,
                },
            }
        }
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = stream.next() => msg,
        };
        let msg = match msg {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => m,
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                debug!(%error, "mux connection failed");
                break;
            }
            None => break,
        };
        match protocol::decode(msg, encoding) {
            Ok(Frame::Hello(hello)) => {
                conn = Connection {
                    id: hello.connection,
                    tx: tx.clone(),
                }
            }
            Ok(Frame::Open { session, open }) => {
                let s = Session {
                    id: session,
                    conn: conn.clone(),
                };
                sessions.insert(session, s.clone());
                handler.on_open(&s, &open);
            }
            Ok(Frame::Message { session, payload }) => match sessions.get(&session) {
                Some(s) => handler.on_message(s, payload),
                None => debug!(%session, "message for an unknown session dropped"),
            },
            Ok(Frame::Close {
                session,
                code,
                reason,
            }) => {
                if let Some(s) = sessions.remove(&session) {
                    handler.on_close(&s, code, &reason);
                }
            }
            Ok(Frame::Broadcast { .. }) => debug!("broadcast from the broker dropped"),
            Err(reason) => debug!(reason = reason.as_str(), "malformed mux frame dropped"),
        }
    }
    for s in sessions.into_values() {
        handler.on_close(&s, 1006, "mux connection lost");
    }
    drop(conn);
    drop(tx);
    let _ = writer.await;
}
