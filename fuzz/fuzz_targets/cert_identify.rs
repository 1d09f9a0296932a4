//! The broker reads the device identity (SAN URI, serial, role) from the client certificate
//! rustls accepted: any bytes must give an identity or a refusal reason, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = fleet_broker::fuzzing::identify(data) {
        let _ = e.refusal().label();
    }
});
