//! The release-manifest decoder never panics; what it accepts re-encodes identically, and the
//! device's offer rule never panics on it.
#![no_main]
use fleet_device::release::{Manifest, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(&m.encode()[..], data);
        assert_eq!(&m.signed_part()[..], &data[..fleet_device::release::SIGNED_LEN]);
        let _ = m.check_offer(&m.key_id, &m.board, Version::ZERO, u32::MAX);
        let _ = m.check_offer(&[0; 8], &m.board, m.version, m.image_size);
    }
});
