//! The client's handshake, the part every mode shares: what the upgrade
//! request must be, who may make it, and the answer it gets. Everything
//! here runs before a WebSocket exists, so every refusal is an HTTP status
//! with a clear body rather than an accepted socket that closes at once.
//! Which mode then serves the session is the app's choice
//! (`crate::app::clients`); this module knows neither mode.
//!
//! A WebSocket opens the same way over either HTTP the client listener
//! speaks: a GET with `Upgrade: websocket` over HTTP/1.1, answered 101
//! (RFC 6455), or an extended CONNECT with `:protocol websocket` on a
//! stream of an HTTP/2 connection, answered 200 (RFC 8441). Everything
//! after the request's form (routing, origin, plugins, limits, the modes)
//! is the same for both, and so is every refusal's status.
//!
//! Statuses: unknown path 404, not GET (over HTTP/2: not CONNECT) 405, no
//! WebSocket upgrade 426,
//! malformed upgrade 400, bad `Origin` 403, per-IP limit 429, global limit,
//! shutdown or no healthy target 503, upstream refused or failed its
//! handshake 502, upstream handshake timed out 504.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::config::{Compression, Text, WebSocketSettings};
use crate::limits::LimitRefusal;
use crate::routing::Route;
use crate::upstream::ConnectError;
use muxgate_backend::deflate::codec::MIN_DEFLATE_WINDOW_BITS;
use muxgate_backend::deflate::negotiate;
use muxgate_backend::deflate::stream::DeflateSettings;
use muxgate_plugins::Rejection;

