//! Direct mode end to end: real broker, real upstreams, real clients.

mod common;

use bytes::Bytes;
use common::upstream::{
    answers_close_and_holds_listener, greeting_in_handshake_listener, http_500_listener,
    late_talker_listener, refused_addr, silent_listener, TestUpstream,
};
use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Text and binary messages of every length class the frame format has
/// (7-bit, 16-bit and 64-bit lengths, and their edges) come back byte-exact.
#[tokio::test]
async fn echoes_text_and_binary_byte_exact_at_every_length_class() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        echo_roundtrip(&mut ws, Message::Binary(Bytes::from(bytes))).await;
        let text: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        echo_roundtrip(&mut ws, Message::text(text)).await;
    }
    // Multi-byte characters survive unchanged too.
    echo_roundtrip(&mut ws, Message::text("héllo wörld ✓ 🚀")).await;
}

/// A message sent in three fragments reaches the upstream as one message.
#[tokio::test]
async fn reassembles_a_fragmented_message() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let parts: [(&str, OpCode, bool); 3] = [
        ("frag", OpCode::Data(Data::Text), false),
        ("ment", OpCode::Data(Data::Continue), false),
        ("ed ✓", OpCode::Data(Data::Continue), true),
    ];
    for (text, op, fin) in parts {
        ws.send(Message::Frame(Frame::message(Bytes::from(text), op, fin)))
            .await
            .unwrap();
    }
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("fragmented ✓"))
    );
}

/// A client's close code and reason reach the upstream unchanged.
#[tokio::test]
async fn client_close_code_and_reason_reach_the_upstream() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    assert_eq!(up.close().await, (4001, "bye".to_string()));
    // The broker answers the client's close with the same code.
    assert_eq!(expect_close(&mut ws).await, (4001, "bye".to_string()));
    expect_end(&mut ws).await;
}

/// An upstream's close code and reason reach the client unchanged.
#[tokio::test]
async fn upstream_close_code_and_reason_reach_the_client() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    ws.send(Message::text("close:4001:bye")).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, (4001, "bye".to_string()));
    expect_end(&mut ws).await;
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_close_codes_sent_total",
            &[("side", "client"), ("code", "4001")]
        ),
        1.0
    );
}

/// The client's offered subprotocols go upstream, and the one the upstream
/// selects (here its last, not the client's first) comes back to the client.
#[tokio::test]
async fn relays_the_subprotocol_the_upstream_selects() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (_ws, response) = connect(
        &broker.url("/ws/echo"),
        &[("sec-websocket-protocol", "chat.v1, chat.v2")],
    )
    .await;
    let (_, headers) = up.handshake().await;
    assert_eq!(
        header(&headers, "sec-websocket-protocol"),
        Some("chat.v1, chat.v2")
    );
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v2"
    );
}

/// No subprotocol offered: none is selected either way.
#[tokio::test]
async fn no_subprotocol_when_none_is_offered() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (_ws, response) = connect(&broker.url("/ws/echo"), &[]).await;
    let (_, headers) = up.handshake().await;
    assert_eq!(header(&headers, "sec-websocket-protocol"), None);
    assert!(response.headers().get("sec-websocket-protocol").is_none());
}

