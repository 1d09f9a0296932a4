//! MQTT 5 for the device (feature `mqtt5`, docs/spec/mqtt5.md): what differs from 3.1.1 on the
//! wire, encoded into and decoded from the same buffers as [`super::codec`], no allocation.
//!
//! What a device sends: CONNECT with Session Expiry Interval and Receive Maximum; PUBLISH with a
//! topic alias (set once per connection, then the topic is left empty); SUBSCRIBE with an
//! options byte; PUBACK, PINGREQ and DISCONNECT are byte for byte the 3.1.1 packets. What it
//! reads: CONNACK, PUBACK, SUBACK and DISCONNECT with their reason codes (properties skipped),
//! PUBLISH with its properties skipped. It asks for no topic aliases from the broker (Topic
//! Alias Maximum 0), so a PUBLISH carrying one is malformed.

use super::codec::{
    frame, publish_head, read_u16, DecodeError, EncodeError, Packet, Publish, SubscribeFilters, Writer,
};

/// Property identifiers used here (MQTT 5 §2.2.2.2).
const SESSION_EXPIRY: u8 = 0x11;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS: u8 = 0x23;

/// How a PUBLISH names its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alias {
    /// The topic, no alias.
    None,
    /// The topic, and it sets this alias.
    Set(u16),
    /// The alias alone (empty topic): set earlier on this connection.
    Use(u16),
}

/// CONNECT v5: no will, no credentials (the identity is the certificate).
pub fn encode_connect(
    client_id: &str,
    keep_alive: u16,
    clean_start: bool,
    session_expiry: u32,
    receive_max: u16,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let props = 5 + 3;
    let mut w = Writer::new(out);
    w.header(0x10, 10 + 1 + props + 2 + client_id.len())?;
    w.str("MQTT")?;
    w.u8(5)?;
    w.u8(if clean_start { 0x02 } else { 0 })?;
    w.u16(keep_alive)?;
    w.u8(props as u8)?;
    w.u8(SESSION_EXPIRY)?;
    w.bytes(&session_expiry.to_be_bytes())?;
    w.u8(RECEIVE_MAXIMUM)?;
    w.u16(receive_max.max(1))?;
    w.str(client_id)?;
    Ok(w.at())
}

/// PUBLISH v5 with its topic named as `alias` says.
pub fn encode_publish(p: &Publish<'_>, alias: Alias, out: &mut [u8]) -> Result<usize, EncodeError> {
    let (topic, id) = match alias {
        Alias::None => (p.topic, None),
        Alias::Set(a) => (p.topic, Some(a)),
        Alias::Use(a) => ("", Some(a)),
    };
    let pkid_len = if p.pkid.is_some() { 2 } else { 0 };
    let props = if id.is_some() { 3 } else { 0 };
    let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
    let mut w = Writer::new(out);
    w.header(first, 2 + topic.len() + pkid_len + 1 + props + p.payload.len())?;
    w.str(topic)?;
    if let Some(pkid) = p.pkid {
        w.u16(pkid)?;
    }
    w.u8(props as u8)?;
    if let Some(a) = id {
        w.u8(TOPIC_ALIAS)?;
        w.u16(a)?;
    }
    w.bytes(p.payload)?;
    Ok(w.at())
}

/// SUBSCRIBE v5: no properties; each filter's options byte is its QoS (No Local, Retain As
/// Published and Retain Handling 0).
pub fn encode_subscribe(
    pkid: u16,
    filters: SubscribeFilters<'_>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let len = 2 + 1 + filters.iter().map(|(f, _)| 2 + f.len() + 1).sum::<usize>();
    let mut w = Writer::new(out);
    w.header(0x82, len)?;
    w.u16(pkid)?;
    w.u8(0)?;
    for (f, q) in filters.iter() {
        w.str(f)?;
        w.u8(q as u8)?;
    }
    Ok(w.at())
}

/// The properties at `at` (a variable-byte length, then that many bytes): the offset after them.
fn skip_properties(b: &[u8], at: usize) -> Result<usize, DecodeError> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *b.get(at + i).ok_or(DecodeError::Malformed("property length"))?;
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let end = at + i + 1 + len;
            return if end > b.len() {
                Err(DecodeError::Malformed("properties beyond the packet"))
            } else {
                Ok(end)
            };
        }
    }
    Err(DecodeError::Malformed("property length"))
}

/// Property identifier of the Server Reference (a UTF-8 string).
const SERVER_REFERENCE: u8 = 0x1C;

