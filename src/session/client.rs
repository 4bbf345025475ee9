//! The client's WebSocket, built one way for every session that decodes
//! messages (the message relay and multiplexed sessions; the frame relay
//! keeps the raw upgraded socket).

use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::transport::chunked::{self, ChunkedRead};
use crate::transport::upgraded::{self, ClientIo};

/// A client's upgraded connection, read in chunks.
pub(crate) type DecodedClientIo = ChunkedRead<ClientIo>;

/// The client's WebSocket, once hyper has handed over the upgraded
/// connection; reads go through [`ChunkedRead`], so an idle client holds
/// only a small decoder buffer.
pub(crate) async fn client_socket(
    on_upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
) -> std::io::Result<WebSocketStream<DecodedClientIo>> {
    let io = ChunkedRead::new(upgraded::client(on_upgrade).await?, config.read_buffer_size);
    let config = config.read_buffer_size(chunked::DECODER_BUFFER);
    Ok(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
}