/// The path is rewritten to internal_path with the query kept, and the
/// upstream request carries the forwarding headers, cookies, credentials and
/// forward_headers, but no extension other than permessage-deflate (whose
/// offers the frame relay passes on: tests/compression.rs).
#[tokio::test]
async fn rewrites_the_path_and_forwards_headers() {
    let mut up = TestUpstream::start().await;
    let cfg = direct_config(
        &[up.addr],
        "",
        "forward_headers: [user-agent, x-tenant, cookie, x-request-id]",
        "",
    );
    let broker = start_broker(&cfg).await;
    let (_ws, response) = connect(
        &broker.url("/ws/echo?room=7&x=%20y"),
        &[
            ("cookie", "sid=abc"),
            ("authorization", "Bearer t0k"),
            ("user-agent", "muxgate-test"),
            ("x-tenant", "acme"),
            ("x-not-forwarded", "1"),
            ("sec-websocket-extensions", "x-webkit-deflate-frame"),
        ],
    )
    .await;
    let (path, h) = up.handshake().await;
    assert_eq!(path, "/echo?room=7&x=%20y");
    assert_eq!(header(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(
        header(&h, "x-forwarded-host"),
        Some(broker.client_addr.to_string().as_str())
    );
    let request_id = header(&h, "x-request-id").expect("a request id");
    assert!(uuid::Uuid::parse_str(request_id).is_ok(), "{request_id}");
    assert_eq!(response.headers().get("x-request-id").unwrap(), request_id);
    assert_eq!(header(&h, "cookie"), Some("sid=abc"));
    assert_eq!(
        h.iter().filter(|(k, _)| k == "cookie").count(),
        1,
        "cookie once"
    );
    assert_eq!(h.iter().filter(|(k, _)| k == "x-request-id").count(), 1);
    assert_eq!(header(&h, "authorization"), Some("Bearer t0k"));
    assert_eq!(header(&h, "user-agent"), Some("muxgate-test"));
    assert_eq!(header(&h, "x-tenant"), Some("acme"));
    assert_eq!(header(&h, "x-not-forwarded"), None);
    assert_eq!(header(&h, "sec-websocket-extensions"), None);
    // Nor is an extension accepted from the client.
    assert!(response.headers().get("sec-websocket-extensions").is_none());
}

/// A client's own X-Request-Id is kept, and X-Forwarded-For is appended to.
#[tokio::test]
async fn keeps_the_clients_request_id_and_appends_to_forwarded_for() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let _ = connect(
        &broker.url("/ws/echo"),
        &[
            ("x-request-id", "req-42"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    let (_, h) = up.handshake().await;
    assert_eq!(header(&h, "x-request-id"), Some("req-42"));
    assert_eq!(
        header(&h, "x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
}

/// Every refusal before the upgrade is an HTTP status with the right headers.
#[tokio::test]
async fn refuses_bad_requests_with_http_statuses() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(
        &[up.addr],
        "",
        "allowed_origins: [\"https://app.example\"]",
        "",
    );
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    let origin = "Origin: https://app.example\r\n";

    let (s, _, _) = raw_http(a, &upgrade_request(a, "/nope", origin)).await;
    assert_eq!(s, 404, "unknown path");

    let post = upgrade_request(a, "/ws/echo", origin).replacen("GET", "POST", 1);
    let (s, h, _) = raw_http(
        a,
        &post.replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
    )
    .await;
    assert_eq!(s, 405, "POST");
    assert_eq!(header(&h, "allow"), Some("GET"));

    let (s, h, _) = http_get(a, "/ws/echo").await;
    assert_eq!(s, 426, "no upgrade");
    assert_eq!(header(&h, "upgrade"), Some("websocket"));

    let bad_key =
        upgrade_request(a, "/ws/echo", origin).replace("dGhlIHNhbXBsZSBub25jZQ==", "not-a-key");
    let (s, _, body) = raw_http(a, &bad_key).await;
    assert_eq!(s, 400, "bad key");
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");

    let short_key =
        upgrade_request(a, "/ws/echo", origin).replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=");
    assert_eq!(raw_http(a, &short_key).await.0, 400, "key of 5 bytes");

    let bad_version = upgrade_request(a, "/ws/echo", origin)
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (s, h, _) = raw_http(a, &bad_version).await;
    assert_eq!(s, 400, "bad version");
    assert_eq!(header(&h, "sec-websocket-version"), Some("13"));

    let no_connection = upgrade_request(a, "/ws/echo", origin)
        .replace("Connection: Upgrade", "Connection: keep-alive");
    assert_eq!(
        raw_http(a, &no_connection).await.0,
        400,
        "Connection without Upgrade"
    );

    // Asks to upgrade without saying to what: malformed, not a plain GET.
    let no_upgrade_header =
        upgrade_request(a, "/ws/echo", origin).replace("Upgrade: websocket\r\n", "");
    let (s, _, body) = raw_http(a, &no_upgrade_header).await;
    assert_eq!(s, 400, "Connection: Upgrade without Upgrade");
    assert!(body.contains("malformed WebSocket upgrade"), "{body}");
    // Upgrading to something else is not a malformed WebSocket upgrade.
    let other_protocol =
        upgrade_request(a, "/ws/echo", origin).replace("Upgrade: websocket", "Upgrade: h2c");
    assert_eq!(raw_http(a, &other_protocol).await.0, 426, "Upgrade: h2c");

    let (s, _, _) = raw_http(
        a,
        &upgrade_request(a, "/ws/echo", "Origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(s, 403, "wrong origin");
    let (s, _, _) = raw_http(a, &upgrade_request(a, "/ws/echo", "")).await;
    assert_eq!(s, 403, "missing origin");

    let (s, h, _) = raw_http(a, &upgrade_request(a, "/ws/echo", origin)).await;
    assert_eq!(s, 101, "the same request done right");
    assert!(header(&h, "sec-websocket-accept").is_some());

    let m = broker.metrics().await;
    for (status, reason) in [
        ("404", "not_found"),
        ("405", "method_not_allowed"),
        ("426", "upgrade_required"),
        ("403", "origin_not_allowed"),
    ] {
        assert!(
            m.value(
                "muxgate_handshakes_rejected_total",
                &[("status", status), ("reason", reason)]
            ) >= 1.0,
            "{status} {reason} counted"
        );
    }
    assert_eq!(
        m.value("muxgate_handshakes_rejected_total", &[("status", "400")]),
        5.0
    );
}

/// What an upstream sends in the same packet as its 101 reaches the
/// client, in both relays: the broker reads it along with the response.
#[tokio::test]
async fn bytes_behind_the_101_are_relayed() {
    let (up, _task) = greeting_in_handshake_listener("hello from the upstream").await;
    for plugins in [
        "",
        "plugins: [{name: message_size, stage: post_response, settings: {max_bytes: 1000}}]",
    ] {
        let broker = start_broker(&direct_config(&[up], "", plugins, "")).await;
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        assert_eq!(
            next_message(&mut ws).await,
            Some(Message::text("hello from the upstream")),
            "with plugins {plugins:?}"
        );
    }
}

/// What a client sends in the same packet as its upgrade request reaches
/// the upstream, in both relays: hyper reads it along with the request,
/// and the broker takes it over with the socket.
#[tokio::test]
async fn bytes_behind_the_request_are_relayed() {
    let up = TestUpstream::start().await;
    for plugins in [
        "",
        "plugins: [{name: message_size, stage: pre_request, settings: {max_bytes: 1000}}]",
    ] {
        let broker = start_broker(&direct_config(&[up.addr], "", plugins, "")).await;
        assert_eq!(
            echo_of_text_behind_the_request(broker.client_addr, "/ws/echo", "early bird").await,
            "early bird",
            "with plugins {plugins:?}"
        );
    }
}

/// A client connection that sends nothing, or only part of a request head,
/// within `header_read_timeout` is closed and counted, so that idle
/// connections cannot pile up and hold the broker's file descriptors; a
/// client that sends its request in time is served as always.
#[tokio::test]
async fn a_client_without_a_request_head_in_time_is_disconnected() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(
        &[up.addr],
        "",
        "",
        "header_read_timeout: 200ms",
    ))
    .await;
    let idle = TcpStream::connect(broker.client_addr).await.unwrap();
    let mut partial = TcpStream::connect(broker.client_addr).await.unwrap();
    partial
        .write_all(b"GET /ws/echo HTTP/1.1\r\nHost: muxgate\r\n")
        .await
        .unwrap();
    for (what, mut tcp) in [("idle", idle), ("partial", partial)] {
        let mut buf = [0u8; 64];
        let read = within("the broker to close the connection", tcp.read(&mut buf)).await;
        assert_eq!(read.unwrap(), 0, "{what}: closed without an answer");
    }
    broker
        .metrics_when("both timeouts counted", |m| {
            m.value("muxgate_client_header_timeouts_total", &[]) == 2.0
        })
        .await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::text("in time")).await;
}

/// What the upstream sends after the broker closed the session cannot be
/// delivered: the frame relay reads it up to the upstream's close and
/// counts each message as dropped.
#[tokio::test]
async fn messages_after_the_brokers_close_are_counted_as_dropped() {
    let (up, upstream_done) = late_talker_listener(3).await;
    // A client that never answers the close keeps the drain, and with it
    // the admin listener, going.
    let cfg = direct_config(&[up], "close_timeout: 30s", "", "shutdown_grace: 30s");
    let broker = start_broker(&cfg).await;
    let (_ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    broker.shutdown.begin();
    within("the broker to hang up on the upstream", upstream_done)
        .await
        .unwrap();
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_messages_dropped_total",
            &[
                ("direction", "upstream_to_client"),
                ("reason", "session_closed")
            ]
        ),
        3.0
    );
}

/// A refused upstream connection is a 502 before any upgrade.
#[tokio::test]
async fn refused_upstream_is_502() {
    let dead = refused_addr().await;
    let broker = start_broker(&direct_config(&[dead], "", "", "")).await;
    let a = broker.client_addr;
    let (s, _, body) = raw_http(a, &upgrade_request(a, "/ws/echo", "")).await;
    assert_eq!(s, 502);
    // return_error_details is off: the body is generic.
    assert_eq!(body.trim(), "upstream unavailable");
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_upstream_connect_failures_total",
            &[("reason", "connect")]
        ),
        1.0
    );
}

/// With return_error_details the body names the underlying error.
#[tokio::test]
async fn error_details_are_added_when_enabled() {
    let dead = refused_addr().await;
    let cfg = direct_config(&[dead], "return_error_details: true", "", "");
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    let (s, _, body) = raw_http(a, &upgrade_request(a, "/ws/echo", "")).await;
    assert_eq!(s, 502);
    assert!(
        body.starts_with("upstream unavailable: connecting to ws://"),
        "{body}"
    );
}

/// With return_error_details a close the broker originates says why.
#[tokio::test]
async fn close_reasons_carry_details_when_enabled() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "return_error_details: true", "", "");
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    ws.send(Message::text("drop")).await.unwrap();
    let (code, reason) = raw_close(ws).await;
    assert_eq!(code, 1014);
    assert!(
        reason.starts_with("upstream went away: ") && reason.contains("without closing handshake"),
        "{reason}"
    );
    assert!(reason.len() <= 123);
}

