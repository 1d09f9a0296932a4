//! MQTT 5 at the session's edge (docs/spec/mqtt5.md).
//!
//! A client speaks 3.1.1 or 5, chosen by its CONNECT's protocol level. Inside, the broker works in
//! one vocabulary (the 3.1.1 packets of `rumqttc::mqttbytes::v4`); this module translates a v5
//! client's packets on the way in and the broker's on the way out, and adds what only v5 can say:
//! the reason codes of every refusal and close (one table: [`connack_code`], [`disconnect_code`]),
//! the session expiry a client asks for, its Receive Maximum and Maximum Packet Size, topic aliases
//! for what it publishes, and the identifier assigned to an empty client id.
//!
//! A PUBLISH's properties become the message's [`Props`] (the session checks that a Response
//! Topic leads back to the publisher); a SUBSCRIBE's options become [`crate::message::SubOpts`].

use std::collections::HashMap;

use bytes::Bytes;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::Error as Error5;

use std::sync::Arc;

use super::wire::{qos_in, qos_out, Inbound};
use crate::clock::now_millis;
use crate::message::{Message, Props, SubOpts};
use crate::outcome::{CloseReason, Refusal};

/// The protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// The Topic Alias property's identifier (MQTT 5 §3.3.2.3.4).
const TOPIC_ALIAS_PROPERTY: u8 = 0x23;

/// Most topic aliases a v5 client may set on what it publishes (CONNACK Topic Alias Maximum).
pub(crate) const TOPIC_ALIAS_MAX: u16 = 16;

/// The protocol level of the CONNECT at the front of `buf`: `None` until enough bytes are there
/// (or when the first packet is not a CONNECT: the 3.1.1 decoder then refuses it).
pub(crate) fn protocol_level(buf: &[u8]) -> Option<u8> {
    if buf.first() != Some(&0x10) {
        return buf.first().map(|_| 4);
    }
    // Remaining length: 1 to 4 bytes.
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            break;
        }
    }
    // Protocol name (length 4, "MQTT"), then the level.
    match buf.get(i..i + 7)? {
        [0, 4, b'M', b'Q', b'T', b'T', level] => Some(*level),
        _ => Some(4),
    }
}

/// What a v5 CONNECT asks for beyond 3.1.1.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectTerms {
    /// Session Expiry Interval, seconds (0: the session ends with the connection).
    pub(crate) session_expiry: u32,
    /// Receive Maximum: QoS 1 deliveries it takes unacknowledged at once.
    pub(crate) receive_max: Option<u16>,
    /// Maximum Packet Size it accepts.
    pub(crate) max_packet: Option<u32>,
    /// It asked for reason strings (Request Problem Information, default 1).
    pub(crate) problem_info: bool,
}

/// A v5 client's state at the edge.
#[derive(Debug, Default)]
pub(crate) struct Edge {
    pub(crate) terms: ConnectTerms,
    /// Topic aliases the client set on its PUBLISHes.
    aliases: HashMap<u16, String>,
    /// A DISCONNECT's new Session Expiry Interval.
    pub(crate) disconnect_expiry: Option<u32>,
}

/// Why a v5 packet cannot be taken in.
fn decode_error(e: &Error5) -> Option<CloseReason> {
    match e {
        Error5::InsufficientBytes(_) => None,
        Error5::PayloadSizeLimitExceeded { .. } => Some(CloseReason::PacketTooLarge),
        _ => Some(CloseReason::MalformedPacket),
    }
}

