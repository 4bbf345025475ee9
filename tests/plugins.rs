//! Plugins through the running broker, in both modes: JWT (`auth_required`
//! and the `jwt` plugin), API keys, rate limits, message sizes and regex
//! filters, with their accept and reject paths.

mod common;
#[path = "support/mux_peer.rs"]
mod mux_peer;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::upstream::TestUpstream;
use common::*;
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mux_peer::{Behavior, MuxPeer, OutFrame, Payload, PeerEvent};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-of-enough-length";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token signed by RustCrypto. `jsonwebtoken::encode` is not used: it
/// would make RustCrypto the process's provider, and the broker in this
/// process must verify with its own (ring).
fn sign(alg: Algorithm, claims: &serde_json::Value, key: &EncodingKey) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = serde_json::to_vec(&Header::new(alg)).unwrap();
    let body = format!(
        "{}.{}",
        b64.encode(header),
        b64.encode(serde_json::to_vec(claims).unwrap())
    );
    let signer = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.signer_factory;
    let signature = signer(&alg, key)
        .unwrap()
        .try_sign(body.as_bytes())
        .unwrap();
    format!("{body}.{}", b64.encode(signature))
}

fn hs256(claims: serde_json::Value, secret: &str) -> String {
    sign(
        Algorithm::HS256,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

fn good_claims() -> serde_json::Value {
    serde_json::json!({"sub": "alice", "iss": "kairos-gateway", "aud": "websocket-clients", "exp": now() + 600})
}

/// Both modes' configs against an echo upstream: (mode, target, yaml).
enum Upstream {
    Direct(TestUpstream),
    Mux(MuxPeer),
}

impl Upstream {
    async fn start(direct: bool) -> Upstream {
        if direct {
            Upstream::Direct(TestUpstream::start().await)
        } else {
            Upstream::Mux(MuxPeer::start(Behavior::Echo).await)
        }
    }
    fn addr(&self) -> SocketAddr {
        match self {
            Upstream::Direct(t) => t.addr,
            Upstream::Mux(p) => p.addr,
        }
    }
    /// A short close_timeout: the tests drain brokers with clients still open.
    fn config(&self, ws: &str, upstream: &str) -> String {
        let ws = format!("close_timeout: 200ms\n{ws}");
        let ws = ws.as_str();
        match self {
            Upstream::Direct(_) => direct_config(&[self.addr()], ws, upstream, ""),
            Upstream::Mux(_) => {
                mux_config(&[self.addr()], &format!("pool_size: 1\n{ws}"), upstream, "")
            }
        }
    }
    /// The claims the upstream received with the next session.
    async fn claims(&mut self) -> serde_json::Value {
        match self {
            Upstream::Direct(t) => {
                let (_, headers) = t.handshake().await;
                serde_json::from_str(header(&headers, "x-muxgate-claims").expect("claims header"))
                    .unwrap()
            }
            Upstream::Mux(p) => match p
                .wait_for("open", |e| matches!(e, PeerEvent::Open { .. }))
                .await
            {
                PeerEvent::Open { claims, .. } => claims.expect("open.claims"),
                _ => unreachable!(),
            },
        }
    }
}

fn with_jwt(yaml: String) -> String {
    format!("{yaml}jwt: {{secret: {SECRET}, issuer: kairos-gateway, audience: websocket-clients, leeway: 5s}}\n")
}

/// `auth_required`: a valid token (header or `access_token`) opens the
/// session and its claims reach the upstream; every bad token is a 401 with
/// `WWW-Authenticate`, generic unless return_error_details.
#[tokio::test]
async fn jwt_auth_required_in_both_modes() {
    for direct in [true, false] {
        let mut up = Upstream::start(direct).await;
        let broker = start_broker(&with_jwt(up.config("", "auth_required: true"))).await;
        let token = hs256(good_claims(), SECRET);
        let (mut ws, _) = connect(
            &broker.url("/ws/echo"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(up.claims().await["sub"], "alice", "direct={direct}");
        echo_roundtrip(&mut ws, Message::text("authenticated")).await;
        let (_ws2, _) = connect(&broker.url(&format!("/ws/echo?access_token={token}")), &[]).await;
        assert_eq!(up.claims().await["sub"], "alice");

        let a = broker.client_addr;
        let mut claims = good_claims();
        let bad: Vec<(&str, String)> = vec![
            ("missing", String::new()),
            (
                "expired",
                hs256(
                    {
                        claims["exp"] = (now() - 3600).into();
                        claims.clone()
                    },
                    SECRET,
                ),
            ),
            (
                "not yet valid",
                hs256(
                    {
                        let mut c = good_claims();
                        c["nbf"] = (now() + 3600).into();
                        c
                    },
                    SECRET,
                ),
            ),
            (
                "wrong audience",
                hs256(
                    {
                        let mut c = good_claims();
                        c["aud"] = "others".into();
                        c
                    },
                    SECRET,
                ),
            ),
            (
                "wrong issuer",
                hs256(
                    {
                        let mut c = good_claims();
                        c["iss"] = "mallory".into();
                        c
                    },
                    SECRET,
                ),
            ),
            (
                "bad signature",
                hs256(good_claims(), "another-secret-entirely"),
            ),
        ];
        for (what, token) in bad {
            let auth = if token.is_empty() {
                String::new()
            } else {
                format!("Authorization: Bearer {token}\r\n")
            };
            let (status, headers, body) = raw_http(a, &upgrade_request(a, "/ws/echo", &auth)).await;
            assert_eq!(status, 401, "{what}");
            let challenge = header(&headers, "www-authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer realm=\"muxgate\""),
                "{what}: {challenge}"
            );
            assert_eq!(
                body.trim(),
                "unauthorized",
                "{what}: generic without return_error_details"
            );
        }
        let m = broker.metrics().await;
        assert_eq!(
            m.value(
                "muxgate_handshakes_rejected_total",
                &[("status", "401"), ("reason", "jwt")]
            ),
            6.0
        );
        broker.stop().await;
    }
}

/// With return_error_details the 401 says why.
#[tokio::test]
async fn jwt_errors_are_detailed_when_enabled() {
    let up = TestUpstream::start().await;
    let cfg = with_jwt(direct_config(
        &[up.addr],
        "return_error_details: true",
        "auth_required: true",
        "",
    ));
    let broker = start_broker(&cfg).await;
    let mut claims = good_claims();
    claims["exp"] = (now() - 3600).into();
    let a = broker.client_addr;
    let auth = format!("Authorization: Bearer {}\r\n", hs256(claims, SECRET));
    let (status, _, body) = raw_http(a, &upgrade_request(a, "/ws/echo", &auth)).await;
    assert_eq!(status, 401);
    assert!(body.starts_with("unauthorized: token expired"), "{body}");
}

/// The `jwt` plugin verifies RS256 and ES256 tokens against PEM public keys.
#[tokio::test]
async fn jwt_plugin_with_rsa_and_ec_keys() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa-private.pem", "rsa-public.pem"),
        (Algorithm::ES256, "ec-private.pem", "ec-public.pem"),
    ] {
        let mut up = Upstream::start(false).await;
        let plugins = format!(
            "plugins: [{{name: jwt, stage: handshake, settings: {{public_key_file: {keys}/{public}, audience: websocket-clients}}}}]"
        );
        let broker = start_broker(&up.config("", &plugins)).await;
        let pem = std::fs::read(format!("{keys}/{private}")).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let token = sign(alg, &good_claims(), &key);
        let (_ws, _) = connect(
            &broker.url("/ws/echo"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(up.claims().await["sub"], "alice", "{alg:?}");
        let a = broker.client_addr;
        let forged = hs256(good_claims(), SECRET);
        let (status, _, _) = raw_http(
            a,
            &upgrade_request(
                a,
                "/ws/echo",
                &format!("Authorization: Bearer {forged}\r\n"),
            ),
        )
        .await;
        assert_eq!(status, 401, "an HS256 token is refused by an {alg:?} key");
        broker.stop().await;
    }
}

/// `api_key`: keys from a file and an environment variable, in a header or
/// a query parameter; anything else is a 401.
#[tokio::test]
async fn api_keys_from_file_and_env() {
    std::env::set_var("MUXGATE_TEST_API_KEYS", "env-key-1, env-key-2");
    for direct in [true, false] {
        let up = Upstream::start(direct).await;
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keys/api-keys.txt"
        );
        let plugins = format!(
            "plugins: [{{name: api_key, stage: handshake, settings: {{keys_file: {file}, keys_env: MUXGATE_TEST_API_KEYS, query: api_key}}}}]"
        );
        let broker = start_broker(&up.config("", &plugins)).await;
        let a = broker.client_addr;
        for ok in ["X-Api-Key: key-two\r\n", "X-Api-Key: env-key-1\r\n"] {
            assert_eq!(
                raw_http(a, &upgrade_request(a, "/ws/echo", ok)).await.0,
                101,
                "{ok}"
            );
        }
        assert_eq!(
            raw_http(a, &upgrade_request(a, "/ws/echo?api_key=key-one", ""))
                .await
                .0,
            101
        );
        for bad in ["X-Api-Key: key-three\r\n", "X-Api-Key: key-on\r\n", ""] {
            let (status, _, body) = raw_http(a, &upgrade_request(a, "/ws/echo", bad)).await;
            assert_eq!(status, 401, "{bad:?}");
            assert_eq!(body.trim(), "invalid or missing API key");
        }
        broker.stop().await;
    }
}

/// `rate_limit` at 10 messages per second with a burst of 10 lets 10 through
/// in the first second and answers the rest with `retry_after`.
#[tokio::test]
async fn rate_limit_replies_with_retry_after() {
    for direct in [true, false] {
        let up = Upstream::start(direct).await;
        let plugins = "plugins: [{name: rate_limit, stage: pre_request, settings: {messages_per_second: 10, burst: 10}}]";
        let broker = start_broker(&up.config("", plugins)).await;
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        for k in 0..13 {
            ws.send(Message::text(format!("m{k}"))).await.unwrap();
        }
        let (mut echoes, mut limited) = (0, 0);
        while echoes + limited < 13 {
            match next_message(&mut ws).await {
                Some(Message::Text(t)) if t.starts_with('{') => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["error"], "rate limit exceeded");
                    assert_eq!(v["retry_after"], 1);
                    limited += 1;
                }
                Some(Message::Text(_)) => echoes += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((echoes, limited), (10, 3), "direct={direct}");
        broker.stop().await;
    }
}

/// `message_size` closes a sender over the route's limit with 1009.
#[tokio::test]
async fn message_size_limit_is_1009() {
    for direct in [true, false] {
        let up = Upstream::start(direct).await;
        let plugins =
            "plugins: [{name: message_size, stage: pre_request, settings: {max_bytes: 100}}]";
        let broker = start_broker(&up.config("", plugins)).await;
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        echo_roundtrip(&mut ws, Message::binary(vec![1u8; 100])).await;
        ws.send(Message::binary(vec![1u8; 101])).await.unwrap();
        assert_eq!(
            expect_close(&mut ws).await,
            (1009, "message too big".into()),
            "direct={direct}"
        );
        broker.stop().await;
    }
}

/// `regex_filter` redacts card numbers on the way up and denies matches
/// with 1008; on the way down it masks e-mail addresses.
#[tokio::test]
async fn regex_filter_redacts_and_denies_both_ways() {
    for direct in [true, false] {
        let up = Upstream::start(direct).await;
        let plugins = "plugins: [{name: regex_filter, stage: pre_request, settings: {presets: [card_number], action: redact}}, \
             {name: regex_filter, stage: pre_request, settings: {patterns: ['(?i)drop table'], action: deny}}, \
             {name: regex_filter, stage: post_response, settings: {presets: [email], action: redact, replacement: '<email>'}}]";
        let broker = start_broker(&up.config("", plugins)).await;
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        ws.send(Message::text("pay with 4111-1111-1111-1111 please"))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut ws).await,
            Some(Message::text("pay with [REDACTED] please"))
        );
        // The upstream echoes an address; the client sees it masked.
        ws.send(Message::text("write to bob@example.org"))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut ws).await,
            Some(Message::text("write to <email>"))
        );
        ws.send(Message::text("x'; DROP TABLE users; --"))
            .await
            .unwrap();
        assert_eq!(expect_close(&mut ws).await.0, 1008, "direct={direct}");
        broker.stop().await;
    }
}

