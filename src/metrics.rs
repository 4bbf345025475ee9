//! Every Prometheus collector of the broker, registered once at start-up,
//! with one method per event. Labels come from bounded sets (upstream and
//! target names from the config, modes, directions, reasons, close codes),
//! never from session ids or raw error text.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// A word that metrics label by and the sessions define (a session's
/// side, a message's direction: `crate::session::side`): its label value,
/// and its place among the two values its kind has, for caches kept per
/// value. Metrics depend on this, not on the session layer.
pub(crate) trait Label: Copy {
    fn label(self) -> &'static str;
    /// 0 or 1.
    fn index(self) -> usize;
}

pub(crate) struct Metrics {
    registry: Registry,
    config_generation: IntGauge,
    config_reloads_total: IntCounterVec,
    sessions_active: IntGaugeVec,
    sessions_draining: IntGaugeVec,
    compressed_sessions_active: IntGaugeVec,
    compression_bytes_total: IntCounterVec,
    decompression_limit_closes_total: IntCounterVec,
    sessions_total: IntCounterVec,
    messages_total: IntCounterVec,
    message_bytes_total: IntCounterVec,
    messages_dropped_total: IntCounterVec,
    upstream_connects_total: IntCounterVec,
    upstream_connect_failures_total: IntCounterVec,
    handshake_duration_seconds: HistogramVec,
    ping_timeouts_total: IntCounterVec,
    close_codes_sent_total: IntCounterVec,
    handshakes_rejected_total: IntCounterVec,
    mux_connections: IntGaugeVec,
    mux_frames_total: IntCounterVec,
    mux_frame_bytes_total: IntCounterVec,
    mux_frames_dropped_total: IntCounterVec,
    mux_write_queue_depth: IntGaugeVec,
    sessions_rebound_total: IntCounterVec,
    mux_connections_moved_total: IntCounterVec,
    slow_consumer_closes_total: IntCounterVec,
    target_healthy: IntGaugeVec,
    health_checks_total: IntCounterVec,
    target_picks_total: IntCounterVec,
    connections_accepted_total: IntCounterVec,
    client_header_timeouts_total: IntCounterVec,
    /// Each upstream's message counters, one set per direction, resolved
    /// once and shared by its sessions (a session keeps a pointer to them
    /// instead of four counters per direction).
    message_counters: [DashMap<Box<str>, Arc<MessageCounters>>; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new_custom(Some("muxgate".into()), None).expect("registry");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let sessions_total = counter(
            "sessions_total",
            "Client sessions opened, by upstream, mode and the HTTP version their WebSocket came over (1.1 or 2).",
            &["upstream", "mode", "http_version"],
        );
        let messages_total = counter(
            "messages_total",
            "Messages relayed, by upstream, direction and kind (text, binary).",
            &["upstream", "direction", "kind"],
        );
        let message_bytes_total = counter(
            "message_bytes_total",
            "Payload bytes relayed, by upstream, direction and kind.",
            &["upstream", "direction", "kind"],
        );
        let messages_dropped_total = counter(
            "messages_dropped_total",
            "Messages read but not delivered, by upstream, direction and reason.",
            &["upstream", "direction", "reason"],
        );
        let upstream_connects_total = counter(
            "upstream_connects_total",
            "Successful upstream WebSocket handshakes, by upstream and target.",
            &["upstream", "target"],
        );
        let upstream_connect_failures_total = counter(
            "upstream_connect_failures_total",
            "Failed upstream connects, by upstream, target and reason (connect, handshake, subprotocol, extensions, timeout).",
            &["upstream", "target", "reason"],
        );
        let ping_timeouts_total = counter(
            "ping_timeouts_total",
            "Sockets dropped for not answering a ping within pong_wait, by upstream and side.",
            &["upstream", "side"],
        );
        let close_codes_sent_total = counter(
            "close_codes_sent_total",
            "Close frames sent by the broker, by upstream, side and code.",
            &["upstream", "side", "code"],
        );
        let handshakes_rejected_total = counter(
            "handshakes_rejected_total",
            "Client handshakes answered with an HTTP error, by status, reason and the request's HTTP version (1.1 or 2).",
            &["status", "reason", "http_version"],
        );
        let mux_frames_total = counter(
            "mux_frames_total",
            "Mux frames on mux connections, by upstream and direction (to_upstream, from_upstream).",
            &["upstream", "direction"],
        );
        let mux_frame_bytes_total = counter(
            "mux_frame_bytes_total",
            "WebSocket payload bytes of mux frames, by upstream and direction.",
            &["upstream", "direction"],
        );
        let mux_frames_dropped_total = counter(
            "mux_frames_dropped_total",
            "Mux frames from upstreams that were dropped, by upstream and reason.",
            &["upstream", "reason"],
        );
        let sessions_rebound_total = counter(
            "sessions_rebound_total",
            "Sessions re-bound to another mux connection after theirs died or moved, by upstream.",
            &["upstream"],
        );
        let mux_connections_moved_total = counter(
            "mux_connections_moved_total",
            "Mux connections the pool moved to another target to spread over its targets by weight again, by upstream and the targets it moved from and to.",
            &["upstream", "from", "to"],
        );
        let slow_consumer_closes_total = counter(
            "slow_consumer_closes_total",
            "Sessions closed with 1008 because their client_queue was full, by upstream.",
            &["upstream"],
        );
        let health_checks_total = counter(
            "health_checks_total",
            "Health verdicts by upstream, target, kind (active, passive) and outcome (success, failure).",
            &["upstream", "target", "kind", "outcome"],
        );
        let config_reloads_total = counter(
            "config_reloads_total",
            "Config reloads (SIGHUP, POST /admin/reload, watch_config), by result: applied, or rejected (the file had problems and nothing changed).",
            &["result"],
        );
        for result in ["applied", "rejected"] {
            config_reloads_total.with_label_values(&[result]);
        }
        let target_picks_total = counter(
            "target_picks_total",
            "Sessions (direct) or mux connections (multiplexed) placed on a target.",
            &["upstream", "target"],
        );
        let connections_accepted_total = counter(
            "connections_accepted_total",
            "Client connections accepted (TLS ones once their TLS handshake is done), by the event loop that took them (0 to server.workers - 1).",
            &["event_loop"],
        );
        let client_header_timeouts_total = counter(
            "client_header_timeouts_total",
            "Client connections closed for sending no whole request head within server.header_read_timeout, by event loop.",
            &["event_loop"],
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("gauge");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let sessions_active = gauge(
            "sessions_active",
            "Client sessions open now, by upstream, mode and the HTTP version their WebSocket came over (1.1 or 2).",
            &["upstream", "mode", "http_version"],
        );
        let sessions_draining = gauge(
            "sessions_draining",
            "Client sessions a reload or an admin drain took away (removed route, upstream or target), open until they end or server.drain_timeout closes them with 1001.",
            &["upstream"],
        );
        let compressed_sessions_active = gauge(
            "compressed_sessions_active",
            "Client sessions open now that agreed permessage-deflate with the client, by upstream (in direct mode's frame relay the upstream compresses, end to end).",
            &["upstream"],
        );
        let compression_bytes_total = counter(
            "compression_bytes_total",
            "permessage-deflate where the broker compresses: message bytes (form=uncompressed) and the compressed payload bytes that carry them (form=compressed), by upstream, hop (client: the client's socket; mux: mux connections with mux_compression) and direction.",
            &["upstream", "hop", "direction", "form"],
        );
        let decompression_limit_closes_total = counter(
            "decompression_limit_closes_total",
            "Sockets failed for a compressed message that inflated past its cap: clients past compression.max_decompressed_size (closed with 1009), mux connections past their message limit (dropped as lost), by upstream and hop.",
            &["upstream", "hop"],
        );
        let mux_connections = gauge(
            "mux_connections",
            "Mux connections by upstream, target and state (connecting, live).",
            &["upstream", "target", "state"],
        );
        let target_healthy = gauge(
            "target_healthy",
            "1 while a target is in rotation (neither passive nor active checks say unhealthy), else 0.",
            &["upstream", "target"],
        );
        let config_generation = IntGauge::with_opts(Opts::new(
            "config_generation",
            "The applied config file's generation: the first 48 bits of its SHA-256.",
        ))
        .expect("gauge");
        registry
            .register(Box::new(config_generation.clone()))
            .expect("register");
        let mux_write_queue_depth = gauge(
            "mux_write_queue_depth",
            "Commands waiting in a mux connection's write queue, by upstream and pool slot.",
            &["upstream", "slot"],
        );
        let handshake_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "handshake_duration_seconds",
                "Time from a client's upgrade request to the broker's answer, by upstream.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["upstream"],
        )
        .expect("histogram");
        registry
            .register(Box::new(handshake_duration_seconds.clone()))
            .expect("register");
        Metrics {
            registry,
            sessions_active,
            compressed_sessions_active,
            compression_bytes_total,
            decompression_limit_closes_total,
            sessions_draining,
            config_reloads_total,
            sessions_total,
            messages_total,
            message_bytes_total,
            messages_dropped_total,
            upstream_connects_total,
            upstream_connect_failures_total,
            handshake_duration_seconds,
            ping_timeouts_total,
            close_codes_sent_total,
            handshakes_rejected_total,
            mux_connections,
            mux_frames_total,
            mux_frame_bytes_total,
            mux_frames_dropped_total,
            mux_write_queue_depth,
            sessions_rebound_total,
            mux_connections_moved_total,
            slow_consumer_closes_total,
            target_healthy,
            health_checks_total,
            target_picks_total,
            connections_accepted_total,
            client_header_timeouts_total,
            config_generation,
            message_counters: Default::default(),
        }
    }

