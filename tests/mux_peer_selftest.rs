//! Self-test of the test upstream in `support/mux_peer.rs`: a plain
//! tokio-tungstenite client plays the broker and checks every frame against
//! the bytes `shared/mux-protocol.md` prescribes.

#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use mux_peer::*;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const STEP: Duration = Duration::from_secs(10);

async fn connect(peer: &MuxPeer, path: &str, subprotocol: Option<&str>) -> Result<Ws, WsError> {
    let mut req = format!("ws://{}{}", peer.addr, path)
        .into_client_request()
        .unwrap();
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
    }
    let (ws, resp) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")?;
    if let Some(p) = subprotocol {
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").unwrap(),
            p,
            "the peer selects the offered subprotocol"
        );
    } else {
        assert!(resp.headers().get("sec-websocket-protocol").is_none());
    }
    Ok(ws)
}

/// The next data frame the "broker" receives (pings/pongs skipped).
async fn recv(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no frame from the peer within 10 s")
            .expect("the peer closed the connection")
            .expect("websocket error");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("the peer sent valid JSON"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn recv_binary(ws: &mut Ws) -> Vec<u8> {
    match recv(ws).await {
        Message::Binary(b) => b.to_vec(),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

async fn send_text(ws: &mut Ws, text: impl Into<String>) {
    ws.send(Message::text(text.into())).await.unwrap();
}

async fn send_bin(ws: &mut Ws, bytes: Vec<u8>) {
    ws.send(Message::Binary(Bytes::from(bytes))).await.unwrap();
}

fn bin_frame(kind: u8, session: Uuid, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(session.as_bytes());
    f.extend_from_slice(payload);
    f
}

fn hello_json() -> Value {
    json!({"type":"hello","version":1,"broker":"muxgate/0.1.0",
           "instance":Uuid::new_v4().to_string(),"connection":Uuid::new_v4().to_string()})
}

fn open_body() -> Value {
    json!({"route":"/ws/chat","path":"/ws?room=7","remote_addr":"203.0.113.9:53122",
           "headers":{"user-agent":"ua","origin":"http://o"},"subprotocols":["chat.v2"],
           "claims":{"sub":"alice"},"resumed":false})
}

fn assert_malformed(event: PeerEvent, conn: ConnId, needle: &str) {
    match event {
        PeerEvent::Malformed { conn: c, why } => {
            assert_eq!(c, conn);
            assert!(
                why.contains(needle),
                "reason {why:?} should mention {needle:?}"
            );
        }
        other => panic!("expected Malformed ({needle}), got {other:?}"),
    }
}

#[tokio::test]
async fn json_encoding_echo_malformed_and_broadcast() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let mut ws = connect(&peer, "/mux?pool=1", Some(JSON_SUBPROTOCOL))
        .await
        .unwrap();
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Connected {
            conn: 1,
            path: "/mux?pool=1".into(),
            subprotocol: Some(JSON_SUBPROTOCOL.into())
        }
    );
    assert_eq!(peer.encoding(1), Some(Encoding::Json));
    assert_eq!((peer.open_connections(), peer.total_connections()), (1, 1));

    // hello
    let hello = hello_json();
    send_text(&mut ws, hello.to_string()).await;
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Hello {
            conn: 1,
            hello: hello.clone()
        }
    );

    // open, with and without the optional fields
    let s1 = Uuid::new_v4();
    let s2 = Uuid::new_v4();
    let mut open = open_body();
    open["type"] = json!("open");
    open["session"] = json!(s1.to_string());
    open["some_future_field"] = json!(42); // ignored
    send_text(&mut ws, open.to_string()).await;
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Open {
            conn: 1,
            session: s1,
            route: "/ws/chat".into(),
            path: "/ws?room=7".into(),
            remote_addr: Some("203.0.113.9:53122".into()),
            headers: json!({"user-agent":"ua","origin":"http://o"}),
            subprotocols: vec!["chat.v2".into()],
            claims: Some(json!({"sub":"alice"})),
            resumed: false,
        }
    );
    let open2 = json!({"type":"open","session":s2.to_string(),"route":"/r","path":"/p",
                       "headers":{},"subprotocols":[],"resumed":true});
    send_text(&mut ws, open2.to_string()).await;
    match peer.next_event().await {
        PeerEvent::Open {
            session,
            remote_addr,
            claims,
            resumed,
            ..
        } => {
            assert_eq!(
                (session, remote_addr, claims, resumed),
                (s2, None, None, true)
            );
        }
        other => panic!("expected Open, got {other:?}"),
    }
    assert_eq!(peer.open_sessions(), 2);

    // text message: recorded and echoed byte-exact
    let text = "héllo ✓ \"quoted\" \\ \u{0}";
    send_text(
        &mut ws,
        json!({"type":"message","session":s1.to_string(),"text":text}).to_string(),
    )
    .await;
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s1,
            payload: Payload::Text(text.into())
        }
    );
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"message","session":s1.to_string(),"text":text})
    );

    // binary message: every byte value survives, base64 standard with padding
    let all: Vec<u8> = (0..=255u8).chain([0]).collect();
    let b64 = BASE64.encode(&all);
    assert!(b64.ends_with('='));
    send_text(
        &mut ws,
        json!({"type":"message","session":s2.to_string(),"binary":b64}).to_string(),
    )
    .await;
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s2,
            payload: Payload::Binary(all.clone())
        }
    );
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"message","session":s2.to_string(),"binary":b64})
    );
    // The page's own example.
    send_text(
        &mut ws,
        json!({"type":"message","session":s2.to_string(),"binary":"AAECAw=="}).to_string(),
    )
    .await;
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s2,
            payload: Payload::Binary(vec![0, 1, 2, 3])
        }
    );
    assert_eq!(recv_json(&mut ws).await["binary"], json!("AAECAw=="));

    // "close:CODE:REASON" is answered with a close
    send_text(
        &mut ws,
        json!({"type":"message","session":s1.to_string(),"text":"close:4001:kicked: really"})
            .to_string(),
    )
    .await;
    peer.wait_for("the close command", |e| {
        matches!(e, PeerEvent::Message { .. })
    })
    .await;
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"close","session":s1.to_string(),"code":4001,"reason":"kicked: really"})
    );
    assert_eq!(peer.open_sessions(), 1);

    // the broker's close is recorded and NOT answered
    send_text(
        &mut ws,
        json!({"type":"close","session":s2.to_string(),"code":1000,"reason":"bye"}).to_string(),
    )
    .await;
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Close {
            conn: 1,
            session: s2,
            code: 1000,
            reason: "bye".into()
        }
    );
    assert_eq!(peer.open_sessions(), 0);

    // malformed frames: recorded, dropped, the connection stays up
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "not valid JSON"),
        (Message::text("[1,2]"), "not a JSON object"),
        (Message::text(r#"{"session":"x"}"#), "lacks `type`"),
        (
            Message::text(json!({"type":"message","text":"x"}).to_string()),
            "lacks `session`",
        ),
        (
            Message::text(
                json!({"type":"message","session":s1.to_string(),"binary":"AAEC!!=="}).to_string(),
            ),
            "base64",
        ),
        (
            Message::text(
                json!({"type":"message","session":s1.to_string(),"binary":"AAECAw"}).to_string(),
            ),
            "base64",
        ),
        (
            Message::text(
                json!({"type":"message","session":s1.to_string(),"text":"a","binary":"AA=="})
                    .to_string(),
            ),
            "both",
        ),
        (
            Message::text(
                json!({"type":"message","session":s1.to_string().to_uppercase(),"text":"a"})
                    .to_string(),
            ),
            "lowercase",
        ),
        (
            Message::text(
                json!({"type":"close","session":s1.to_string(),"code":70000,"reason":""})
                    .to_string(),
            ),
            "u16",
        ),
        (
            Message::text(
                json!({"type":"open","session":s1.to_string(),"route":"/r","path":"/p",
                                 "headers":{"User-Agent":"x"},"subprotocols":[],"resumed":false})
                .to_string(),
            ),
            "lower-case",
        ),
        (
            Message::text(r#"{"type":"teleport"}"#),
            "unknown frame type",
        ),
        (
            Message::Binary(Bytes::from_static(&[2; 20])),
            "binary frame on a muxgate.v1.json",
        ),
    ];
    for (msg, needle) in cases {
        ws.send(msg).await.unwrap();
        assert_malformed(peer.next_event().await, 1, needle);
    }
    send_text(
        &mut ws,
        json!({"type":"message","session":s1.to_string(),"text":"still alive"}).to_string(),
    )
    .await;
    // The close was not answered: the next frame is this echo.
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"message","session":s1.to_string(),"text":"still alive"})
    );
    peer.wait_for(
        "the echo after malformed frames",
        |e| matches!(e, PeerEvent::Message { payload: Payload::Text(t), .. } if t == "still alive"),
    )
    .await;

    // upstream-initiated frames, encoded per section 3
    peer.send(
        1,
        OutFrame::Broadcast {
            sessions: Some(vec![s1, s2]),
            payload: Payload::Text("tick".into()),
        },
    )
    .await;
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"broadcast","sessions":[s1.to_string(),s2.to_string()],"text":"tick"})
    );
    peer.send(
        1,
        OutFrame::Broadcast {
            sessions: None,
            payload: Payload::Binary(vec![0, 1, 2]),
        },
    )
    .await;
    let b = recv_json(&mut ws).await;
    assert_eq!(b, json!({"type":"broadcast","binary":"AAEC"}));
    assert!(b.get("sessions").is_none());
    peer.send(
        1,
        OutFrame::Message {
            session: s1,
            payload: Payload::Text("hi there".into()),
        },
    )
    .await;
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"message","session":s1.to_string(),"text":"hi there"})
    );
    peer.send_raw(1, Message::text("raw")).await;
    assert_eq!(recv(&mut ws).await, Message::text("raw"));

    // the broker closes the mux connection
    ws.close(None).await.unwrap();
    peer.wait_for("Disconnected", |e| {
        *e == PeerEvent::Disconnected { conn: 1 }
    })
    .await;
    assert_eq!((peer.open_connections(), peer.total_connections()), (0, 1));
    assert_eq!(peer.encoding(1), Some(Encoding::Json));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_encoding_echo_malformed_and_broadcast() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let mut ws = connect(&peer, "/internal/mux", Some(BINARY_SUBPROTOCOL))
        .await
        .unwrap();
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Connected {
            conn: 1,
            path: "/internal/mux".into(),
            subprotocol: Some(BINARY_SUBPROTOCOL.into())
        }
    );
    assert_eq!(peer.encoding(1), Some(Encoding::Binary));

    let hello = hello_json();
    send_bin(
        &mut ws,
        bin_frame(0x00, Uuid::nil(), hello.to_string().as_bytes()),
    )
    .await;
    assert_eq!(peer.next_event().await, PeerEvent::Hello { conn: 1, hello });

    let s1 = Uuid::new_v4();
    let s2 = Uuid::new_v4();
    send_bin(
        &mut ws,
        bin_frame(0x01, s1, open_body().to_string().as_bytes()),
    )
    .await;
    match peer.next_event().await {
        PeerEvent::Open {
            conn,
            session,
            route,
            path,
            headers,
            claims,
            resumed,
            ..
        } => {
            assert_eq!(
                (conn, session, route.as_str(), path.as_str()),
                (1, s1, "/ws/chat", "/ws?room=7")
            );
            assert_eq!(headers, json!({"user-agent":"ua","origin":"http://o"}));
            assert_eq!((claims, resumed), (Some(json!({"sub":"alice"})), false));
        }
        other => panic!("expected Open, got {other:?}"),
    }
    let body2 =
        json!({"route":"/r","path":"/p","headers":{},"subprotocols":["a","b"],"resumed":true});
    send_bin(&mut ws, bin_frame(0x01, s2, body2.to_string().as_bytes())).await;
    peer.wait_for(
        "open s2",
        |e| matches!(e, PeerEvent::Open { session, .. } if *session == s2),
    )
    .await;
    assert_eq!(peer.open_sessions(), 2);

    // text and binary messages echo byte-exact (the reply frame equals the request frame)
    for frame in [
        bin_frame(0x02, s1, "héllo ✓".as_bytes()),
        bin_frame(0x02, s1, b""),
        bin_frame(0x03, s2, &(0..=255u8).collect::<Vec<_>>()),
        bin_frame(0x03, s2, b""),
    ] {
        send_bin(&mut ws, frame.clone()).await;
        assert_eq!(recv_binary(&mut ws).await, frame);
    }
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s1,
            payload: Payload::Text("héllo ✓".into())
        }
    );
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s1,
            payload: Payload::Text(String::new())
        }
    );
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s2,
            payload: Payload::Binary((0..=255u8).collect())
        }
    );
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s2,
            payload: Payload::Binary(vec![])
        }
    );

    // many messages keep their order
    for i in 0..500u32 {
        send_bin(&mut ws, bin_frame(0x03, s2, &i.to_be_bytes())).await;
    }
    for i in 0..500u32 {
        assert_eq!(
            recv_binary(&mut ws).await,
            bin_frame(0x03, s2, &i.to_be_bytes())
        );
    }

    // "close:CODE:REASON" -> 0x04, u16 BE code, UTF-8 reason
    send_bin(&mut ws, bin_frame(0x02, s1, b"close:4001:kicked")).await;
    let mut expected = bin_frame(0x04, s1, &4001u16.to_be_bytes());
    expected.extend_from_slice(b"kicked");
    assert_eq!(recv_binary(&mut ws).await, expected);

    // the broker's close (empty reason allowed) is recorded and not answered
    send_bin(&mut ws, bin_frame(0x04, s2, &1006u16.to_be_bytes())).await;
    assert_eq!(
        peer.wait_for("close s2", |e| matches!(e, PeerEvent::Close { .. }))
            .await,
        PeerEvent::Close {
            conn: 1,
            session: s2,
            code: 1006,
            reason: String::new()
        }
    );
    assert_eq!(peer.open_sessions(), 0);

    // malformed frames
    let bad_hello = bin_frame(0x00, s1, hello_json().to_string().as_bytes());
    let cases: Vec<(Message, &str)> = vec![
        (Message::Binary(Bytes::from(bin_frame(0x02, s1, b"")[..16].to_vec())), "shorter than 17"),
        (Message::Binary(Bytes::new()), "shorter than 17"),
        (Message::Binary(Bytes::from(bin_frame(0x02, s1, &[0xff, 0xfe]))), "not UTF-8"),
        (Message::Binary(Bytes::from(bin_frame(0x04, s1, &[0x03]))), "u16 code"),
        (Message::Binary(Bytes::from(bin_frame(0x04, s1, &[0x03, 0xe8, 0xc3]))), "not UTF-8"),
        (Message::Binary(Bytes::from(bin_frame(0x07, s1, b"x"))), "unknown frame type 0x07"),
        (Message::Binary(Bytes::from(bin_frame(0x05, Uuid::nil(), &[0, 0, 0, 0]))), "broadcast"),
        (Message::Binary(Bytes::from(bin_frame(0x01, s1, b"{"))), "not valid JSON"),
        (
            Message::Binary(Bytes::from(bin_frame(
                0x01,
                s1,
                json!({"type":"open","route":"/r","path":"/p","headers":{},"subprotocols":[],"resumed":false})
                    .to_string()
                    .as_bytes(),
            ))),
            "must not carry",
        ),
        (Message::Binary(Bytes::from(bad_hello)), "non-zero session"),
        (Message::text("{}"), "text frame on a muxgate.v1.binary"),
    ];
    for (msg, needle) in cases {
        ws.send(msg).await.unwrap();
        assert_malformed(peer.next_event().await, 1, needle);
    }
    let alive = bin_frame(0x02, s1, b"still alive");
    send_bin(&mut ws, alive.clone()).await;
    assert_eq!(
        recv_binary(&mut ws).await,
        alive,
        "no close was sent for the broker's close"
    );

    // upstream-initiated frames, encoded per section 4
    peer.send(
        1,
        OutFrame::Broadcast {
            sessions: Some(vec![s1, s2]),
            payload: Payload::Text("tick".into()),
        },
    )
    .await;
    let mut expected = vec![0x05];
    expected.extend_from_slice(&[0; 16]);
    expected.extend_from_slice(&[0, 0, 0, 2]);
    expected.extend_from_slice(s1.as_bytes());
    expected.extend_from_slice(s2.as_bytes());
    expected.extend_from_slice(b"tick");
    assert_eq!(recv_binary(&mut ws).await, expected);

    peer.send(
        1,
        OutFrame::Broadcast {
            sessions: None,
            payload: Payload::Binary(vec![9, 8]),
        },
    )
    .await;
    let mut expected = vec![0x06];
    expected.extend_from_slice(&[0; 16]);
    expected.extend_from_slice(&[0, 0, 0, 0, 9, 8]);
    assert_eq!(recv_binary(&mut ws).await, expected);

    peer.send(
        1,
        OutFrame::Message {
            session: s2,
            payload: Payload::Binary(vec![1, 2, 3]),
        },
    )
    .await;
    assert_eq!(recv_binary(&mut ws).await, bin_frame(0x03, s2, &[1, 2, 3]));
    peer.send(
        1,
        OutFrame::Close {
            session: s2,
            code: 1011,
            reason: "oops ✓".into(),
        },
    )
    .await;
    let mut expected = bin_frame(0x04, s2, &[0x03, 0xf3]);
    expected.extend_from_slice("oops ✓".as_bytes());
    assert_eq!(recv_binary(&mut ws).await, expected);
}

