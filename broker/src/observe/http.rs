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

/// 200 while the node can admit devices and store what they send; 503 while a cluster member's
/// NATS connection is down (a load balancer's health check then sends devices to the other
/// nodes), and from a failed flush of a store on (`fleet_store_stopped`): that store
/// acknowledges nothing more until the broker restarts.
async fn healthz(State(e): State<Endpoint>) -> (StatusCode, String) {
    let stopped = e.metrics.stopped_stores();
    if !stopped.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stopped after a failed flush to disk: {}; nothing more is acknowledged there until the broker restarts\n",
                stopped.join(", ").replace('_', " ")
            ),
        );
    }
    if (e.probes.healthy)() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable: NATS connection down\n".into())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(connected: bool) -> Endpoint {
        Endpoint {
            metrics: Metrics::new(),
            probes: Probes { refresh: Arc::new(|| {}), healthy: Arc::new(move || connected) },
        }
    }

    #[tokio::test]
    async fn healthz_says_ok_until_a_store_stops_or_the_cluster_link_is_down() {
        let e = endpoint(true);
        assert_eq!(healthz(State(e.clone())).await, (StatusCode::OK, "ok\n".to_owned()));
        e.metrics.store_stopped("telemetry_log");
        let (status, body) = healthz(State(e.clone())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "stopped after a failed flush to disk: telemetry log; nothing more is acknowledged there until the broker restarts\n"
        );

        let (status, body) = healthz(State(endpoint(false))).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable: NATS connection down\n")
        );
    }
}
