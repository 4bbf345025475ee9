//! The configuration model: serde structs that mirror `shared/config.md`.
//!
//! Every struct denies unknown fields, so a misspelt key is an error that
//! names its path and line instead of a silently ignored setting. Defaults
//! live here as named constants, documented once and used by both the
//! `default_*` functions and the README's table. Loading (file, `${NAME}`
//! expansion, YAML) is in `load`; the checks serde cannot express are in
//! `validate`.

mod load;
pub(crate) mod parsed;
mod path;
mod validate;
pub use muxgate_plugins::values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

pub use load::{load_file, load_str, ConfigError, FieldError};
pub use values::{Secret, Size, Text};

/// Client-facing WebSocket listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Listener for `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Concurrent client sessions before new handshakes get HTTP 503.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Most event loops `server.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;
/// How long SIGTERM waits for sessions to close before exiting.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long sessions that a reload or an admin drain takes away (a removed
/// route or target) may go on before they are closed with 1001.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `watch_config` waits after a write for more before reloading.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(250);
/// How long a client connection may take to send a request's head (and
/// how long it may stay idle between requests): hyper's default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `server.http2_max_concurrent_streams` when unset: what browsers expect
/// of a server (and Envoy's and HAProxy's default).
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// `server.max_request_head_size`: HAProxy's default buffer; NGINX takes
/// up to 4 x 8 KiB.
pub const DEFAULT_MAX_REQUEST_HEAD_SIZE: u64 = 16 * 1024;
/// The bounds of `server.max_request_head_size`.
pub const MIN_REQUEST_HEAD_SIZE: u64 = 1024;
pub const MAX_REQUEST_HEAD_SIZE: u64 = 1024 * 1024;
/// How often the broker pings each socket.
pub const DEFAULT_PING_PERIOD: Duration = Duration::from_secs(30);
/// How long a socket may stay silent after a ping before it is dropped.
pub const DEFAULT_PONG_WAIT: Duration = Duration::from_secs(45);
/// Upper bound on connecting to a target and completing its handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing side may take to answer a close frame.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-socket read buffer, in bytes.
pub const DEFAULT_READ_BUFFER_SIZE: u64 = 4096;
/// Per-socket write buffer, in bytes: frames are batched up to this before a write.
pub const DEFAULT_WRITE_BUFFER_SIZE: u64 = 4096;
/// Largest message accepted from either side.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1 << 20;
/// permessage-deflate's default level: zlib's fastest, which keeps most of
/// the ratio on chat-sized JSON.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;
/// Messages below this many bytes are sent uncompressed: deflate's own
/// overhead eats most of what it saves on them.
pub const DEFAULT_COMPRESSION_MIN_SIZE: u64 = 256;
/// The LZ77 window permessage-deflate allows (RFC 7692 §7.1.2): 2^8 to 2^15.
pub const MIN_WINDOW_BITS: u8 = 8;
pub const MAX_WINDOW_BITS: u8 = 15;
/// Mux connections per multiplexed upstream.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Per-session queue toward the client, in messages (multiplexed mode).
pub const DEFAULT_CLIENT_QUEUE: usize = 256;
/// Per-session messages held while no mux connection is live.
pub const DEFAULT_RESUME_BUFFER: usize = 64;
/// How long a session may wait to be re-bound to a live mux connection.
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(5);
/// Failures within `interval` before a target is unhealthy.
pub const DEFAULT_HEALTH_THRESHOLD: u32 = 3;
/// Seconds before a target's failure count resets.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(60);
/// First time an unhealthy target stays out before a half-open trial.
pub const DEFAULT_PASSIVE_BACKOFF: Duration = Duration::from_secs(10);
/// Longest it stays out (the backoff doubles per failed trial).
pub const DEFAULT_PASSIVE_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Time between active probes of a target.
pub const DEFAULT_ACTIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Upper bound on one active probe.
pub const DEFAULT_ACTIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive failed probes that take a target out.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// Consecutive good probes that bring it back.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    /// Used by routes with `auth_required: true`.
    pub jwt: Option<muxgate_plugins::JwtSettings>,
    pub upstreams: Vec<UpstreamConfig>,
    /// Which file this is: the first 48 bits of its text's SHA-256 (so
    /// that a Prometheus float holds it exactly). Set by the loader; the
    /// same text gives the same generation in every process.
    #[serde(skip)]
    pub generation: u64,
    /// The file it was read from (set by [`load_file`]): what a reload
    /// reads again. `None` for a config given as text.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// A config text's generation (see [`Config::generation`]).
