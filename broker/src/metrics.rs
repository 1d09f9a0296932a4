//! Prometheus metrics, one registry per broker (tests run several brokers in one process).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Every metric the broker exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Handshakes/admissions by outcome and reason.
    pub handshakes: IntCounterVec,
    /// Live MQTT sessions.
    pub sessions_live: IntGauge,
    /// Open TCP connections (any state).
    pub connections_open: IntGauge,
    /// Connections turned away before the handshake (cap).
    pub connections_rejected: IntCounterVec,
    /// PUBLISH received from clients.
    pub messages_received: IntCounter,
    /// Messages committed to the store.
    pub messages_stored: IntCounter,
    /// Messages delivered to subscribers.
    pub messages_delivered: IntCounter,
    /// Messages dropped (subscriber too slow).
    pub messages_dropped: IntCounter,
    /// Store failures.
    pub store_errors: IntCounter,
    /// Sessions cut by the broker, by reason.
    pub kicks: IntCounterVec,
    /// ACL refusals.
    pub acl_denied: IntCounterVec,
    /// Sessions closed for protocol reasons.
    pub protocol_errors: IntCounterVec,
    /// Seconds since the loaded CRL's thisUpdate.
    pub crl_age_seconds: IntGauge,
    /// Seconds until the loaded CRL's nextUpdate (negative: expired).
    pub crl_next_update_seconds: IntGauge,
    /// 1 while the CRL is past nextUpdate (alert).
    pub crl_expired: IntGauge,
    /// CRL reloads by outcome.
    pub crl_reloads: IntCounterVec,
    /// Days until expiry of the server certificate and CAs.
    pub cert_expiry_days: IntGaugeVec,
    /// Revocation events seen by the watcher.
    pub revocations_seen: IntCounter,
    /// Per-session and per-source caps hit, by limit.
    pub limits: IntCounterVec,
    /// cRLNumber of the CRL in force (0: none).
    pub crl_number: IntGauge,
    /// Admissions decided from the cache (`hit`) or by a registry query (`miss`).
    pub admission_cache: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are static and unique, so registration cannot fail.
    let _ = r.register(Box::new(m.clone()));
    m
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("fleet".into()), None).unwrap_or_default();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!()))
        };
        let c =
            |name: &str, help: &str| reg(&r, IntCounter::new(name, help).unwrap_or_else(|_| unreachable!()));
        let g =
            |name: &str, help: &str| reg(&r, IntGauge::new(name, help).unwrap_or_else(|_| unreachable!()));
        Self {
            handshakes: cv(
                "handshakes_total",
                "TLS handshakes and admissions by outcome and reason",
                &["outcome", "reason"],
            ),
            sessions_live: g("sessions_live", "Live MQTT sessions"),
            connections_open: g("connections_open", "Open TCP connections"),
            connections_rejected: cv(
                "connections_rejected_total",
                "Connections refused before the handshake",
                &["reason"],
            ),
            messages_received: c("messages_received_total", "PUBLISH packets received"),
            messages_stored: c("messages_stored_total", "Messages committed to the store"),
            messages_delivered: c("messages_delivered_total", "Messages delivered to subscribers"),
            messages_dropped: c("messages_dropped_total", "Messages dropped for slow subscribers"),
            store_errors: c("store_errors_total", "Failed store commits"),
            kicks: cv("kicks_total", "Sessions cut by the broker", &["reason"]),
            acl_denied: cv("acl_denied_total", "ACL refusals", &["action"]),
            protocol_errors: cv(
                "protocol_errors_total",
                "Sessions closed for protocol violations",
                &["reason"],
            ),
            crl_age_seconds: g("crl_age_seconds", "Seconds since the CRL's thisUpdate"),
            crl_next_update_seconds: g("crl_next_update_seconds", "Seconds until the CRL's nextUpdate"),
            crl_expired: g("crl_expired", "1 while the CRL is past its nextUpdate (alert)"),
            crl_reloads: cv("crl_reloads_total", "CRL reloads by outcome", &["outcome"]),
            cert_expiry_days: reg(
                &r,
                IntGaugeVec::new(Opts::new("cert_expiry_days", "Days until certificate expiry"), &["cert"])
                    .unwrap_or_else(|_| unreachable!()),
            ),
            revocations_seen: c("revocations_seen_total", "Revocation events seen in the registry"),
            limits: cv(
                "limits_total",
                "Caps hit (subscriptions, retained, queue, topic, source)",
                &["limit"],
            ),
            crl_number: g("crl_number", "cRLNumber of the CRL in force"),
            admission_cache: cv(
                "admission_cache_total",
                "Admissions decided from the cache or the registry",
                &["result"],
            ),
            registry: r,
        }
    }

    /// Counts an admission decision.
    pub fn handshake(&self, accepted: bool, reason: &str) {
        self.handshakes.with_label_values(&[if accepted { "accepted" } else { "refused" }, reason]).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
