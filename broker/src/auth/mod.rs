//! Who a client is (from its certificate) and what it may do (ACL).
//!
//! A client's identity is its certificate's SAN URI: `urn:fleetgate:device:<id>` makes a device,
//! `urn:fleetgate:service:<name>` a backend service. The registry is then asked whether that
//! certificate serial is known and active (see `session`). The ACL model:
//!
//! | role | publish | subscribe |
//! |---|---|---|
//! | device `X` | `devices/X/<anything>` except `devices/X/commands/...`, and under `ota/` only `get` and `status` | filters inside `devices/X/` (wildcards only after it) |
//! | service | `devices/<id>/commands/<anything>` except `commands/ota/...` (the campaign runner's) | any filter inside `devices/` (`devices/+/telemetry`, `devices/#`) |
//! | issuer | `devices/<id>/certs/<answer>`, `claims/<claim>/<nonce>/certs/<answer>` (never `csr`) | `devices/+/certs/csr`, `devices/+/certs/active`, `claims/+/+/certs/csr` |
//! | claim `C` (client id `claims/C/<nonce>`) | `claims/C/<nonce>/certs/csr` | `claims/C/<nonce>/certs/+` and its concrete answers |
//!
//! A device's `certs/` level is for rotation (docs/spec/rotation.md): it may publish only `csr`
//! and `active` there; the broker replaces the payload of `active` with the serial of the
//! certificate the session was admitted with, so the issuer learns which certificate is in use
//! from the broker, not from the device's word.
use fleet_registry::{
    DeviceId, Role, SerialNumber, CLAIM_URI_PREFIX, DEVICE_URI_PREFIX, ISSUER_URI_PREFIX,
    OPERATOR_URI_PREFIX, SERVICE_URI_PREFIX,
};
use fleet_topic::Addressed;

use crate::outcome::Refusal;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Device id or service name.
    pub id: DeviceId,
    /// Its role.
    pub role: Role,
    /// Serial of the certificate it connected with.
    pub serial: SerialNumber,
    /// Certificate notAfter (unix seconds).
    pub not_after: i64,
    /// A claim session's nonce (its client id is `claims/<claim-id>/<nonce>`), set at CONNECT.
    pub nonce: Option<String>,
}

impl Identity {
    /// The key of this client's live session: the device id, or a claim session's client id
    /// (which contains `/`, so it never equals a device id).
    pub fn session_key(&self) -> String {
        match &self.nonce {
            Some(n) => fleet_topic::claim_session(self.id.as_str(), n).to_string(),
            None => self.id.as_str().to_owned(),
        }
    }

    /// The client id a claim session must use, `claims/<claim-id>/<nonce>`, parsed: the nonce
    /// is 16 to 64 characters of `[0-9a-z]`.
    pub fn claim_nonce<'c>(&self, client_id: &'c str) -> Option<&'c str> {
        let (claim, nonce) = fleet_topic::parse_claim_session(client_id)?;
        if claim != self.id.as_str() {
            return None;
        }
        let ok = (16..=64).contains(&nonce.len())
            && nonce.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        ok.then_some(nonce)
    }
}

/// Why a certificate does not name a fleetgate client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not parseable X.509.
    #[error("certificate does not parse")]
    Unparseable,
    /// A CA certificate presented as a client.
    #[error("CA certificate used as a client certificate")]
    CaAsClient,
    /// No or malformed fleetgate SAN URI.
    #[error("certificate carries no valid fleetgate identity URI")]
    NoIdentity,
}

impl IdentityError {
    /// The admission refusal it causes.
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Unparseable | Self::NoIdentity => Refusal::BadIdentity,
            Self::CaAsClient => Refusal::CaAsClient,
        }
    }
}

