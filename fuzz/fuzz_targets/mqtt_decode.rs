//! The device MQTT decoder never panics, and what it decodes re-encodes to the same bytes.
#![no_main]
use fleet_device::mqtt::codec::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((packet, used)) = decode(data, 1 << 20) {
        assert!(used <= data.len());
        let mut out = vec![0u8; used + 16];
        if let Ok(n) = packet.encode(&mut out) {
            assert_eq!(&out[..n], &data[..used]);
        }
    }
});
