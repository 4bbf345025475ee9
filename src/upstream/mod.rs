//! Upstream targets: their addresses, their health, the balancer that picks
//! one, and [`connect`], which opens one WebSocket to a target under the
//! handshake timeout and sorts its failures into the HTTP statuses a client
//! sees (refused or bad handshake: 502, timeout: 504).

mod balance;
mod health;
pub(crate) mod probe;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

pub(crate) use crate::config::parsed::{HashOn, TargetUrl};
pub(crate) use crate::transport::upgraded::UpstreamIo;
pub(crate) use balance::Balancer;
pub(crate) use health::TargetHealth;

use crate::config::{Mode, UpstreamConfig};
use crate::metrics::Metrics;
use muxgate_backend::deflate::negotiate::{self, Agreed, BadAnswer};
use muxgate_backend::deflate::stream::{Counts, DeflateSettings, Deflating};
use tracing::warn;

/// Worst-case growth of a message inside a JSON mux frame (`\u0000` escapes).
const MUX_ENVELOPE_FACTOR: usize = 6;
/// Room for the envelope's own fields.
const MUX_ENVELOPE_SLACK: usize = 64 * 1024;

/// A WebSocket to a target, with permessage-deflate taken off and put on
/// where the broker agreed it (a mux connection with `mux_compression`).
pub(crate) type UpstreamSocket = WebSocketStream<Deflating<UpstreamIo>>;

/// One target of an upstream.
///
/// What a target has learnt at run time (its health, its sessions, an
/// operator's drain) is shared with the same target of the upstream a
/// reload builds next (see [`Upstream::new`]), so that a reload which keeps
/// a target keeps what is known of it.
#[derive(Debug)]
pub(crate) struct Target {
    pub url: TargetUrl,
    /// The URL as a metrics label.
    pub label: Arc<str>,
    pub weight: u32,
    pub health: Arc<TargetHealth>,
    /// Leases held on this target: direct sessions and mux connections.
    active: Arc<AtomicUsize>,
    /// Taken out of rotation by hand (`POST .../drain`) until undrained.
    drained: Arc<AtomicBool>,
}

impl Target {
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether new sessions and mux connections may go to it now: its
    /// health admits it and no operator drained it.
    pub(crate) fn in_rotation(&self, now: std::time::Instant) -> bool {
        !self.is_drained() && self.health.is_candidate(now)
    }

    pub(crate) fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Takes the target out of rotation (`true`) or puts it back; returns
    /// whether that changed anything.
    pub(crate) fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::Relaxed) != drained
    }

    /// Reports what a real connection to this target showed (passive
    /// health): counts it in `muxgate_health_checks_total`, records it in
    /// the target's health, and warns when a failure (`Err(cause)`) takes
    /// the target out of rotation.
    pub(crate) fn report_passive(
        &self,
        upstream: &str,
        metrics: &Metrics,
        outcome: Result<(), &str>,
    ) {
        metrics.health_check(upstream, &self.label, "passive", outcome.is_ok());
        match outcome {
            Ok(()) => self.health.record_success(),
            Err(cause) => {
                if self.health.record_failure(cause) {
                    warn!(upstream, target_url = %self.label, cause, "target marked unhealthy");
                }
            }
        }
    }
}

/// Held while a session uses a target; dropping it releases the slot that
/// `least_connections` counts.
#[derive(Debug)]
pub(crate) struct TargetLease {
    upstream: Arc<Upstream>,
    index: usize,
}

impl TargetLease {
    pub(crate) fn target(&self) -> &Target {
        &self.upstream.targets[self.index]
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }
}

