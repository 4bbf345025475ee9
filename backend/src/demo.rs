//! The bundled demo upstream: a plain WebSocket echo server.
//!
//! It echoes every text and binary message back unchanged, answers a close
//! with the same code and reason, and selects the first subprotocol a client
//! offers. Every connection task is owned by the server's tracker and ends
//! when the server's token is cancelled.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

/// Serves the echo upstream on `listener` until `stop` is cancelled, then
/// waits for its connections to end.
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "demo upstream listening");
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tracker.spawn(echo(tcp, peer, stop.clone()));
                }
                Err(error) => debug!(%error, "demo upstream accept failed"),
            },
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Picks the first offered subprotocol, if any.
#[allow(clippy::result_large_err)] // the callback signature is tungstenite's
fn select_protocol(
    request: &Request,
    mut response: Response,
) -> Result<Response, tokio_tungstenite::tungstenite::handshake::server::ErrorResponse> {
    let first = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| !p.is_empty())
        .map(str::to_owned);
    if let Some(p) = first.and_then(|p| HeaderValue::from_str(&p).ok()) {
        response.headers_mut().insert("sec-websocket-protocol", p);
    }
    Ok(response)
}

async fn echo(tcp: TcpStream, peer: SocketAddr, stop: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let mut ws = match tokio_tungstenite::accept_hdr_async(tcp, select_protocol).await {
        Ok(ws) => ws,
        Err(error) => {
            debug!(%peer, %error, "demo upstream handshake failed");
            return;
        }
    };
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
