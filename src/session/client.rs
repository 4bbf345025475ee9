//! The client's WebSocket, built one way for every session that decodes
//! messages (the message relay and multiplexed sessions; the frame relay
//! keeps the raw upgraded socket).

use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::metrics::{CompressionCounters, Metrics};
use crate::session::side::Direction;
use crate::transport::chunked::{self, ChunkedRead};
use crate::transport::upgraded::{self, ClientIo};
use muxgate_backend::deflate::stream::{DeflateSettings, Deflating};

/// A client's upgraded connection, read in chunks, with permessage-deflate
/// taken off and put on when the client agreed it.
pub(crate) type DecodedClientIo = Deflating<ChunkedRead<ClientIo>>;

/// permessage-deflate as agreed with a client, and where its bytes count.
pub(crate) struct ClientDeflate {
    pub settings: DeflateSettings,
    pub counters: CompressionCounters,
}

impl ClientDeflate {
    /// The client socket's compression for a session of `upstream`, if the
    /// handshake agreed one. Boxed: a session's future holds it across the
    /// upgrade, and every idle session, compressed or not, would pay for
    /// its size inline.
    pub(crate) fn agreed(
        settings: Option<DeflateSettings>,
        metrics: &Metrics,
        upstream: &str,
    ) -> Option<Box<ClientDeflate>> {
        settings.map(|settings| {
            Box::new(ClientDeflate {
                settings,
                counters: metrics.compression_counters(
                    upstream,
                    "client",
                    Direction::ClientToUpstream,
                    Direction::UpstreamToClient,
                ),
            })
        })
    }
}

/// The client's WebSocket, once hyper has handed over the upgraded
/// connection; reads go through [`ChunkedRead`], so an idle client holds
/// only a small decoder buffer.
pub(crate) async fn client_socket(
    on_upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
    deflate: Option<Box<ClientDeflate>>,
) -> std::io::Result<WebSocketStream<DecodedClientIo>> {
    let io = ChunkedRead::new(upgraded::client(on_upgrade).await?, config.read_buffer_size);
    let io = match deflate {
        None => Deflating::plain(io),
        Some(d) => {
            let ClientDeflate { settings, counters } = *d;
            Deflating::new(io, Role::Server, settings, Box::new(counters))
        }
    };
    let config = config.read_buffer_size(chunked::DECODER_BUFFER);
    Ok(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
}
