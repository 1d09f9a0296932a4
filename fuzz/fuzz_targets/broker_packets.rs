//! The broker's handling of client bytes after admission: packet framing with the size limit,
//! then the ACL and topic-matching decisions a session makes for each packet. Never a panic, and
//! a device may never publish or subscribe outside its own subtree, nor publish its own commands.
#![no_main]
use bytes::BytesMut;
use fleet_broker::fuzzing::{self as auth, decode_client_packet, Identity};
use fleet_registry::{DeviceId, Role, SerialNumber};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;

fuzz_target!(|data: &[u8]| {
    let id = DeviceId::parse("dev-0123456789ab").expect("id");
    let who = Identity {
        id: id.clone(),
        role: Role::Device,
        serial: SerialNumber::from_bytes(&[1; 16]).expect("serial"),
        not_after: 0,
        nonce: None,
    };
    let own = format!("devices/{id}/");
    let commands = format!("{own}commands");
    let mut buf = BytesMut::from(data);
    for _ in 0..256 {
        match decode_client_packet(&mut buf, 4096) {
            Ok(Some(Packet::Publish(p))) => {
                if auth::Topic::parse(&p.topic).is_ok_and(|t| auth::may_publish(&who, t)) {
                    assert!(p.topic.starts_with(&own), "device may publish to {:?}", p.topic);
                    assert!(!p.topic.starts_with(&commands), "device may command itself: {:?}", p.topic);
                }
                let _ = auth::matches("devices/+/telemetry", &p.topic);
                let _ = auth::matches("#", &p.topic);
            }
            Ok(Some(Packet::Subscribe(s))) => {
                for f in &s.filters {
                    if auth::TopicFilter::parse(&f.path).is_ok_and(|f| auth::may_subscribe(&who, f)) {
                        assert!(f.path.starts_with(&own), "device may subscribe to {:?}", f.path);
                    }
                    let _ = auth::matches(&f.path, &format!("{own}commands/reboot"));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