/// An upstream that answers the upgrade with HTTP 500 is a 502.
#[tokio::test]
async fn failed_upstream_handshake_is_502() {
    let (addr, _task) = http_500_listener().await;
    let broker = start_broker(&direct_config(&[addr], "", "", "")).await;
    let a = broker.client_addr;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        502
    );
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_upstream_connect_failures_total",
            &[("reason", "handshake")]
        ),
        1.0
    );
}

/// An upstream that never answers within handshake_timeout is a 504.
#[tokio::test]
async fn upstream_handshake_timeout_is_504() {
    let (addr, _task) = silent_listener().await;
    let cfg = direct_config(&[addr], "handshake_timeout: 200ms", "", "");
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        504
    );
}

/// Once passive health marks the only target unhealthy, clients get 503.
#[tokio::test]
async fn no_healthy_target_is_503() {
    let dead = refused_addr().await;
    let cfg = direct_config(
        &[dead],
        "",
        "health_checks: {passive: true, threshold: 1, interval: 60}",
        "",
    );
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        502
    );
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        503
    );
    let m = broker.metrics().await;
    assert_eq!(
        m.value(
            "muxgate_handshakes_rejected_total",
            &[("reason", "no_healthy_target")]
        ),
        1.0
    );
}

/// An upstream that vanishes without a close handshake closes the client with 1014.
#[tokio::test]
async fn upstream_lost_without_close_is_1014() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    ws.send(Message::text("drop")).await.unwrap();
    assert_eq!(
        raw_close(ws).await,
        (1014, "upstream went away".to_string())
    );
}

