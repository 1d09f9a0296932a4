//! The device codec against rumqttc's `mqttbytes` (the broker's codec): every packet one encodes,
//! the other decodes to the same thing. Deterministic pseudo-random packets cover sizes around
//! every remaining-length boundary.
#![allow(clippy::unwrap_used)] // test code

use bytes::BytesMut;
use fleet_device::mqtt::codec::{decode, Packet, Publish, QoS, SubscribeFilters};
use rumqttc::mqttbytes::v4 as theirs;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn their_qos(q: QoS) -> rumqttc::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

#[test]
fn publish_both_ways() {
    let mut rng = Lcg(7);
    let payload: Vec<u8> = (0..20_000).map(|i| (i * 31 % 251) as u8).collect();
    let sizes = [0usize, 1, 100, 120, 121, 122, 127, 128, 16_250, 16_380, 16_384, 19_000];
    for (i, &size) in sizes.iter().cycle().take(200).enumerate() {
        let topic = format!("devices/dev-{}/telemetry/{}", rng.next() % 1000, i);
        let qos = if rng.next().is_multiple_of(2) { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        let pkid = (qos != QoS::AtMostOnce).then(|| (rng.next() % 65535 + 1) as u16);
        let retain = rng.next().is_multiple_of(2);
        let ours = Publish { topic: &topic, payload: &payload[..size], qos, retain, dup: false, pkid };
        // Ours → theirs.
        let mut out = vec![0u8; size + 200];
        let n = Packet::Publish(ours).encode(&mut out).unwrap();
        let mut buf = BytesMut::from(&out[..n]);
        match theirs::Packet::read(&mut buf, 1 << 20).unwrap() {
            theirs::Packet::Publish(p) => {
                assert_eq!(p.topic, topic);
                assert_eq!(&p.payload[..], &payload[..size]);
                assert_eq!(p.qos, their_qos(qos));
                assert_eq!(p.retain, retain);
                assert_eq!(p.pkid, pkid.unwrap_or(0));
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
        // Theirs → ours.
        let mut p = theirs::Publish::new(&topic, their_qos(qos), payload[..size].to_vec());
        p.pkid = pkid.unwrap_or(0);
        p.retain = retain;
        let mut buf = BytesMut::new();
        theirs::Packet::Publish(p).write(&mut buf, 1 << 20).unwrap();
        let (decoded, used) = decode(&buf, 1 << 20).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(decoded, Packet::Publish(ours));
    }
}

#[test]
fn control_packets_both_ways() {
    // CONNECT (ours) → theirs.
    let mut out = [0u8; 128];
    let n = Packet::Connect { client_id: "dev-0a1b2c3d4e5f", keep_alive: 45, clean_session: true }
        .encode(&mut out)
        .unwrap();
    match theirs::Packet::read(&mut BytesMut::from(&out[..n]), 1024).unwrap() {
        theirs::Packet::Connect(c) => {
            assert_eq!((c.client_id.as_str(), c.keep_alive, c.clean_session), ("dev-0a1b2c3d4e5f", 45, true));
            assert!(c.login.is_none() && c.last_will.is_none());
        }
        other => panic!("{other:?}"),
    }
    // SUBSCRIBE (ours) → theirs.
    let filters = [("devices/dev-1/commands/#", QoS::AtLeastOnce), ("devices/dev-1/config", QoS::AtMostOnce)];
    let n =
        Packet::Subscribe { pkid: 3, filters: SubscribeFilters::List(&filters) }.encode(&mut out).unwrap();
    match theirs::Packet::read(&mut BytesMut::from(&out[..n]), 1024).unwrap() {
        theirs::Packet::Subscribe(s) => {
            assert_eq!(s.pkid, 3);
            let got: Vec<_> = s.filters.iter().map(|f| (f.path.as_str(), f.qos)).collect();
            assert_eq!(
                got,
                vec![
                    ("devices/dev-1/commands/#", rumqttc::mqttbytes::QoS::AtLeastOnce),
                    ("devices/dev-1/config", rumqttc::mqttbytes::QoS::AtMostOnce)
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // PUBACK, PINGREQ, DISCONNECT (ours) → theirs.
    for (p, want) in [
        (Packet::PubAck { pkid: 77 }, theirs::Packet::PubAck(theirs::PubAck::new(77))),
        (Packet::PingReq, theirs::Packet::PingReq),
        (Packet::Disconnect, theirs::Packet::Disconnect),
    ] {
        let n = p.encode(&mut out).unwrap();
        assert_eq!(theirs::Packet::read(&mut BytesMut::from(&out[..n]), 1024).unwrap(), want);
    }
    // CONNACK, SUBACK, PUBACK, PINGRESP (theirs, i.e. the broker's) → ours.
    let cases = [
        (
            theirs::Packet::ConnAck(theirs::ConnAck::new(theirs::ConnectReturnCode::Success, false)),
            Packet::ConnAck { session_present: false, code: 0 },
        ),
        (
            theirs::Packet::ConnAck(theirs::ConnAck::new(theirs::ConnectReturnCode::BadClientId, false)),
            Packet::ConnAck { session_present: false, code: 2 },
        ),
        (
            theirs::Packet::ConnAck(theirs::ConnAck::new(theirs::ConnectReturnCode::NotAuthorized, false)),
            Packet::ConnAck { session_present: false, code: 5 },
        ),
        (
            theirs::Packet::SubAck(theirs::SubAck::new(
                3,
                vec![
                    theirs::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                    theirs::SubscribeReasonCode::Failure,
                ],
            )),
            Packet::SubAck { pkid: 3, codes: &[1, 0x80] },
        ),
        (theirs::Packet::PubAck(theirs::PubAck::new(9)), Packet::PubAck { pkid: 9 }),
        (theirs::Packet::PingResp, Packet::PingResp),
    ];
    for (theirs_p, ours) in cases {
        let mut buf = BytesMut::new();
        theirs_p.write(&mut buf, 1024).unwrap();
        let (decoded, used) = decode(&buf, 1024).unwrap();
        assert_eq!((decoded, used), (ours, buf.len()));
    }
}
