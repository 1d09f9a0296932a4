//! The device's MQTT 5 decoder (feature `mqtt5`) never panics, never reads past the packet it
//! reports, and agrees with the 3.1.1 decoder on every packet both read the same way.
#![no_main]
use fleet_device::mqtt::codec::{self, Packet};
use fleet_device::mqtt::v5::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((packet, used)) = decode(data, 1 << 20) {
        assert!(used <= data.len());
        // A PINGRESP or a body-less PUBACK means the same in both protocols.
        if let Packet::PingResp | Packet::PubAck { .. } = packet {
            if let Ok((old, n)) = codec::decode(data, 1 << 20) {
                assert_eq!((old, n), (packet, used));
            }
        }
    }
});
