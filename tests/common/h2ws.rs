//! WebSockets over HTTP/2 (RFC 8441) for tests: `muxgate_backend::h2ws`'s
//! client, each step under [`within`], and tungstenite clients on its
//! streams.

use muxgate_backend::h2ws::{Connection, Stream, Windows};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::within;

/// What a client's receive windows are unless a test asks otherwise.
pub const STREAM_WINDOW: u32 = 1 << 20;

/// A WebSocket on one stream of an HTTP/2 connection.
pub type H2Client = WebSocketStream<H2Stream>;
/// A stream's DATA frames as bytes to read and write.
pub type H2Stream = Stream;

/// One HTTP/2 connection to the broker.
pub struct H2Connection {
    connection: Connection,
    /// Resolves when the connection has ended (after GOAWAY, or an error).
    pub driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl H2Connection {
    /// Prior-knowledge HTTP/2 (h2c) to `addr`.
    pub async fn cleartext(addr: std::net::SocketAddr) -> H2Connection {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).unwrap();
        H2Connection::over(tcp, "http", addr.to_string(), STREAM_WINDOW).await
    }

    /// HTTP/2 on `io`, with each stream's receive window `window` (the
    /// connection's holds 64 of them); returns once the broker's SETTINGS
    /// have arrived, which must allow extended CONNECT.
    pub async fn over<T>(
        io: T,
        scheme: &'static str,
        authority: String,
        window: u32,
    ) -> H2Connection
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let windows = Windows {
            stream: window,
            connection: window.saturating_mul(64).min(i32::MAX as u32),
        };
        let origin = format!("{scheme}://{authority}");
        let (connection, driver) = within(
            "the broker's SETTINGS",
            Connection::handshake(io, origin, windows),
        )
        .await
        .expect("HTTP/2 handshake, PING answered");
        assert!(
            connection.allows_extended_connect(),
            "the broker's SETTINGS allow extended CONNECT"
        );
        H2Connection { connection, driver }
    }

    /// The most streams the broker lets this connection open at once.
    pub fn max_streams(&self) -> usize {
        self.connection.max_streams()
    }

    /// Sends an extended CONNECT for `path` with `headers` and returns the
    /// response head and, if the broker answered 2xx, the stream.
    pub async fn connect(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(http::response::Parts, H2Stream), h2::Error> {
        within(
            "the CONNECT's answer",
            self.connection.connect(path, headers),
        )
        .await
    }

    /// Opens a WebSocket on `path`, which must be accepted (200).
    pub async fn open(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (H2Client, http::response::Parts) {
        let (head, stream) = self.connect(path, headers).await.expect("stream opened");
        assert_eq!(head.status, 200, "extended CONNECT to {path}: {head:?}");
        let ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        (ws, head)
    }

    /// Any request on a new stream (a GET, say): its status.
    pub async fn request(&self, method: http::Method, path: &str) -> u16 {
        within("the answer", self.connection.request(method, path))
            .await
            .expect("answer")
            .status
            .as_u16()
    }
}