#[tokio::test]
#[should_panic(expected = "cannot carry an empty session list")]
async fn binary_broadcast_to_nobody_is_refused() {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let _ws = connect(&peer, "/", Some(BINARY_SUBPROTOCOL)).await.unwrap();
    peer.wait_for("Connected", |e| matches!(e, PeerEvent::Connected { .. }))
        .await;
    peer.send(
        1,
        OutFrame::Broadcast {
            sessions: Some(vec![]),
            payload: Payload::Text("x".into()),
        },
    )
    .await;
}

#[tokio::test]
async fn manual_records_without_replying_and_checks_hello_first() {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let mut ws = connect(&peer, "/", Some(JSON_SUBPROTOCOL)).await.unwrap();
    peer.next_event().await;
    let s = Uuid::new_v4();
    send_text(
        &mut ws,
        json!({"type":"message","session":s.to_string(),"text":"x"}).to_string(),
    )
    .await;
    assert_malformed(peer.next_event().await, 1, "must be `hello`");
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Message {
            conn: 1,
            session: s,
            payload: Payload::Text("x".into())
        }
    );
    // No echo: the next frame the broker gets is the test's own.
    peer.send(
        1,
        OutFrame::Message {
            session: s,
            payload: Payload::Text("mine".into()),
        },
    )
    .await;
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"type":"message","session":s.to_string(),"text":"mine"})
    );
    assert!(peer.try_next_event().is_none());
}