/// A client that never answers pings is dropped after pong_wait and the
/// upstream is closed with 1001.
#[tokio::test]
async fn client_that_misses_its_pong_is_dropped() {
    let mut up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "ping_period: 100ms\npong_wait: 300ms", "", "");
    let broker = start_broker(&cfg).await;
    // Never polled until the end, so tungstenite never sends a pong.
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    assert_eq!(up.close().await.0, 1001);
    expect_end(&mut ws).await;
    let m = broker.metrics().await;
    assert_eq!(
        m.value("muxgate_ping_timeouts_total", &[("side", "client")]),
        1.0
    );
}

/// A client that answers pings stays connected across many ping periods.
#[tokio::test]
async fn client_that_answers_pings_stays() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "ping_period: 50ms\npong_wait: 150ms", "", "");
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    // Reading (which answers pings) until 10 pings have arrived: 500ms.
    let mut pings = 0;
    while pings < 10 {
        match within("a ping", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    echo_roundtrip(&mut ws, Message::text("still here")).await;
}

/// An upstream that stops answering pings closes the client with 1014.
#[tokio::test]
async fn upstream_that_misses_its_pong_closes_the_client_with_1014() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "ping_period: 100ms\npong_wait: 300ms", "", "");
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    ws.send(Message::text("deaf")).await.unwrap();
    assert_eq!(raw_close(ws).await.0, 1014);
    let m = broker.metrics().await;
    assert_eq!(
        m.value("muxgate_ping_timeouts_total", &[("side", "upstream")]),
        1.0
    );
}

