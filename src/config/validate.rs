//! Semantic checks that serde cannot express: value ranges, cross-field
//! rules, uniqueness across upstreams, URL schemes. All problems are
//! collected in one pass, each with the path of the field at fault, so a user
//! fixes a file in one round trip.
//!
//! Rules the libraries would otherwise enforce by panicking at run time live
//! here too, so they fail before any port is bound.

use std::collections::HashMap;

use super::path::FieldPath;
use super::{Config, LoadBalancing, UpstreamConfig, WebSocketSettings, MAX_WORKERS};

/// One semantic problem.
#[derive(Debug)]
pub(super) struct Problem {
    pub path: FieldPath,
    pub message: String,
}

struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: FieldPath, message: impl Into<String>) {
        self.0.push(Problem {
            path,
            message: message.into(),
        });
    }
}

pub(super) fn validate(config: &Config) -> Vec<Problem> {
    let mut out = Problems(Vec::new());
    let root = FieldPath::default();
    let server = root.key("server");
    if config.server.max_connections == 0 {
        out.push(server.key("max_connections"), "must be greater than 0");
    }
    if config.server.header_read_timeout.is_zero() {
        out.push(server.key("header_read_timeout"), "must be greater than 0");
    }
    let head = config.server.max_request_head_size.0;
    if !(super::MIN_REQUEST_HEAD_SIZE..=super::MAX_REQUEST_HEAD_SIZE).contains(&head) {
        out.push(
            server.key("max_request_head_size"),
            "must be from 1 KiB to 1 MiB",
        );
    }
    if config.server.http2_max_concurrent_streams == 0 {
        out.push(
            server.key("http2_max_concurrent_streams"),
            "must be at least 1",
        );
    }
    match config.server.workers {
        Some(0) => out.push(
            server.key("workers"),
            "must be at least 1 (leave it out for one per core)",
        ),
        Some(n) if n > MAX_WORKERS => out.push(
            server.key("workers"),
            format!("must be at most {}", MAX_WORKERS),
        ),
        _ => {}
    }
    if config.server.listen == config.server.admin_listen && config.server.listen.port() != 0 {
        out.push(
            server.key("admin_listen"),
            format!("must differ from server.listen ({})", config.server.listen),
        );
    }
    if let Some(tls) = &config.server.tls {
        if let Err(e) = crate::transport::tls::server_config(&tls.cert_file, &tls.key_file, false) {
            out.push(server.key("tls"), e.to_string());
        }
    }
    if let Some(jwt) = &config.jwt {
        if let Err(e) = muxgate_plugins::JwtVerifier::build(jwt) {
            out.push(root.key("jwt").key(&e.field), e.message);
        }
    }
    let upstreams = root.key("upstreams");
    if config.upstreams.is_empty() {
        out.push(upstreams.clone(), "at least one upstream is required");
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut paths: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let at = upstreams.index(i);
        if upstream.name.trim().is_empty() {
            out.push(at.key("name"), "must not be empty");
        } else if let Some(first) = names.insert(&upstream.name, i) {
            out.push(
                at.key("name"),
                format!(
                    "duplicate upstream name `{}` (also upstreams[{first}].name)",
                    upstream.name
                ),
            );
        }
        if upstream.routes.is_empty() {
            out.push(at.key("routes"), "at least one route is required");
        }
        for (j, route) in upstream.routes.iter().enumerate() {
            let rp = at.key("routes").index(j);
            check_path(&mut out, rp.key("external_path"), &route.external_path);
            check_path(&mut out, rp.key("internal_path"), &route.internal_path);
            if let Some((fi, fj)) = paths.insert(&route.external_path, (i, j)) {
                out.push(
                    rp.key("external_path"),
                    format!(
                        "duplicate external_path `{}` (also upstreams[{fi}].routes[{fj}].external_path)",
                        route.external_path
                    ),
                );
            }
        }
        check_upstream(&mut out, &at, upstream);
        if upstream.auth_required && config.jwt.is_none() {
            out.push(at.key("auth_required"), "needs the top-level `jwt` section");
        }
    }
    out.0
}

/// Headers of the handshake or the connection itself: forwarding the
/// client's would corrupt the upstream handshake (an extension the broker
/// cannot decode, another connection's key). Cookie, Authorization,
/// Sec-WebSocket-Protocol and the X-Forwarded-*/X-Request-Id headers may be
/// listed; the broker sends them in any case.
const MANAGED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

fn check_path(out: &mut Problems, path: FieldPath, value: &str) {
    if !value.starts_with('/') {
        out.push(path, format!("must start with `/`, got {value:?}"));
    } else if value.contains('?') || value.contains('#') {
        out.push(
            path,
            format!("must be a plain path without `?` or `#`, got {value:?}"),
        );
    }
}