impl Edge {
    /// Takes one v5 packet off `buf`, as the broker's 3.1.1 vocabulary.
    pub(crate) fn decode(
        &mut self,
        buf: &mut bytes::BytesMut,
        max_packet: usize,
    ) -> Result<Option<Inbound>, CloseReason> {
        if buf.is_empty() {
            return Ok(None);
        }
        // A DISCONNECT without properties: "normal disconnection" without a body, or a reason
        // code alone (MQTT 5 §3.14.2.1; the codec wants a body, then a property length).
        if buf[0] == 0xE0 && matches!(buf.get(1), Some(0 | 1)) {
            let len = 2 + usize::from(buf[1]);
            if buf.len() < len {
                return Ok(None);
            }
            let _ = buf.split_to(len);
            return Ok(Some(Inbound::Packet(v4::Packet::Disconnect)));
        }
        let max = u32::try_from(max_packet).unwrap_or(u32::MAX);
        // Framed first: once the whole packet is there, "more bytes" from the codec means a
        // length inside it that runs out (a 3.1.1 PUBLISH has no property length), and the
        // packet is already taken off the buffer. Malformed, not a wait for bytes.
        if let Err(e) = m5::check(buf.iter(), Some(max)) {
            return decode_error(&e).map_or(Ok(None), Err);
        }
        // AUTH: no enhanced authentication, the certificate is the identity (the codec does not
        // know the packet at all).
        if buf[0] == 0xF0 {
            return Err(CloseReason::UnexpectedPacket);
        }
        if buf[0] >> 4 == 3 {
            if let Some(m) = self.fast_publish(buf) {
                return m.map(|m| Some(Inbound::Publish(m)));
            }
        }
        let packet = m5::Packet::read(buf, Some(max))
            .map_err(|e| decode_error(&e).unwrap_or(CloseReason::MalformedPacket))?;
        Ok(Some(Inbound::Packet(match packet {
            m5::Packet::Connect(c, _will, _login) => {
                let p = c.properties.as_ref();
                // MQTT 5 §3.1.2.11: a Receive Maximum or Maximum Packet Size of 0 is a protocol
                // error; enhanced authentication is not offered (the certificate is the identity).
                let zero = p.is_some_and(|p| p.receive_maximum == Some(0) || p.max_packet_size == Some(0));
                if zero || p.is_some_and(|p| p.authentication_method.is_some()) {
                    return Err(CloseReason::MalformedPacket);
                }
                self.terms = ConnectTerms {
                    session_expiry: p.and_then(|p| p.session_expiry_interval).unwrap_or(0),
                    receive_max: p.and_then(|p| p.receive_maximum),
                    max_packet: p.and_then(|p| p.max_packet_size),
                    problem_info: p.and_then(|p| p.request_problem_info) != Some(0),
                };
                let mut connect = v4::Connect::new(c.client_id);
                connect.keep_alive = c.keep_alive;
                connect.clean_session = c.clean_start;
                v4::Packet::Connect(connect)
            }
            m5::Packet::Publish(p) => return self.publish_in(p).map(|m| Some(Inbound::Publish(m))),
            m5::Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
            m5::Packet::Subscribe(s) => {
                let id = s.properties.as_ref().and_then(|p| p.id).and_then(|id| u32::try_from(id).ok());
                let opts = |f: &m5::Filter| SubOpts {
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        m5::RetainForwardRule::OnEverySubscribe => 0,
                        m5::RetainForwardRule::OnNewSubscribe => 1,
                        m5::RetainForwardRule::Never => 2,
                    },
                    id,
                };
                let filters =
                    s.filters.into_iter().map(|f| (opts(&f), f)).map(|(o, f)| (f.path, qos_in(f.qos), o));
                return Ok(Some(Inbound::Subscribe { pkid: s.pkid, filters: filters.collect() }));
            }
            m5::Packet::Unsubscribe(u) => {
                v4::Packet::Unsubscribe(v4::Unsubscribe { pkid: u.pkid, topics: u.filters })
            }
            m5::Packet::PingReq(_) => v4::Packet::PingReq,
            m5::Packet::Disconnect(d) => {
                self.disconnect_expiry = d.properties.and_then(|p| p.session_expiry_interval);
                v4::Packet::Disconnect
            }
            m5::Packet::PubRec(_) | m5::Packet::PubRel(_) | m5::Packet::PubComp(_) => {
                return Err(CloseReason::Qos2Unsupported)
            }
            m5::Packet::Auth(_)
            | m5::Packet::ConnAck(_)
            | m5::Packet::PingResp(_)
            | m5::Packet::SubAck(_)
            | m5::Packet::UnsubAck(_) => return Err(CloseReason::UnexpectedPacket),
        })))
    }

    /// A v5 PUBLISH in the broker's vocabulary: its topic alias resolved (set when it comes with
    /// a topic, used when it comes without).
    fn publish_in(&mut self, p: m5::Publish) -> Result<Message, CloseReason> {
        let qos = qos_in(p.qos);
        if qos == QoS::ExactlyOnce {
            return Err(CloseReason::Qos2Unsupported);
        }
        let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| CloseReason::MalformedPacket)?;
        let alias = p.properties.as_ref().and_then(|props| props.topic_alias);
        let topic = self.resolve(topic, alias)?;
        let props = p.properties.map(props_in).filter(|props| !props.is_empty()).map(Arc::new);
        let mut m = Message::new(topic, qos, p.payload);
        (m.dup, m.retain, m.pkid, m.props) = (p.dup, p.retain, p.pkid, props);
        Ok(m)
    }

    /// A PUBLISH's topic with its topic alias resolved (set when it comes with a topic, used
    /// when it comes without).
    fn resolve(&mut self, topic: String, alias: Option<u16>) -> Result<String, CloseReason> {
        Ok(match alias {
            None => topic,
            Some(a) if a == 0 || a > TOPIC_ALIAS_MAX => return Err(CloseReason::TopicAliasInvalid),
            Some(a) if topic.is_empty() => {
                self.aliases.get(&a).cloned().ok_or(CloseReason::TopicAliasInvalid)?
            }
            // An alias costs room for as long as the session: never more than a topic may be.
            Some(_) if topic.len() > fleet_topic::MAX_LEN => return Err(CloseReason::TopicLimit),
            Some(a) => {
                self.aliases.insert(a, topic.clone());
                topic
            }
        })
    }

    /// The common PUBLISH read without the codec: a complete packet (framed by the caller) of
    /// QoS 0 or 1 whose only property, if any, is a topic alias (a device's telemetry). `None`
    /// for anything else (the codec reads it, and says what is wrong with it).
    fn fast_publish(&mut self, buf: &mut bytes::BytesMut) -> Option<Result<Message, CloseReason>> {
        let first = *buf.first()?;
        let qos = match (first >> 1) & 3 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => return None,
        };
        let (mut len, mut header) = (0usize, 1usize);
        loop {
            let b = *buf.get(header)?;
            len |= usize::from(b & 0x7f) << (7 * (header - 1));
            header += 1;
            if b & 0x80 == 0 {
                break;
            }
            if header > 4 {
                return None;
            }
        }
        let body = buf.get(header..header + len)?;
        let u16_at = |at: usize| Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
        let topic_len = usize::from(u16_at(0)?);
        let topic = std::str::from_utf8(body.get(2..2 + topic_len)?).ok()?;
        let mut at = 2 + topic_len;
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            _ => {
                at += 2;
                u16_at(at - 2).filter(|&p| p != 0)?
            }
        };
        let alias = match body.get(at)? {
            0 => {
                at += 1;
                None
            }
            3 if body.get(at + 1) == Some(&TOPIC_ALIAS_PROPERTY) => {
                at += 4;
                Some(u16_at(at - 2)?)
            }
            _ => return None,
        };
        let topic = topic.to_owned();
        let packet = buf.split_to(header + len).freeze();
        let payload = packet.slice(header + at..);
        Some(self.resolve(topic, alias).map(|topic| {
            let mut m = Message::new(topic, qos, payload);
            (m.dup, m.retain, m.pkid) = (first & 0x08 != 0, first & 0x01 != 0, pkid);
            m
        }))
    }

    /// The broker's packet as this v5 client gets it (`None`: not sent to v5 clients this way).
    pub(crate) fn encode(&self, p: v4::Packet) -> Option<m5::Packet> {
        Some(match p {
            v4::Packet::Publish(p) => m5::Packet::Publish(publish_out(Message::from_v4(p))),
            v4::Packet::PubAck(a) => m5::Packet::PubAck(puback(a.pkid, PubAckReason5::Success)),
            v4::Packet::PingResp => m5::Packet::PingResp(m5::PingResp),
            _ => return None,
        })
    }

    /// The largest packet this client takes, within the broker's own limit.
    pub(crate) fn max_packet(&self, broker_max: usize) -> usize {
        self.terms.max_packet.map_or(broker_max, |m| broker_max.min(usize::try_from(m).unwrap_or(usize::MAX)))
    }
}