pub fn generation_of(text: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first[2..].copy_from_slice(&digest[..6]);
    u64::from_be_bytes(first)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen", deserialize_with = "values::socket_addr")]
    pub listen: SocketAddr,
    #[serde(
        default = "default_admin_listen",
        deserialize_with = "values::socket_addr"
    )]
    pub admin_listen: SocketAddr,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// 0 means no per-IP limit.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    #[serde(
        default = "default_shutdown_grace",
        deserialize_with = "values::duration"
    )]
    pub shutdown_grace: Duration,
    /// How long the sessions a reload or an admin drain takes away may go
    /// on before they are closed with 1001.
    #[serde(
        default = "default_drain_timeout",
        deserialize_with = "values::duration"
    )]
    pub drain_timeout: Duration,
    /// Reload when the config file changes (as on SIGHUP).
    #[serde(default)]
    pub watch_config: bool,
    /// Bind the listeners with `SO_REUSEPORT`, so that another muxgate
    /// process can listen on the same ports (a restart without downtime,
    /// or several processes as replicas).
    #[serde(default)]
    pub reuse_port: bool,
    /// A client connection that has not sent a whole request head this long
    /// after connecting (or after its last response) is closed.
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "values::duration"
    )]
    pub header_read_timeout: Duration,
    /// The most a client's request head (request line and headers) may
    /// take; a larger one is answered 431.
    #[serde(default = "default_max_request_head_size")]
    pub max_request_head_size: Size,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve HTTP/2 (and so WebSockets over HTTP/2, RFC 8441) on the client
    /// listener beside HTTP/1.1: by ALPN `h2` with TLS, by prior knowledge
    /// (h2c) without. Unset is on with TLS and off without (see
    /// [`ServerConfig::serves_http2`]).
    #[serde(default)]
    pub http2: Option<bool>,
    /// The most streams (WebSockets and requests) one HTTP/2 connection may
    /// have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(default = "default_http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Event loops serving clients; unset is one per core (see
    /// [`ServerConfig::event_loops`]).
    #[serde(default)]
    pub workers: Option<usize>,
}

impl ServerConfig {
    /// How many event loops serve clients: `workers` when set, else one per
    /// core the process may use.
    pub fn event_loops(&self) -> std::num::NonZeroUsize {
        self.workers
            .and_then(std::num::NonZeroUsize::new)
            .unwrap_or_else(|| {
                std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN)
            })
    }

    /// Whether the client listener serves HTTP/2: `http2` when set, else
    /// only with TLS (where browsers ask for it by ALPN; cleartext HTTP/2
    /// is for clients that know it is there).
    pub fn serves_http2(&self) -> bool {
        self.http2.unwrap_or(self.tls.is_some())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: 0,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            watch_config: false,
            reuse_port: false,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_request_head_size: default_max_request_head_size(),
            tls: None,
            http2: None,
            http2_max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
            workers: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Text,
    pub key_file: Text,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: Text,
    pub routes: Vec<RouteConfig>,
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub hash_on: Option<Text>,
    #[serde(default)]
    pub auth_required: bool,
    /// Empty means any `Origin`.
    #[serde(default)]
    pub allowed_origins: Vec<Text>,
    /// Client request headers copied onto the upstream handshake.
    #[serde(default)]
    pub forward_headers: Vec<Text>,
    #[serde(default)]
    pub websocket_config: WebSocketSettings,
    #[serde(default)]
    pub health_checks: HealthChecks,
    /// Run in order per stage; see muxgate_plugins.
    #[serde(default)]
    pub plugins: Vec<muxgate_plugins::PluginConfig>,
    /// For `wss://` targets.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// How `wss://` targets are verified.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM CA certificates to trust instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<Text>,
}

impl UpstreamConfig {
    /// `direct` or `multiplexed`: the label used in metrics and logs.
    pub fn mode(&self) -> Mode {
        if self.websocket_config.enable_direct_communication {
            Mode::Direct
        } else {
            Mode::Multiplexed
        }
    }
}

/// How an upstream carries its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Multiplexed,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Multiplexed => "multiplexed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub external_path: Text,
    pub internal_path: Text,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub url: Text,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    LeastConnections,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    #[default]
    Json,
    Binary,
}

