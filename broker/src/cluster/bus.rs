//! What makes a message on the cluster bus a node's: two headers that only nodes set, checked
//! by every node before it acts on a message (`docs/spec/nats-subjects.md`, docs/security.md).
//!
//! - `Fleet-Node`: on every message a node publishes for the other nodes (routed messages,
//!   session claims, revocation announcements, admin questions and answers). Stored messages
//!   (`fleet.m.>`) never carry it, so a JetStream delivery of a stored message onto another
//!   subject (a push consumer's deliver subject) is not mistaken for a node's.
//! - `Fleet-Origin`: on a routed device message, the client the ingress node authenticated:
//!   `<role> <serial hex> <session key>` (`claims/<claim>/<nonce>` for a claim session), or
//!   `broker` for what a node publishes itself (command status). The receiving node applies the
//!   publish ACL of that client to the topic, as if the client had published it there: a node
//!   never hands its local subscribers a topic its origin could not have published.
//!
//! NATS permissions (`deploy/nats/nats-server.conf`) keep everyone but nodes from publishing
//! on `fleet.>`; these checks are the second line, and they keep the first line's mistakes
//! (a reader's push consumer, a node bug) from reaching devices and the issuer.

use async_nats::HeaderMap;
use fleet_registry::{DeviceId, Role, SerialNumber};

use crate::auth::{self, Identity, Topic};

/// Header naming the node that published a message.
pub(crate) const NODE: &str = "Fleet-Node";
/// Header naming the client a routed message came from.
pub(crate) const ORIGIN: &str = "Fleet-Origin";
/// The origin of what a node publishes itself.
const BROKER: &str = "broker";

/// Who published a routed message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Origin<'a> {
    /// A client this node admitted.
    Client(&'a Identity),
    /// This node itself (command status).
    Broker,
}

impl Origin<'_> {
    /// The header value.
    pub(crate) fn encode(self) -> String {
        match self {
            Origin::Client(id) => format!("{} {} {}", id.role.as_str(), id.serial.to_hex(), id.session_key()),
            Origin::Broker => BROKER.to_owned(),
        }
    }
}

/// An origin as another node sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Relayed {
    /// A client of that node.
    Client(Identity),
    /// That node itself.
    Broker,
}

/// Reads a `Fleet-Origin` value (`None`: unreadable).
pub(crate) fn decode_origin(v: &str) -> Option<Relayed> {
    if v == BROKER {
        return Some(Relayed::Broker);
    }
    let mut parts = v.splitn(3, ' ');
    let role = Role::parse(parts.next()?)?;
    let serial = SerialNumber::parse(parts.next()?).ok()?;
    let key = parts.next()?;
    let (id, nonce) = match role {
        Role::Claim => {
            let (claim, nonce) = fleet_topic::parse_claim_session(key)?;
            (DeviceId::parse(claim).ok()?, Some(nonce.to_owned()))
        }
        _ => (DeviceId::parse(key).ok()?, None),
    };
    let id = Identity { id, role, serial, not_after: i64::MAX, nonce };
    // A claim's nonce is checked as at CONNECT (`claims/<claim>/<nonce>`).
    if role == Role::Claim && id.claim_nonce(key).is_none() {
        return None;
    }
    Some(Relayed::Client(id))
}

/// Was this message published by a node?
pub(crate) fn from_node(headers: Option<&HeaderMap>) -> bool {
    headers.and_then(|h| h.get(NODE)).is_some_and(|v| !v.as_str().is_empty())
}

/// May a message on `topic` from `origin` be handed to this node's subscribers? A client's
/// topic must pass its publish ACL; a node publishes only command status.
pub(crate) fn may_relay(origin: &Relayed, topic: &str) -> bool {
    match origin {
        Relayed::Client(id) => {
            id.role != Role::Operator && Topic::parse(topic).is_ok_and(|t| auth::may_publish(id, t))
        }
        Relayed::Broker => {
            topic.split_once('/').is_some_and(|(first, _)| first == fleet_topic::level::STATUS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(role: Role, id: &str, nonce: Option<&str>) -> Identity {
        Identity {
            id: DeviceId::parse(id).unwrap(),
            role,
            serial: SerialNumber::parse("4a0b").unwrap(),
            not_after: 0,
            nonce: nonce.map(str::to_owned),
        }
    }

    #[test]
    fn origins_round_trip_and_the_acl_of_the_origin_decides() {
        let dev = identity(Role::Device, "dev-1", None);
        let back = decode_origin(&Origin::Client(&dev).encode()).unwrap();
        let Relayed::Client(got) = &back else { panic!("{back:?}") };
        assert_eq!(
            (got.role, got.id.as_str(), got.serial.to_hex()),
            (Role::Device, "dev-1", dev.serial.to_hex())
        );
        assert!(may_relay(&back, "devices/dev-1/telemetry"));
        assert!(may_relay(&back, "devices/dev-1/certs/csr"));
        // A device's identity never carries another device's CSR, nor a command.
        assert!(!may_relay(&back, "devices/dev-2/certs/csr"));
        assert!(!may_relay(&back, "devices/dev-1/commands/reboot"));
        assert!(!may_relay(&back, "claims/batch/0123456789abcdef/certs/csr"));

        let claim = identity(Role::Claim, "batch", Some("0123456789abcdef"));
        let back = decode_origin(&Origin::Client(&claim).encode()).unwrap();
        assert!(may_relay(&back, "claims/batch/0123456789abcdef/certs/csr"));
        assert!(!may_relay(&back, "claims/batch/fedcba9876543210/certs/csr"));
        assert!(!may_relay(&back, "devices/dev-1/certs/csr"));

        let svc = identity(Role::Service, "backend", None);
        let back = decode_origin(&Origin::Client(&svc).encode()).unwrap();
        assert!(may_relay(&back, "devices/dev-1/commands/reboot"));
        assert!(!may_relay(&back, "devices/dev-1/certs/csr"));

        let broker = decode_origin(&Origin::Broker.encode()).unwrap();
        assert!(may_relay(&broker, "status/devices/dev-1/commands/reboot"));
        assert!(!may_relay(&broker, "devices/dev-1/certs/csr"));
        assert!(!may_relay(&broker, "statusx/a"));
    }

    #[test]
    fn unreadable_origins_are_refused() {
        for bad in [
            "",
            "device",
            "device 4a0b",
            "device zz dev-1",
            "king 4a0b dev-1",
            "device 4a0b ../x",
            "claim 4a0b batch",
            "claim 4a0b claims/batch/short",
            "claim 4a0b claims/batch/0123456789ABCDEF",
        ] {
            assert_eq!(decode_origin(bad), None, "{bad:?}");
        }
    }
}
