use super::*;
use bytes::BytesMut;

fn connect5() -> m5::Connect {
    m5::Connect { keep_alive: 30, client_id: "dev-1".into(), clean_start: true, properties: None }
}

fn encoded(p: m5::Packet) -> BytesMut {
    let mut b = BytesMut::new();
    p.write(&mut b, None).unwrap();
    b
}

#[test]
fn the_connect_says_which_protocol() {
    let mut c5 = encoded(m5::Packet::Connect(connect5(), None, None));
    assert_eq!(protocol_level(&c5), Some(5));
    assert_eq!(protocol_level(&c5[..8]), None, "not enough bytes yet");
    let mut b4 = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new("dev-1")).write(&mut b4, 1024).unwrap();
    assert_eq!(protocol_level(&b4), Some(4));
    assert_eq!(protocol_level(&[0x30, 0]), Some(4), "not a CONNECT: the 3.1.1 decoder refuses it");
    assert_eq!(protocol_level(&[]), None);
    let mut edge = Edge::default();
    assert!(
        matches!(edge.decode(&mut c5, 1024), Ok(Some(Inbound::Packet(v4::Packet::Connect(c)))) if c.client_id == "dev-1")
    );
}

#[test]
fn connect_terms_are_read() {
    let mut c = connect5();
    c.clean_start = false;
    c.properties = Some(m5::ConnectProperties {
        session_expiry_interval: Some(600),
        receive_maximum: Some(5),
        max_packet_size: Some(2048),
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: Some(0),
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    });
    let mut edge = Edge::default();
    let p = edge.decode(&mut encoded(m5::Packet::Connect(c, None, None)), 4096).unwrap();
    assert!(matches!(p, Some(Inbound::Packet(v4::Packet::Connect(c))) if !c.clean_session));
    assert_eq!(edge.terms.session_expiry, 600);
    assert_eq!(edge.terms.receive_max, Some(5));
    assert_eq!(edge.max_packet(4096), 2048);
    assert!(!edge.terms.problem_info);
}

