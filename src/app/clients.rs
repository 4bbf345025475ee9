//! The client listener's one handler: a request on a route becomes a
//! session of the route's upstream, in that upstream's mode.
//!
//! The checks every mode shares are `crate::handshake`'s, run in the order
//! the README lists; then the mode decides what must exist before the 101
//! (a live mux connection, or the dedicated upstream socket), and the
//! session's task is spawned on the shutdown tracker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use axum::Router;
use http::header::{self, HeaderValue};
use tracing::debug;

use super::snapshot::Snapshot;
use super::state::AppState;
use crate::config::Mode;
use crate::direct::{self, DirectSession, UpstreamUnavailable};
use crate::handshake::{self, HandshakeError, HttpVersion};
use crate::mux::pool::Tenancy;
use crate::mux::session::MuxSession;
use crate::routing::Route;
use crate::session::{Placement, SessionGuard};
use crate::transport::accept::BalancedListener;
use crate::transport::event_loops::ServeFuture;
use crate::transport::{client_conn, http2, server, tls};
use crate::upstream::Upstream;
use muxgate_backend::deflate::negotiate;
use muxgate_plugins::{HandshakeCtx, SessionCtx, SessionHooks};

/// `server`'s bounds on a client connection before its upgrade.
#[derive(Clone, Copy)]
pub(super) struct ClientLimits {
    /// `header_read_timeout`.
    pub header_read_timeout: Duration,
    /// `max_request_head_size`, in bytes.
    pub max_request_head: usize,
    /// `http2` and its settings; `None` where HTTP/2 is off.
    pub http2: Option<http2::Settings>,
}

/// Serves client handshakes on `listener` until its listener closes (and,
/// in a handover, what it had taken); one call per event loop, `index`
/// being the loop's.
pub(super) fn serve_clients(
    listener: BalancedListener,
    index: usize,
    tls: Option<tls::ServerTls>,
    client: ClientLimits,
    state: Arc<AppState>,
) -> ServeFuture {
    let accepted = state.metrics.accepted_on(index);
    let limits = client_conn::Limits {
        header_read_timeout: client.header_read_timeout,
        header_timeouts: state.metrics.header_timeouts_on(index),
        max_head: client.max_request_head,
        heads_too_large: state.metrics.heads_too_large(),
    };
    let shutdown = state.shutdown.clone();
    let router = Router::new().fallback(handle).with_state(state);
    let server = server::Server::new(router, limits, client.http2, accepted, shutdown.clone());
    Box::pin(async move {
        match tls {
            None => server.run(listener).await,
            Some(config) => {
                let handshakes = shutdown.listeners().clone();
                server
                    .run(tls::TlsListener::new(listener, config, handshakes))
                    .await
            }
        }
    })
}

/// axum handler for every path on the client listener.
async fn handle(
    State(app): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let started = Instant::now();
    // One snapshot for the whole handshake: the config before a reload or
    // after it, never a mix.
    let snapshot = app.current.load_full();
    let route = snapshot.routes.lookup(request.uri().path()).cloned();
    let details = route
        .as_ref()
        .is_some_and(|r| r.upstream.config.websocket_config.return_error_details);
    match accept(&app, &snapshot, route, remote, &mut request, started).await {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            let http_version = HttpVersion::of(&request).as_str();
            app.metrics
                .handshake_rejected(status.as_u16(), error.reason(), http_version);
            debug!(%remote, path = %request.uri().path(), http_version, status = status.as_u16(), %error, "handshake refused");
            error.into_response_with(details)
        }
    }
}

/// The session's message plugins.
fn session_hooks(
    upstream: &Upstream,
    guard: &SessionGuard,
    route: &Route,
    remote: SocketAddr,
    claims: &Option<serde_json::Value>,
) -> SessionHooks {
    upstream.pipeline.session(&SessionCtx {
        session: guard.handle.id.to_string(),
        route: route.external_path.to_string(),
        remote,
        claims: claims.clone(),
    })
}

