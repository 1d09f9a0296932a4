//! fleetgate example firmware for a Cortex-M4F (QEMU `mps2-an386`).
//!
//! It reads its identity from the credentials flash region (written at the factory from
//! `fleet-provision mint` output; the image itself holds no secret), opens mutual TLS 1.3 to the
//! broker over UART0 (QEMU bridges the UART to TCP), publishes one telemetry reading, waits for a
//! command, acknowledges it, and exits through semihosting: status 0 when the command was
//! acknowledged, 1 otherwise. One line per step goes to the semihosting console, prefixed
//! `FLEETGATE:` for tests to read.
//!
//! TEST-ONLY parts, marked below: the RNG is seeded from the host's /dev/urandom and the clock
//! read from the host, both over semihosting, because QEMU's board has no TRNG or RTC. A real
//! board uses its TRNG and RTC; the SDK takes both as parameters.
#![no_std]
#![no_main]

mod semihost;
mod stack;
mod ticks;
mod uart;

use cortex_m_rt::entry;
use cortex_m_semihosting::debug;
use fleet_device::client::{ClientError, Device, Incoming};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, QoS, SessionConfig};
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

/// One telemetry sample (postcard on the wire).
#[derive(Serialize)]
struct Reading {
    seq: u32,
    temp_centi_c: i32,
}

#[cfg(not(feature = "minimal"))]
fn say(args: core::fmt::Arguments<'_>) {
    use core::fmt::Write as _;
    if let Ok(mut out) = cortex_m_semihosting::hio::hstdout() {
        let _ = out.write_fmt(format_args!("FLEETGATE: {args}\n"));
    }
}

/// The `minimal` build (for size figures) prints nothing: no `core::fmt` in the image.
#[cfg(feature = "minimal")]
fn say(_: core::fmt::Arguments<'_>) {}

macro_rules! say {
    ($($t:tt)*) => { say(format_args!($($t)*)) };
}

fn exit(ok: bool) -> ! {
    debug::exit(if ok { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    #[allow(clippy::empty_loop)]
    loop {}
}

fn now() -> Millis {
    Millis(semihost::clock_centis().saturating_mul(10))
}

#[entry]
fn main() -> ! {
    let top = stack::paint();
    run(top)
}

/// Everything below `top` (painted) is the SDK's and this function's stack.
#[inline(never)]
fn run(top: usize) -> ! {
    if let Some(p) = cortex_m::Peripherals::take() {
        ticks::start(p.SYST);
    }
    let bundle = semihost::credentials_region();
    let creds = match Credentials::decode(bundle) {
        Ok(c) => c,
        Err(e) => {
            say!("no valid credentials in the credentials region: {e}");
            exit(false)
        }
    };
    say!("device {} -> {}:{}", creds.device_id, creds.broker_host, creds.broker_port);

    // TEST-ONLY entropy and wall clock (see the crate docs).
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(semihost::host_entropy());
    let unix_now = semihost::host_unix_time();

    let uart = uart::Uart0::init();
    let mut device: Device<'_, 4, 128> = Device::new(creds, SessionConfig::default());
    let mut rx = [0u8; 16_640];
    let mut tx = [0u8; 4096];
    let t0 = ticks::now();
    let mut conn = match device.connect(uart, &mut rx, &mut tx, &mut rng, unix_now, now()) {
        Ok(c) => c,
        Err(ClientError::Tls { error, rejection }) => {
            say!("TLS refused: {error:?}, broker rejection: {rejection:?}");
            exit(false)
        }
        Err(e) => {
            say!("connect failed: {e:?}");
            exit(false)
        }
    };
    let handshake = ticks::now() - t0;
    say!(
        "TLS established in {handshake} core ticks ({} ms at {} MHz; x40 = instructions under qemu -icount shift=0), stack used so far: {} bytes",
        handshake * 1000 / ticks::CORE_HZ,
        ticks::CORE_HZ / 1_000_000,
        stack::used(top)
    );
    if let Err(e) = device.publish_telemetry(&Reading { seq: 1, temp_centi_c: 2150 }) {
        say!("queue failed: {e:?}");
        exit(false)
    }
    let mut delivered = 0;
    loop {
        match device.poll(&mut conn, now()) {
            Ok(Some(Incoming::Connected)) => say!("MQTT session up"),
            Ok(Some(Incoming::Delivered)) => {
                delivered += 1;
                if delivered == 1 {
                    say!("telemetry stored by the broker");
                } else {
                    say!("command acknowledged");
                    say!("peak stack: {} bytes", stack::used(top));
                    exit(true)
                }
            }
            Ok(Some(Incoming::Command { name, payload })) => {
                say!("command {} ({} bytes)", name.as_str(), payload.len());
                let mut topic: heapless::String<48> = heapless::String::new();
                let _ = topic.push_str("acks/");
                let _ = topic.push_str(&name);
                if device.publish(&topic, &payload, QoS::AtLeastOnce).is_err() {
                    exit(false)
                }
            }
            Ok(Some(Incoming::CommandTooLarge { name_len, payload_len })) => {
                say!("command too large for this firmware ({name_len} B name, {payload_len} B payload): ignored")
            }
            Ok(None) => {}
            Err(ClientError::Session(e)) => {
                say!("session refused: {e:?}");
                exit(false)
            }
            Err(e) => {
                say!("connection lost: {e:?}");
                let _ = rng.next_u32();
                exit(false)
            }
        }
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    #[cfg(not(feature = "minimal"))]
    say!("panic: {_info}");
    exit(false)
}