#[tokio::test]
async fn no_subprotocol_offered_means_json_and_reject_does_not_select() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let _ws = connect(&peer, "/plain", None).await.unwrap();
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Connected {
            conn: 1,
            path: "/plain".into(),
            subprotocol: None
        }
    );
    assert_eq!(peer.encoding(1), Some(Encoding::Json));

    let mut peer = MuxPeer::start(Behavior::RejectSubprotocol).await;
    match connect(&peer, "/mux", Some(JSON_SUBPROTOCOL)).await {
        Err(WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
            SubProtocolError::NoSubProtocol,
        ))) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("the handshake must not select the subprotocol"),
    }
    assert_eq!(
        peer.next_event().await,
        PeerEvent::Connected {
            conn: 1,
            path: "/mux".into(),
            subprotocol: Some(JSON_SUBPROTOCOL.into())
        }
    );
    assert_eq!(peer.next_event().await, PeerEvent::Disconnected { conn: 1 });
}

/// A read that ends without a close frame from the peer.
async fn assert_dropped_without_close(ws: &mut Ws) {
    loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("the peer did not drop us")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                panic!("expected an abrupt drop, got a close {frame:?}")
            }
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            Some(Err(_)) | None => return,
        }
    }
}

#[tokio::test]
async fn kill_drops_connections_and_frees_the_port() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let mut a = connect(&peer, "/a", Some(JSON_SUBPROTOCOL)).await.unwrap();
    peer.wait_for("conn 1", |e| {
        matches!(e, PeerEvent::Connected { conn: 1, .. })
    })
    .await;
    let mut b = connect(&peer, "/b", Some(BINARY_SUBPROTOCOL))
        .await
        .unwrap();
    peer.wait_for("conn 2", |e| {
        matches!(e, PeerEvent::Connected { conn: 2, .. })
    })
    .await;
    let s = Uuid::new_v4();
    let mut open = open_body();
    open["type"] = json!("open");
    open["session"] = json!(s.to_string());
    send_text(&mut a, hello_json().to_string()).await;
    send_text(&mut a, open.to_string()).await;
    peer.wait_for("open", |e| matches!(e, PeerEvent::Open { .. }))
        .await;
    assert_eq!((peer.open_connections(), peer.open_sessions()), (2, 1));

    peer.kill().await;
    let mut gone = vec![];
    for _ in 0..2 {
        match peer.next_event().await {
            PeerEvent::Disconnected { conn } => gone.push(conn),
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    gone.sort();
    assert_eq!(gone, [1, 2]);
    assert_eq!(
        (
            peer.open_connections(),
            peer.open_sessions(),
            peer.total_connections()
        ),
        (0, 0, 2)
    );
    assert_dropped_without_close(&mut a).await;
    assert_dropped_without_close(&mut b).await;
    assert!(
        TcpStream::connect(peer.addr).await.is_err(),
        "nothing listens any more"
    );
    peer.kill().await; // idempotent

    // The port is free: a new peer can take it over (a target coming back).
    let mut again = MuxPeer::start_on(peer.addr, Behavior::Echo).await;
    assert_eq!(again.addr, peer.addr);
    let _c = connect(&again, "/c", Some(JSON_SUBPROTOCOL)).await.unwrap();
    assert_eq!(
        again.next_event().await,
        PeerEvent::Connected {
            conn: 1,
            path: "/c".into(),
            subprotocol: Some(JSON_SUBPROTOCOL.into())
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_peer_drops_its_connections() {
    let mut peer = MuxPeer::start(Behavior::Echo).await;
    let mut ws = connect(&peer, "/", Some(JSON_SUBPROTOCOL)).await.unwrap();
    peer.next_event().await;
    let addr = peer.addr;
    drop(peer);
    assert_dropped_without_close(&mut ws).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
#[should_panic(expected = "mux connection 7 is gone")]
async fn send_to_an_unknown_connection_panics() {
    let peer = MuxPeer::start(Behavior::Manual).await;
    peer.send(
        7,
        OutFrame::Close {
            session: Uuid::new_v4(),
            code: 1000,
            reason: String::new(),
        },
    )
    .await;
}

/// The broker's keepalive pings are answered (section 1, `pong_wait`).
#[tokio::test]
async fn pings_are_answered() {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let mut ws = connect(&peer, "/", Some(BINARY_SUBPROTOCOL)).await.unwrap();
    peer.next_event().await;
    for i in 0..3u8 {
        ws.send(Message::Ping(Bytes::from(vec![i; 4])))
            .await
            .unwrap();
        let reply = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no pong within 10 s")
            .expect("connection ended")
            .expect("websocket error");
        assert_eq!(reply, Message::Pong(Bytes::from(vec![i; 4])));
    }
    assert!(peer.try_next_event().is_none());
}