/// A post_response plugin sees messages the upstream sends on its own.
#[tokio::test]
async fn post_response_plugins_see_upstream_initiated_messages() {
    let mut peer = MuxPeer::start(Behavior::Manual).await;
    let plugins = "plugins: [{name: regex_filter, stage: post_response, settings: {presets: [email], action: redact}}]";
    let broker = start_broker(&mux_config(&[peer.addr], "pool_size: 1", plugins, "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (conn, session, _) = peer.next_open().await;
    peer.send(
        conn,
        OutFrame::Message {
            session,
            payload: Payload::Text("contact: eve@example.com".into()),
        },
    )
    .await;
    assert_eq!(
        next_message(&mut ws).await,
        Some(Message::text("contact: [REDACTED]"))
    );
}

/// `json_schema` passes valid client messages and answers invalid ones
/// (and non-JSON) with the reason, without forwarding them.
#[tokio::test]
async fn json_schema_rejects_invalid_messages() {
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/schemas/chat-message.json"
    );
    for direct in [true, false] {
        let up = Upstream::start(direct).await;
        let plugins = format!("plugins: [{{name: json_schema, stage: pre_request, settings: {{schema_file: {schema}}}}}]");
        let broker = start_broker(&up.config("", &plugins)).await;
        let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
        echo_roundtrip(&mut ws, Message::text(r#"{"text":"hello","room":7}"#)).await;
        for bad in [r#"{"room":7}"#, r#"{"text":5}"#, "not json"] {
            ws.send(Message::text(bad)).await.unwrap();
            let Some(Message::Text(reply)) = next_message(&mut ws).await else {
                panic!("a reply")
            };
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(v["error"], "invalid message", "{bad}");
            assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }
        // Nothing invalid reached the upstream: the next echo is the next valid message.
        echo_roundtrip(&mut ws, Message::text(r#"{"text":"again"}"#)).await;
        broker.stop().await;
    }
}

/// `transform` stamps the verified user on client messages and removes
/// fields, in both modes.
#[tokio::test]
async fn transform_stamps_the_user_from_claims() {
    for direct in [true, false] {
        let up = Upstream::start(direct).await;
        let plugins = "auth_required: true\nplugins: [{name: transform, stage: pre_request, settings: {set: {user: '{{claims.sub}}'}, add: {v: 1}, remove: [admin]}}]";
        let broker = start_broker(&with_jwt(up.config("", plugins))).await;
        let token = hs256(good_claims(), SECRET);
        let (mut ws, _) = connect(
            &broker.url("/ws/echo"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        ws.send(Message::text(
            r#"{"text":"hi","user":"mallory","admin":true}"#,
        ))
        .await
        .unwrap();
        let Some(Message::Text(echo)) = next_message(&mut ws).await else {
            panic!("an echo")
        };
        let v: serde_json::Value = serde_json::from_str(&echo).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"text": "hi", "user": "alice", "v": 1}),
            "direct={direct}"
        );
        broker.stop().await;
    }
}

/// Sends `n` messages at once (`message(k)` each) through a route whose
/// plugin answers some of them itself, reading meanwhile, and checks that
/// every message comes back, echoed or answered (`is_reply`), that the
/// session then still answers, and that it closes cleanly.
async fn burst_through_a_replying_plugin(
    direct: bool,
    plugins: &str,
    n: usize,
    message: fn(usize) -> String,
    is_reply: fn(&str) -> bool,
) -> (usize, usize) {
    use futures_util::StreamExt;
    let up = Upstream::start(direct).await;
    let broker = start_broker(&up.config("", plugins)).await;
    let (ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    let (mut sink, mut stream) = ws.split();
    let sender = tokio::spawn(async move {
        for k in 0..n {
            sink.feed(Message::text(message(k))).await.unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    let (mut echoes, mut replies) = (0, 0);
    within("every message answered", async {
        while echoes + replies < n {
            match stream.next().await {
                Some(Ok(Message::Text(t))) if is_reply(&t) => replies += 1,
                Some(Ok(Message::Text(_))) => echoes += 1,
                other => panic!(
                    "direct={direct} n={n}: after {echoes} echoes and {replies} replies, {other:?}"
                ),
            }
        }
    })
    .await;
    let mut ws = sender.await.unwrap().reunite(stream).unwrap();
    ws.send(Message::text(message(n))).await.unwrap();
    assert!(
        matches!(next_message(&mut ws).await, Some(Message::Text(_))),
        "direct={direct} n={n}: the session answers after the burst"
    );
    ws.send(Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        },
    )))
    .await
    .unwrap();
    assert_eq!(expect_close(&mut ws).await.0, 1000, "direct={direct} n={n}");
    expect_end(&mut ws).await;
    let m = broker.metrics().await;
    assert!(
        !m.has_family("muxgate_messages_dropped_total")
            || m.value("muxgate_messages_dropped_total", &[]) == 0.0,
        "direct={direct} n={n}: nothing was dropped"
    );
    broker.stop().await;
    (echoes, replies)
}

/// A `rate_limit` that replies, by messages or by bytes (4-byte messages,
/// 40 B a second), under bursts of 30, 300 and 3,000 messages: the burst's
/// worth is echoed, the rest answered, none lost, and the session goes on
/// (a reply left waiting for the other direction would stop it for good:
/// see `direct::messages::poll_direction`).
#[tokio::test]
async fn a_replying_rate_limit_answers_every_message_of_a_burst() {
    let limits = [
        "messages_per_second: 5, burst: 10",
        "bytes_per_second: 40, bytes_burst: 40",
    ];
    for limit in limits {
        let plugins = format!("plugins: [{{name: rate_limit, stage: pre_request, settings: {{{limit}, action: reply}}}}]");
        for direct in [true, false] {
            for n in [30, 300, 3000] {
                let (echoes, replies) = burst_through_a_replying_plugin(
                    direct,
                    &plugins,
                    n,
                    |k| format!("{:04}", k % 10_000),
                    |t| t.starts_with('{'),
                )
                .await;
                assert!(
                    echoes >= 10 && replies >= n - 20,
                    "{limit}, direct={direct} n={n}: {echoes} echoes, {replies} replies"
                );
            }
        }
    }
}

/// The same for `json_schema` answering nine messages in ten.
#[tokio::test]
async fn a_replying_json_schema_answers_every_message_of_a_burst() {
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/schemas/chat-message.json"
    );
    let plugins = format!("plugins: [{{name: json_schema, stage: pre_request, settings: {{schema_file: {schema}, action: reply}}}}]");
    for direct in [true, false] {
        for n in [30, 300, 3000] {
            let (echoes, replies) = burst_through_a_replying_plugin(
                direct,
                &plugins,
                n,
                |k| {
                    if k % 10 == 0 {
                        format!(r#"{{"text":"m{k}","room":7}}"#)
                    } else {
                        "not json".into()
                    }
                },
                |t| t.contains("invalid message"),
            )
            .await;
            assert_eq!(
                (echoes, replies),
                (n / 10, n - n / 10),
                "direct={direct} n={n}"
            );
        }
    }
}
