//! The demo upstream over a real socket: echo, subprotocol, close.

#![forbid(unsafe_code)]

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Echoes text and binary, selects the first offered subprotocol, answers a
/// close with its code, and stops when its token is cancelled.
#[tokio::test]
async fn demo_echoes_and_stops() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(muxgate_backend::demo::serve(listener, stop.clone()));

    let mut request = format!("ws://{addr}/echo").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "a.v1, b.v2".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "a.v1");
    for msg in [Message::text("hi ✓"), Message::binary(vec![0u8, 1, 2, 255])] {
        ws.send(msg.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), msg);
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected a close, got {other:?}"),
    }
    stop.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("demo server stops")
        .unwrap();
}
