//! The operations endpoint (axum): `GET /metrics` (Prometheus text) and `GET /healthz`.
//!
//! What it reports about other services comes in as two functions ([`Probes`]), so this module
//! depends on none of them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::metrics::Metrics;

/// What the endpoint asks of the rest of the broker.
#[derive(Clone)]
pub(crate) struct Probes {
    /// Brings the gauges that are read on demand up to date (CRL age, certificate expiry).
    pub(crate) refresh: Arc<dyn Fn() + Send + Sync>,
    /// Can the node admit devices now?
    pub(crate) healthy: Arc<dyn Fn() -> bool + Send + Sync>,
}

#[derive(Clone)]
struct Endpoint {
    metrics: Metrics,
    probes: Probes,
}

async fn metrics(State(e): State<Endpoint>) -> impl IntoResponse {
    (e.probes.refresh)();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], e.metrics.render())
}

/// 200 while the node can admit devices; 503 while a cluster member's NATS connection is down
/// (a load balancer's health check then sends devices to the other nodes).
async fn healthz(State(e): State<Endpoint>) -> impl IntoResponse {
    if (e.probes.healthy)() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable: NATS connection down\n")
    }
}

/// Serves the endpoint on `listener` until `shutdown`.
pub(crate) async fn serve(
    metrics: Metrics,
    probes: Probes,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let state = Endpoint { metrics, probes };
    let app =
        Router::new().route("/metrics", get(self::metrics)).route("/healthz", get(healthz)).with_state(state);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        warn!(error = %e, "metrics endpoint stopped");
    }
}
