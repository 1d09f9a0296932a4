//! Prometheus metrics, one registry per broker (tests run several brokers in one process).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub(crate) use super::labels::{AclAction, AdminDenial, Limit, Reload, EXPIRY_LABELS};
use crate::outcome::{CloseCounter, CloseReason, Refusal};

/// Every metric the broker exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Handshakes/admissions by outcome and reason.
    pub(crate) handshakes: IntCounterVec,
    /// Live MQTT sessions.
    pub(crate) sessions_live: IntGauge,
    /// Open TCP connections (any state).
    pub(crate) connections_open: IntGauge,
    /// Connections turned away before the handshake (cap).
    pub(crate) connections_rejected: IntCounterVec,
    /// PUBLISH received from clients.
    pub(crate) messages_received: IntCounter,
    /// Messages committed to the store.
    pub(crate) messages_stored: IntCounter,
    /// Messages delivered to subscribers.
    pub(crate) messages_delivered: IntCounter,
    /// Messages dropped (subscriber too slow).
    pub(crate) messages_dropped: IntCounter,
    /// Store failures.
    pub(crate) store_errors: IntCounter,
    /// Records in the telemetry log not yet copied into the registry's table.
    pub(crate) store_log_backlog_records: IntGauge,
    /// Bytes of telemetry log records not yet copied into the registry.
    pub(crate) store_log_backlog_bytes: IntGauge,
    /// Rows copied from the telemetry log into the registry's table.
    pub(crate) store_fed_rows: IntCounter,
    /// Failed copies from the telemetry log into the registry (retried).
    pub(crate) store_feed_errors: IntCounter,
    /// 1 for a store that stopped acknowledging after a failed flush, by store
    /// ([`STOPPED_STORES`]): nothing more is stored there until the broker restarts.
    pub(crate) store_stopped: IntGaugeVec,
    /// Sessions cut by the broker, by reason.
    pub(crate) kicks: IntCounterVec,
    /// ACL refusals.
    pub(crate) acl_denied: IntCounterVec,
    /// Sessions closed for protocol reasons.
    pub(crate) protocol_errors: IntCounterVec,
    /// Seconds since the loaded CRL's thisUpdate.
    pub(crate) crl_age_seconds: IntGauge,
    /// Seconds until the loaded CRL's nextUpdate (negative: expired).
    pub(crate) crl_next_update_seconds: IntGauge,
    /// 1 while the CRL is past nextUpdate (alert).
    pub(crate) crl_expired: IntGauge,
    /// CRL reloads by outcome.
    pub(crate) crl_reloads: IntCounterVec,
    /// Days until expiry of the server certificate and CAs.
    pub(crate) cert_expiry_days: IntGaugeVec,
    /// Revocation events seen by the watcher.
    pub(crate) revocations_seen: IntCounter,
    /// Per-session and per-source caps hit, by limit.
    pub(crate) limits: IntCounterVec,
    /// cRLNumber of the CRL in force (0: none).
    pub(crate) crl_number: IntGauge,
    /// Admissions decided from the cache (`hit`) or by a registry query (`miss`).
    pub(crate) admission_cache: IntCounterVec,
    /// Live sessions by how soon their certificate expires (`within`: 1d, 7d, 30d, 90d, 365d,
    /// more; each bucket excludes the smaller ones).
    pub(crate) sessions_cert_expiry: IntGaugeVec,
    /// 1 while the node's NATS connection is up (a cluster member).
    pub(crate) cluster_connected: IntGauge,
    /// 1 on a node configured as a cluster member (so `cluster_connected == 0` means down).
    pub(crate) cluster_member: IntGauge,
    /// Rows the node's SQL sink took from the stream into the telemetry table.
    pub(crate) cluster_sink_rows: IntCounter,
    /// Failed SQL sink commits (retried).
    pub(crate) cluster_sink_errors: IntCounter,
    /// Revocations other nodes announced over NATS.
    pub(crate) cluster_revocations_received: IntCounter,
    /// NATS queue subscriptions this node holds for shared subscriptions (`cluster::shares`),
    /// lingering ones included.
    pub(crate) cluster_share_subscriptions: IntGauge,
    /// Messages from the cluster bus a node refused to act on, by reason
    /// (`cluster::BusRefusal`): not from a node, an origin that may not publish the topic, a
    /// revocation the registry does not confirm.
    pub(crate) cluster_refused: IntCounterVec,
    /// Queued-command status transitions (docs/spec/commands.md), by status.
    pub(crate) commands: IntCounterVec,
    /// Commands not yet final (queued or delivered), as last counted.
    pub(crate) commands_pending: IntGauge,
    /// Persistent sessions kept for clients that are away.
    pub(crate) sessions_parked: IntGauge,
    /// Kept persistent sessions forgotten before a resume, by reason.
    pub(crate) sessions_parked_discarded: IntCounterVec,
    /// Admin listener: requests and connections turned away, by reason.
    pub(crate) admin_denied: IntCounterVec,
    /// Admin listener: open operator connections.
    pub(crate) admin_connections: IntGauge,
    /// Chunk requests answered with a refusal, by reason (docs/spec/ota.md).
    pub(crate) ota_refused: IntCounterVec,
    /// Chunks sent with data.
    pub(crate) ota_chunks: IntCounter,
    /// Image bytes sent in chunks.
    pub(crate) ota_chunk_bytes: IntCounter,
    /// Update job state changes, by state.
    pub(crate) ota_jobs: IntCounterVec,
    /// Campaign events (`wave_started`, `completed`, `aborted`).
    pub(crate) ota_campaigns: IntCounterVec,
}

