//! Why a connection was refused.

use rumqttc::mqttbytes::v4::ConnectReturnCode;

/// Why a connection was not admitted: `fleet_handshakes_total{outcome="refused",reason}` (or
/// `fleet_connections_rejected_total{reason}` for the accept-time ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Too many connections from one address still before admission (at accept).
    SourceLimit,
    /// `max_handshakes` connections are before admission already (at accept).
    HandshakesBusy,
    /// The broker's connection cap (at accept).
    MaxConnections,
    /// No TLS handshake within the deadline.
    HandshakeTimeout,
    /// The peer closed or reset during the handshake or before CONNECT.
    PeerClosed,
    /// Another socket error during the handshake.
    Io,
    /// The client presented no certificate.
    NoCertificate,
    /// Certificate past notAfter.
    Expired,
    /// Certificate before notBefore.
    NotYetValid,
    /// Certificate revoked (CRL, registry or the revocation feed).
    Revoked,
    /// Certificate not issued by the device issuing CA.
    UnknownCa,
    /// A signature in the chain or the handshake does not verify.
    BadSignature,
    /// No extendedKeyUsage clientAuth.
    WrongPurpose,
    /// The CRL is past nextUpdate and the policy is fail-closed.
    CrlExpired,
    /// Revocation status could not be determined.
    RevocationUnknown,
    /// A CA certificate presented as a client.
    CaAsClient,
    /// Any other certificate defect.
    BadCertificate,
    /// No protocol version, cipher suite or group in common.
    Incompatible,
    /// A malformed TLS message.
    Malformed,
    /// The peer sent a fatal alert.
    PeerAlert,
    /// Any other TLS error.
    TlsError,
    /// The certificate names no (or an ambiguous) fleetgate identity, or the registry disagrees
    /// with it.
    BadIdentity,
    /// The certificate's serial is not in the registry.
    UnknownDevice,
    /// The registry could not be asked.
    RegistryUnavailable,
    /// A cluster member's NATS connection is down: nothing could be routed or stored.
    ClusterUnavailable,
    /// `proxy_protocol` is on and the connection did not start with a valid PROXY v2 header.
    ProxyHeader,
    /// The first packet was not a valid CONNECT.
    ProtocolError,
    /// No CONNECT within the deadline.
    ConnectTimeout,
    /// The CONNECT client id is not the certificate's device id.
    ClientIdMismatch,
    /// An identity that never speaks MQTT (an operator's, for the admin API) on the MQTT
    /// listener, or one that is not an operator's on the admin listener.
    WrongRole,
    /// A claim certificate already holds `max_sessions_per_claim` live sessions (one leaked
    /// claim key cannot take every connection slot).
    ClaimBusy,
    /// This node has moved (`moved_to`): the client was told where to connect.
    Moved,
}

