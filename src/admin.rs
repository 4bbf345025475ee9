//! The admin listener: `/metrics` (Prometheus text format), `/healthz`
//! (the process is up) and `/readyz` (it accepts new sessions; 503 once
//! shutdown has begun, so load balancers drain it first).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::app::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
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