/// Why a client's handshake was refused, each variant one HTTP status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("no route for this path")]
    NotFound,
    /// The method that can (GET, or CONNECT over HTTP/2).
    #[error("only {0} can open a WebSocket")]
    MethodNotAllowed(&'static str),
    #[error("this path serves WebSocket only; send an Upgrade: websocket request")]
    UpgradeRequired,
    #[error("malformed WebSocket upgrade: {0}")]
    BadRequest(&'static str),
    #[error("unsupported Sec-WebSocket-Version; this server speaks 13")]
    UnsupportedVersion,
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("too many connections from this address")]
    TooManyFromIp,
    #[error("server at connection capacity")]
    AtCapacity,
    #[error("server shutting down")]
    ShuttingDown,
    #[error("no healthy upstream target")]
    NoHealthyTarget,
    #[error("no upstream connection available")]
    NoMuxConnection,
    #[error("upstream unavailable")]
    Upstream(#[source] ConnectError),
    #[error("connection cannot be upgraded")]
    NotUpgradable,
    /// A handshake plugin (or `auth_required`) refused.
    #[error("{}", .0.message)]
    Plugin(Rejection),
}

impl HandshakeError {
    pub(crate) fn status(&self) -> StatusCode {
        use HandshakeError::*;
        match self {
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            BadRequest(_) | UnsupportedVersion => StatusCode::BAD_REQUEST,
            OriginNotAllowed => StatusCode::FORBIDDEN,
            TooManyFromIp => StatusCode::TOO_MANY_REQUESTS,
            AtCapacity | ShuttingDown | NoHealthyTarget | NoMuxConnection => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Upstream(ConnectError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            Upstream(_) => StatusCode::BAD_GATEWAY,
            NotUpgradable => StatusCode::INTERNAL_SERVER_ERROR,
            Plugin(r) => r.status,
        }
    }

    /// A bounded label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        use HandshakeError::*;
        match self {
            NotFound => "not_found",
            MethodNotAllowed(_) => "method_not_allowed",
            UpgradeRequired => "upgrade_required",
            BadRequest(_) => "bad_request",
            UnsupportedVersion => "unsupported_version",
            OriginNotAllowed => "origin_not_allowed",
            TooManyFromIp => "per_ip_limit",
            AtCapacity => "max_connections",
            ShuttingDown => "shutting_down",
            NoHealthyTarget => "no_healthy_target",
            NoMuxConnection => "no_mux_connection",
            Upstream(e) => match e {
                ConnectError::Refused { .. } => "upstream_connect",
                ConnectError::Handshake { .. } => "upstream_handshake",
                ConnectError::Timeout { .. } => "upstream_timeout",
            },
            NotUpgradable => "not_upgradable",
            Plugin(r) => r.reason,
        }
    }

    /// The response; `details` adds the underlying error to the body
    /// (`return_error_details`).
    pub(crate) fn into_response_with(self, details: bool) -> Response {
        let mut body = self.to_string();
        if details {
            match &self {
                HandshakeError::Upstream(e) => body = format!("{body}: {e}"),
                HandshakeError::Plugin(r) => body = format!("{body}: {}", r.detail),
                _ => {}
            }
        }
        body.push('\n');
        let mut response = (self.status(), body).into_response();
        let h = response.headers_mut();
        match self {
            HandshakeError::MethodNotAllowed(allowed) => {
                h.insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            HandshakeError::UpgradeRequired => {
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                h.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            HandshakeError::UnsupportedVersion => {
                h.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            HandshakeError::Plugin(r) => {
                for (name, value) in r.headers {
                    h.insert(name, value);
                }
            }
            _ => {}
        }
        response
    }
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The HTTP a client's WebSocket came over: a label of the session's
/// metrics (`http_version`) and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HttpVersion {
    Http1,
    Http2,
}

impl HttpVersion {
    /// The request's: HTTP/2, or (HTTP/1.0 and 1.1 alike) HTTP/1.1.
    pub(crate) fn of(request: &Request) -> HttpVersion {
        if request.version() == http::Version::HTTP_2 {
            HttpVersion::Http2
        } else {
            HttpVersion::Http1
        }
    }

    /// `1.1` or `2`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

/// A request that can open a WebSocket, of either form.
pub(crate) enum Upgrade {
    /// An HTTP/1.1 upgrade, with the client's `Sec-WebSocket-Key`.
    Http1 { key: HeaderValue },
    /// An HTTP/2 extended CONNECT, which has no key (RFC 8441 §5).
    Http2,
}

impl Upgrade {
    /// The HTTP it came over.
    pub(crate) fn http_version(&self) -> HttpVersion {
        match self {
            Upgrade::Http1 { .. } => HttpVersion::Http1,
            Upgrade::Http2 => HttpVersion::Http2,
        }
    }

    /// The answer that accepts it: 101 with `Sec-WebSocket-Accept`, or,
    /// over HTTP/2, 200; the mode adds the subprotocol and extensions.
    pub(crate) fn accepted(&self, request_id: &str) -> Response {
        let mut response = match self {
            Upgrade::Http1 { key } => switching_protocols(key),
            Upgrade::Http2 => Response::new(Body::empty()),
        };
        if let Ok(v) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert("x-request-id", v);
        }
        response
    }
}

/// Checks that the request can open a WebSocket: an HTTP/1.1 upgrade
/// (RFC 6455 §4.2.1) or an HTTP/2 extended CONNECT (RFC 8441 §5).
pub(crate) fn check_upgrade(request: &Request) -> Result<Upgrade, HandshakeError> {
    if HttpVersion::of(request) == HttpVersion::Http2 {
        check_extended_connect(request)?;
        return Ok(Upgrade::Http2);
    }
    check_http1_upgrade(request).map(|key| Upgrade::Http1 { key })
}

/// An HTTP/2 stream's request: CONNECT with `:protocol websocket` and
/// `Sec-WebSocket-Version: 13`. A GET is a plain request to a WebSocket
/// path, answered 426 as over HTTP/1.1.
fn check_extended_connect(request: &Request) -> Result<(), HandshakeError> {
    if request.method() == Method::GET {
        return Err(HandshakeError::UpgradeRequired);
    }
    if request.method() != Method::CONNECT {
        return Err(HandshakeError::MethodNotAllowed("CONNECT"));
    }
    let protocol = request.extensions().get::<hyper::ext::Protocol>();
    if !protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::BadRequest(
            "an HTTP/2 CONNECT opens a WebSocket only with :protocol websocket",
        ));
    }
    check_version(request.headers())
}

fn check_version(headers: &HeaderMap) -> Result<(), HandshakeError> {
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v.as_bytes() == b"13" => Ok(()),
        Some(_) => Err(HandshakeError::UnsupportedVersion),
        None => Err(HandshakeError::BadRequest("missing Sec-WebSocket-Version")),
    }
}

/// Checks an HTTP/1.1 upgrade request (RFC 6455 §4.2.1) and returns its key.
fn check_http1_upgrade(request: &Request) -> Result<HeaderValue, HandshakeError> {
    if request.method() != Method::GET {
        return Err(HandshakeError::MethodNotAllowed("GET"));
    }
    let headers = request.headers();
    if !has_token(headers, header::UPGRADE, "websocket") {
        // Asking to upgrade without saying to what is a malformed upgrade,
        // not a plain request (RFC 9110 §7.6.1: a sender of
        // `Connection: upgrade` sends `Upgrade`).
        if headers.get(header::UPGRADE).is_none()
            && has_token(headers, header::CONNECTION, "upgrade")
        {
            return Err(HandshakeError::BadRequest(
                "Connection: Upgrade without an Upgrade header",
            ));
        }
        return Err(HandshakeError::UpgradeRequired);
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::BadRequest(
            "Connection header must include Upgrade",
        ));
    }
    check_version(headers)?;
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::BadRequest("missing Sec-WebSocket-Key"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_err(|_| HandshakeError::BadRequest("Sec-WebSocket-Key is not base64"))?;
    if decoded.len() != 16 {
        return Err(HandshakeError::BadRequest(
            "Sec-WebSocket-Key must encode 16 bytes",
        ));
    }
    Ok(key.clone())
}

/// Headers the broker sets on the upgrade it sends upstream.
pub(crate) fn upstream_headers(
    route: &Route,
    request: &Request,
    remote: SocketAddr,
    request_id: &str,
    secure: bool,
) -> HeaderMap {
    let incoming = request.headers();
    let mut out = HeaderMap::new();
    let always = [
        header::COOKIE,
        header::AUTHORIZATION,
        header::SEC_WEBSOCKET_PROTOCOL,
    ];
    let configured = route
        .upstream
        .config
        .forward_headers
        .iter()
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| !always.contains(n));
    for name in always.iter().cloned().chain(configured) {
        for v in incoming.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    // Never forwarded as sent: the broker passes on only permessage-deflate
    // offers, and only where it relays frames undecoded
    // ([`deflate_offers`]).
    out.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    let ip = remote.ip().to_string();
    let prior: Vec<&str> = incoming
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let xff = if prior.is_empty() {
        ip
    } else {
        format!("{}, {ip}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert("x-forwarded-for", v);
    }
    out.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if secure { "https" } else { "http" }),
    );
    // Over HTTP/2 the host is the request's `:authority`.
    let authority = || {
        let authority = request.uri().authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    };
    if let Some(host) = incoming.get(header::HOST).cloned().or_else(authority) {
        out.insert("x-forwarded-host", host);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        out.insert("x-request-id", v);
    }
    out
}

