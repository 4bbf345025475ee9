//! The admin listener: `/metrics` (Prometheus text format), `/healthz`
//! (the process is up), `/readyz` (it accepts new sessions; 503 once
//! shutdown has begun, so load balancers drain it first) and
//! `/admin/upstreams` (each upstream's mode, targets, health, sessions and
//! pool, as JSON), and the changes of a running broker: `POST
//! /admin/reload`, `PUT /admin/upstreams/{name}/mode` and `POST
//! /admin/upstreams/{name}/targets/{url}/drain` (or `/undrain`), see
//! `app::reload`. Every answer names the process and config generation
//! that gave it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;

use super::reload::ReloadError;
use super::state::AppState;
use crate::config::Mode;

/// The headers on every admin answer that say which broker answered: its
/// process id and the generation of the config it runs (with several
/// processes on one port, or across a restart, they tell them apart).
const PID: &str = "x-muxgate-pid";
const GENERATION: &str = "x-muxgate-config-generation";

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let pid = HeaderValue::from(std::process::id());
    let identified = Arc::clone(&state);
    let identify = move |mut response: Response| {
        let generation = identified.current.load().config.generation;
        let h = response.headers_mut();
        h.insert(PID, pid.clone());
        h.insert(
            GENERATION,
            HeaderValue::from_str(&format!("{generation:012x}"))
                .expect("hex digits make a header value"),
        );
        std::future::ready(response)
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/admin/upstreams", get(upstreams))
        .route("/admin/reload", post(reload))
        .route("/admin/upstreams/{name}/mode", put(set_mode))
        .route(
            "/admin/upstreams/{name}/targets/{*rest}",
            post(drain_target),
        )
        .with_state(state)
        .layer(map_response(identify))
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let snapshot = app.current.load();
    for upstream in &snapshot.upstreams {
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

/// A JSON answer with `status`.
fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// `POST /admin/reload`: 200 with what changed, 400 with every problem
/// of a rejected file (path, message, line, column), 409 for a broker
/// started without a file.
async fn reload(State(app): State<Arc<AppState>>) -> Response {
    match app.reload("POST /admin/reload").await {
        Ok(changes) => {
            let generation = app.current.load().config.generation;
            json(
                StatusCode::OK,
                serde_json::json!({
                    "result": "applied",
                    "generation": format!("{generation:012x}"),
                    "changes": changes,
                }),
            )
        }
        Err(ReloadError::NoFile) => json(
            StatusCode::CONFLICT,
            serde_json::json!({"result": "rejected", "error": ReloadError::NoFile.to_string()}),
        ),
        Err(ReloadError::Rejected(error)) => {
            let mut errors: Vec<serde_json::Value> = error
                .field_errors()
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "path": e.path,
                        "message": e.message,
                        "line": e.location.map(|l| l.0),
                        "column": e.location.map(|l| l.1),
                    })
                })
                .collect();
            if errors.is_empty() {
                errors.push(serde_json::json!({"path": "", "message": error.to_string()}));
            }
            json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"result": "rejected", "errors": errors}),
            )
        }
    }
}

/// `PUT /admin/upstreams/{name}/mode` with `direct` or `multiplexed` (as
/// text, or JSON `{"mode": ...}`): the upstream's mode until the next reload.
async fn set_mode(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: String,
) -> Response {
    let word = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("mode").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().trim_matches('"').to_owned());
    let mode = match word.as_str() {
        "direct" => Mode::Direct,
        "multiplexed" => Mode::Multiplexed,
        other => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("mode must be direct or multiplexed, not {other:?}")}),
            )
        }
    };
    match app.set_mode(&name, mode).await {
        Ok(changes) => json(
            StatusCode::OK,
            serde_json::json!({"upstream": name, "mode": mode.as_str(), "changes": changes}),
        ),
        Err(e) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// `POST /admin/upstreams/{name}/targets/{url}/drain` (or `/undrain`);
/// the URL as configured, percent-encoded or not.
async fn drain_target(
    State(app): State<Arc<AppState>>,
    Path((name, rest)): Path<(String, String)>,
) -> Response {
    let (target, drained) = if let Some(t) = rest.strip_suffix("/undrain") {
        (t, false)
    } else if let Some(t) = rest.strip_suffix("/drain") {
        (t, true)
    } else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "expected .../targets/{url}/drain or .../undrain"}),
        );
    };
    // The label is the URL as the target parser prints it.
    let target = crate::upstream::TargetUrl::parse(target)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| target.to_owned());
    match app.drain_target(&name, &target, drained) {
        Ok(sessions) => json(
            StatusCode::OK,
            serde_json::json!({
                "upstream": name,
                "target": target,
                "drained": drained,
                "direct_sessions": sessions,
            }),
        ),
        Err(e) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": e.to_string()}),
        ),
    }
}

async fn upstreams(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let snapshot = app.current.load();
    let body: Vec<serde_json::Value> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let targets: Vec<serde_json::Value> = u
                .targets
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "url": &*t.label,
                        "weight": t.weight,
                        "healthy": t.health.is_healthy(),
                        "drained": t.is_drained(),
                        "passive": t.health.passive_state(),
                        "active": if !t.health.active_enabled() { "off" } else if t.health.active_up() { "up" } else { "down" },
                        "last_failure": t.health.last_failure(),
                        "direct_sessions": t.active(),
                    })
                })
                .collect();
            let pool = snapshot.pools.get(&u.name).map(|p| {
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
                    "sessions": p.tenants(),
                    "live": connections.len(),
                    "connections": connections,
                })
            });
            let (sessions, draining) = app.sessions.count_for(&u.name);
            serde_json::json!({
                "name": &*u.name,
                "mode": u.mode().as_str(),
                "mode_overridden": snapshot.overrides.contains_key(&*u.name),
                "load_balancing": u.config.load_balancing,
                "sessions": sessions,
                "sessions_draining": draining,
                "targets": targets,
                "pool": pool,
            })
        })
        .collect();
    axum::Json(body)
}
