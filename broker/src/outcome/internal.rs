//! Outcomes the broker counts and publishes but that are not part of its public API: why a kept
//! session was discarded, and why a service's command was refused or dropped.

/// Why a kept session was forgotten before its client resumed it:
/// `fleet_parked_sessions_discarded_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Discard {
    /// The client came back with clean session = 1.
    CleanStart,
    /// The client came back on another certificate than the one that parked it.
    OtherCertificate,
    /// The certificate that parked it was revoked.
    Revoked,
    /// `session_expiry_secs` passed.
    Expired,
}

impl Discard {
    /// Every reason.
    pub(crate) const ALL: [Discard; 4] =
        [Self::CleanStart, Self::OtherCertificate, Self::Revoked, Self::Expired];

    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::CleanStart => "clean_start",
            Self::OtherCertificate => "other_certificate",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

/// Why a service's command was refused or dropped: the `reason` of its status message on
/// `status/devices/<id>/commands/<name>` (docs/spec/commands.md), which the service that issued
/// it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommandRefusal {
    /// A `ttl=` level that is not a number of seconds in 1..=30 days.
    BadTtl,
    /// The payload is over `max_command_bytes`.
    TooLarge,
    /// The device is revoked.
    Revoked,
    /// No such device (or the id is not a device's).
    UnknownDevice,
    /// Dropped: the device's queue held `max_queued_commands` (the oldest goes).
    QueueFull,
}

impl CommandRefusal {
    /// The status message's `reason`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::BadTtl => "bad_ttl",
            Self::TooLarge => "too_large",
            Self::Revoked => "revoked",
            Self::UnknownDevice => "unknown_device",
            Self::QueueFull => "queue_full",
        }
    }
}
