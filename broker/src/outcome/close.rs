//! Why an admitted session ended.

/// Why an admitted session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client sent DISCONNECT or closed its socket.
    ClientGone,
    /// The broker is stopping.
    Shutdown,
    /// Its certificate was revoked (cut by the revocation feed).
    Revoked,
    /// A new connection of the same device replaced it.
    Takeover,
    /// Its certificate passed notAfter.
    CertExpired,
    /// The peer accepted no bytes for the write timeout.
    WriteTimeout,
    /// A PUBLISH topic over the configured length or depth.
    TopicLimit,
    /// A retained message over the per-device count.
    RetainedPerDevice,
    /// A retained message over the broker-wide byte budget.
    RetainedBytes,
    /// A packet over the maximum packet size.
    PacketTooLarge,
    /// Bytes that are not MQTT 3.1.1.
    MalformedPacket,
    /// No packet for 1.5 keep-alive periods.
    KeepaliveTimeout,
    /// QoS 2 is not supported.
    Qos2Unsupported,
    /// A second CONNECT.
    SecondConnect,
    /// A packet a client never sends (CONNACK, SUBACK...).
    UnexpectedPacket,
    /// An MQTT 5 topic alias that is 0, over the maximum, or never set.
    TopicAliasInvalid,
    /// A packet the broker could not encode.
    Encode,
    /// A QoS 1 PUBLISH the ACL refuses (no PUBACK to withhold otherwise).
    AclDenied,
    /// The store failed to commit a QoS 1 message.
    StoreFailed,
}

/// Which counter a close is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCounter {
    /// `fleet_kicks_total{reason}`: the broker cut the session.
    Kick,
    /// `fleet_protocol_errors_total{reason}`: the client broke the protocol.
    Protocol,
    /// Not counted (the client left, the broker stopped, or the cause is counted elsewhere).
    None,
}

impl CloseReason {
    /// Every reason, to export each counter at zero from the start.
    pub const ALL: [CloseReason; 19] = [
        Self::ClientGone,
        Self::Shutdown,
        Self::Revoked,
        Self::Takeover,
        Self::CertExpired,
        Self::WriteTimeout,
        Self::TopicLimit,
        Self::RetainedPerDevice,
        Self::RetainedBytes,
        Self::PacketTooLarge,
        Self::MalformedPacket,
        Self::KeepaliveTimeout,
        Self::Qos2Unsupported,
        Self::SecondConnect,
        Self::UnexpectedPacket,
        Self::TopicAliasInvalid,
        Self::Encode,
        Self::AclDenied,
        Self::StoreFailed,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientGone => "client_gone",
            Self::Shutdown => "shutdown",
            Self::Revoked => "revoked",
            Self::Takeover => "takeover",
            Self::CertExpired => "cert_expired",
            Self::WriteTimeout => "write_timeout",
            Self::TopicLimit => "topic_limit",
            Self::RetainedPerDevice => "retained_per_device",
            Self::RetainedBytes => "retained_bytes",
            Self::PacketTooLarge => "packet_too_large",
            Self::MalformedPacket => "malformed_packet",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::Qos2Unsupported => "qos2_unsupported",
            Self::SecondConnect => "second_connect",
            Self::UnexpectedPacket => "unexpected_packet",
            Self::TopicAliasInvalid => "topic_alias_invalid",
            Self::Encode => "encode",
            Self::AclDenied => "acl",
            Self::StoreFailed => "store_failed",
        }
    }

    /// The counter it goes to.
    pub fn counter(self) -> CloseCounter {
        match self {
            Self::Revoked
            | Self::Takeover
            | Self::CertExpired
            | Self::WriteTimeout
            | Self::TopicLimit
            | Self::RetainedPerDevice
            | Self::RetainedBytes => CloseCounter::Kick,
            Self::PacketTooLarge
            | Self::MalformedPacket
            | Self::KeepaliveTimeout
            | Self::Qos2Unsupported
            | Self::SecondConnect
            | Self::UnexpectedPacket
            | Self::TopicAliasInvalid
            | Self::Encode => CloseCounter::Protocol,
            Self::ClientGone | Self::Shutdown | Self::AclDenied | Self::StoreFailed => CloseCounter::None,
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