/// The Server Reference among the properties at `at` (a variable-byte length, then the
/// properties), if there is one; every property is walked by its type, so a lying length is
/// malformed.
fn server_reference(b: &[u8], at: usize) -> Result<Option<&str>, DecodeError> {
    let end = skip_properties(b, at)?;
    // The length took 1 to 4 bytes: the properties start after its last byte.
    let mut i = at;
    while b[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let bad = DecodeError::Malformed("CONNACK or DISCONNECT properties");
    let mut found = None;
    while i < end {
        let id = b[i];
        i += 1;
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => {
                // A variable-byte integer: up to 4 bytes, the last without the top bit.
                let n = b[i..end.min(i + 4)].iter().position(|x| x & 0x80 == 0).ok_or(bad)?;
                n + 1
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => 2 + usize::from(read_u16(b, i)?),
            0x26 => {
                let k = 2 + usize::from(read_u16(b, i)?);
                k + 2 + usize::from(read_u16(b, i + k)?)
            }
            _ => return Err(bad),
        };
        if i + len > end {
            return Err(bad);
        }
        if id == SERVER_REFERENCE {
            found = Some(core::str::from_utf8(&b[i + 2..i + len]).map_err(|_| bad)?);
        }
        i += len;
    }
    Ok(found)
}

/// A CONNACK or DISCONNECT with `code` and the properties at `at`: [`Packet::Moved`] when it
/// sends the client elsewhere and says where, else `plain`.
fn moved_or<'a>(b: &'a [u8], at: usize, code: u8, plain: Packet<'a>) -> Result<Packet<'a>, DecodeError> {
    if !matches!(code, 0x9C | 0x9D) || at >= b.len() {
        return Ok(plain);
    }
    Ok(match server_reference(b, at)? {
        Some(reference) if !reference.is_empty() => Packet::Moved { code, reference },
        _ => plain,
    })
}

/// The reason code at `at`; success when the packet ends before it.
fn reason_at(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Decodes one packet a broker sends a v5 client. CONNACK, PUBACK, SUBACK and DISCONNECT carry
/// their reason codes (`code`, `reason`); a PUBACK that refused its message is
/// [`Packet::PubRefused`], a DISCONNECT from the broker [`Packet::ServerDisconnect`].
pub fn decode(buf: &[u8], max_size: usize) -> Result<(Packet<'_>, usize), DecodeError> {
    let (first, body, total) = frame(buf, max_size)?;
    let packet = match first {
        0x20 => {
            if body.len() < 2 || body[0] & 0xfe != 0 {
                return Err(DecodeError::Malformed("CONNACK"));
            }
            if body.len() > 2 {
                skip_properties(body, 2)?;
            }
            let plain = Packet::ConnAck { session_present: body[0] & 1 == 1, code: body[1] };
            moved_or(body, 2, body[1], plain)?
        }
        0x40 => {
            let pkid = read_u16(body, 0)?;
            match reason_at(body, 2) {
                0 | 0x10 => Packet::PubAck { pkid },
                reason => Packet::PubRefused { pkid, reason },
            }
        }
        0x90 => {
            let pkid = read_u16(body, 0)?;
            let at = skip_properties(body, 2)?;
            let codes = &body[at..];
            if codes.is_empty() {
                return Err(DecodeError::Malformed("SUBACK without reason codes"));
            }
            Packet::SubAck { pkid, codes }
        }
        0xd0 if body.is_empty() => Packet::PingResp,
        0xe0 => {
            let reason = reason_at(body, 0);
            moved_or(body, 1, reason, Packet::ServerDisconnect { reason })?
        }
        f if f >> 4 == 3 => decode_publish(f & 0x0f, body)?,
        _ => return Err(DecodeError::Malformed("packet type not expected from a broker")),
    };
    Ok((packet, total))
}

fn decode_publish(flags: u8, body: &[u8]) -> Result<Packet<'_>, DecodeError> {
    // An empty topic would need a broker alias, and this client allows none: malformed.
    let (qos, dup, topic, pkid, at) = publish_head(flags, body)?;
    let end = skip_properties(body, at)?;
    Ok(Packet::Publish(Publish { topic, payload: &body[end..], qos, retain: flags & 1 != 0, dup, pkid }))
}

/// What a CONNACK or DISCONNECT reason code means for the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again with the usual back-off.
    Soon,
    /// Not before a long wait: the broker will not admit this identity now (banned, not
    /// authorised, revoked while connected); hammering it changes nothing.
    MuchLater,
}