impl Refusal {
    /// Every refusal (for tests and dashboards).
    pub const ALL: [Refusal; 32] = [
        Self::SourceLimit,
        Self::HandshakesBusy,
        Self::MaxConnections,
        Self::HandshakeTimeout,
        Self::PeerClosed,
        Self::Io,
        Self::NoCertificate,
        Self::Expired,
        Self::NotYetValid,
        Self::Revoked,
        Self::UnknownCa,
        Self::BadSignature,
        Self::WrongPurpose,
        Self::CrlExpired,
        Self::RevocationUnknown,
        Self::CaAsClient,
        Self::BadCertificate,
        Self::Incompatible,
        Self::Malformed,
        Self::PeerAlert,
        Self::TlsError,
        Self::BadIdentity,
        Self::UnknownDevice,
        Self::RegistryUnavailable,
        Self::ClusterUnavailable,
        Self::ProxyHeader,
        Self::ProtocolError,
        Self::ConnectTimeout,
        Self::ClientIdMismatch,
        Self::WrongRole,
        Self::ClaimBusy,
        Self::Moved,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::SourceLimit => "source_limit",
            Self::HandshakesBusy => "handshakes_busy",
            Self::MaxConnections => "max_connections",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::PeerClosed => "peer_closed",
            Self::Io => "io",
            Self::NoCertificate => "no_certificate",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::UnknownCa => "unknown_ca",
            Self::BadSignature => "bad_signature",
            Self::WrongPurpose => "wrong_purpose",
            Self::CrlExpired => "crl_expired",
            Self::RevocationUnknown => "revocation_unknown",
            Self::CaAsClient => "ca_as_client",
            Self::BadCertificate => "bad_certificate",
            Self::Incompatible => "incompatible",
            Self::Malformed => "malformed",
            Self::PeerAlert => "peer_alert",
            Self::TlsError => "tls_error",
            Self::BadIdentity => "bad_identity",
            Self::UnknownDevice => "unknown_device",
            Self::RegistryUnavailable => "registry_unavailable",
            Self::ClusterUnavailable => "cluster_unavailable",
            Self::ProxyHeader => "proxy_header",
            Self::ProtocolError => "protocol_error",
            Self::ConnectTimeout => "connect_timeout",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::WrongRole => "wrong_role",
            Self::ClaimBusy => "claim_busy",
            Self::Moved => "moved",
        }
    }

    /// One line for an operator: what happened, and what usually causes it (the console shows
    /// it next to the label).
    pub fn explain(self) -> &'static str {
        match self {
            Self::SourceLimit => "One address had too many connections still in their handshake (max_pre_admission_per_source); a flood or a NAT of many devices.",
            Self::HandshakesBusy => "max_handshakes connections were in their handshake already: a reconnect storm (the client tries again), or a flood from many addresses.",
            Self::MaxConnections => "The broker was at max_connections and closed the new connection at once.",
            Self::HandshakeTimeout => "The client did not finish the TLS handshake in time (handshake_timeout_secs): a slow link, or a socket held open on purpose.",
            Self::PeerClosed => "The client hung up during the handshake or before CONNECT, often because it did not trust the broker's certificate.",
            Self::Io => "A network error cut the connection during the handshake.",
            Self::NoCertificate => "The client presented no certificate: every client needs one from the fleet's device CA.",
            Self::Expired => "The client's certificate is past its notAfter date: rotate it (fleet-provision rotate) or reissue it.",
            Self::NotYetValid => "The client's certificate is not valid yet: its clock, or the station's, is wrong.",
            Self::Revoked => "The certificate is revoked (registry or CRL): this device may not connect any more.",
            Self::UnknownCa => "The certificate is not issued by this fleet's device CA: another fleet's device, or a forgery.",
            Self::BadSignature => "A signature in the certificate or the handshake does not verify: a forged or corrupted certificate.",
            Self::WrongPurpose => "The certificate is not for client authentication (extended key usage).",
            Self::CrlExpired => "The CRL is past its next update and crl_policy is fail-closed: sign a new CRL (fleet-provision crl, or run the issuer).",
            Self::RevocationUnknown => "The broker could not tell whether the certificate is revoked.",
            Self::CaAsClient => "A CA certificate was presented as a client's: a misconfigured client, or an attack.",
            Self::BadCertificate => "The certificate is malformed or breaks the device profile.",
            Self::Incompatible => "The client shares no TLS version, cipher suite or key-exchange group with the broker.",
            Self::Malformed => "The client sent a malformed TLS message.",
            Self::PeerAlert => "The client aborted the handshake with a TLS alert, usually because it refused the broker's certificate.",
            Self::TlsError => "The TLS handshake failed for another reason (see the broker's log).",
            Self::BadIdentity => "The certificate names no fleetgate identity, or the registry records it differently.",
            Self::UnknownDevice => "The certificate's serial is not in the registry: minted elsewhere, or the registry was restored from an old backup.",
            Self::RegistryUnavailable => "The registry database did not answer in time, so the broker could not decide; the client should retry.",
            Self::ClusterUnavailable => "This node's connection to the cluster bus (NATS) is down; the client should retry.",
            Self::ProxyHeader => "proxy_protocol is on and the connection did not start with a valid PROXY v2 header: something other than the load balancer connected.",
            Self::ProtocolError => "The first packet after the handshake was not a valid MQTT CONNECT.",
            Self::ConnectTimeout => "No MQTT CONNECT arrived in time after the handshake (connect_timeout_secs).",
            Self::ClientIdMismatch => "The MQTT client id is not the device id in the certificate.",
            Self::WrongRole => "The identity's role may not use this listener (an operator on MQTT, or a device on the admin API).",
            Self::ClaimBusy => "A claim certificate already holds max_sessions_per_claim sessions: a batch booting at once, or a leaked claim key.",
            Self::Moved => "This node has moved (moved_to): MQTT 5 clients were told the new server (CONNACK 0x9D), 3.1.1 clients to try later.",
        }
    }

    /// The CONNACK return code a client refused at CONNECT gets: "try later" when the broker
    /// cannot decide, "bad client id" for a mismatch, "not authorised" otherwise.
    pub fn connack(self) -> ConnectReturnCode {
        match self {
            Self::CrlExpired
            | Self::RegistryUnavailable
            | Self::ClusterUnavailable
            | Self::ClaimBusy
            | Self::Moved => ConnectReturnCode::ServiceUnavailable,
            Self::ClientIdMismatch => ConnectReturnCode::BadClientId,
            _ => ConnectReturnCode::NotAuthorized,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_one_line_explanation_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for r in Refusal::ALL {
            let e = r.explain();
            assert!(e.len() > 20 && e.ends_with('.') && !e.contains('\n'), "{}: {e}", r.label());
            assert!(seen.insert(e), "{} shares its explanation", r.label());
        }
    }

    #[test]
    fn labels_are_unique_metric_label_values() {
        let mut seen = std::collections::HashSet::new();
        for r in Refusal::ALL {
            let l = r.label();
            assert!(seen.insert(l), "{l} twice");
            assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
        }
    }

    #[test]
    fn refusals_that_the_client_may_retry_say_so() {
        assert_eq!(Refusal::RegistryUnavailable.connack(), ConnectReturnCode::ServiceUnavailable);
        assert_eq!(Refusal::CrlExpired.connack(), ConnectReturnCode::ServiceUnavailable);
        assert_eq!(Refusal::ClientIdMismatch.connack(), ConnectReturnCode::BadClientId);
        assert_eq!(Refusal::Revoked.connack(), ConnectReturnCode::NotAuthorized);
    }
}