impl Drop for TargetLease {
    fn drop(&mut self) {
        self.target().active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream at run time: its config, targets and balancer.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    pub targets: Vec<Target>,
    balancer: Balancer,
    /// What `consistent_hash` hashes, when it is the balancer.
    pub hash_on: Option<HashOn>,
    /// Handshake and message plugins (with the `auth_required` JWT check first).
    pub pipeline: muxgate_plugins::Pipeline,
    /// Direct mode: the header that carries verified claims upstream.
    pub claims_header: http::HeaderName,
    /// TLS for `wss://` targets.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// tungstenite settings for both sockets of a session on this upstream.
    pub socket_config: WebSocketConfig,
    /// Settings for mux connections: a frame wraps a message of up to
    /// `max_message_size` in an envelope (JSON escaping can make text six
    /// times longer), so the link allows that much more.
    pub mux_socket_config: WebSocketConfig,
}

impl Upstream {
    /// Builds the run-time upstream from a validated config; `jwt` is the
    /// top-level section, used when the upstream has `auth_required`.
    /// `previous` is the upstream of the same name that a reload replaces:
    /// each of its targets that stays shares its run-time state with the
    /// new one (its health only when the health settings stayed too).
    pub(crate) fn new(
        config: UpstreamConfig,
        jwt: Option<&muxgate_plugins::JwtSettings>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let mut pipeline =
            muxgate_plugins::Pipeline::build(&config.plugins).expect("validated plugins");
        let mut claims_header = http::HeaderName::from_static("x-muxgate-claims");
        if let (true, Some(jwt)) = (config.auth_required, jwt) {
            let verifier = muxgate_plugins::JwtVerifier::build(jwt).expect("validated jwt");
            claims_header = verifier.claims_header.clone();
            pipeline.require_first(Arc::new(muxgate_plugins::JwtPlugin(verifier)));
        }
        let tls_config = config
            .targets
            .iter()
            .any(|t| t.url.starts_with("wss://"))
            .then(|| {
                let ca = config.tls.as_ref().and_then(|t| t.ca_file.as_deref());
                crate::transport::tls::client_config(ca).expect("validated TLS settings")
            });
        for plugin in &config.plugins {
            if let muxgate_plugins::PluginConfig::Jwt { settings, .. } = plugin {
                if let Ok(h) = http::HeaderName::from_bytes(settings.claims_header.as_bytes()) {
                    claims_header = h;
                }
            }
        }
        let targets: Vec<Target> = config
            .targets
            .iter()
            .map(|t| {
                let url = TargetUrl::parse(&t.url).expect("validated target URL");
                let label: Arc<str> = Arc::from(url.to_string());
                let kept = previous.and_then(|p| p.target(&label));
                let same_health =
                    previous.is_some_and(|p| p.config.health_checks == config.health_checks);
                Target {
                    health: match kept {
                        Some(k) if same_health => Arc::clone(&k.health),
                        _ => Arc::new(TargetHealth::new(&config.health_checks)),
                    },
                    active: kept.map(|k| Arc::clone(&k.active)).unwrap_or_default(),
                    drained: kept.map(|k| Arc::clone(&k.drained)).unwrap_or_default(),
                    label,
                    url,
                    weight: t.weight,
                }
            })
            .collect();
        let ws = &config.websocket_config;
        let socket_config = WebSocketConfig::default()
            .read_buffer_size(ws.read_buffer_size.bytes())
            .write_buffer_size(ws.write_buffer_size.bytes())
            .max_message_size(Some(ws.max_message_size.bytes()))
            .max_frame_size(Some(ws.max_message_size.bytes()));
        let mux_limit = ws
            .max_message_size
            .bytes()
            .saturating_mul(MUX_ENVELOPE_FACTOR)
            .saturating_add(MUX_ENVELOPE_SLACK);
        let mux_socket_config = socket_config
            .max_message_size(Some(mux_limit))
            .max_frame_size(Some(mux_limit));
        Upstream {
            name: Arc::from(config.name.as_ref()),
            balancer: Balancer::new(config.load_balancing, &targets),
            pipeline,
            claims_header,
            tls: tls_config,
            hash_on: config
                .hash_on
                .as_deref()
                .map(|h| HashOn::parse(h).expect("validated hash_on")),
            targets,
            socket_config,
            mux_socket_config,
            config,
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        self.config.mode()
    }

    /// The target whose URL reads `label`.
    pub(crate) fn target(&self, label: &str) -> Option<&Target> {
        self.targets.iter().find(|t| &*t.label == label)
    }

    /// Picks a healthy target and leases it, or `None` when none is
    /// healthy. `key` is the consistent-hash key, when the upstream hashes.
    pub(crate) fn pick(self: &Arc<Self>, key: Option<&[u8]>) -> Option<TargetLease> {
        self.pick_except(key, &[])
    }

    /// Leases target `index` if its health admits it now, taking its
    /// half-open trial if that is where it stands (for a pool moving a
    /// connection to a target back in rotation).
    pub(crate) fn lease(self: &Arc<Self>, index: usize) -> Option<TargetLease> {
        let target = self.targets.get(index)?;
        let now = std::time::Instant::now();
        if !(target.in_rotation(now) && target.health.claim(now)) {
            return None;
        }
        self.targets[index].active.fetch_add(1, Ordering::Relaxed);
        Some(TargetLease {
            upstream: Arc::clone(self),
            index,
        })
    }

    /// [`Upstream::pick`], passing over the targets in `skip`.
    pub(crate) fn pick_except(
        self: &Arc<Self>,
        key: Option<&[u8]>,
        skip: &[usize],
    ) -> Option<TargetLease> {
        let index = self.balancer.pick(&self.targets, key, skip)?;
        self.targets[index].active.fetch_add(1, Ordering::Relaxed);
        Some(TargetLease {
            upstream: Arc::clone(self),
            index,
        })
    }
}

/// Why connecting to a target failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {target}: {source}")]
    Refused {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WebSocket handshake with {target}: {source}")]
    Handshake {
        target: String,
        #[source]
        source: HandshakeFailure,
    },
    #[error("no handshake from {target} within {}", humantime::format_duration(*.timeout))]
    Timeout { target: String, timeout: Duration },
}

impl ConnectError {
    /// A bounded label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ConnectError::Refused { .. } => "connect",
            ConnectError::Handshake {
                source: HandshakeFailure::Subprotocol(_),
                ..
            } => "subprotocol",
            ConnectError::Handshake {
                source: HandshakeFailure::Extensions(_),
                ..
            } => "extensions",
            ConnectError::Handshake { .. } => "handshake",
            ConnectError::Timeout { .. } => "timeout",
        }
    }
}

