//! The credentials-bundle decoder never panics; what it accepts re-encodes identically.
#![no_main]
use fleet_device::credentials::Credentials;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Credentials::decode(data) {
        let mut out = vec![0u8; c.encoded_len()];
        let n = c.encode(&mut out).expect("a decoded bundle encodes");
        assert_eq!(&out[..n], &data[..n]);
    }
});