type PubAckReason5 = m5::PubAckReason;

/// A v5 PUBLISH's properties as the broker keeps them (the topic alias stays at the edge; an
/// expiry becomes an instant).
fn props_in(p: m5::PublishProperties) -> Props {
    Props {
        payload_format: p.payload_format_indicator,
        content_type: p.content_type,
        user: p.user_properties,
        response_topic: p.response_topic,
        correlation: p.correlation_data,
        expires_at_ms: p.message_expiry_interval.map(|s| now_millis() + i64::from(s) * 1000),
    }
}

/// A message as a v5 client gets it: its properties, and what remains of its expiry.
pub(crate) fn publish_out(m: Message) -> m5::Publish {
    let ids: Vec<usize> = m.sub_ids.iter().map(|&id| id as usize).collect();
    let mut properties = m.props.as_deref().map(|p| m5::PublishProperties {
        payload_format_indicator: p.payload_format,
        message_expiry_interval: p.expiry_left(now_millis()),
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation.clone(),
        user_properties: p.user.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    });
    if !ids.is_empty() {
        properties.get_or_insert_with(Default::default).subscription_identifiers = ids;
    }
    m5::Publish {
        dup: m.dup,
        qos: qos_out(m.qos),
        retain: m.retain,
        topic: Bytes::from(m.topic.into_bytes()),
        pkid: m.pkid,
        payload: m.payload,
        properties,
    }
}