impl Retry {
    /// For a CONNACK or DISCONNECT reason code.
    pub fn after(reason: u8) -> Retry {
        match reason {
            // Not authorized, banned, client id not valid, bad user name or password,
            // administrative action (a live revocation).
            0x85 | 0x86 | 0x87 | 0x8A | 0x98 => Retry::MuchLater,
            _ => Retry::Soon,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::QoS;
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5 as m5;

    fn theirs(bytes: &[u8]) -> m5::Packet {
        let mut b = BytesMut::from(bytes);
        let p = m5::Packet::read(&mut b, None).expect("rumqttc decodes it");
        assert!(b.is_empty(), "trailing bytes");
        p
    }

    fn ours(p: m5::Packet) -> std::vec::Vec<u8> {
        let mut b = BytesMut::new();
        p.write(&mut b, None).expect("rumqttc encodes it");
        b.to_vec()
    }

    #[test]
    fn connect_carries_session_expiry_and_receive_maximum() {
        let mut buf = [0u8; 64];
        let n = encode_connect("dev-1", 30, false, 600, 1, &mut buf).unwrap();
        let m5::Packet::Connect(c, None, None) = theirs(&buf[..n]) else { panic!("not a CONNECT") };
        assert_eq!((c.client_id.as_str(), c.keep_alive, c.clean_start), ("dev-1", 30, false));
        let p = c.properties.expect("properties");
        assert_eq!((p.session_expiry_interval, p.receive_maximum), (Some(600), Some(1)));
    }

    #[test]
    fn publish_names_its_topic_by_alias_once_set() {
        let p = Publish {
            topic: "devices/dev-1/telemetry",
            payload: b"21.5",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: Some(7),
        };
        let mut buf = [0u8; 64];
        for (alias, topic, id) in [
            (Alias::None, "devices/dev-1/telemetry", None),
            (Alias::Set(1), "devices/dev-1/telemetry", Some(1)),
            (Alias::Use(1), "", Some(1)),
        ] {
            let n = encode_publish(&p, alias, &mut buf).unwrap();
            let m5::Packet::Publish(got) = theirs(&buf[..n]) else { panic!("not a PUBLISH") };
            assert_eq!((&got.topic[..], got.pkid, &got.payload[..]), (topic.as_bytes(), 7, &b"21.5"[..]));
            assert_eq!(got.properties.and_then(|p| p.topic_alias), id);
        }
    }

    #[test]
    fn subscribe_is_read_by_rumqttc() {
        let mut buf = [0u8; 64];
        let list = [("devices/dev-1/commands/#", QoS::AtLeastOnce)];
        let n = encode_subscribe(3, SubscribeFilters::List(&list), &mut buf).unwrap();
        let m5::Packet::Subscribe(s) = theirs(&buf[..n]) else { panic!("not a SUBSCRIBE") };
        assert_eq!(
            (s.pkid, s.filters[0].path.as_str(), s.filters[0].nolocal),
            (3, "devices/dev-1/commands/#", false)
        );
    }

    #[test]
    fn what_a_broker_sends_decodes_with_its_reason_codes() {
        let mut ack =
            m5::ConnAck { session_present: true, code: m5::ConnectReturnCode::Success, properties: None };
        let bytes = ours(m5::Packet::ConnAck(ack.clone()));
        assert_eq!(decode(&bytes, 1024).unwrap().0, Packet::ConnAck { session_present: true, code: 0 });
        ack.code = m5::ConnectReturnCode::Banned;
        ack.session_present = false;
        let bytes = ours(m5::Packet::ConnAck(ack));
        assert_eq!(decode(&bytes, 1024).unwrap().0, Packet::ConnAck { session_present: false, code: 0x8A });
        let refused = m5::PubAck { pkid: 9, reason: m5::PubAckReason::NotAuthorized, properties: None };
        let bytes = ours(m5::Packet::PubAck(refused));
        assert_eq!(decode(&bytes, 1024).unwrap().0, Packet::PubRefused { pkid: 9, reason: 0x87 });
        let ok = ours(m5::Packet::PubAck(m5::PubAck {
            pkid: 9,
            reason: m5::PubAckReason::Success,
            properties: None,
        }));
        assert_eq!(decode(&ok, 1024).unwrap().0, Packet::PubAck { pkid: 9 });
        let d =
            ours(m5::Packet::Disconnect(m5::Disconnect::new(m5::DisconnectReasonCode::AdministrativeAction)));
        assert_eq!(decode(&d, 1024).unwrap().0, Packet::ServerDisconnect { reason: 0x98 });
        assert_eq!(decode(&[0xe0, 0], 1024).unwrap().0, Packet::ServerDisconnect { reason: 0 });
        let mut publish = m5::Publish::new(
            "devices/dev-1/commands/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            "go",
            None,
        );
        publish.pkid = 4;
        publish.properties = Some(m5::PublishProperties {
            message_expiry_interval: Some(60),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        });
        let bytes = ours(m5::Packet::Publish(publish));
        let (Packet::Publish(p), used) = decode(&bytes, 1024).unwrap() else { panic!("not a PUBLISH") };
        assert_eq!(
            (p.topic, p.payload, p.pkid, used),
            ("devices/dev-1/commands/x", &b"go"[..], Some(4), bytes.len())
        );
        let suback = m5::SubAck {
            pkid: 3,
            return_codes: vec![
                m5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                m5::SubscribeReasonCode::NotAuthorized,
            ],
            properties: None,
        };
        let bytes = ours(m5::Packet::SubAck(suback));
        assert_eq!(decode(&bytes, 1024).unwrap().0, Packet::SubAck { pkid: 3, codes: &[1, 0x87] });
    }

    #[test]
    fn truncated_and_lying_properties_are_malformed_never_a_panic() {
        // A CONNACK whose property length runs past the packet.
        assert!(matches!(decode(&[0x20, 3, 0, 0, 9], 64), Err(DecodeError::Malformed(_))));
        // A PUBLISH property length of five bytes.
        let bad = [0x30, 9, 0, 1, b't', 0xff, 0xff, 0xff, 0xff, 0x7f, 0];
        assert!(decode(&bad, 64).is_err());
        for cut in 0..12 {
            let _ = decode(&bad[..cut.min(bad.len())], 64);
        }
        assert_eq!(Retry::after(0x98), Retry::MuchLater);
        assert_eq!(Retry::after(0x8B), Retry::Soon);
    }

    #[test]
    fn a_broker_that_sends_the_device_elsewhere_names_the_server() {
        // As fleet-broker (and rumqttc) write them: every other CONNACK property around it.
        let ack = m5::ConnAck {
            session_present: false,
            code: m5::ConnectReturnCode::ServerMoved,
            properties: Some(m5::ConnAckProperties {
                session_expiry_interval: Some(60),
                receive_max: Some(10),
                max_qos: Some(1),
                retain_available: Some(1),
                max_packet_size: Some(4096),
                assigned_client_identifier: Some("dev-1".into()),
                topic_alias_max: Some(16),
                reason_string: Some("moved".into()),
                user_properties: vec![("k".into(), "v".into())],
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(1),
                shared_subscription_available: Some(1),
                server_keep_alive: Some(30),
                response_information: Some("r".into()),
                server_reference: Some("fleet-2.example:8883".into()),
                authentication_method: None,
                authentication_data: Some(bytes::Bytes::from_static(b"x")),
            }),
        };
        let bytes = ours(m5::Packet::ConnAck(ack.clone()));
        assert_eq!(
            decode(&bytes, 1024).unwrap().0,
            Packet::Moved { code: 0x9D, reference: "fleet-2.example:8883" }
        );
        let mut d = m5::Disconnect::new(m5::DisconnectReasonCode::UseAnotherServer);
        d.properties = Some(m5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some("drain".into()),
            user_properties: Vec::new(),
            server_reference: Some("other:1883".into()),
        });
        let bytes = ours(m5::Packet::Disconnect(d));
        assert_eq!(decode(&bytes, 1024).unwrap().0, Packet::Moved { code: 0x9C, reference: "other:1883" });
        // Without a reference it is a refusal like any other; a reference on another code is
        // not followed.
        let bare = ours(m5::Packet::ConnAck(m5::ConnAck { properties: None, ..ack.clone() }));
        assert_eq!(decode(&bare, 1024).unwrap().0, Packet::ConnAck { session_present: false, code: 0x9D });
        let banned = ours(m5::Packet::ConnAck(m5::ConnAck { code: m5::ConnectReturnCode::Banned, ..ack }));
        assert_eq!(decode(&banned, 1024).unwrap().0, Packet::ConnAck { session_present: false, code: 0x8A });
        // A property whose length runs past the properties, an unknown property: malformed.
        assert!(decode(&[0x20, 7, 0, 0x9D, 4, 0x1C, 0, 9, b'h'], 64).is_err());
        assert!(decode(&[0x20, 5, 0, 0x9D, 2, 0x7F, 0], 64).is_err());
        assert!(decode(&[0xe0, 6, 0x9C, 4, 0x1C, 0, 1, 0xff], 64).is_err(), "not UTF-8");
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut], 64);
        }
    }
}
