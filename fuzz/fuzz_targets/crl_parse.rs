//! The broker's CRL loader (PEM or DER, issuer and signature against the device CA, serial
//! table). Seeds are CRLs the station signed with the CA in fixtures/.
#![no_main]
use libfuzzer_sys::fuzz_target;

const CA: &[u8] = include_bytes!("../fixtures/device-ca.der");

fuzz_target!(|data: &[u8]| {
    if let Ok((serials, info)) = fleet_broker::fuzzing::parse_crl(data, CA) {
        assert_eq!(serials.len(), info.revoked);
        let _ = serials.contains(data.get(..16).unwrap_or(data));
    }
});