/// A message over max_message_size closes its sender with 1009.
#[tokio::test]
async fn oversized_message_is_1009() {
    let mut up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "max_message_size: 1KiB", "", "");
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::Binary(Bytes::from(vec![7u8; 1024]))).await;
    ws.send(Message::Binary(Bytes::from(vec![7u8; 1025])))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut ws).await.0, 1009);
    assert_eq!(up.close().await.0, 1001);
}

/// A text message that is not UTF-8 closes its sender with 1007.
#[tokio::test]
async fn invalid_utf8_is_1007() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let bad = Frame::message(
        Bytes::from_static(&[0x68, 0xff, 0xfe]),
        OpCode::Data(Data::Text),
        true,
    );
    ws.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(expect_close(&mut ws).await.0, 1007);
}

/// max_connections_per_ip answers 429 and frees the slot when the session ends.
#[tokio::test]
async fn per_ip_limit_is_429_and_released_after_close() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "", "", "max_connections_per_ip: 1");
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    let (mut first, _) = connect(&broker.url("/ws/echo"), &[]).await;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        429
    );
    first.close(None).await.unwrap();
    expect_end(&mut first).await;
    let (mut again, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut again, Message::text("slot reused")).await;
}

/// max_connections answers 503 and frees the slot when the session ends.
#[tokio::test]
async fn max_connections_is_503_and_released_after_close() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "", "", "max_connections: 2");
    let broker = start_broker(&cfg).await;
    let a = broker.client_addr;
    let (mut first, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (_second, _) = connect(&broker.url("/ws/echo"), &[]).await;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        503
    );
    // An upstream that goes away releases the slot too.
    first.send(Message::text("drop")).await.unwrap();
    expect_end(&mut first).await;
    let (mut again, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut again, Message::text("slot reused")).await;
}

