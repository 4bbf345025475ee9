//! The admin listener: `/metrics` (Prometheus text format), `/healthz`
//! (the process is up), `/readyz` (it accepts new sessions; 503 once
//! shutdown has begun, so load balancers drain it first) and
//! `/admin/upstreams` (each upstream's mode, targets, health, sessions and
//! pool, as JSON). Every answer names the process and config generation
//! that gave it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::state::AppState;

/// The headers on every admin answer that say which broker answered: its
/// process id and the generation of the config it runs (with several
/// processes on one port, or across a restart, they tell them apart).
const PID: &str = "x-muxgate-pid";
const GENERATION: &str = "x-muxgate-config-generation";

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let pid = HeaderValue::from(std::process::id());
    let generation = HeaderValue::from_str(&format!("{:012x}", state.generation))
        .expect("hex digits make a header value");
    let identify = move |mut response: Response| {
        let h = response.headers_mut();
        h.insert(PID, pid.clone());
        h.insert(GENERATION, generation.clone());
        std::future::ready(response)
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/admin/upstreams", get(upstreams))
        .with_state(state)
        .layer(map_response(identify))
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    for upstream in &app.upstreams {
        for target in &upstream.targets {
            app.metrics.set_target_healthy(
                &upstream.name,
                &target.label,
                target.health.is_healthy(),
            );
        }
    }
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        app.metrics.render(),
    )
}

async fn ready(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    if app.shutdown.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn upstreams(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let body: Vec<serde_json::Value> = app
        .upstreams
        .iter()
        .map(|u| {
            let targets: Vec<serde_json::Value> = u
                .targets
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "url": t.label,
                        "weight": t.weight,
                        "healthy": t.health.is_healthy(),
                        "passive": t.health.passive_state(),
                        "active": if !t.health.active_enabled() { "off" } else if t.health.active_up() { "up" } else { "down" },
                        "last_failure": t.health.last_failure(),
                        "direct_sessions": t.active(),
                    })
                })
                .collect();
            let pool = app.pools.get(&u.name).map(|p| {
                let connections: Vec<serde_json::Value> = p
                    .connections()
                    .into_iter()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id,
                            "target": &*c.target,
                            "event_loop": c.event_loop,
                            "sessions": c.sessions,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "pool_size": u.config.websocket_config.pool_size,
                    "live": connections.len(),
                    "connections": connections,
                })
            });
            serde_json::json!({
                "name": &*u.name,
                "mode": u.mode().as_str(),
                "load_balancing": u.config.load_balancing,
                "sessions": app.sessions.count_for(&u.name),
                "targets": targets,
                "pool": pool,
            })
        })
        .collect();
    axum::Json(body)
}
