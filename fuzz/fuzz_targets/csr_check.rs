//! The provisioning station's CSR check (`sign-csr`): PEM or DER, signature, device profile.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fleet_provision::pki::check_csr(data);
});