#[test]
fn topic_aliases_resolve_and_a_bad_one_is_refused() {
    let mut edge = Edge::default();
    let mut first = m5::Publish::new("devices/dev-1/telemetry", qos_out(QoS::AtLeastOnce), "a", None);
    first.pkid = 1;
    first.properties = Some(m5::PublishProperties { topic_alias: Some(3), ..Default::default() });
    let mut later = m5::Publish::new("", qos_out(QoS::AtLeastOnce), "b", None);
    later.pkid = 2;
    later.properties = Some(m5::PublishProperties { topic_alias: Some(3), ..Default::default() });
    let mut buf = encoded(m5::Packet::Publish(first));
    buf.extend_from_slice(&encoded(m5::Packet::Publish(later.clone())));
    let topics: Vec<String> = (0..2)
        .map(|_| match edge.decode(&mut buf, 4096) {
            Ok(Some(Inbound::Publish(m))) => m.topic,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(topics, ["devices/dev-1/telemetry", "devices/dev-1/telemetry"]);
    let mut unknown = later.clone();
    unknown.properties = Some(m5::PublishProperties { topic_alias: Some(4), ..Default::default() });
    assert_eq!(
        Edge::default().decode(&mut encoded(m5::Packet::Publish(unknown)), 4096).err(),
        Some(CloseReason::TopicAliasInvalid)
    );
    let mut over = later;
    over.properties =
        Some(m5::PublishProperties { topic_alias: Some(TOPIC_ALIAS_MAX + 1), ..Default::default() });
    over.topic = Bytes::from_static(b"devices/dev-1/t");
    assert_eq!(
        edge.decode(&mut encoded(m5::Packet::Publish(over)), 4096).err(),
        Some(CloseReason::TopicAliasInvalid)
    );
}

#[test]
fn an_empty_disconnect_is_a_normal_one_and_one_with_expiry_is_read() {
    let mut edge = Edge::default();
    let mut buf = BytesMut::from(&[0xE0u8, 0x00][..]);
    assert!(matches!(edge.decode(&mut buf, 4096), Ok(Some(Inbound::Packet(v4::Packet::Disconnect)))));
    // A reason code alone (here: with Will Message) is a DISCONNECT too, not malformed.
    let mut buf = BytesMut::from(&[0xE0u8, 0x01][..]);
    assert!(matches!(edge.decode(&mut buf, 4096), Ok(None)), "the reason code is still coming");
    buf.extend_from_slice(&[0x04]);
    assert!(matches!(edge.decode(&mut buf, 4096), Ok(Some(Inbound::Packet(v4::Packet::Disconnect)))));
    assert!(buf.is_empty());
    let mut d = m5::Disconnect::new(m5::DisconnectReasonCode::NormalDisconnection);
    d.properties = Some(m5::DisconnectProperties {
        session_expiry_interval: Some(0),
        reason_string: None,
        user_properties: Vec::new(),
        server_reference: None,
    });
    assert!(matches!(
        edge.decode(&mut encoded(m5::Packet::Disconnect(d)), 4096),
        Ok(Some(Inbound::Packet(v4::Packet::Disconnect)))
    ));
    assert_eq!(edge.disconnect_expiry, Some(0));
}

#[test]
fn a_length_that_runs_out_inside_a_whole_packet_is_malformed_and_a_partial_one_waits() {
    // A 3.1.1 QoS 1 PUBLISH with an empty payload: no property length after the packet id.
    let mut b4 = BytesMut::new();
    let mut p = v4::Publish::new("devices/dev-1/state", QoS::AtLeastOnce, "");
    p.pkid = 1;
    v4::Packet::Publish(p).write(&mut b4, 4096).unwrap();
    let mut edge = Edge::default();
    assert_eq!(edge.decode(&mut b4.clone(), 4096).err(), Some(CloseReason::MalformedPacket));
    let mut partial = BytesMut::from(&b4[..b4.len() - 1]);
    assert!(matches!(edge.decode(&mut partial, 4096), Ok(None)), "not all there yet");
    assert_eq!(partial.len(), b4.len() - 1, "nothing taken");
    for auth in [&[0xF0u8, 0x00][..], &[0xF0, 0x02, 0x18, 0x00]] {
        let mut auth = BytesMut::from(auth);
        assert_eq!(edge.decode(&mut auth, 4096).err(), Some(CloseReason::UnexpectedPacket), "{auth:?}");
    }
}

#[test]
fn every_broker_close_has_a_reason_code_and_the_client_leaving_has_none() {
    for end in CloseReason::ALL {
        let code = disconnect_code(end);
        assert_eq!(
            code.is_none(),
            matches!(end, CloseReason::ClientGone | CloseReason::WriteTimeout),
            "{end:?}"
        );
    }
    assert_eq!(disconnect_code(CloseReason::Revoked), Some(m5::DisconnectReasonCode::AdministrativeAction));
    assert_eq!(disconnect_code(CloseReason::Takeover), Some(m5::DisconnectReasonCode::SessionTakenOver));
    assert_eq!(connack_code(Refusal::Revoked), m5::ConnectReturnCode::Banned);
    assert_eq!(connack_code(Refusal::UnknownDevice), m5::ConnectReturnCode::NotAuthorized);
    // A reason string only for a client that asked for problem information.
    assert!(disconnect(CloseReason::Revoked, false).is_some_and(|d| d.properties.is_none()));
    assert!(connack_refused(Refusal::Revoked, false, None).properties.is_none());
    // A moved node names the new server; no other refusal does, even when it is configured.
    let moved = connack_refused(Refusal::Moved, false, Some("fleet-2.example:8883"));
    assert_eq!(moved.code, m5::ConnectReturnCode::ServerMoved);
    assert_eq!(moved.properties.and_then(|p| p.server_reference).as_deref(), Some("fleet-2.example:8883"));
    let other = connack_refused(Refusal::Revoked, false, Some("fleet-2.example:8883"));
    assert!(other.properties.is_none());
}
