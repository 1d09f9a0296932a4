//! The small label sets of the broker's metrics, each an enum with one `label()`: caps hit,
//! TLS reload outcomes, ACL actions, admin denials, certificate-expiry buckets. (Refusals and
//! close reasons, part of the public API, are in `outcome`.)

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