/// TrustGate's `websocket_config`, with its names and defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSettings {
    /// true: one upstream socket per client; false: multiplexed.
    #[serde(default)]
    pub enable_direct_communication: bool,
    #[serde(default)]
    pub return_error_details: bool,
    #[serde(default = "default_ping_period", deserialize_with = "values::duration")]
    pub ping_period: Duration,
    #[serde(default = "default_pong_wait", deserialize_with = "values::duration")]
    pub pong_wait: Duration,
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "values::duration"
    )]
    pub handshake_timeout: Duration,
    #[serde(
        default = "default_close_timeout",
        deserialize_with = "values::duration"
    )]
    pub close_timeout: Duration,
    #[serde(default = "default_read_buffer_size")]
    pub read_buffer_size: Size,
    #[serde(default = "default_write_buffer_size")]
    pub write_buffer_size: Size,
    #[serde(default = "default_max_message_size")]
    pub max_message_size: Size,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default)]
    pub envelope: Envelope,
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    #[serde(default = "default_resume_buffer")]
    pub resume_buffer: usize,
    #[serde(
        default = "default_resume_timeout",
        deserialize_with = "values::duration"
    )]
    pub resume_timeout: Duration,
    #[serde(default)]
    pub compression: Compression,
}

/// `websocket_config.compression`: permessage-deflate (RFC 7692). The
/// `server_*` fields bound what the broker sends clients, the `client_*`
/// ones what it asks clients to send (and, in direct mode's frame relay,
/// what the upstream's answer to the client's offer may agree to).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// zlib level, 0 (stored) to 9 (smallest).
    #[serde(default = "default_compression_level")]
    pub level: u32,
    /// Messages smaller than this are sent uncompressed.
    #[serde(default = "default_compression_min_size")]
    pub min_size: Size,
    /// Reset the broker's compressor after each message: no window is
    /// kept between messages (less memory, a worse ratio).
    #[serde(default)]
    pub server_no_context_takeover: bool,
    /// Ask clients to reset theirs, so that the broker keeps no inflate
    /// window between their messages either.
    #[serde(default)]
    pub client_no_context_takeover: bool,
    #[serde(default = "default_window_bits")]
    pub server_max_window_bits: u8,
    #[serde(default = "default_window_bits")]
    pub client_max_window_bits: u8,
    /// Largest message after inflating; inflating stops there and the
    /// client is closed with 1009. Default: `max_message_size`.
    #[serde(default)]
    pub max_decompressed_size: Option<Size>,
    /// Multiplexed mode: offer permessage-deflate on the mux connections
    /// themselves (one context per connection, shared by its sessions'
    /// envelopes); independent of `enabled`, which is about clients.
    #[serde(default)]
    pub mux_compression: bool,
}

impl Compression {
    /// What the broker prefers when it answers a client's offer itself.
    pub fn preferences(&self) -> muxgate_backend::deflate::negotiate::Preferences {
        muxgate_backend::deflate::negotiate::Preferences {
            server_no_context_takeover: self.server_no_context_takeover,
            client_no_context_takeover: self.client_no_context_takeover,
            server_max_window_bits: self.server_max_window_bits,
            client_max_window_bits: self.client_max_window_bits,
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            enabled: true,
            level: DEFAULT_COMPRESSION_LEVEL,
            min_size: default_compression_min_size(),
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: MAX_WINDOW_BITS,
            client_max_window_bits: MAX_WINDOW_BITS,
            max_decompressed_size: None,
            mux_compression: false,
        }
    }
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        Self {
            enable_direct_communication: false,
            return_error_details: false,
            ping_period: DEFAULT_PING_PERIOD,
            pong_wait: DEFAULT_PONG_WAIT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            read_buffer_size: default_read_buffer_size(),
            write_buffer_size: default_write_buffer_size(),
            max_message_size: default_max_message_size(),
            pool_size: DEFAULT_POOL_SIZE,
            envelope: Envelope::Json,
            client_queue: DEFAULT_CLIENT_QUEUE,
            resume_buffer: DEFAULT_RESUME_BUFFER,
            resume_timeout: DEFAULT_RESUME_TIMEOUT,
            compression: Compression::default(),
        }
    }
}

impl WebSocketSettings {
    /// `compression.max_decompressed_size`, or `max_message_size`.
    pub fn max_decompressed_size(&self) -> u64 {
        self.compression
            .max_decompressed_size
            .unwrap_or(self.max_message_size)
            .0
    }
}

