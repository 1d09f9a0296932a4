//! The complete device flow (bundle → mutual TLS → MQTT → telemetry → command), written once
//! for any `embedded_io` transport and instantiated here so that it is compiled for targets the
//! QEMU example does not cover: `thumbv6m-none-eabi` (Cortex-M0+, no atomic CAS) and
//! `riscv32imc-unknown-none-elf`. A board crate provides its UART/TCP transport, its TRNG and
//! clock, and calls [`run`].
#![no_std]
#![deny(unsafe_code)]

use embedded_io::{ErrorType, Read, Write};
use fleet_device::client::{ClientError, Device, Incoming};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, SessionConfig};
use rand_core::{CryptoRngCore, SeedableRng};
use serde::Serialize;

/// A telemetry sample.
#[derive(Serialize)]
pub struct Reading {
    /// Sequence number.
    pub seq: u32,
    /// Temperature, centi-degrees Celsius.
    pub temp_centi_c: i32,
}

/// What the flow achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Telemetry stored and a command acknowledged.
    Done,
    /// No valid bundle.
    NoCredentials,
    /// The broker or the link failed.
    Failed,
}

/// Connects, publishes one reading, waits for one command and acknowledges it.
pub fn run<T: Read + Write, R: CryptoRngCore>(
    bundle: &[u8],
    transport: T,
    rng: R,
    now: impl Fn() -> u64,
) -> Outcome {
    let Ok(creds) = Credentials::decode(bundle) else { return Outcome::NoCredentials };
    let mut device: Device<'_, 4, 128> = Device::new(creds, SessionConfig::default());
    let mut rx = [0u8; 16_640];
    let mut tx = [0u8; 4096];
    let Ok(mut conn) = device.connect(transport, &mut rx, &mut tx, rng, None, Millis(now())) else {
        return Outcome::Failed;
    };
    if device.publish_telemetry(&Reading { seq: 1, temp_centi_c: 2150 }).is_err() {
        return Outcome::Failed;
    }
    let mut acked = 0;
    loop {
        match device.poll(&mut conn, Millis(now())) {
            Ok(Some(Incoming::Delivered)) => {
                acked += 1;
                if acked == 2 {
                    return Outcome::Done;
                }
            }
            Ok(Some(Incoming::Command { name, payload })) => {
                let _ = device.publish(&name, &payload, fleet_device::mqtt::QoS::AtLeastOnce);
            }
            Ok(_) => {}
            Err(ClientError::Session(_) | ClientError::Transport | ClientError::Tls { .. } | _) => {
                return Outcome::Failed
            }
        }
    }
}

/// A stand-in transport (a board supplies its UART or TCP socket).
#[derive(Debug)]
pub struct Unconnected;

impl ErrorType for Unconnected {
    type Error = embedded_io::ErrorKind;
}

impl Read for Unconnected {
    fn read(&mut self, _: &mut [u8]) -> Result<usize, Self::Error> {
        Err(embedded_io::ErrorKind::NotConnected)
    }
}

impl Write for Unconnected {
    fn write(&mut self, _: &[u8]) -> Result<usize, Self::Error> {
        Err(embedded_io::ErrorKind::NotConnected)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The instantiation the static library exports, so the whole flow is compiled for the target.
/// The seed stands in for a board TRNG.
#[allow(unsafe_code)] // `no_mangle` only names the exported symbol; no unsafe operation
#[no_mangle]
pub extern "C" fn fleetgate_demo(seed: u64) -> i32 {
    let bundle = core::hint::black_box([0u8; 64]);
    let rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    match run(&bundle, Unconnected, rng, || 0) {
        Outcome::Done => 0,
        Outcome::NoCredentials => 1,
        Outcome::Failed => 2,
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
