//! The verifier's X.509 reader and the verifier never panic on any certificate bytes.
#![no_main]
use fleet_device::tls::{x509, ServerVerifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = x509::parse(data);
    // As a broker certificate against itself as the pinned CA.
    let _ = ServerVerifier::new(data, "localhost", Some(1_800_000_000)).check_chain(data);
});
