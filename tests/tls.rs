//! `wss://` end to end: client to broker (the `server.tls` listener) and
//! broker to upstream (`wss://` targets verified against `tls.ca_file`),
//! with a CA and certificates generated here (rcgen).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::pki::Pki;
use common::upstream::TestUpstream;
use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A `wss://` echo upstream with the Pki's server certificate.
async fn wss_echo(pki: &Pki) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A client on the broker's wss:// listener reaches a ws:// upstream, which
/// sees `X-Forwarded-Proto: https`.
#[tokio::test]
async fn clients_connect_over_tls() {
    let pki = Pki::new();
    let mut up = TestUpstream::start().await;
    let server = format!(
        "tls: {{cert_file: {}, key_file: {}}}",
        pki.cert.display(),
        pki.key.display()
    );
    let broker = start_broker(&direct_config(&[up.addr], "", "", &server)).await;
    let tcp = TcpStream::connect(broker.client_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the broker");
    let url = format!("wss://localhost:{}/ws/echo", broker.client_addr.port());
    let (mut ws, _) = within("handshake", tokio_tungstenite::client_async(url, tls))
        .await
        .unwrap();
    ws.send(Message::text("over TLS")).await.unwrap();
    assert_eq!(
        within("echo", ws.next()).await.unwrap().unwrap(),
        Message::text("over TLS")
    );
    let (_, headers) = up.handshake().await;
    assert_eq!(header(&headers, "x-forwarded-proto"), Some("https"));
    // A plain-text client gets no WebSocket from a TLS listener.
    assert!(tokio_tungstenite::connect_async(broker.url("/ws/echo"))
        .await
        .is_err());
}

/// The broker reaches a wss:// target it verifies against `tls.ca_file`,
/// and refuses (502) a target whose certificate it cannot verify.
#[tokio::test]
async fn wss_targets_are_verified() {
    let pki = Pki::new();
    let (addr, _task) = wss_echo(&pki).await;
    let target = format!("wss://127.0.0.1:{}", addr.port());
    let yaml = |ca: &PathBuf| {
        direct_config(
            &[addr],
            "",
            &format!("tls: {{ca_file: {}}}", ca.display()),
            "",
        )
        .replace(&format!("ws://{addr}"), &target)
    };
    let broker = start_broker(&yaml(&pki.ca)).await;
    let (mut ws, _) = connect(&broker.url("/ws/echo"), &[]).await;
    echo_roundtrip(&mut ws, Message::text("to a wss upstream")).await;
    drop(ws);
    broker.stop().await;

    // Trusting another CA only: the target's certificate is refused.
    let other = Pki::new();
    let broker = start_broker(&yaml(&other.ca)).await;
    let a = broker.client_addr;
    assert_eq!(
        raw_http(a, &upgrade_request(a, "/ws/echo", "")).await.0,
        502
    );
}

/// A reload reads the listener's certificate and key again (a renewal
/// replaces the files at the same paths): new handshakes get the new
/// certificate, sessions already open keep going.
#[tokio::test]
async fn a_reload_serves_a_renewed_certificate_to_new_handshakes() {
    let (old, renewed) = (Pki::new(), Pki::new());
    let mut up = TestUpstream::start().await;
    let server = format!(
        "tls: {{cert_file: {}, key_file: {}}}",
        old.cert.display(),
        old.key.display()
    );
    let file = old.dir.join("upstreams.yaml");
    std::fs::write(&file, direct_config(&[up.addr], "", "", &server)).unwrap();
    let broker = start_broker_from_file(&file).await;
    let open = |pki: &Pki| {
        let (addr, client) = (broker.client_addr, pki.client_config());
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            let url = format!("wss://localhost:{}/ws/echo", addr.port());
            let (ws, _) = within("handshake", tokio_tungstenite::client_async(url, tls))
                .await
                .expect("WebSocket handshake");
            Ok::<_, std::io::Error>(ws)
        }
    };
    let mut before = open(&old).await.expect("the first certificate");
    let _ = up.handshake().await;

    std::fs::copy(&renewed.cert, &old.cert).unwrap();
    std::fs::copy(&renewed.key, &old.key).unwrap();
    let (status, _, body) = raw_http(
        broker.admin_addr,
        "POST /admin/reload HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    assert!(
        open(&old).await.is_err(),
        "the old CA no longer verifies the listener"
    );
    let mut after = open(&renewed).await.expect("the renewed certificate");
    for ws in [&mut before, &mut after] {
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(
            within("echo", ws.next()).await.unwrap().unwrap(),
            Message::text("still here")
        );
    }
}
