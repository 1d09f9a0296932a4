//! The operations endpoint (axum): `GET /metrics` (Prometheus text) and `GET /healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tracing::warn;

use crate::watch::update_gauges;
use crate::Shared;

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    update_gauges(&shared);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render())
}

/// 200 while the node can admit devices; 503 while a cluster member's NATS connection is down
/// (a load balancer's health check then sends devices to the other nodes).
async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match &shared.cluster {
        Some(c) if !c.connected() => {
            (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable: NATS connection down\n")
        }
        _ => (StatusCode::OK, "ok\n"),
    }
}

/// Serves the endpoint on `listener` until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let shutdown = shared.shutdown.clone();
    let app =
        Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(shared);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        warn!(error = %e, "metrics endpoint stopped");
    }
}