/// CONNACK properties that say nothing.
fn no_connack_properties() -> m5::ConnAckProperties {
    m5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// A v5 PUBACK.
pub(crate) fn puback(pkid: u16, reason: m5::PubAckReason) -> m5::PubAck {
    m5::PubAck { pkid, reason, properties: None }
}

/// The CONNACK reason code of a refusal at CONNECT (docs/spec/mqtt5.md has the table).
pub(crate) fn connack_code(r: Refusal) -> m5::ConnectReturnCode {
    use m5::ConnectReturnCode as C;
    match r {
        Refusal::Revoked => C::Banned,
        Refusal::CrlExpired | Refusal::RegistryUnavailable | Refusal::ClusterUnavailable => {
            C::ServerUnavailable
        }
        Refusal::ClaimBusy | Refusal::MaxConnections | Refusal::SourceLimit | Refusal::HandshakesBusy => {
            C::ServerBusy
        }
        Refusal::ClientIdMismatch => C::ClientIdentifierNotValid,
        Refusal::ProtocolError => C::ProtocolError,
        Refusal::Moved => C::ServerMoved,
        _ => C::NotAuthorized,
    }
}

/// The DISCONNECT reason code of a session the broker ends (`None`: the client left, or the
/// connection cannot carry one).
pub(crate) fn disconnect_code(end: CloseReason) -> Option<m5::DisconnectReasonCode> {
    use m5::DisconnectReasonCode as D;
    Some(match end {
        CloseReason::ClientGone | CloseReason::WriteTimeout => return None,
        CloseReason::Shutdown => D::ServerShuttingDown,
        CloseReason::Revoked | CloseReason::CertExpired => D::AdministrativeAction,
        CloseReason::Takeover => D::SessionTakenOver,
        CloseReason::TopicLimit => D::TopicNameInvalid,
        CloseReason::RetainedPerDevice | CloseReason::RetainedBytes => D::QuotaExceeded,
        CloseReason::PacketTooLarge => D::PacketTooLarge,
        CloseReason::MalformedPacket => D::MalformedPacket,
        CloseReason::KeepaliveTimeout => D::KeepAliveTimeout,
        CloseReason::Qos2Unsupported => D::QoSNotSupported,
        CloseReason::SecondConnect | CloseReason::UnexpectedPacket => D::ProtocolError,
        CloseReason::TopicAliasInvalid => D::TopicAliasInvalid,
        CloseReason::Encode | CloseReason::StoreFailed => D::UnspecifiedError,
        CloseReason::AclDenied => D::NotAuthorized,
    })
}

/// The v5 DISCONNECT the broker sends before closing (a reason string only if asked for).
pub(crate) fn disconnect(end: CloseReason, problem_info: bool) -> Option<m5::Disconnect> {
    let code = disconnect_code(end)?;
    let mut d = m5::Disconnect::new(code);
    if problem_info {
        d.properties = Some(m5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(end.label().to_owned()),
            user_properties: Vec::new(),
            server_reference: None,
        });
    }
    Some(d)
}

/// What the broker says in a v5 CONNACK that admits a session.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    pub(crate) session_present: bool,
    /// The session expiry granted (when less than asked for).
    pub(crate) session_expiry: Option<u32>,
    /// The client id assigned to an empty one.
    pub(crate) assigned_id: Option<String>,
    /// QoS 1 PUBLISHes the broker takes unacknowledged at once.
    pub(crate) receive_max: u16,
    pub(crate) max_packet: u32,
}

/// The v5 CONNACK of an admitted session: what the broker offers, truthfully.
pub(crate) fn connack_ok(a: Admitted) -> m5::ConnAck {
    m5::ConnAck {
        session_present: a.session_present,
        code: m5::ConnectReturnCode::Success,
        properties: Some(m5::ConnAckProperties {
            session_expiry_interval: a.session_expiry,
            receive_max: Some(a.receive_max),
            max_qos: Some(1),
            retain_available: Some(1),
            max_packet_size: Some(a.max_packet),
            assigned_client_identifier: a.assigned_id,
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            ..no_connack_properties()
        }),
    }
}

/// The v5 CONNACK of a refusal.
pub(crate) fn connack_refused(r: Refusal, problem_info: bool, moved_to: Option<&str>) -> m5::ConnAck {
    let server_reference = moved_to.filter(|_| r == Refusal::Moved).map(str::to_owned);
    let reason_string = problem_info.then(|| r.label().to_owned());
    m5::ConnAck {
        session_present: false,
        code: connack_code(r),
        properties: (reason_string.is_some() || server_reference.is_some()).then(|| m5::ConnAckProperties {
            reason_string,
            server_reference,
            ..no_connack_properties()
        }),
    }
}

#[cfg(test)]
mod tests;
