//! The admin API and operator console: HTTPS on `admin_listen`, admitted by the same gate as
//! MQTT ([`crate::gate::Gate::pass`]: handshake with its deadline, the certificate's
//! identity, the CRL policy, the revocation feed, the admission cache and the registry), then
//! one more rule: the identity's role must be `operator`.
//!
//! - **Before TLS**: handshakes in progress are capped (`admin_handshakes`), each source (IPv6:
//!   a /64) to `max_pre_admission_per_source` and to its fair share ([`crate::caps::FairShare`]), so silent
//!   sockets from a few addresses cannot lock operators out.
//! - **After TLS**: an identity the gate refuses, or one that is not an operator's, gets one
//!   answer (403, or 503 when the broker cannot decide) and the connection is closed: only an
//!   operator keeps a connection. Operators' connections are capped per certificate and per
//!   source.
//! - **While open**: every request asks the gate again ([`extract::Op`]); the revocation feed cuts
//!   an operator's connections as it cuts MQTT sessions (they are attached to the session
//!   table by serial); a request's headers must come within `admin_header_timeout_secs`, and a
//!   connection that moves no byte for `admin_idle_timeout_secs` is closed.
//! - **State changes** need a same-origin JSON request with the `X-Fleetgate-Request` header
//!   ([`extract`]), so a page on another origin cannot use the operator's browser.

mod api;
mod error;
mod extract;
mod feed;
mod listen;
mod page;
mod state;
mod views;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use fleet_registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::Config;
use crate::gate::Gate;
use crate::observe::Observe;
use crate::sessions::Sessions;
pub(crate) use state::Admin;
pub(crate) use views::Views;

/// What the admin API is built from.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) config: Arc<Config>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) observe: Observe,
    pub(crate) registry: Registry,
    pub(crate) views: Views,
    pub(crate) shutdown: CancellationToken,
}

/// Every route of the API and the console, in one place.
pub(crate) fn router(admin: Admin) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/console.js", get(page::script))
        .route("/console.css", get(page::style))
        .route("/api/v1/openapi.json", get(api::openapi))
        .route("/api/v1/summary", get(api::summary))
        .route("/api/v1/devices", get(api::devices))
        .route("/api/v1/devices/{id}", get(api::device))
        .route("/api/v1/devices/{id}/revoke", post(api::revoke))
        .route("/api/v1/events", get(feed::events))
        .route("/api/v1/ota/campaigns", get(api::campaigns))
        .route("/api/v1/ota/campaigns/{id}", get(api::campaign))
        .fallback(api::not_found)
        .with_state(admin)
}

/// Serves the admin API on `listener` until the broker stops.
pub(crate) async fn serve(p: Parts, listener: TcpListener) {
    let writer = match &p.config.admin_database_url {
        Some(url) => match Registry::open_existing(url, p.config.registry_timeout()).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "admin API off: admin_database_url cannot be opened");
                return;
            }
        },
        None => p.registry.clone(),
    };
    let admin = Admin {
        config: p.config,
        gate: p.gate,
        sessions: p.sessions,
        observe: p.observe,
        registry: p.registry,
        writer,
        views: p.views,
        log_check: Arc::default(),
        streams: Arc::default(),
        revocations: Arc::default(),
        shutdown: p.shutdown,
    };
    let router = router(admin.clone());
    listen::run(admin, router, listener).await;
}