fn check_upstream(out: &mut Problems, at: &FieldPath, upstream: &UpstreamConfig) {
    if upstream.targets.is_empty() {
        out.push(at.key("targets"), "at least one target is required");
    }
    for (k, target) in upstream.targets.iter().enumerate() {
        let tp = at.key("targets").index(k);
        if let Err(why) = super::parsed::TargetUrl::parse(&target.url) {
            out.push(tp.key("url"), why);
        }
        if target.weight == 0 {
            out.push(tp.key("weight"), "must be greater than 0");
        }
    }
    match (&upstream.load_balancing, &upstream.hash_on) {
        (LoadBalancing::ConsistentHash, None) => out.push(
            at.key("hash_on"),
            "consistent_hash needs hash_on (header:NAME, query:NAME, cookie:NAME or ip)",
        ),
        (_, Some(hash_on)) => {
            if let Err(why) = super::parsed::HashOn::parse(hash_on) {
                out.push(at.key("hash_on"), why);
            }
        }
        _ => {}
    }
    for (k, origin) in upstream.allowed_origins.iter().enumerate() {
        if origin.trim().is_empty() {
            out.push(at.key("allowed_origins").index(k), "must not be empty");
        }
    }
    for (k, name) in upstream.forward_headers.iter().enumerate() {
        let path = at.key("forward_headers").index(k);
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => out.push(path, format!("{name:?} is not a valid HTTP header name")),
            Ok(h) if MANAGED_HEADERS.contains(&h.as_str()) => out.push(
                path,
                format!("`{h}` belongs to the WebSocket handshake or the connection and is set by the broker"),
            ),
            Ok(_) => {}
        }
    }
    check_websocket(out, &at.key("websocket_config"), &upstream.websocket_config);
    if let Some(ca) = upstream.tls.as_ref().and_then(|t| t.ca_file.as_deref()) {
        if let Err(e) = crate::transport::tls::client_config(Some(ca)) {
            out.push(at.key("tls").key("ca_file"), e.to_string());
        }
    }

    let hc = &upstream.health_checks;
    let hp = at.key("health_checks");
    if hc.threshold == 0 {
        out.push(hp.key("threshold"), "must be at least 1");
    }
    if hc.interval.is_zero() {
        out.push(hp.key("interval"), "must be greater than 0");
    }
    if !hc.path.is_empty() && !hc.path.starts_with('/') {
        out.push(
            hp.key("path"),
            format!("must start with `/`, got {:?}", &*hc.path),
        );
    }
    for (name, value) in [
        ("active_interval", hc.active_interval),
        ("timeout", hc.timeout),
        ("passive_backoff", hc.passive_backoff),
    ] {
        if value.is_zero() {
            out.push(hp.key(name), "must be greater than 0");
        }
    }
    if hc.passive_backoff_max < hc.passive_backoff {
        out.push(
            hp.key("passive_backoff_max"),
            "must not be less than passive_backoff",
        );
    }
    for (name, value) in [
        ("unhealthy_threshold", hc.unhealthy_threshold),
        ("healthy_threshold", hc.healthy_threshold),
    ] {
        if value == 0 {
            out.push(hp.key(name), "must be at least 1");
        }
    }
    for name in hc.headers.keys() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            out.push(
                hp.key("headers"),
                format!("{name:?} is not a valid HTTP header name"),
            );
        }
    }
    for (j, plugin) in upstream.plugins.iter().enumerate() {
        if let muxgate_plugins::PluginConfig::MessageSize { settings, .. } = plugin {
            let max = upstream.websocket_config.max_message_size;
            if settings.max_bytes > max {
                out.push(
                    at.key("plugins").index(j).key("settings").key("max_bytes"),
                    format!(
                        "{} is above websocket_config.max_message_size ({max}), which already refuses such messages",
                        settings.max_bytes
                    ),
                );
            }
        }
    }
    if let Err(errors) = muxgate_plugins::Pipeline::build(&upstream.plugins) {
        for (j, e) in errors {
            let mut path = at.key("plugins").index(j);
            for part in e.field.split('.') {
                path = match part.split_once('[') {
                    Some((key, idx)) => path
                        .key(key)
                        .index(idx.trim_end_matches(']').parse().unwrap_or(0)),
                    None => path.key(part),
                };
            }
            out.push(path, e.message);
        }
    }
}

fn check_websocket(out: &mut Problems, wp: &FieldPath, ws: &WebSocketSettings) {
    if ws.ping_period.is_zero() {
        out.push(wp.key("ping_period"), "must be greater than 0");
    }
    if ws.pong_wait <= ws.ping_period {
        out.push(
            wp.key("pong_wait"),
            format!(
                "must be greater than ping_period ({}), got {}",
                humantime::format_duration(ws.ping_period),
                humantime::format_duration(ws.pong_wait)
            ),
        );
    }
    for (name, value) in [
        ("handshake_timeout", ws.handshake_timeout),
        ("close_timeout", ws.close_timeout),
        ("resume_timeout", ws.resume_timeout),
    ] {
        if value.is_zero() {
            out.push(wp.key(name), "must be greater than 0");
        }
    }
    for (name, value) in [
        ("read_buffer_size", ws.read_buffer_size),
        ("write_buffer_size", ws.write_buffer_size),
        ("max_message_size", ws.max_message_size),
    ] {
        if value.0 == 0 {
            out.push(wp.key(name), "must be greater than 0");
        }
    }
    for (name, value) in [
        ("pool_size", ws.pool_size),
        ("client_queue", ws.client_queue),
    ] {
        if value == 0 {
            out.push(wp.key(name), "must be at least 1");
        }
    }
    check_compression(out, &wp.key("compression"), &ws.compression);
}

fn check_compression(out: &mut Problems, at: &FieldPath, c: &super::Compression) {
    if c.level > 9 {
        out.push(
            at.key("level"),
            format!("must be from 0 to 9, got {}", c.level),
        );
    }
    let bits = super::MIN_WINDOW_BITS..=super::MAX_WINDOW_BITS;
    for (name, value) in [
        ("server_max_window_bits", c.server_max_window_bits),
        ("client_max_window_bits", c.client_max_window_bits),
    ] {
        if !bits.contains(&value) {
            out.push(
                at.key(name),
                format!(
                    "must be from {} to {}, got {value}",
                    bits.start(),
                    bits.end()
                ),
            );
        }
    }
    if c.max_decompressed_size.is_some_and(|s| s.0 == 0) {
        out.push(at.key("max_decompressed_size"), "must be greater than 0");
    }
}
