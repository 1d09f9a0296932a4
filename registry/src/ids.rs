//! Identifier newtypes: device ids, certificate serial numbers, roles, statuses, revocation
//! reasons.
//!
//! Each is built only through a parsing constructor, so a value of the type is always valid:
//! a `DeviceId` can be put into a topic, a URI and a file name without further checks.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// URI prefix of the SAN that names a device (the scheme's, from `fleet-topic`).
pub const DEVICE_URI_PREFIX: &str = fleet_topic::uri::DEVICE;
/// URI prefix of the SAN that names a backend service.
pub const SERVICE_URI_PREFIX: &str = fleet_topic::uri::SERVICE;
/// SAN URI prefix of a certificate issuer's identity (rotation over MQTT).
pub const ISSUER_URI_PREFIX: &str = fleet_topic::uri::ISSUER;
/// SAN URI prefix of a claim identity (docs/spec/rotation.md).
pub const CLAIM_URI_PREFIX: &str = fleet_topic::uri::CLAIM;
/// SAN URI prefix of an operator's identity: the broker's admin API and console, never MQTT.
pub const OPERATOR_URI_PREFIX: &str = fleet_topic::uri::OPERATOR;
/// SAN URI prefix of a broker node's identity on the cluster bus (NATS).
pub const NODE_URI_PREFIX: &str = fleet_topic::uri::NODE;
/// SAN URI prefix of a backend's read-only identity on the cluster bus.
pub const STREAM_READER_URI_PREFIX: &str = fleet_topic::uri::STREAM_READER;
/// First line of a CSR payload as the broker relays it to the issuer:
/// `fleetgate-origin <serial hex>\n`, the serial of the certificate the publishing session was
/// admitted with (docs/spec/rotation.md). The issuer binds the CSR to that certificate.
pub const CSR_ORIGIN: &str = "fleetgate-origin";

/// A device (or service) id: 1–64 chars of `[a-z0-9._-]`, starting with a letter or digit.
///
/// Safe as an MQTT topic level (no `/`, `+`, `#`), a URI path segment and a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Parses and validates an id.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let ok_len = !s.is_empty() && s.len() <= 64;
        let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok_chars =
            s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if ok_len && ok_first && ok_chars {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::InvalidDeviceId(s.to_owned()))
        }
    }

    /// Ids that name the infrastructure or the topic scheme, never a device: a CSR asking for
    /// one is refused (a device named `broker` or `admin` would confuse every log and ACL that
    /// reads ids).
    pub const RESERVED: &'static [&'static str] = &[
        "admin",
        "all",
        "any",
        "broker",
        "commands",
        "devices",
        "fleet",
        "fleetgate",
        "localhost",
        "null",
        "operator",
        "root",
        "server",
        "service",
        "services",
        "station",
        "system",
    ];

    /// Parses an id for a *device* from untrusted input (a CSR): the id syntax, and not a
    /// reserved name.
    pub fn parse_for_device(s: &str) -> Result<Self, Error> {
        let id = Self::parse(s)?;
        if Self::RESERVED.contains(&s) {
            return Err(Error::ReservedId(s.to_owned()));
        }
        Ok(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SAN URI carried by a certificate for this id and role.
    pub fn uri(&self, role: Role) -> String {
        match role {
            Role::Device => format!("{DEVICE_URI_PREFIX}{}", self.0),
            Role::Service => format!("{SERVICE_URI_PREFIX}{}", self.0),
            Role::Issuer => format!("{ISSUER_URI_PREFIX}{}", self.0),
            Role::Claim => format!("{CLAIM_URI_PREFIX}{}", self.0),
            Role::Operator => format!("{OPERATOR_URI_PREFIX}{}", self.0),
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// A certificate serial number: positive, 16 bytes, 126 random bits. Shown as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SerialNumber(Vec<u8>);

impl SerialNumber {
    /// A fresh random serial. The top bit is cleared (DER INTEGERs are signed) and the next bit
    /// set, so the encoding is always exactly 16 bytes with no leading zero to normalise away.
    pub fn random() -> Self {
        let mut b: [u8; 16] = rand::random();
        b[0] = (b[0] & 0x3f) | 0x40;
        Self(b.to_vec())
    }

    /// Parses hex (case-insensitive, optional `0x` and `:` separators as openssl prints them).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let cleaned: String = s.trim().trim_start_matches("0x").chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&cleaned).map_err(|_| Error::InvalidSerial(s.to_owned()))?;
        Self::from_bytes(&bytes).ok_or_else(|| Error::InvalidSerial(s.to_owned()))
    }

    /// From the big-endian bytes of a certificate's serial (leading zeros stripped).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let start = bytes.iter().position(|b| *b != 0)?;
        let trimmed = &bytes[start..];
        (trimmed.len() <= 20).then(|| Self(trimmed.to_vec()))
    }

    /// Big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lowercase hex, the registry's key.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Display for SerialNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.to_hex())
    }
}

/// What a client identity may do at the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A device: its own topics only.
    Device,
    /// A backend service: subscribes to all devices' telemetry, publishes commands.
    Service,
    /// An online certificate issuer: subscribes to devices' CSRs (`devices/+/certs/csr`) and
    /// publishes under `devices/<id>/certs/` only.
    Issuer,
    /// A claim (batch) identity: only `claims/<claim-id>/<nonce>/certs/...`, to exchange a CSR for
    /// a device's own identity at first boot.
    Claim,
    /// A person running the fleet: the broker's admin API and console (over HTTPS), never MQTT.
    Operator,
}