    /// The config now applied (see `Config::generation`).
    pub(crate) fn config_applied(&self, generation: u64) {
        self.config_generation.set(generation as i64);
    }

    /// A reload ended: `applied` or `rejected`.
    pub(crate) fn config_reloaded(&self, result: &str) {
        self.config_reloads_total.with_label_values(&[result]).inc();
    }

    /// Sessions of `upstream` began (`delta` > 0) or stopped draining.
    pub(crate) fn sessions_draining(&self, upstream: &str, delta: i64) {
        self.sessions_draining
            .with_label_values(&[upstream])
            .add(delta);
    }

    /// A reload took `target` (or its whole upstream) away: its health
    /// gauge goes, rather than stay at its last value.
    pub(crate) fn target_removed(&self, upstream: &str, target: &str) {
        let _ = self.target_healthy.remove_label_values(&[upstream, target]);
    }

    /// The text exposition format served on `/metrics`.
    pub(crate) fn render(&self) -> String {
        for cache in &self.message_counters {
            for counters in cache.iter() {
                counters.flush();
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }

    pub(crate) fn session_opened(
        &self,
        upstream: &str,
        mode: &str,
        compressed: bool,
        http_version: &str,
    ) {
        self.sessions_total
            .with_label_values(&[upstream, mode, http_version])
            .inc();
        self.sessions_active
            .with_label_values(&[upstream, mode, http_version])
            .inc();
        if compressed {
            self.compressed_sessions_active
                .with_label_values(&[upstream])
                .inc();
        }
    }

    pub(crate) fn session_closed(
        &self,
        upstream: &str,
        mode: &str,
        compressed: bool,
        http_version: &str,
    ) {
        self.sessions_active
            .with_label_values(&[upstream, mode, http_version])
            .dec();
        if compressed {
            self.compressed_sessions_active
                .with_label_values(&[upstream])
                .dec();
        }
    }

    /// Counter handles for the messages of `upstream`'s sessions in one
    /// direction, resolved on first use and shared, so the per-message
    /// path is two atomic adds into the calling thread's shard.
    pub(crate) fn message_counters(
        &self,
        upstream: &str,
        direction: impl Label,
    ) -> Arc<MessageCounters> {
        let cache = &self.message_counters[direction.index()];
        if let Some(counters) = cache.get(upstream) {
            return Arc::clone(&counters);
        }
        let counters = Arc::new(self.resolve_message_counters(upstream, direction));
        Arc::clone(cache.entry(upstream.into()).or_insert(counters).value())
    }

    fn resolve_message_counters(&self, upstream: &str, direction: impl Label) -> MessageCounters {
        let d = direction.label();
        MessageCounters {
            text: self
                .messages_total
                .with_label_values(&[upstream, d, "text"]),
            text_bytes: self
                .message_bytes_total
                .with_label_values(&[upstream, d, "text"]),
            binary: self
                .messages_total
                .with_label_values(&[upstream, d, "binary"]),
            binary_bytes: self
                .message_bytes_total
                .with_label_values(&[upstream, d, "binary"]),
            shards: Default::default(),
        }
    }

    /// The counters of one compressed socket of `upstream`: the client's
    /// (`hop` "client") or a mux connection's ("mux"). `read` is the
    /// direction of what the socket receives.
    pub(crate) fn compression_counters(
        &self,
        upstream: &str,
        hop: &str,
        read: impl Label,
        written: impl Label,
    ) -> CompressionCounters {
        let c = &self.compression_bytes_total;
        let (r, w) = (read.label(), written.label());
        CompressionCounters {
            read_wire: c.with_label_values(&[upstream, hop, r, "compressed"]),
            read_message: c.with_label_values(&[upstream, hop, r, "uncompressed"]),
            written_message: c.with_label_values(&[upstream, hop, w, "uncompressed"]),
            written_wire: c.with_label_values(&[upstream, hop, w, "compressed"]),
            too_large: self
                .decompression_limit_closes_total
                .with_label_values(&[upstream, hop]),
        }
    }

    pub(crate) fn messages_dropped(
        &self,
        upstream: &str,
        direction: impl Label,
        reason: &str,
        n: u64,
    ) {
        if n > 0 {
            self.messages_dropped_total
                .with_label_values(&[upstream, direction.label(), reason])
                .inc_by(n);
        }
    }

    pub(crate) fn upstream_connected(&self, upstream: &str, target: &str) {
        self.upstream_connects_total
            .with_label_values(&[upstream, target])
            .inc();
    }

    /// A client handshake answered with 101, `took` after it arrived.
    pub(crate) fn handshake_completed(&self, upstream: &str, took: std::time::Duration) {
        self.handshake_duration_seconds
            .with_label_values(&[upstream])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_connect_failed(&self, upstream: &str, target: &str, reason: &str) {
        self.upstream_connect_failures_total
            .with_label_values(&[upstream, target, reason])
            .inc();
    }

    pub(crate) fn ping_timeout(&self, upstream: &str, side: impl Label) {
        self.ping_timeouts_total
            .with_label_values(&[upstream, side.label()])
            .inc();
    }

    pub(crate) fn close_sent(&self, upstream: &str, side: impl Label, code: u16) {
        self.close_codes_sent_total
            .with_label_values(&[upstream, side.label(), &code.to_string()])
            .inc();
    }

    pub(crate) fn health_check(&self, upstream: &str, target: &str, kind: &str, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.health_checks_total
            .with_label_values(&[upstream, target, kind, outcome])
            .inc();
    }

    pub(crate) fn target_picked(&self, upstream: &str, target: &str) {
        self.target_picks_total
            .with_label_values(&[upstream, target])
            .inc();
    }

    /// Sets the health gauge (refreshed on every scrape).
    pub(crate) fn set_target_healthy(&self, upstream: &str, target: &str, healthy: bool) {
        self.target_healthy
            .with_label_values(&[upstream, target])
            .set(i64::from(healthy));
    }

    pub(crate) fn mux_conn_state(&self, upstream: &str, target: &str, state: &str, delta: i64) {
        self.mux_connections
            .with_label_values(&[upstream, target, state])
            .add(delta);
    }

    pub(crate) fn mux_frame_dropped(&self, upstream: &str, reason: &str) {
        self.mux_frames_dropped_total
            .with_label_values(&[upstream, reason])
            .inc();
    }

    pub(crate) fn session_rebound(&self, upstream: &str) {
        self.sessions_rebound_total
            .with_label_values(&[upstream])
            .inc();
    }

    pub(crate) fn mux_connection_moved(&self, upstream: &str, from: &str, to: &str) {
        self.mux_connections_moved_total
            .with_label_values(&[upstream, from, to])
            .inc();
    }

    pub(crate) fn slow_consumer_closed(&self, upstream: &str) {
        self.slow_consumer_closes_total
            .with_label_values(&[upstream])
            .inc();
    }

    /// Counters for one mux connection in pool slot `slot`.
    pub(crate) fn conn_counters(&self, upstream: &str, slot: usize) -> ConnMetrics {
        let slot = slot.to_string();
        ConnMetrics {
            frames_out: self
                .mux_frames_total
                .with_label_values(&[upstream, "to_upstream"]),
            bytes_out: self
                .mux_frame_bytes_total
                .with_label_values(&[upstream, "to_upstream"]),
            frames_in: self
                .mux_frames_total
                .with_label_values(&[upstream, "from_upstream"]),
            bytes_in: self
                .mux_frame_bytes_total
                .with_label_values(&[upstream, "from_upstream"]),
            queue_depth: self
                .mux_write_queue_depth
                .with_label_values(&[upstream, &slot]),
        }
    }

    /// The counter of connections accepted by event loop `index`, resolved
    /// once per loop.
    pub(crate) fn accepted_on(&self, index: usize) -> IntCounter {
        self.connections_accepted_total
            .with_label_values(&[&index.to_string()])
    }

    /// The counter of event loop `index`'s header read timeouts.
    pub(crate) fn header_timeouts_on(&self, index: usize) -> IntCounter {
        self.client_header_timeouts_total
            .with_label_values(&[&index.to_string()])
    }

    /// The rejection counter of request heads over
    /// `server.max_request_head_size` (answered 431 by the HTTP server).
    pub(crate) fn heads_too_large(&self) -> IntCounter {
        self.handshakes_rejected_total
            .with_label_values(&["431", "request_head_too_large", "1.1"])
    }

    pub(crate) fn handshake_rejected(&self, status: u16, reason: &str, http_version: &str) {
        self.handshakes_rejected_total
            .with_label_values(&[&status.to_string(), reason, http_version])
            .inc();
    }
}

/// Counters of one mux connection, resolved once.
pub(crate) struct ConnMetrics {
    pub frames_out: IntCounter,
    pub bytes_out: IntCounter,
    pub frames_in: IntCounter,
    pub bytes_in: IntCounter,
    pub queue_depth: prometheus::IntGauge,
}

/// One compressed socket's byte counts before and after compression.
pub(crate) struct CompressionCounters {
    /// Compressed payload bytes read, and the message bytes they inflated to.
    pub read_wire: IntCounter,
    pub read_message: IntCounter,
    /// Message bytes compressed for writing, and the payload bytes sent.
    pub written_message: IntCounter,
    pub written_wire: IntCounter,
    /// Messages refused for inflating past `max_decompressed_size`.
    pub too_large: IntCounter,
}

impl muxgate_backend::deflate::stream::CompressionCounts for CompressionCounters {
    fn read_compressed(&self, n: u64) {
        self.read_wire.inc_by(n);
    }
    fn read_inflated(&self, n: u64) {
        self.read_message.inc_by(n);
    }
    fn written(&self, message: u64, compressed: u64) {
        self.written_message.inc_by(message);
        self.written_wire.inc_by(compressed);
    }
    fn too_large(&self) {
        self.too_large.inc();
    }
}

/// Pre-resolved message counters of one direction of one upstream, shared
/// by its sessions on every event loop.
///
/// Every relayed message counts here, from several threads at once. Adding
/// straight into the Prometheus counters would make the loops take turns
/// owning the same cache lines, once per message; instead each thread adds
/// into a shard of its own (see `shard_index`), and [`Metrics::render`]
/// moves the shards' sums into the counters before every scrape.
pub(crate) struct MessageCounters {
    text: IntCounter,
    text_bytes: IntCounter,
    binary: IntCounter,
    binary_bytes: IntCounter,
    shards: [MessageShard; SHARDS],
}

/// How many shards each [`MessageCounters`] has: threads beyond this many
/// share shards, which stays correct (the adds are atomic), only slower.
const SHARDS: usize = 8;

/// One thread's share of a [`MessageCounters`], alone on its cache lines
/// (128 B: Intel prefetches lines in pairs).
#[derive(Default)]
#[repr(align(128))]
struct MessageShard {
    text: AtomicU64,
    text_bytes: AtomicU64,
    binary: AtomicU64,
    binary_bytes: AtomicU64,
}

/// The shard of the calling thread: threads are numbered in the order they
/// first count a message.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

impl MessageCounters {
    pub(crate) fn text(&self, bytes: usize) {
        let shard = &self.shards[shard_index()];
        shard.text.fetch_add(1, Ordering::Relaxed);
        shard.text_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn binary(&self, bytes: usize) {
        let shard = &self.shards[shard_index()];
        shard.binary.fetch_add(1, Ordering::Relaxed);
        shard
            .binary_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Moves what the shards counted since the last call into the
    /// Prometheus counters.
    fn flush(&self) {
        let take = |n: &AtomicU64, into: &IntCounter| match n.swap(0, Ordering::Relaxed) {
            0 => {}
            n => into.inc_by(n),
        };
        for shard in &self.shards {
            take(&shard.text, &self.text);
            take(&shard.text_bytes, &self.text_bytes);
            take(&shard.binary, &self.binary);
            take(&shard.binary_bytes, &self.binary_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::side::Direction;

    /// Messages counted on several threads all reach the exposition.
    #[test]
    fn messages_counted_on_every_thread_are_rendered() {
        let metrics = Metrics::new();
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|_| {
                let counters = metrics.message_counters("echo", Direction::ClientToUpstream);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counters.text(5);
                        counters.binary(7);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("counting thread");
        }
        let messages = (SHARDS + 3) * 1000;
        let line = |name: &str, kind: &str| {
            format!(
                "muxgate_{name}{{direction=\"client_to_upstream\",kind=\"{kind}\",upstream=\"echo\"}} "
            )
        };
        let rendered = metrics.render();
        for (name, kind, value) in [
            ("messages_total", "text", messages),
            ("message_bytes_total", "text", messages * 5),
            ("messages_total", "binary", messages),
            ("message_bytes_total", "binary", messages * 7),
        ] {
            let expected = format!("{}{value}\n", line(name, kind));
            assert!(
                rendered.contains(&expected),
                "{expected:?} not in:\n{rendered}"
            );
        }
        // A second scrape neither loses nor repeats what the first moved.
        metrics
            .message_counters("echo", Direction::ClientToUpstream)
            .text(1);
        let expected = format!("{}{}\n", line("messages_total", "text"), messages + 1);
        assert!(metrics.render().contains(&expected));
    }
}
