//! What a client sends and what it is answered, whatever protocol it speaks: the session's
//! vocabulary between the connection ([`super::conn`]) and the v5 edge ([`super::v5`]).

use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5 as m5;

use crate::message::{Message, SubOpts};

/// What a client sent: a message, a subscription, or another packet (never a PUBLISH or
/// SUBSCRIBE).
#[derive(Debug)]
pub(crate) enum Inbound {
    Publish(Message),
    Subscribe { pkid: u16, filters: Vec<(String, QoS, SubOpts)> },
    Packet(Packet),
}

impl Inbound {
    pub(crate) fn v4(p: Packet) -> Self {
        match p {
            Packet::Publish(p) => Self::Publish(Message::from_v4(p)),
            Packet::Subscribe(s) => Self::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, f.qos, SubOpts::default())).collect(),
            },
            p => Self::Packet(p),
        }
    }
}

/// How a QoS 1 PUBLISH ended, for its PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Stored (or routed): acknowledged.
    Done,
    /// Not stored: no PUBACK, and the session ends (the client retransmits).
    Failed,
    /// Refused: a v5 client gets a PUBACK with the reason, a 3.1.1 client a plain PUBACK.
    Refused(PubRefusal),
}

/// Why a QoS 1 PUBLISH was not taken, as a v5 PUBACK says it (a 3.1.1 client is cut instead, or
/// gets a PUBACK as before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PubRefusal {
    /// The ACL refuses the topic (0x87).
    NotAuthorized,
    /// A rate or quota (0x97).
    QuotaExceeded,
}

impl PubRefusal {
    pub(crate) fn code(self) -> m5::PubAckReason {
        match self {
            Self::NotAuthorized => m5::PubAckReason::NotAuthorized,
            Self::QuotaExceeded => m5::PubAckReason::QuotaExceeded,
        }
    }
}

/// The answer to one SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubResult {
    /// Granted at this QoS.
    Granted(QoS),
    /// The ACL refuses it (v5 0x87).
    NotAuthorized,
    /// Not a valid filter, or over the topic limits (v5 0x8F).
    Invalid,
    /// Over the subscription cap (v5 0x97).
    Quota,
}

impl SubResult {
    pub(crate) fn v4(self) -> v4::SubscribeReasonCode {
        match self {
            Self::Granted(q) => v4::SubscribeReasonCode::Success(q),
            _ => v4::SubscribeReasonCode::Failure,
        }
    }

    pub(crate) fn v5(self) -> m5::SubscribeReasonCode {
        match self {
            Self::Granted(q) => m5::SubscribeReasonCode::Success(qos_out(q)),
            Self::NotAuthorized => m5::SubscribeReasonCode::NotAuthorized,
            Self::Invalid => m5::SubscribeReasonCode::TopicFilterInvalid,
            Self::Quota => m5::SubscribeReasonCode::QuotaExceeded,
        }
    }
}

/// A v5 QoS in the broker's vocabulary.
pub(crate) fn qos_in(q: rumqttc::v5::mqttbytes::QoS) -> QoS {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    match q {
        Q5::AtMostOnce => QoS::AtMostOnce,
        Q5::AtLeastOnce => QoS::AtLeastOnce,
        Q5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The broker's QoS as a v5 packet carries it.
pub(crate) fn qos_out(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    match q {
        QoS::AtMostOnce => Q5::AtMostOnce,
        QoS::AtLeastOnce => Q5::AtLeastOnce,
        QoS::ExactlyOnce => Q5::ExactlyOnce,
    }
}