/// Shutdown closes every client with 1001 and the upstream cleanly.
#[tokio::test]
async fn shutdown_closes_clients_with_1001() {
    let mut up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::text("before")).await;
    let shutdown = broker.shutdown.clone();
    let task = broker.task;
    shutdown.begin();
    assert_eq!(
        expect_close(&mut ws).await,
        (1001, "server shutting down".to_string())
    );
    // Reading on lets the client's close reply go out.
    expect_end(&mut ws).await;
    assert_eq!(up.close().await.0, 1001);
    let outcome = within("drain", task).await.unwrap();
    assert_eq!(outcome, muxgate::shutdown::DrainOutcome::Drained);
}

/// Messages keep their order under load in both directions.
#[tokio::test]
async fn keeps_order_under_load() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (mut tx, mut rx) = futures_util::StreamExt::split(ws);
    let n = 5000;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tx.feed(Message::text(i.to_string())).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    for i in 0..n {
        match within("echo", futures_util::StreamExt::next(&mut rx)).await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), i.to_string()),
            other => panic!("expected echo {i}, got {other:?}"),
        }
    }
    drop(sender.await.unwrap());
}

/// Without message plugins the session takes the frame relay: a client's
/// ping crosses to the upstream and the upstream's pong comes back, while
/// the pongs that answer the broker's own pings (every 50 ms here) go no
/// further than the broker. The client's payload is the one the broker
/// once used for its own pings, whose pongs it then swallowed.
#[tokio::test]
async fn pings_cross_the_frame_relay_end_to_end() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "ping_period: 50ms\npong_wait: 1s", "", "");
    let broker = start_broker(&cfg).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    ws.send(Message::Ping(Bytes::from_static(b"muxgate")))
        .await
        .unwrap();
    let mut broker_pings = 0;
    loop {
        match within("the pong", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], b"muxgate");
                break;
            }
            // The broker's own; tungstenite answers it.
            Some(Ok(Message::Ping(p))) => {
                assert!(p.starts_with(b"muxgate:"), "the broker's ping: {p:?}");
                broker_pings += 1;
            }
            other => panic!("expected the pong, got {other:?}"),
        }
    }
    // Several broker pings later the client has seen only its own pong.
    while broker_pings < 5 {
        match within("a ping", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Ping(_))) => broker_pings += 1,
            other => panic!("expected only the broker's pings, got {other:?}"),
        }
    }
    echo_roundtrip(&mut ws, Message::text("still here")).await;
}

/// An upstream that answers the close handshake but keeps its connection
/// open (a server should close first, and this one never does) holds the
/// client neither for `close_timeout` nor for `pong_wait`: once both close
/// frames have passed, the broker ends the client's connection at once and
/// its slot is free for the next session.
#[tokio::test]
async fn a_finished_close_handshake_ends_the_client_connection_at_once() {
    let (addr, mut holding) = answers_close_and_holds_listener().await;
    let cfg = direct_config(
        &[addr],
        "close_timeout: 60s\nping_period: 30s\npong_wait: 60s",
        "",
        "max_connections_per_ip: 1",
    );
    let broker = start_broker(&cfg).await;
    let (mut first, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut first, Message::text("before")).await;
    first.close(None).await.unwrap();
    within("the end of the client's connection", expect_end(&mut first)).await;
    let _kept_open = holding
        .recv()
        .await
        .expect("the upstream holds its connection");
    let (mut again, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut again, Message::text("slot reused")).await;
}

/// The message relay: the same route with a message plugin that passes
/// everything.
const MESSAGE_RELAY: &str =
    "plugins: [{name: message_size, stage: post_response, settings: {max_bytes: 1000000}}]";

