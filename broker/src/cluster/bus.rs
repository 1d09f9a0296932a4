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

use std::sync::Arc;

use async_nats::HeaderMap;
use fleet_registry::{DeviceId, Role, SerialNumber};
use rumqttc::mqttbytes::QoS;
use tracing::{debug, warn};

use super::stream;
use crate::auth::{self, Identity, Topic};
use crate::message::{Message, Props};
use crate::observe::metrics::Metrics;
use crate::outcome::BusRefusal;

/// Header carrying the QoS a message was published with.
pub(crate) const QOS: &str = "Fleet-QoS";
/// Header set on retained messages.
pub(crate) const RETAIN: &str = "Fleet-Retain";

/// Header naming the node that published a message.
pub(crate) const NODE: &str = "Fleet-Node";
/// Header naming the client a routed message came from.
pub(crate) const ORIGIN: &str = "Fleet-Origin";
/// The origin of what a node publishes itself.
const BROKER: &str = "broker";
/// The origin of what a node publishes on a service's Response Topic: `reply <service id>`.
const REPLY: &str = "reply";

/// Who published a routed message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Origin<'a> {
    /// A client this node admitted.
    Client(&'a Identity),
    /// This node itself (command status).
    Broker,
    /// This node, answering the service with this id on its command's Response Topic (MQTT 5
    /// request/response).
    Reply(&'a str),
}

impl Origin<'_> {
    /// The header value.
    pub(crate) fn encode(self) -> String {
        match self {
            Origin::Client(id) => format!("{} {} {}", id.role.as_str(), id.serial.to_hex(), id.session_key()),
            Origin::Broker => BROKER.to_owned(),
            Origin::Reply(service) => format!("{REPLY} {service}"),
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
    /// That node, answering this service on its Response Topic.
    Reply(Identity),
}

/// Reads a `Fleet-Origin` value (`None`: unreadable).
pub(crate) fn decode_origin(v: &str) -> Option<Relayed> {
    if v == BROKER {
        return Some(Relayed::Broker);
    }
    if let Some(service) = v.strip_prefix(REPLY).and_then(|rest| rest.strip_prefix(' ')) {
        let id = DeviceId::parse(service).ok()?;
        // The serial plays no part in the subscribe ACL; the service's is not carried.
        let serial = SerialNumber::parse("01").ok()?;
        return Some(Relayed::Reply(Identity {
            id,
            role: Role::Service,
            serial,
            not_after: i64::MAX,
            nonce: None,
        }));
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
/// topic must pass its publish ACL; a node publishes only command status, and a service's
/// answers on a topic that service may subscribe to (its Response Topic was held to that).
pub(crate) fn may_relay(origin: &Relayed, topic: &str) -> bool {
    match origin {
        Relayed::Client(id) => {
            id.role != Role::Operator && Topic::parse(topic).is_ok_and(|t| auth::may_publish(id, t))
        }
        // A node's own: statuses, and the wake-up of a campaign's offer (a copy of a command
        // already in the shared queue, `devices/<id>/commands/ota/offer`).
        Relayed::Broker => {
            topic.split_once('/').is_some_and(|(first, _)| first == fleet_topic::level::STATUS)
                || auth::is_ota_offer(topic)
        }
        Relayed::Reply(service) => Topic::parse(topic)
            .is_ok_and(|t| auth::may_be_answered_on(service, t) && auth::broker_may_answer_on(None, t)),
    }
}

/// A routed message from another node as this node's message, if this node may hand it to its
/// subscribers (`bus`: from a node, with an origin whose ACL allows the topic). `topic`: the
/// topic its subject names, if it names one.
pub(crate) fn relayable(m: &async_nats::Message, topic: Option<String>) -> Result<Message, BusRefusal> {
    if !from_node(m.headers.as_ref()) {
        return Err(BusRefusal::NotFromNode);
    }
    let topic = topic.ok_or(BusRefusal::BadSubject)?;
    let header = |name: &str| m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
    let origin = header(ORIGIN).and_then(decode_origin).ok_or(BusRefusal::NoOrigin)?;
    if !may_relay(&origin, &topic) {
        return Err(BusRefusal::OriginDenied);
    }
    let qos = if header(QOS) == Some("1") { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    let mut p = Message::new(topic, qos, m.payload.clone());
    p.retain = header(RETAIN) == Some("1");
    p.props =
        header(stream::PROPERTIES).and_then(Props::from_json).filter(|props| !props.is_empty()).map(Arc::new);
    Ok(p)
}

/// [`relayable`], counting and logging a refusal.
pub(crate) fn admitted(m: &async_nats::Message, topic: Option<String>, metrics: &Metrics) -> Option<Message> {
    relayable(m, topic)
        .inspect_err(|why| {
            metrics.bus_refused(*why);
            warn_refused(*why, m.subject.as_str());
        })
        .ok()
}

/// The headers of a message this node sends the others: `Fleet-Node`, `Fleet-Origin`, the QoS,
/// the retain flag and the MQTT 5 properties (while they fit the server's `max_payload`).
pub(crate) fn headers(node_id: u64, p: &Message, origin: &str, max_payload: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NODE, node_id.to_string().as_str());
    headers.insert(ORIGIN, origin);
    headers.insert(QOS, if p.qos == QoS::AtMostOnce { "0" } else { "1" });
    if p.retain {
        headers.insert(RETAIN, "1");
    }
    if let Some(props) = &p.props {
        let json = props.to_json();
        if stream::props_fit(max_payload, p.payload.len(), &json) {
            headers.insert(stream::PROPERTIES, json.as_str());
        } else {
            debug!(topic = p.topic.as_str(), "properties too large for the bus: relayed without them");
        }
    }
    headers
}

/// Logs a refused bus message, at most once a second per process (a flood is counted, not
/// logged line by line).
fn warn_refused(why: BusRefusal, subject: &str) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::clock::now_unix().max(0) as u64;
    if LAST.swap(now, Relaxed) != now {
        warn!(reason = why.label(), %subject, "cluster bus: message refused (fleet_cluster_refused_total)");
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

        // A node answering a service on its Response Topic: only where the service may read.
        let reply = decode_origin(&Origin::Reply("backend").encode()).unwrap();
        assert!(may_relay(&reply, "devices/dev-1/responses/r-7"));
        assert!(!may_relay(&reply, "devices/dev-1/telemetry"), "never a device's data");
        assert!(may_relay(&reply, "status/devices/dev-1/commands/reboot"));
        assert!(!may_relay(&reply, "devices/+/responses/r-7"), "a filter is no topic");
        assert!(!may_relay(&reply, "claims/batch/0123456789abcdef/certs/csr"));
        assert!(!may_relay(&reply, "elsewhere/x"));
        assert!(!may_relay(&reply, "devices/dev-1/commands/unlock"), "never a command");
        assert!(!may_relay(&reply, "devices/dev-1/certs/issued"), "never a certificate answer");

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
            "reply",
            "reply ",
            "reply ../x",
            "replyx backend",
        ] {
            assert_eq!(decode_origin(bad), None, "{bad:?}");
        }
    }
}
