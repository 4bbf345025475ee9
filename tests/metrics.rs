//! `/metrics`, `/healthz` and `/readyz` on the admin listener, read by a
//! Prometheus text-format parser.

mod common;

use bytes::Bytes;
use common::upstream::TestUpstream;
use common::*;
use tokio_tungstenite::tungstenite::Message;

/// One session's messages, bytes, connects, handshake time and close codes
/// are counted under the documented names and labels.
#[tokio::test]
async fn counts_a_sessions_traffic() {
    let up = TestUpstream::start().await;
    let broker = start_broker(&direct_config(&[up.addr], "", "", "")).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;

    let during = broker.metrics().await;
    assert_eq!(
        during.value(
            "muxgate_sessions_active",
            &[("upstream", "echo"), ("mode", "direct")]
        ),
        1.0
    );

    echo_roundtrip(&mut ws, Message::text("hello")).await; // 5 bytes
    echo_roundtrip(&mut ws, Message::text("hi")).await; // 2 bytes
    echo_roundtrip(&mut ws, Message::Binary(Bytes::from(vec![0u8; 100]))).await;
    ws.close(None).await.unwrap();
    expect_end(&mut ws).await;

    let echo = ("upstream", "echo");
    let m = broker
        .metrics_when("the session's end", |m| {
            m.value("muxgate_sessions_active", &[echo, ("mode", "direct")]) == 0.0
        })
        .await;
    for family in [
        "muxgate_sessions_active",
        "muxgate_sessions_total",
        "muxgate_messages_total",
        "muxgate_message_bytes_total",
        "muxgate_upstream_connects_total",
        "muxgate_handshake_duration_seconds",
        "muxgate_close_codes_sent_total",
    ] {
        assert!(m.has_family(family), "{family} is exposed");
    }
    assert_eq!(
        m.value("muxgate_sessions_total", &[echo, ("mode", "direct")]),
        1.0
    );
    assert_eq!(
        m.value("muxgate_sessions_active", &[echo, ("mode", "direct")]),
        0.0
    );
    for direction in ["client_to_upstream", "upstream_to_client"] {
        let d = ("direction", direction);
        assert_eq!(
            m.value("muxgate_messages_total", &[echo, d, ("kind", "text")]),
            2.0
        );
        assert_eq!(
            m.value("muxgate_messages_total", &[echo, d, ("kind", "binary")]),
            1.0
        );
        assert_eq!(
            m.value("muxgate_message_bytes_total", &[echo, d, ("kind", "text")]),
            7.0
        );
        assert_eq!(
            m.value(
                "muxgate_message_bytes_total",
                &[echo, d, ("kind", "binary")]
            ),
            100.0
        );
    }
    let target = format!("ws://{}", up.addr);
    assert_eq!(
        m.value(
            "muxgate_upstream_connects_total",
            &[echo, ("target", &target)]
        ),
        1.0
    );
    assert_eq!(m.value("muxgate_handshake_duration_seconds", &[echo]), 1.0);
    // The client's close without a code reached the upstream as such (1005).
    assert_eq!(
        m.value(
            "muxgate_close_codes_sent_total",
            &[echo, ("side", "upstream"), ("code", "1005")]
        ),
        1.0
    );
}

/// /healthz is 200 while the process runs; /readyz turns 503 once shutdown
/// begins, while sessions are still draining.
#[tokio::test]
async fn health_and_readiness() {
    let up = TestUpstream::start().await;
    let cfg = direct_config(&[up.addr], "close_timeout: 30s", "", "shutdown_grace: 30s");
    let broker = start_broker(&cfg).await;
    assert_eq!(http_get(broker.admin_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(broker.admin_addr, "/readyz").await.0, 200);

    // A client that will not answer the close keeps the drain going.
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    broker.shutdown.begin();
    assert_eq!(http_get(broker.admin_addr, "/readyz").await.0, 503);
    assert_eq!(http_get(broker.admin_addr, "/healthz").await.0, 200);
    // New sessions are refused while draining.
    assert!(
        new_session_refused(broker.client_addr, "/ws/echo").await,
        "no new session during the drain"
    );
    assert_eq!(expect_close(&mut ws).await.0, 1001);
    expect_end(&mut ws).await;
    within("drain", broker.task).await.unwrap();
}

/// Every admin answer names the process and the config generation that
/// gave it, and `muxgate_config_generation` holds the same number: the
/// same file text gives the same generation, another text another.
#[tokio::test]
async fn admin_answers_name_the_process_and_the_config_generation() {
    let up = TestUpstream::start().await;
    let yaml = direct_config(&[up.addr], "", "", "");
    let first = start_broker(&yaml).await;
    let twin = start_broker(&yaml).await;
    let other = start_broker(&format!("{yaml}\n# another file\n")).await;

    let generation_of = |broker: &Running| {
        let addr = broker.admin_addr;
        async move {
            let mut seen = None;
            for path in ["/healthz", "/readyz", "/metrics", "/admin/upstreams"] {
                let (status, headers, _) = http_get(addr, path).await;
                assert_eq!(status, 200, "GET {path}");
                let pid = header(&headers, "x-muxgate-pid").expect("a pid header");
                assert_eq!(pid, std::process::id().to_string(), "GET {path}");
                let generation = header(&headers, "x-muxgate-config-generation")
                    .map(str::to_owned)
                    .expect("a generation header");
                assert_eq!(generation.len(), 12, "48 bits in hex: {generation}");
                assert!(seen.as_ref().is_none_or(|s| *s == generation), "GET {path}");
                seen = Some(generation);
            }
            u64::from_str_radix(&seen.unwrap(), 16).expect("hex")
        }
    };
    let generation = generation_of(&first).await;
    let metric = first
        .metrics()
        .await
        .value("muxgate_config_generation", &[]);
    assert_eq!(
        metric, generation as f64,
        "the gauge holds the header's number"
    );
    assert_eq!(
        generation_of(&twin).await,
        generation,
        "same text, same generation"
    );
    assert_ne!(
        generation_of(&other).await,
        generation,
        "another text, another one"
    );
}