/// Close frames that break a rule (RFC 6455 §5.5.1, §7.4.1), as header
/// byte, payload and the code their receiver fails the connection with:
/// the codes of Autobahn's cases 7.9.1-7.9.9 and 5000, a one-byte payload
/// (7.3.2), a reason that is not UTF-8 (7.5.1) and reserved bits (3.7).
fn rule_breaking_closes() -> Vec<(u8, Vec<u8>, u16)> {
    let mut closes: Vec<_> = [0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 5000]
        .iter()
        .map(|code| (0x88, code.to_be_bytes().to_vec(), 1002))
        .collect();
    closes.push((0x88, vec![0x03], 1002));
    closes.push((0x88, vec![0x03, 0xe8, b'o', 0xed, 0xa0, 0x80, b'k'], 1007));
    closes.push((0x88 | 0x70, vec![0x03, 0xe8], 1002));
    closes
}

/// A hand-written upstream that, for each of `closes` in turn, accepts a
/// session, sends that close frame, and reports what the broker answers
/// (read raw) before closing the connection as a server does.
async fn rule_breaking_upstream(
    closes: Vec<(u8, Vec<u8>, u16)>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<common::raw::CloseSeen>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for (first, payload, _) in closes {
            let mut peer = common::raw::RawPeer::accept(&listener).await;
            peer.write_frame(first, &payload).await;
            let answer = peer.next_close().await;
            peer.shutdown().await;
            if tx.send(answer).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An upstream's close frame that breaks a rule is not passed on: the
/// broker fails the upstream with 1002 (1007 for a reason that is not
/// UTF-8), as the receiver of such a frame must, and the client gets 1014
/// (the upstream failed) through either relay, except that the message
/// relay's tungstenite turns a close code no endpoint may send into 1002
/// before the broker sees it.
#[tokio::test]
async fn an_upstream_close_that_breaks_a_rule_fails_the_upstream() {
    use common::raw::{CloseSeen, RawPeer};
    for relay in ["", MESSAGE_RELAY] {
        let closes = rule_breaking_closes();
        let (addr, mut answers) = rule_breaking_upstream(closes.clone()).await;
        let cfg = direct_config(
            &[addr],
            "",
            &format!("health_checks: {{passive: false}}\n{relay}"),
            "",
        );
        let broker = start_broker(&cfg).await;
        for (first, payload, code) in closes {
            let what = format!("{first:#x} {payload:?}, relay {relay:?}");
            // Raw: tungstenite's reader would rewrite 1014, and its
            // handshake may read the close behind the 101.
            let mut client = RawPeer::client(broker.client_addr, "/ws/echo").await;
            let bad_code = first == 0x88 && payload.len() == 2;
            let client_code = if bad_code && !relay.is_empty() {
                1002
            } else {
                1014
            };
            assert_eq!(client.close_code().await, client_code, "{what}");
            client.write_frame(0x88, &client_code.to_be_bytes()).await;
            client.ended().await;
            let answer = within("the upstream's report", answers.recv())
                .await
                .unwrap();
            assert!(
                matches!(answer, CloseSeen::Close(c, _) if c == code),
                "{what}: the upstream got {answer:?}"
            );
        }
    }
}

/// A client's close frame that breaks a rule is not passed on either: the
/// client gets 1002 (1007 for a reason that is not UTF-8) and its
/// connection ends, through either relay.
#[tokio::test]
async fn a_client_close_that_breaks_a_rule_fails_the_client() {
    use common::raw::{CloseSeen, RawPeer};
    for relay in ["", MESSAGE_RELAY] {
        let mut up = TestUpstream::start().await;
        let broker = start_broker(&direct_config(&[up.addr], "", relay, "")).await;
        for (first, payload, code) in rule_breaking_closes() {
            let what = format!("{first:#x} {payload:?}, relay {relay:?}");
            let mut client = RawPeer::client(broker.client_addr, "/ws/echo").await;
            client.write_frame(0x81, b"before").await;
            let echo = within("the echo", client.read_frame())
                .await
                .expect("an echo");
            assert_eq!(echo.payload, b"before", "{what}");
            client.write_frame(first, &payload).await;
            let answer = client.next_close().await;
            assert!(
                matches!(answer, CloseSeen::Close(c, _) if c == code),
                "{what}: the client got {answer:?}"
            );
            client.ended().await;
            // The upstream hears of the end too.
            let (up_code, _) = up.close().await;
            assert!(matches!(up_code, 1001 | 1002), "{what}: {up_code}");
        }
    }
}

/// An upstream that breaks a rule in the middle of a frame it never
/// finishes ends the session at once, not after `close_timeout`: a frame
/// refused at its header has passed nothing, so the client still gets
/// 1014 (Autobahn 3.4, 4.2.5, sent byte by byte); one refused inside its
/// payload (invalid UTF-8, Autobahn 6.3.1) has passed its start, even if
/// the rest came in the same read, so the client's connection is shut down
/// without a close (which would land inside that frame). The upstream gets
/// 1002 or 1007 either way.
#[tokio::test]
async fn a_rule_broken_inside_an_unfinished_frame_ends_the_session_at_once() {
    use common::raw::{CloseSeen, RawPeer};
    // A text frame of 10 bytes: with RSV1, or with a byte that is never UTF-8.
    let unfinished: [(&[u8], Option<u16>, u16); 3] = [
        (&[0xc1, 10, b'a'], Some(1014), 1002),
        (&[0x81, 10, b'a', 0xff], None, 1007),
        // Refused in the read that ends it: its header went on alone.
        (&[0x81, 2, b'a', 0xff], None, 1007),
    ];
    for (bytes, client_code, upstream_code) in unfinished {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let mut peer = RawPeer::accept(&listener).await;
            peer.write_raw(bytes).await;
            let answer = peer.next_close().await;
            peer.shutdown().await;
            answer
        });
        // Without the fix, each side waits out this.
        let cfg = direct_config(&[addr], "close_timeout: 60s", "", "");
        let broker = start_broker(&cfg).await;
        let mut client = RawPeer::client(broker.client_addr, "/ws/echo").await;
        match client_code {
            Some(code) => {
                assert_eq!(client.close_code().await, code, "{bytes:?}");
                client.write_frame(0x88, &code.to_be_bytes()).await;
                client.ended().await;
            }
            // The frame's start was passed on; nothing can follow it.
            None => client.ended().await,
        }
        let answer = within("the upstream's answer", upstream).await.unwrap();
        assert!(
            matches!(answer, CloseSeen::Close(c, _) if c == upstream_code),
            "{bytes:?}: the upstream got {answer:?}"
        );
    }
}

/// A client refused inside a frame it never finishes (invalid UTF-8,
/// Autobahn's fuzzing client in 6.4.3 and 6.4.4) gets 1007, and its answer
/// lands inside that frame where it cannot be told from payload: the
/// broker does not wait `close_timeout` for it, but ends the connection.
#[tokio::test]
async fn a_client_refused_inside_its_unfinished_frame_is_not_awaited() {
    use common::raw::{CloseSeen, RawPeer};
    let up = TestUpstream::start().await;
    // Without the fix, the client waits out this.
    let broker = start_broker(&direct_config(&[up.addr], "close_timeout: 60s", "", "")).await;
    let mut client = RawPeer::client(broker.client_addr, "/ws/echo").await;
    // A masked text frame of 100 bytes, cut short after a bad byte.
    client
        .write_raw(&[0x81, 0x80 | 100, 0, 0, 0, 0, b'a', 0xff])
        .await;
    assert!(
        matches!(client.next_close().await, CloseSeen::Close(1007, _)),
        "the client gets 1007"
    );
    client.write_frame(0x88, &1007u16.to_be_bytes()).await;
    client.ended().await;
}