/// TrustGate's `health_checks`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthChecks {
    #[serde(default = "default_true")]
    pub passive: bool,
    #[serde(default = "default_health_threshold")]
    pub threshold: u32,
    /// Seconds (a bare integer) or a humantime string.
    #[serde(
        default = "default_health_interval",
        deserialize_with = "values::seconds_or_duration"
    )]
    pub interval: Duration,
    #[serde(
        default = "default_passive_backoff",
        deserialize_with = "values::duration"
    )]
    pub passive_backoff: Duration,
    #[serde(
        default = "default_passive_backoff_max",
        deserialize_with = "values::duration"
    )]
    pub passive_backoff_max: Duration,
    /// Non-empty: active checks on this path.
    #[serde(default)]
    pub path: Text,
    #[serde(default)]
    pub headers: BTreeMap<String, Text>,
    #[serde(
        default = "default_active_interval",
        deserialize_with = "values::duration"
    )]
    pub active_interval: Duration,
    #[serde(
        default = "default_active_timeout",
        deserialize_with = "values::duration"
    )]
    pub timeout: Duration,
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    #[serde(default)]
    pub active_probe: ActiveProbe,
}

/// How an active check asks a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveProbe {
    /// HTTP GET; 2xx is healthy.
    #[default]
    Http,
    /// A WebSocket handshake; 101 is healthy.
    Websocket,
}

impl Default for HealthChecks {
    fn default() -> Self {
        Self {
            passive: true,
            threshold: DEFAULT_HEALTH_THRESHOLD,
            interval: DEFAULT_HEALTH_INTERVAL,
            passive_backoff: DEFAULT_PASSIVE_BACKOFF,
            passive_backoff_max: DEFAULT_PASSIVE_BACKOFF_MAX,
            path: Text::default(),
            headers: BTreeMap::new(),
            active_interval: DEFAULT_ACTIVE_INTERVAL,
            timeout: DEFAULT_ACTIVE_TIMEOUT,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            active_probe: ActiveProbe::Http,
        }
    }
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("valid default address")
}
fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("valid default address")
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}
fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_header_read_timeout() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_ping_period() -> Duration {
    DEFAULT_PING_PERIOD
}
fn default_pong_wait() -> Duration {
    DEFAULT_PONG_WAIT
}
fn default_handshake_timeout() -> Duration {
    DEFAULT_HANDSHAKE_TIMEOUT
}
fn default_close_timeout() -> Duration {
    DEFAULT_CLOSE_TIMEOUT
}
fn default_http2_max_concurrent_streams() -> u32 {
    DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS
}

fn default_max_request_head_size() -> Size {
    Size(DEFAULT_MAX_REQUEST_HEAD_SIZE)
}
fn default_read_buffer_size() -> Size {
    Size(DEFAULT_READ_BUFFER_SIZE)
}
fn default_write_buffer_size() -> Size {
    Size(DEFAULT_WRITE_BUFFER_SIZE)
}
fn default_max_message_size() -> Size {
    Size(DEFAULT_MAX_MESSAGE_SIZE)
}
fn default_compression_level() -> u32 {
    DEFAULT_COMPRESSION_LEVEL
}
fn default_compression_min_size() -> Size {
    Size(DEFAULT_COMPRESSION_MIN_SIZE)
}
fn default_window_bits() -> u8 {
    MAX_WINDOW_BITS
}
fn default_pool_size() -> usize {
    DEFAULT_POOL_SIZE
}
fn default_client_queue() -> usize {
    DEFAULT_CLIENT_QUEUE
}
fn default_resume_buffer() -> usize {
    DEFAULT_RESUME_BUFFER
}
fn default_resume_timeout() -> Duration {
    DEFAULT_RESUME_TIMEOUT
}
fn default_health_threshold() -> u32 {
    DEFAULT_HEALTH_THRESHOLD
}
fn default_health_interval() -> Duration {
    DEFAULT_HEALTH_INTERVAL
}
fn default_passive_backoff() -> Duration {
    DEFAULT_PASSIVE_BACKOFF
}
fn default_passive_backoff_max() -> Duration {
    DEFAULT_PASSIVE_BACKOFF_MAX
}
fn default_active_interval() -> Duration {
    DEFAULT_ACTIVE_INTERVAL
}
fn default_active_timeout() -> Duration {
    DEFAULT_ACTIVE_TIMEOUT
}
fn default_unhealthy_threshold() -> u32 {
    DEFAULT_UNHEALTHY_THRESHOLD
}
fn default_healthy_threshold() -> u32 {
    DEFAULT_HEALTHY_THRESHOLD
}