/// Why a chunk request was refused (`fleet_ota_refused_total{reason}`).
pub(crate) const OTA_REFUSALS: [&str; 5] =
    ["not_offered", "beyond_image", "busy", "malformed", "image_unavailable"];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are static and unique, so registration cannot fail.
    let _ = r.register(Box::new(m.clone()));
    m
}

/// The stores that stop acknowledging after a failed flush: the single node's telemetry log
/// (`store::log`; the command queue's commits are flushed by SQLite, each by itself).
pub(crate) const STOPPED_STORES: [&str; 1] = ["telemetry_log"];

impl Metrics {
    /// Marks `store` (one of [`STOPPED_STORES`]) stopped until the broker restarts.
    pub(crate) fn store_stopped(&self, store: &str) {
        self.store_stopped.with_label_values(&[store]).set(1);
    }

    /// The stores stopped after a failed flush, if any.
    pub(crate) fn stopped_stores(&self) -> Vec<&'static str> {
        STOPPED_STORES.into_iter().filter(|s| self.store_stopped.with_label_values(&[s]).get() > 0).collect()
    }

    /// A fresh registry with every metric at zero.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let m = Self::unlabelled();
        m.export_every_label();
        m
    }

    /// Every label set the broker can count, at zero, so that `increase()` in alert rules and
    /// dashboards sees the first event (a series that appears at 1 has no increase).
    fn export_every_label(&self) {
        self.handshakes.with_label_values(&["accepted", "ok"]);
        for r in Refusal::ALL {
            self.handshakes.with_label_values(&["refused", r.label()]);
        }
        for r in
            [Refusal::SourceLimit, Refusal::HandshakesBusy, Refusal::MaxConnections, Refusal::ProxyHeader]
        {
            self.connections_rejected.with_label_values(&[r.label()]);
        }
        for c in CloseReason::ALL {
            match c.counter() {
                CloseCounter::Kick => self.kicks.with_label_values(&[c.label()]),
                CloseCounter::Protocol => self.protocol_errors.with_label_values(&[c.label()]),
                CloseCounter::None => continue,
            };
        }
        for l in Limit::ALL {
            self.limits.with_label_values(&[l.label()]);
        }
        for a in [AclAction::Publish, AclAction::Subscribe] {
            self.acl_denied.with_label_values(&[a.label()]);
        }
        for o in [Reload::Loaded, Reload::Rejected, Reload::Replayed] {
            self.crl_reloads.with_label_values(&[o.label()]);
        }
        for h in ["hit", "miss"] {
            self.admission_cache.with_label_values(&[h]);
        }
        for store in STOPPED_STORES {
            self.store_stopped.with_label_values(&[store]);
        }
        for w in EXPIRY_LABELS {
            self.sessions_cert_expiry.with_label_values(&[w]);
        }
        for s in fleet_registry::commands::CommandStatus::ALL {
            self.commands.with_label_values(&[s.as_str()]);
        }
        for d in AdminDenial::ALL {
            self.admin_denied.with_label_values(&[d.label()]);
        }
        for r in OTA_REFUSALS {
            self.ota_refused.with_label_values(&[r]);
        }
        for j in fleet_registry::JobState::ALL {
            self.ota_jobs.with_label_values(&[j.as_str()]);
        }
        for c in ["wave_started", "completed", "aborted"] {
            self.ota_campaigns.with_label_values(&[c]);
        }
        for d in crate::outcome::Discard::ALL {
            self.sessions_parked_discarded.with_label_values(&[d.label()]);
        }
        for b in crate::outcome::BusRefusal::ALL {
            self.cluster_refused.with_label_values(&[b.label()]);
        }
    }

    /// A message from the cluster bus refused.
    pub(crate) fn bus_refused(&self, why: crate::outcome::BusRefusal) {
        self.cluster_refused.with_label_values(&[why.label()]).inc();
    }

    fn unlabelled() -> Self {
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
            store_log_backlog_records: g(
                "store_log_backlog_records",
                "Acknowledged messages in the telemetry log not yet copied into the registry",
            ),
            store_log_backlog_bytes: g("store_log_backlog_bytes", "Bytes of telemetry log records not yet copied into the registry"),
            store_fed_rows: c(
                "store_fed_rows_total",
                "Rows copied from the telemetry log into the registry's telemetry table",
            ),
            store_feed_errors: c(
                "store_feed_errors_total",
                "Failed copies from the telemetry log into the registry (retried)",
            ),
            store_stopped: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "store_stopped",
                        "1 while a store acknowledges nothing more after a failed flush (restart the broker)",
                    ),
                    &["store"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
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
            sessions_cert_expiry: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "sessions_cert_expiry",
                        "Live sessions by how soon their certificate expires (buckets exclude the smaller ones)",
                    ),
                    &["within"],
                )
                .unwrap_or_else(|_| unreachable!()),
            ),
            cluster_connected: g("cluster_connected", "1 while the NATS connection is up"),
            cluster_member: g("cluster_member", "1 on a node configured as a cluster member"),
            cluster_sink_rows: c(
                "cluster_sink_rows_total",
                "Rows the SQL sink took from the JetStream stream into the telemetry table",
            ),
            cluster_sink_errors: c("cluster_sink_errors_total", "Failed SQL sink commits (retried)"),
            cluster_revocations_received: c(
                "cluster_revocations_received_total",
                "Revocations announced by other nodes over NATS",
            ),
            cluster_share_subscriptions: g(
                "cluster_share_subscriptions",
                "NATS queue subscriptions held for shared subscriptions, lingering ones included",
            ),
            cluster_refused: cv(
                "cluster_refused_total",
                "Messages from the NATS bus refused (not from a node, origin may not publish the topic, unconfirmed revocation)",
                &["reason"],
            ),
            commands: cv("commands_total", "Queued-command status transitions", &["status"]),
            commands_pending: g("commands_pending", "Commands not yet acknowledged, expired or dropped"),
            sessions_parked: g("sessions_parked", "Persistent sessions kept while their clients are away"),
            sessions_parked_discarded: cv(
                "parked_sessions_discarded_total",
                "Kept persistent sessions forgotten before a resume (clean start, other certificate, revoked, expired)",
                &["reason"],
            ),
            admin_denied: cv(
                "admin_denied_total",
                "Admin listener: requests and connections turned away, by reason",
                &["reason"],
            ),
            admin_connections: g("admin_connections", "Admin listener: open operator connections"),
            ota_refused: cv("ota_refused_total", "Firmware chunk requests refused, by reason", &["reason"]),
            ota_chunks: c("ota_chunks_total", "Firmware chunks sent with data"),
            ota_chunk_bytes: c("ota_chunk_bytes_total", "Firmware image bytes sent in chunks"),
            ota_jobs: cv("ota_jobs_total", "Firmware update job state changes", &["state"]),
            ota_campaigns: cv("ota_campaigns_total", "Firmware campaign events", &["event"]),
            registry: r,
        }
    }

    /// A request or connection the admin listener turned away.
    pub(crate) fn admin_denied(&self, why: AdminDenial) {
        self.admin_denied.with_label_values(&[why.label()]).inc();
    }

    /// A session admitted.
    pub(crate) fn accepted(&self) {
        self.handshakes.with_label_values(&["accepted", "ok"]).inc();
    }

    /// A connection refused during the handshake, admission or CONNECT.
    pub(crate) fn refused(&self, why: Refusal) {
        self.handshakes.with_label_values(&["refused", why.label()]).inc();
    }

    /// A connection closed at accept, before any handshake.
    pub(crate) fn rejected_at_accept(&self, why: Refusal) {
        self.connections_rejected.with_label_values(&[why.label()]).inc();
    }

    /// A session ended.
    pub(crate) fn closed(&self, why: CloseReason) {
        match why.counter() {
            CloseCounter::Kick => self.kicks.with_label_values(&[why.label()]).inc(),
            CloseCounter::Protocol => self.protocol_errors.with_label_values(&[why.label()]).inc(),
            CloseCounter::None => {}
        }
    }

    /// A kept persistent session forgotten.
    pub(crate) fn parked_discarded(&self, why: crate::outcome::Discard) {
        self.sessions_parked_discarded.with_label_values(&[why.label()]).inc();
    }

    /// A cap hit.
    pub(crate) fn limit(&self, which: Limit) {
        self.limits.with_label_values(&[which.label()]).inc();
    }

    /// An ACL refusal.
    pub(crate) fn acl_denied(&self, action: AclAction) {
        self.acl_denied.with_label_values(&[action.label()]).inc();
    }

    /// A TLS reload attempt.
    pub(crate) fn reload(&self, outcome: Reload) {
        self.crl_reloads.with_label_values(&[outcome.label()]).inc();
    }

    /// An admission decided from the cache (`hit`) or by a registry query.
    pub(crate) fn admission_cache(&self, hit: bool) {
        self.admission_cache.with_label_values(&[if hit { "hit" } else { "miss" }]).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