/// How a target's answer to the upgrade request fell short.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeFailure {
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("answered HTTP {0} instead of 101 Switching Protocols")]
    Status(http::StatusCode),
    #[error("the Sec-WebSocket-Accept header does not match the key sent")]
    BadAccept,
    #[error("selected the subprotocol {0:?}, which was not offered")]
    Subprotocol(HeaderValue),
    #[error("Sec-WebSocket-Extensions: {0}")]
    Extensions(#[from] BadAnswer),
    #[error("taking the upgraded connection: {0}")]
    Upgraded(std::io::Error),
}

/// An upgraded connection to a target, the subprotocol it selected and the
/// permessage-deflate offer it accepted, if any (with its answer, which
/// direct mode's frame relay passes on to the client that made the offer).
pub(crate) struct Connected {
    pub io: UpstreamIo,
    pub protocol: Option<HeaderValue>,
    pub deflate: Option<(Agreed, HeaderValue)>,
}

impl Connected {
    /// The connection as a WebSocket (the broker is the client), without
    /// compression: the broker made no offer of its own, or it relays the
    /// client's compressed frames as they are.
    pub(crate) async fn websocket(self, config: WebSocketConfig) -> UpstreamSocket {
        WebSocketStream::from_raw_socket(Deflating::plain(self.io), Role::Client, Some(config))
            .await
    }

