//! Observability: what the broker counts ([`metrics`]), the events the admin API shows
//! ([`events`]), rate-limited log lines ([`log_limit`]) and the operations endpoint ([`http`]).
//!
//! [`Observe`] is the handle the other services hold: cloning it clones two `Arc`s. It imports
//! nothing but the outcome labels and the clock, so every service may depend on it.

pub(crate) mod events;
pub(crate) mod http;
mod labels;
pub(crate) mod log_limit;
pub(crate) mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use events::{Event, Events, Kind};
use metrics::Metrics;

/// The broker's metrics and event log.
#[derive(Debug, Clone)]
pub(crate) struct Observe {
    metrics: Metrics,
    events: Arc<Events>,
}

impl Observe {
    /// A fresh registry and an empty event log.
    pub(crate) fn new() -> Self {
        Self { metrics: Metrics::new(), events: Arc::default() }
    }

    /// The metrics (typed counting methods and the gauges).
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The event log.
    pub(crate) fn events(&self) -> &Events {
        &self.events
    }

    /// A session admitted: counted, and recorded as an event.
    pub(crate) fn admitted(&self, peer: SocketAddr, device: &str, serial: String) {
        self.metrics.accepted();
        self.events.record(Event::new(Kind::Admitted, "ok", peer).of(device, serial));
        self.metrics.sessions_live.inc();
    }

    /// A session ended: counted, and recorded as an event.
    pub(crate) fn closed(
        &self,
        why: crate::outcome::CloseReason,
        peer: SocketAddr,
        device: &str,
        serial: String,
    ) {
        self.metrics.sessions_live.dec();
        self.metrics.closed(why);
        self.events.record(Event::new(Kind::Closed, why.label(), peer).of(device, serial));
    }
}