/// Reads the identity from a (chain-verified) client certificate.
pub fn identify(cert_der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| IdentityError::Unparseable)?;
    if cert.is_ca() {
        return Err(IdentityError::CaAsClient);
    }
    let serial = SerialNumber::from_bytes(cert.raw_serial()).ok_or(IdentityError::Unparseable)?;
    let san = cert.subject_alternative_name().map_err(|_| IdentityError::Unparseable)?;
    let mut found = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            let (role, rest) = if let Some(rest) = uri.strip_prefix(DEVICE_URI_PREFIX) {
                (Role::Device, rest)
            } else if let Some(rest) = uri.strip_prefix(SERVICE_URI_PREFIX) {
                (Role::Service, rest)
            } else if let Some(rest) = uri.strip_prefix(ISSUER_URI_PREFIX) {
                (Role::Issuer, rest)
            } else if let Some(rest) = uri.strip_prefix(CLAIM_URI_PREFIX) {
                (Role::Claim, rest)
            } else if let Some(rest) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                (Role::Operator, rest)
            } else {
                continue;
            };
            if found.is_some() {
                return Err(IdentityError::NoIdentity); // two identities: ambiguous
            }
            found = Some((role, DeviceId::parse(rest).map_err(|_| IdentityError::NoIdentity)?));
        }
    }
    let (role, id) = found.ok_or(IdentityError::NoIdentity)?;
    Ok(Identity { id, role, serial, not_after: cert.validity().not_after.timestamp(), nonce: None })
}

/// The levels of the topic scheme (`fleet-topic`), as the ACL reads them.
pub(crate) use fleet_topic::level::{ACTIVE, CERTS, CLAIMS, COMMANDS, CSR, DEVICES, GET, OFFER, OTA, STATUS};
pub use fleet_topic::matches;
pub(crate) use fleet_topic::{Topic, TopicFilter};

/// The topic of a device's `certs/active` announcement, if `topic` is one from `who`.
pub(crate) fn is_active_announcement(who: &Identity, topic: Topic<'_>) -> bool {
    who.role == Role::Device
        && topic.addressed() == Addressed::DeviceCerts { device: who.id.as_str(), kind: ACTIVE }
}

/// Is `topic` a CSR that `who` may send (`devices/<own id>/certs/csr`, or a claim session's
/// `claims/<claim>/<nonce>/certs/csr`)? Such a payload is stamped with
/// [`fleet_registry::CSR_ORIGIN`]: the issuer binds the CSR to that certificate, not to the
/// topic alone.
pub(crate) fn is_csr(who: &Identity, topic: Topic<'_>) -> bool {
    // On the ingest path: no allocation.
    match (who.role, topic.addressed()) {
        (Role::Device, Addressed::DeviceCerts { device, kind: CSR }) => device == who.id.as_str(),
        (Role::Claim, Addressed::ClaimCerts { claim, nonce, kind: CSR }) => {
            claim == who.id.as_str() && who.nonce.as_deref() == Some(nonce)
        }
        _ => false,
    }
}

/// The CSR payload relayed for `who`: the origin line with its serial, then the CSR.
pub(crate) fn stamp_csr(who: &Identity, csr: &[u8]) -> Vec<u8> {
    let mut out = format!("{} {}\n", fleet_registry::CSR_ORIGIN, who.serial.to_hex()).into_bytes();
    out.extend_from_slice(csr);
    out
}

/// May `who` publish to `topic`?
pub fn may_publish(who: &Identity, topic: Topic<'_>) -> bool {
    if topic.has_empty_level() {
        return false;
    }
    let levels: Vec<&str> = topic.levels().collect();
    match (who.role, levels.as_slice()) {
        // A device never writes its own commands: a stolen certificate could otherwise plant a
        // (retained) command that the real device obeys after every reconnect. Under `certs/` it
        // asks (`csr`) and announces (`active`), never answers.
        (Role::Device, [DEVICES, owner, rest @ ..]) => {
            *owner == who.id.as_str()
                && !rest.is_empty()
                && rest[0] != COMMANDS
                && (rest[0] != CERTS || matches!(rest, [_, CSR | ACTIVE]))
                // Under `ota/` a device asks for chunks and reports; only the broker answers.
                && (rest[0] != OTA || matches!(rest, [_, GET | STATUS]))
        }
        // Offers are the campaign runner's (docs/spec/ota.md): a service's would disagree with
        // the job table.
        (Role::Service, [DEVICES, owner, COMMANDS, first, ..]) => {
            DeviceId::parse(owner).is_ok() && *first != OTA
        }
        // The issuer answers under a device's or a claim session's `certs/` (never as the
        // device: not `csr`, not `active`).
        (Role::Issuer, [DEVICES, owner, CERTS, answer]) => {
            DeviceId::parse(owner).is_ok() && !matches!(*answer, CSR | ACTIVE)
        }
        (Role::Issuer, [CLAIMS, claim, _nonce, CERTS, answer]) => {
            DeviceId::parse(claim).is_ok() && !matches!(*answer, CSR | ACTIVE)
        }
        (Role::Claim, [CLAIMS, claim, nonce, CERTS, CSR]) => {
            *claim == who.id.as_str() && who.nonce.as_deref() == Some(*nonce)
        }
        _ => false,
    }
}