impl Role {
    /// Name stored in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Service => "service",
            Role::Issuer => "issuer",
            Role::Claim => "claim",
            Role::Operator => "operator",
        }
    }

    /// Parses a registry value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "device" => Some(Role::Device),
            "service" => Some(Role::Service),
            "issuer" => Some(Role::Issuer),
            "claim" => Some(Role::Claim),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// Status of a device or a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// May connect.
    Active,
    /// Never again.
    Revoked,
}

impl Status {
    /// Both statuses.
    pub const ALL: [Status; 2] = [Status::Active, Status::Revoked];

    /// Registry spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Revoked => "revoked",
        }
    }

    /// Parses a registry value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The RFC 5280 revocation reasons a fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    /// No reason given.
    Unspecified,
    /// The device's private key is (or may be) known to someone else.
    KeyCompromise,
    /// The device changed owner or purpose.
    AffiliationChanged,
    /// Replaced by a newer certificate.
    Superseded,
    /// The device was retired.
    CessationOfOperation,
    /// The device is no longer allowed to connect.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// Every reason, in RFC 5280 order.
    pub const ALL: [RevocationReason; 6] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
    ];

    /// Name as written in the registry and printed (RFC 5280 spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "keyCompromise",
            Self::AffiliationChanged => "affiliationChanged",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessationOfOperation",
            Self::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    /// Parses a registry value (RFC 5280 spelling).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        for ok in ["a", "dev-0001", "sensor.7_b", &"x".repeat(64)] {
            assert!(DeviceId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "A1", "a/b", "a+b", "a#", "a b", &"x".repeat(65), "é"] {
            assert!(DeviceId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serials() {
        let s = SerialNumber::random();
        assert_eq!(s.as_bytes().len(), 16);
        assert!(s.as_bytes()[0] & 0x80 == 0 && s.as_bytes()[0] & 0x40 != 0);
        assert_eq!(SerialNumber::parse(&s.to_hex().to_uppercase()).ok(), Some(s.clone()));
        assert_eq!(SerialNumber::parse("00:0A:ff").ok().map(|s| s.to_hex()), Some("0aff".into()));
        assert!(SerialNumber::parse("zz").is_err());
        assert!(SerialNumber::parse("00").is_err());
        assert_ne!(SerialNumber::random(), SerialNumber::random());
        // A certificate's serial (DER content bytes): at most 20 octets of value (RFC 5280), so
        // a certificate with a longer one is never identified (the broker's CRL skips such).
        assert_eq!(SerialNumber::from_bytes(&[0x7f; 20]).map(|s| s.as_bytes().len()), Some(20));
        let with_sign_octet = [&[0u8][..], &[0x80; 20]].concat();
        assert_eq!(SerialNumber::from_bytes(&with_sign_octet).map(|s| s.as_bytes().len()), Some(20));
        assert_eq!(SerialNumber::from_bytes(&[0x11; 21]), None);
        assert_eq!(SerialNumber::from_bytes(&[0x11; 22]), None);
    }
}
