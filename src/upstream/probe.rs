//! Active health checks: one task per target of an upstream with a
//! `health_checks.path`, probing every `active_interval` with an HTTP GET
//! (hyper's client; 2xx is healthy) or, with `active_probe: websocket`, a
//! WebSocket handshake (101 is healthy), each bounded by `timeout`. Results
//! feed the target's [`super::TargetHealth`]. The tasks, and the polite
//! close of each WebSocket probe's socket, are owned by the broker's
//! shutdown tracker and end when shutdown begins.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue, CONNECTION, HOST};
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{connect, ConnectError, Target, Upstream};
use crate::config::ActiveProbe;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Why an active probe counted as a failure.
///
/// The texts say what the probe was doing; the target is named where they
/// are shown (the target's `last_failure`, the log line's `target_url`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// No answer within `health_checks.timeout`.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// `active_probe: websocket`: connecting or the WebSocket handshake
    /// failed (the text names the target).
    #[error(transparent)]
    WebSocket(#[from] ConnectError),
    /// `active_probe: http`: the TCP connection failed.
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    /// The TLS handshake with a `wss://` target failed.
    #[error("TLS: {0}")]
    Tls(#[source] io::Error),
    /// The HTTP/1 handshake on the new connection failed.
    #[error("HTTP handshake: {0}")]
    Handshake(#[source] hyper::Error),
    /// The GET request could not be built from `health_checks.path`.
    #[error("building the request: {0}")]
    Request(#[source] http::Error),
    /// The target's host and port make no `Host` header.
    #[error("Host header: {0}")]
    Host(#[source] InvalidHeaderValue),
    /// The connection failed before the response was in.
    #[error("connection: {0}")]
    Connection(#[source] hyper::Error),
    /// The request failed.
    #[error("request: {0}")]
    Response(#[source] hyper::Error),
    /// The target answered, but not with a 2xx status.
    #[error("HTTP {0}")]
    Status(StatusCode),
}

/// Starts the probes of `upstream` if it has active checks (and says
/// whether it has); they run until `stop` (a child of a shutdown token) is
/// cancelled: on shutdown, or when a reload replaces the upstream.
pub(crate) fn start(
    upstream: &Arc<Upstream>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    stop: &CancellationToken,
) -> bool {
    if upstream.config.health_checks.path.is_empty() {
        return false;
    }
    for index in 0..upstream.targets.len() {
        shutdown.spawn(run(
            Arc::clone(upstream),
            index,
            Arc::clone(metrics),
            shutdown.clone(),
            stop.clone(),
        ));
    }
    true
}

async fn run(
    upstream: Arc<Upstream>,
    index: usize,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    stop: CancellationToken,
) {
    let hc = &upstream.config.health_checks;
    let target = &upstream.targets[index];
    let mut ticks = tokio::time::interval(hc.active_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(hc.timeout, probe(&upstream, target, &shutdown, &stop)) => match r {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(hc.timeout)),
            },
        };
        let ok = result.is_ok();
        metrics.health_check(&upstream.name, &target.label, "active", ok);
        let detail = result.err().map(|e| e.to_string()).unwrap_or_default();
        match target.health.record_probe(ok, &detail) {
            Some(true) => {
                info!(upstream = %upstream.name, target_url = %target.label, "active check: target healthy again")
            }
            Some(false) => {
                warn!(upstream = %upstream.name, target_url = %target.label, cause = %detail, "active check: target unhealthy")
            }
            None => {}
        }
    }
}

/// Headers configured for every probe.
fn probe_headers(upstream: &Upstream) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &upstream.config.health_checks.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    headers
}

/// One probe of `target`; a WebSocket probe's socket is closed by a task
/// of its own on `shutdown`, given up when `stop` is cancelled.
async fn probe(
    upstream: &Upstream,
    target: &Target,
    shutdown: &Shutdown,
    stop: &CancellationToken,
) -> Result<(), ProbeError> {
    let hc = &upstream.config.health_checks;
    match hc.active_probe {
        ActiveProbe::Websocket => connect(
            &target.url,
            upstream.tls.as_ref(),
            &hc.path,
            probe_headers(upstream),
            hc.timeout,
        )
        .await
        .map(|c| {
            // Close politely; the verdict is already in.
            let config = upstream.socket_config;
            let stop = stop.clone();
            shutdown.spawn(async move {
                let mut socket = c.websocket(config).await;
                let close = tokio::time::timeout(Duration::from_secs(1), socket.close(None));
                tokio::select! {
                    _ = close => {}
                    _ = stop.cancelled() => {}
                }
            });
        })
        .map_err(ProbeError::WebSocket),
        ActiveProbe::Http => http_get(upstream, target).await,
    }
}

/// `GET path` on the target's host and port; Ok for a 2xx status.
async fn http_get(upstream: &Upstream, target: &Target) -> Result<(), ProbeError> {
    let hc = &upstream.config.health_checks;
    let tcp = TcpStream::connect(target.url.authority())
        .await
        .map_err(ProbeError::Connect)?;
    // A wss:// target is probed over TLS too.
    let tls = if target.url.is_secure() {
        upstream.tls.as_ref()
    } else {
        None
    };
    let stream = crate::transport::tls::UpstreamStream::connect(tcp, target.url.host(), tls)
        .await
        .map_err(ProbeError::Tls)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ProbeError::Handshake)?;
    let mut request = http::Request::get(&*hc.path)
        .body(Empty::<Bytes>::new())
        .map_err(ProbeError::Request)?;
    *request.headers_mut() = probe_headers(upstream);
    let host = HeaderValue::from_str(target.url.authority()).map_err(ProbeError::Host)?;
    request.headers_mut().insert(HOST, host);
    request
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    // The connection future must be driven while the request is in flight;
    // with `Connection: close` it may finish in the same turn as the
    // response, which then is ready to take.
    let send = sender.send_request(request);
    tokio::pin!(send, conn);
    let response = tokio::select! {
        biased;
        r = &mut send => r,
        r = &mut conn => match r {
            Ok(()) => send.await,
            Err(e) => return Err(ProbeError::Connection(e)),
        },
    }
    .map_err(ProbeError::Response)?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}
