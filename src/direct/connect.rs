//! Connecting a direct session's upstream, before the client's upgrade is
//! accepted: a dead backend is an HTTP status, not a broken socket.

use std::sync::Arc;

use http::HeaderMap;
use tracing::debug;

use crate::metrics::Metrics;
use crate::upstream::{self, ConnectError, Connected, TargetLease, Upstream};

/// Connects to a healthy target of `upstream`, recording each outcome in
/// metrics and passive health. A target that refuses or fails its handshake
/// is passed over for the next healthy one while `handshake_timeout` lasts,
/// so one dead target does not fail clients; a timeout is not retried.
pub(crate) async fn connect_upstream(
    upstream: &Arc<Upstream>,
    hash_key: Option<&[u8]>,
    path_and_query: &str,
    headers: HeaderMap,
    metrics: &Metrics,
) -> Result<(Connected, TargetLease), UpstreamUnavailable> {
    let ws = &upstream.config.websocket_config;
    let deadline = tokio::time::Instant::now() + ws.handshake_timeout;
    let mut tried = Vec::new();
    let mut last_error = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let lease = match upstream.pick_except(hash_key, &tried) {
            Some(lease) if !left.is_zero() => lease,
            _ => {
                return Err(last_error
                    .map(UpstreamUnavailable::Connect)
                    .unwrap_or(UpstreamUnavailable::NoHealthyTarget))
            }
        };
        let target = lease.target();
        match upstream::connect(
            &target.url,
            upstream.tls.as_ref(),
            path_and_query,
            headers.clone(),
            left,
        )
        .await
        {
            Ok(connected) => {
                metrics.upstream_connected(&upstream.name, &target.label);
                metrics.target_picked(&upstream.name, &target.label);
                target.report_passive(&upstream.name, metrics, Ok(()));
                return Ok((connected, lease));
            }
            Err(error) => {
                metrics.upstream_connect_failed(&upstream.name, &target.label, error.reason());
                debug!(upstream = %upstream.name, target_url = %target.label, %error, "upstream connect failed");
                target.report_passive(&upstream.name, metrics, Err(&error.to_string()));
                let timed_out = matches!(error, ConnectError::Timeout { .. });
                tried.push(lease.index());
                last_error = Some(error);
                if timed_out {
                    return Err(UpstreamUnavailable::Connect(last_error.expect("just set")));
                }
            }
        }
    }
}

/// Why no upstream socket could be had for a new session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamUnavailable {
    #[error("no healthy target")]
    NoHealthyTarget,
    #[error(transparent)]
    Connect(#[from] ConnectError),
}