    /// The connection as a WebSocket that compresses and inflates as the
    /// target agreed to the broker's own permessage-deflate offer, with
    /// what `settings` makes of the agreement; plain if it declined.
    pub(crate) async fn compressed_websocket(
        self,
        config: WebSocketConfig,
        settings: impl FnOnce(Agreed) -> (DeflateSettings, Counts),
    ) -> UpstreamSocket {
        let agreed = self.deflate.as_ref().map(|(agreed, _)| *agreed);
        let mut socket = self.websocket(config).await;
        if let Some(agreed) = agreed {
            let (settings, counts) = settings(agreed);
            socket.get_mut().enable(Role::Client, settings, counts);
        }
        socket
    }
}

/// Opens a WebSocket to `target` at `path_and_query`, sending `headers`
/// (which may carry `Sec-WebSocket-Protocol` and permessage-deflate offers
/// in `Sec-WebSocket-Extensions`), all within `timeout`.
///
/// The upgrade goes through hyper's HTTP/1 client rather than tungstenite's
/// so that the connection comes back as raw bytes: direct mode can then
/// relay frames without decoding them ([`crate::direct`]), and the other
/// users wrap it with [`Connected::websocket`].
pub(crate) async fn connect(
    target: &TargetUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    path_and_query: &str,
    headers: HeaderMap,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let label = || target.to_string();
    let attempt = async {
        let tcp = TcpStream::connect(target.authority())
            .await
            .map_err(|source| ConnectError::Refused {
                target: label(),
                source,
            })?;
        // Relayed messages are latency-sensitive and already batched by us.
        let _ = tcp.set_nodelay(true);
        let tls = if target.is_secure() { tls } else { None };
        let stream = crate::transport::tls::UpstreamStream::connect(tcp, target.host(), tls)
            .await
            .map_err(|source| ConnectError::Refused {
                target: label(),
                source,
            })?;
        upgrade(stream, target, path_and_query, headers)
            .await
            .map_err(|source| ConnectError::Handshake {
                target: label(),
                source,
            })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            target: label(),
            timeout,
        }),
    }
}

/// Sends the WebSocket upgrade request over `stream` and checks the answer
/// (RFC 6455 §4.1): status 101, the accept key, an offered subprotocol, no
/// extension but an answer to one of the permessage-deflate offers sent.
async fn upgrade(
    stream: crate::transport::tls::UpstreamStream,
    target: &TargetUrl,
    path_and_query: &str,
    headers: HeaderMap,
) -> Result<Connected, HandshakeFailure> {
    let key = generate_key();
    let mut request = http::Request::get(path_and_query).body(Empty::<Bytes>::new())?;
    let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
    // Only offers the broker rendered itself are sent, so they parse.
    let deflate_offers = negotiate::offers(&headers).unwrap_or_default();
    let h = request.headers_mut();
    *h = headers;
    h.insert(
        header::HOST,
        HeaderValue::from_str(target.authority()).expect("validated authority"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    h.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).expect("base64 key"),
    );
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future must run while the request is in flight; it
    // ends once the 101 hands the socket over (or, on any other status,
    // once `sender` is dropped at the end of the first future).
    let (response, conn) = tokio::join!(
        async move { sender.send_request(request).await },
        conn.with_upgrades()
    );
    let mut response = response?;
    conn?;
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(HandshakeFailure::Status(response.status()));
    }
    let accept = response.headers().get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(|v| v.as_bytes()) != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err(HandshakeFailure::BadAccept);
    }
    let protocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .cloned();
    if let Some(selected) = &protocol {
        let was_offered = offered
            .as_ref()
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| {
                o.split(',')
                    .any(|p| p.trim().as_bytes() == selected.as_bytes())
            });
        if !was_offered {
            return Err(HandshakeFailure::Subprotocol(selected.clone()));
        }
    }
    let deflate = negotiate::check_answer(response.headers(), &deflate_offers)?
        .map(|agreed| (agreed, negotiate::answer_header(response.headers())));
    let upgraded = hyper::upgrade::on(&mut response).await?;
    Ok(Connected {
        io: UpstreamIo::take(upgraded).map_err(HandshakeFailure::Upgraded)?,
        protocol,
        deflate,
    })
}
