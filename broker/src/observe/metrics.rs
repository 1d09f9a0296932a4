//! Prometheus metrics, one registry per broker (tests run several brokers in one process).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

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
        for r in [Refusal::SourceLimit, Refusal::MaxConnections] {
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
        for w in EXPIRY_LABELS {
            self.sessions_cert_expiry.with_label_values(&[w]);
        }
        for s in fleet_registry::commands::CommandStatus::ALL {
            self.commands.with_label_values(&[s.as_str()]);
        }
        for d in AdminDenial::ALL {
            self.admin_denied.with_label_values(&[d.label()]);
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

/// Labels of `fleet_sessions_cert_expiry{within}`, one per bucket of days to expiry.
pub(crate) const EXPIRY_LABELS: [&str; 6] = ["1d", "7d", "30d", "90d", "365d", "more"];

/// A cap that was hit: `fleet_limits_total{limit}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub(crate) enum Limit {
    /// Topic or filter length or depth.
    Topic,
    /// Subscriptions per session.
    Subscriptions,
    /// Pre-admission connections per source address.
    PerSource,
    /// Retained messages per device.
    RetainedPerDevice,
    /// Retained bytes in the broker.
    RetainedBytes,
    /// Messages queued for one session.
    QueuedMessages,
    /// Persistent sessions kept for one claim certificate's nonces.
    ParkedPerClaim,
    /// Persistent sessions kept in the broker.
    ParkedTotal,
    /// A command published with the retain flag (stripped: commands are never retained).
    CommandRetained,
    /// A device or claim session over its publish rate (messages or bytes per second): waited.
    PublishRate,
    /// A CSR over its identity's CSR rate (`csr_interval_secs`): dropped, never reaches the issuer.
    CsrRate,
}

impl Limit {
    /// Every cap.
    pub(crate) const ALL: [Limit; 11] = [
        Self::Topic,
        Self::Subscriptions,
        Self::PerSource,
        Self::RetainedPerDevice,
        Self::RetainedBytes,
        Self::QueuedMessages,
        Self::ParkedPerClaim,
        Self::ParkedTotal,
        Self::CommandRetained,
        Self::PublishRate,
        Self::CsrRate,
    ];

    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Subscriptions => "subscriptions",
            Self::PerSource => "source_limit",
            Self::RetainedPerDevice => "retained_per_device",
            Self::RetainedBytes => "retained_bytes",
            Self::QueuedMessages => "queued_messages",
            Self::ParkedPerClaim => "parked_per_claim",
            Self::ParkedTotal => "parked_total",
            Self::CommandRetained => "command_retained",
            Self::PublishRate => "publish_rate",
            Self::CsrRate => "csr_rate",
        }
    }
}

/// What became of a changed TLS file set: `fleet_crl_reloads_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reload {
    /// Loaded and in force.
    Loaded,
    /// Unreadable or unverifiable: the previous configuration stays.
    Rejected,
    /// A CRL with a lower number than the loaded one (or none at all): refused.
    Replayed,
}

impl Reload {
    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Rejected => "rejected",
            Self::Replayed => "replayed",
        }
    }
}

/// The ACL action refused: `fleet_acl_denied_total{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AclAction {
    /// PUBLISH.
    Publish,
    /// SUBSCRIBE.
    Subscribe,
}

impl AclAction {
    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
        }
    }
}

/// Why the admin listener turned a request or connection away:
/// `fleet_admin_denied_total{reason}`. (The admission gate's own refusals, the same as MQTT's,
/// are in `fleet_handshakes_total{outcome="refused"}`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub(crate) enum AdminDenial {
    /// At accept: the source address holds its share of the handshake slots, or all are taken.
    HandshakeShare,
    /// The gate refused the certificate (at the connection or at a request: revoked, CRL
    /// expired, unknown...): one answer, then the connection is closed.
    Refused,
    /// An admitted identity that is not an operator's: one 403, then the connection is closed.
    NotOperator,
    /// More open connections of one operator certificate than allowed.
    IdentityLimit,
    /// More open operator connections from one source (IPv6: /64) than allowed.
    SourceLimit,
    /// A state-changing request from another origin (`Origin`, `Sec-Fetch-Site`).
    CrossOrigin,
    /// A state-changing request without the `X-Fleetgate-Request` header.
    RequestHeader,
    /// A state-changing request whose body is not declared `application/json`.
    ContentType,
    /// More live event streams than allowed (in all or for the operator).
    EventStreams,
}

impl AdminDenial {
    /// Every reason.
    pub(crate) const ALL: [AdminDenial; 9] = [
        Self::HandshakeShare,
        Self::Refused,
        Self::NotOperator,
        Self::IdentityLimit,
        Self::SourceLimit,
        Self::CrossOrigin,
        Self::RequestHeader,
        Self::ContentType,
        Self::EventStreams,
    ];

    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::HandshakeShare => "handshake_share",
            Self::Refused => "refused",
            Self::NotOperator => "not_operator",
            Self::IdentityLimit => "identity_limit",
            Self::SourceLimit => "source_limit",
            Self::CrossOrigin => "cross_origin",
            Self::RequestHeader => "request_header",
            Self::ContentType => "content_type",
            Self::EventStreams => "event_streams",
        }
    }
}