async fn accept(
    app: &Arc<AppState>,
    snapshot: &Snapshot,
    route: Option<Route>,
    remote: SocketAddr,
    request: &mut Request,
    started: Instant,
) -> Result<Response, HandshakeError> {
    let route = route.ok_or(HandshakeError::NotFound)?;
    let upgrade = handshake::check_upgrade(request)?;
    let http_version = upgrade.http_version();
    // Not yet during a handover: a connection the closed listener had
    // taken is served as any other.
    if app.shutdown.has_begun() {
        return Err(HandshakeError::ShuttingDown);
    }
    let upstream = Arc::clone(&route.upstream);
    handshake::check_origin(request.headers(), &upstream.config.allowed_origins)?;
    let mut plugin_ctx = HandshakeCtx {
        route: &route.external_path,
        remote,
        headers: request.headers(),
        query: request.uri().query(),
        claims: None,
    };
    upstream
        .pipeline
        .on_handshake(&mut plugin_ctx)
        .map_err(HandshakeError::Plugin)?;
    let claims = plugin_ctx.claims;
    let permit = app.limits.try_acquire(remote.ip())?;
    let request_id = handshake::request_id(request.headers());
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(HandshakeError::NotUpgradable)?;

    let path = route.upstream_path(request.uri().query());
    let mut response = upgrade.accepted(&request_id);
    let ws = &upstream.config.websocket_config;
    let deflate_offers = handshake::deflate_offers(request.headers(), &ws.compression)?;
    if upstream.mode() == Mode::Multiplexed {
        let deflate = handshake::terminate_deflate(&deflate_offers, ws, &mut response);
        let pool = Tenancy::new(Arc::clone(
            snapshot
                .pools
                .get(&upstream.name)
                .expect("a pool per multiplexed upstream"),
        ));
        if !pool
            .wait_live(upstream.config.websocket_config.handshake_timeout)
            .await
        {
            return Err(HandshakeError::NoMuxConnection);
        }
        let mut open = crate::mux::open_frame(
            &route.external_path,
            path,
            remote,
            request.headers(),
            &upstream.config.forward_headers,
        );
        open.claims = claims.clone();
        let guard = app.sessions.open(
            Placement {
                upstream: Arc::clone(&upstream.name),
                route: Arc::clone(&route.external_path),
                mode: Mode::Multiplexed,
                target: None,
                compressed: deflate.is_some(),
                http_version,
            },
            remote,
            request_id,
        );
        let hooks = session_hooks(&upstream, &guard, &route, remote, &claims);
        let session = Box::new(MuxSession {
            guard,
            hooks,
            _permit: permit,
            upstream: Arc::clone(&upstream),
            pool,
            metrics: Arc::clone(&app.metrics),
            open: Arc::new(open),
            deflate,
        });
        app.metrics
            .handshake_completed(&upstream.name, started.elapsed());
        // As for direct sessions: the future holds the box, not copies.
        app.shutdown
            .spawn(crate::mux::session::run(session, on_upgrade));
        return Ok(response);
    }

    let mut headers =
        handshake::upstream_headers(&route, request, remote, &request_id, app.tls.is_some());
    // The frame relay passes compressed frames through as bytes: the
    // upstream answers the client's permessage-deflate offers, and its
    // answer is checked (`upstream::connect`) and passed back. The message
    // relay must read messages: the broker answers the client itself
    // (below, once the upstream is connected).
    let frame_relay = !upstream.pipeline.reads_messages();
    if frame_relay {
        if let Some(offers) = negotiate::offers_header(&deflate_offers) {
            headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, offers);
        }
    }
    if let Some(c) = &claims {
        if let Ok(v) = HeaderValue::from_str(&c.to_string()) {
            headers.insert(upstream.claims_header.clone(), v);
        }
    }
    let hash_key = upstream
        .hash_on
        .as_ref()
        .map(|h| h.key(request.headers(), request.uri().query(), remote.ip()));
    let (connected, lease) =
        direct::connect_upstream(&upstream, hash_key.as_deref(), &path, headers, &app.metrics)
            .await
            .map_err(|e| match e {
                UpstreamUnavailable::NoHealthyTarget => HandshakeError::NoHealthyTarget,
                UpstreamUnavailable::Connect(e) => HandshakeError::Upstream(e),
            })?;
    if let Some(protocol) = &connected.protocol {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }
    if let Some((_, answer)) = &connected.deflate {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, answer.clone());
    }
    let client_deflate = if frame_relay {
        None
    } else {
        handshake::terminate_deflate(&deflate_offers, ws, &mut response)
    };
    app.metrics
        .handshake_completed(&upstream.name, started.elapsed());

    let guard = app.sessions.open(
        Placement {
            upstream: Arc::clone(&upstream.name),
            route: Arc::clone(&route.external_path),
            mode: Mode::Direct,
            target: Some(Arc::clone(&lease.target().label)),
            compressed: connected.deflate.is_some() || client_deflate.is_some(),
            http_version,
        },
        remote,
        request_id,
    );
    let hooks = session_hooks(&upstream, &guard, &route, remote, &claims);
    let session = Box::new(DirectSession {
        guard,
        hooks,
        permit,
        lease,
        upstream: Arc::clone(&upstream),
        metrics: Arc::clone(&app.metrics),
        client_deflate,
    });
    app.shutdown
        .spawn(direct::relay(session, on_upgrade, connected));
    Ok(response)
}