/// The client's permessage-deflate offers, in its order, when `compression`
/// is enabled (none otherwise); a `Sec-WebSocket-Extensions` header that
/// breaks RFC 6455 §9.1's grammar is a bad request.
pub(crate) fn deflate_offers(
    headers: &HeaderMap,
    compression: &Compression,
) -> Result<Vec<negotiate::Params>, HandshakeError> {
    if !compression.enabled {
        return Ok(Vec::new());
    }
    negotiate::offers(headers)
        .map_err(|_| HandshakeError::BadRequest("malformed Sec-WebSocket-Extensions header"))
}

/// The broker's own answer to the client's permessage-deflate `offers`,
/// where it terminates compression (it must read the messages): the first
/// offer it can accept within `ws.compression` is answered in `response`,
/// and the settings the client's stream needs are returned.
pub(crate) fn terminate_deflate(
    offers: &[negotiate::Params],
    ws: &WebSocketSettings,
    response: &mut Response,
) -> Option<DeflateSettings> {
    let c = &ws.compression;
    let (agreed, answer) = negotiate::accept(offers, &c.preferences(), MIN_DEFLATE_WINDOW_BITS)?;
    response
        .headers_mut()
        .insert(header::SEC_WEBSOCKET_EXTENSIONS, answer);
    Some(DeflateSettings {
        agreed,
        level: c.level,
        min_size: c.min_size.bytes(),
        max_decompressed_size: usize::try_from(ws.max_decompressed_size()).unwrap_or(usize::MAX),
    })
}

impl From<LimitRefusal> for HandshakeError {
    fn from(refusal: LimitRefusal) -> Self {
        match refusal {
            LimitRefusal::Global => HandshakeError::AtCapacity,
            LimitRefusal::PerIp => HandshakeError::TooManyFromIp,
        }
    }
}

/// Checks `Origin` against `allowed_origins` (empty: any origin).
pub(crate) fn check_origin(headers: &HeaderMap, allowed: &[Text]) -> Result<(), HandshakeError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if origin.is_some_and(|o| allowed.iter().any(|a| &**a == o)) {
        Ok(())
    } else {
        Err(HandshakeError::OriginNotAllowed)
    }
}

/// The request's id: the client's `X-Request-Id` when it is usable, else
/// a new UUID.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The 101 that accepts the HTTP/1.1 upgrade with `key`.
fn switching_protocols(key: &HeaderValue) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 accept key"),
    );
    response
}
