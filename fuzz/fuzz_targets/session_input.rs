//! The session state machine survives any byte stream from a broker.
#![no_main]
use fleet_device::mqtt::{Millis, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut s: Session<'_, 4, 64> = Session::new("dev-1", SessionConfig::default());
    s.transport_up(Millis(0));
    let mut out = [0u8; 256];
    let _ = s.poll_transmit(Millis(0), &mut out);
    let _ = s.publish("telemetry", b"x", fleet_device::mqtt::QoS::AtLeastOnce);
    let mut rest = data;
    let mut now = 0;
    while !rest.is_empty() {
        now += 100;
        match s.handle(Millis(now), rest) {
            Ok((0, _)) | Err(_) => break,
            Ok((n, _)) => rest = &rest[n..],
        }
        while let Ok(Some(_)) = s.poll_transmit(Millis(now), &mut out) {}
    }
});