/// May `who` subscribe to `filter`?
pub fn may_subscribe(who: &Identity, filter: TopicFilter<'_>) -> bool {
    let levels: Vec<&str> = filter.levels().collect();
    match (who.role, levels.as_slice()) {
        (Role::Device, [DEVICES, owner, _, ..]) => *owner == who.id.as_str(),
        (Role::Service, [DEVICES, ..]) => true,
        // Command status (docs/spec/commands.md): services only.
        (Role::Service, [STATUS, DEVICES, ..]) => true,
        // Devices' certificate requests and announcements, claim sessions' requests.
        (Role::Issuer, [DEVICES, owner, CERTS, CSR | ACTIVE]) => {
            *owner == "+" || DeviceId::parse(owner).is_ok()
        }
        (Role::Issuer, [CLAIMS, "+", "+", CERTS, CSR]) => true,
        // A claim session reads only its own answers.
        (Role::Claim, [CLAIMS, claim, nonce, CERTS, answer]) => {
            *claim == who.id.as_str() && who.nonce.as_deref() == Some(*nonce) && *answer != "#"
        }
        _ => false,
    }
}

/// May `who` name `topic` as the Response Topic of a message (MQTT 5)? Only a topic it reads
/// itself: an answer goes back to the asker, and a backend that answers must not be made to
/// publish where the asker may not (another device's commands, its certificate answers).
pub(crate) fn may_be_answered_on(who: &Identity, topic: Topic<'_>) -> bool {
    !topic.has_empty_level()
        && TopicFilter::parse(topic.as_str()).is_ok_and(|filter| may_subscribe(who, filter))
}

/// May the broker publish a command's statuses on `topic`, the Response Topic its sender set?
/// Only under a device's `responses/` or on a status topic, and (`device`: the command's) only
/// that device's: never on a command or certificate topic, where its words would be taken for a
/// command or a certificate answer, nor on a device's data, where they would be taken for the
/// device's, nor in another device's subtree, where they would be taken for that device's
/// answers (a service reads all of those, so [`may_be_answered_on`] alone lets it name them).
/// `device` is `None` where the command is not known (a node relaying another node's answer).
pub(crate) fn broker_may_answer_on(device: Option<&str>, topic: Topic<'_>) -> bool {
    let (owner, fits) = match topic.addressed() {
        Addressed::DeviceData { device, rest } => {
            (device, rest.split_once('/').is_some_and(|(first, _)| first == fleet_topic::level::RESPONSES))
        }
        // Not the status topics of the campaign runner's commands (`commands/ota/...`): another
        // command's statuses there would be read as an offer's (docs/spec/ota.md).
        Addressed::Status { device, name } => (device, name.split('/').next() != Some(OTA)),
        _ => return false,
    };
    fits && device.is_none_or(|d| d == owner)
}

#[cfg(test)]
mod tests;

/// Is `topic` a campaign's offer, `devices/<id>/commands/ota/offer` (with or without a `ttl=`
/// level)? Only the broker's campaign runner puts those in the queue (docs/spec/ota.md).
pub(crate) fn is_ota_offer(topic: &str) -> bool {
    let levels: Vec<&str> = topic.split('/').collect();
    match levels.as_slice() {
        [DEVICES, owner, COMMANDS, OTA, OFFER] => DeviceId::parse(owner).is_ok(),
        [DEVICES, owner, COMMANDS, OTA, OFFER, ttl] => {
            DeviceId::parse(owner).is_ok() && ttl.starts_with(fleet_topic::level::TTL)
        }
        _ => false,
    }
}
