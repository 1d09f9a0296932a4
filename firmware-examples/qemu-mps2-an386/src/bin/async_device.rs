//! fleetgate example firmware, async (embassy), for a Cortex-M4F (QEMU `mps2-an386`): a device
//! that runs for days.
//!
//! It reads its identity from the credentials region, hands the key to a (mock) secure element
//! at first boot, and from then on signs its TLS handshakes through it. The loop: mutual TLS 1.3
//! to the broker over UART0 (QEMU bridges the UART to TCP), a persistent MQTT session, a
//! telemetry reading every `TELEMETRY_MS`, keep-alive PINGs while idle, commands answered on
//! `acks/<name>`; when the broker goes away (no PINGRESP), reconnect with jittered back-off
//! while telemetry keeps queuing, and the outbox drains once the session is back. The command
//! `halt` ends the program (semihosting exit 0), for tests.
//!
//! The executor is embassy's (thread mode, WFE while idle); time is SysTick at 1 kHz as the
//! embassy time driver (`time_driver.rs`). One line per event goes to the semihosting console,
//! prefixed `FLEETGATE:`. TEST-ONLY as in the blocking example: entropy and wall clock from the
//! host over semihosting.
#![no_std]
#![no_main]

#[path = "../async_uart.rs"]
mod async_uart;
#[path = "../console.rs"]
#[macro_use]
mod console;
#[path = "../flash.rs"]
#[allow(dead_code)]
mod flash;
#[path = "../mock_se.rs"]
mod mock_se;
#[path = "../qemu_ldm.rs"]
mod qemu_ldm;
#[path = "../semihost.rs"]
mod semihost;
#[path = "../stack.rs"]
mod stack;
#[path = "../systick.rs"]
mod systick;
#[path = "../time_driver.rs"]
mod ticks;
#[path = "../uart.rs"]
#[allow(dead_code)]
mod uart;

use console::exit;
use embassy_executor::Spawner;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::channel::Channel;
use embassy_time::{Ticker, Timer};
use fleet_device::client::{rx_buffer_for, Device, Incoming, FLEET_BROKER_RECORD, MIN_TX_BUFFER};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, QoS, SessionConfig};
use fleet_device::topic;
use fleet_device::transport::RecordBoundary;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

/// A telemetry reading every 8 s: longer than the keep-alive, so the session idles through
/// PINGs between readings.
const TELEMETRY_MS: u64 = 8_000;
/// MQTT keep-alive, seconds.
const KEEP_ALIVE_SECS: u16 = 3;
/// A read with nothing for this long returns, so the loop can publish on schedule.
const IDLE_READ_MS: u32 = 250;
/// A handshake waits this long for each broker message.
const HANDSHAKE_READ_MS: u32 = 10_000;

/// One telemetry sample (postcard on the wire).
#[derive(Serialize)]
struct Reading {
    seq: u32,
    temp_centi_c: i32,
}

/// Readings from the sensor task to the device loop, which moves them into the SDK's outbox
/// whenever it runs: while connected, while backing off, between connection attempts.
static READINGS: Channel<CriticalSectionRawMutex, Reading, 8> = Channel::new();

/// The sensor: a reading every `TELEMETRY_MS`, whatever the network is doing.
#[embassy_executor::task]
async fn sensor() {
    let mut ticker = Ticker::every(embassy_time::Duration::from_millis(TELEMETRY_MS));
    let mut seq = 0u32;
    loop {
        seq += 1;
        // TEST-ONLY value: a real board reads its sensor here.
        let reading = Reading { seq, temp_centi_c: 2000 + (seq % 50) as i32 };
        if READINGS.try_send(reading).is_err() {
            say!("reading {seq} dropped: the device loop is not keeping up");
        }
        ticker.next().await;
    }
}

/// Moves the waiting readings into the outbox (QoS 1, kept across reconnects).
fn queue_readings<const N: usize, const M: usize>(device: &mut Device<'_, N, M>) {
    while let Ok(r) = READINGS.try_receive() {
        let seq = r.seq;
        if device.publish_telemetry(&r).is_err() {
            say!("reading {seq} does not fit the outbox's messages");
        }
        if !device.session().is_connected() {
            say!("reading {seq} queued while the session is down ({} queued)", device.session().queued());
        }
    }
}

fn now() -> Millis {
    Millis(ticks::millis())
}

#[cfg_attr(feature = "wfe-idle", embassy_executor::main)]
#[cfg_attr(not(feature = "wfe-idle"), embassy_executor::main(entry = "cortex_m_rt::entry"))]
async fn main(spawner: Spawner) {
    let top = stack::paint();
    if let Some(mut p) = cortex_m::Peripherals::take() {
        qemu_ldm::enable(&mut p.SCB);
        ticks::start(p.SYST);
    }
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(semihost::host_entropy());
    let unix_now = semihost::host_unix_time();
    let factory = flash::factory();
    let creds = match Credentials::decode(factory) {
        Ok(c) => c,
        Err(e) => {
            say!("no valid credentials in the credentials region: {e}");
            exit(false)
        }
    };
    // First boot: the key goes into the secure element; the firmware signs only through it.
    let mut chip = mock_se::MockChip::personalised(creds.key_der);
    let mut signer = mock_se::SeSigner(&mut chip);
    let cfg = SessionConfig {
        keep_alive_secs: KEEP_ALIVE_SECS,
        clean_session: false,
        backoff_min_ms: 1_000,
        backoff_max_ms: 8_000,
        #[cfg(feature = "mqtt5")]
        mqtt5: Some(fleet_device::mqtt::Mqtt5::default()),
        ..SessionConfig::default()
    };
    let mut device: Device<'_, 8, 64> = Device::new(creds, cfg);
    if let Err(e) = device.check_signer(&mut signer) {
        say!("the secure element does not hold this certificate's key: {e:?}");
        exit(false)
    }
    say!(
        "device {} -> {}:{}, key in the secure element",
        creds.device_id,
        creds.broker_host,
        creds.broker_port
    );
    let mut uart = uart::Uart0::init();
    let mut rx = [0u8; rx_buffer_for(FLEET_BROKER_RECORD)];
    let mut tx = [0u8; MIN_TX_BUFFER];
    match sensor() {
        Ok(task) => spawner.spawn(task),
        Err(e) => {
            say!("cannot start the sensor task: {e:?}");
            exit(false)
        }
    }
    let mut connections = 0u32;
    loop {
        // Back-off: telemetry keeps queuing (the outbox holds 8) until the session is back.
        while ticks::millis() < device.reconnect_at().0 {
            queue_readings(&mut device);
            Timer::after_millis(100).await;
        }
        queue_readings(&mut device);
        uart.drain();
        async_uart::set_idle_timeout(HANDSHAKE_READ_MS);
        let (t0, w0) = (ticks::now(), async_uart::waiting_ticks());
        // Idle reads time out between TLS records only; a broker that stalls inside one for
        // 40 idle periods (10 s) is gone.
        let transport = RecordBoundary::new(async_uart::AsyncUart(&mut uart), 40);
        let connected = device
            .connect_with_async(transport, &mut rx, &mut tx, &mut rng, &mut signer, unix_now, now())
            .await;
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) => {
                say!("connect failed: {e:?}");
                device.disconnected(now(), rng.next_u32());
                say!("reconnecting in {} ms", device.reconnect_at().0.saturating_sub(ticks::millis()));
                continue;
            }
        };
        connections += 1;
        let compute = (ticks::now() - t0) - u64::from(async_uart::waiting_ticks().wrapping_sub(w0));
        say!(
            "TLS established (connection {connections}): {} M instructions computing (x40 per tick under qemu -icount shift=0), {} signatures by the secure element, stack used so far: {} bytes",
            compute * 40 / 1_000_000,
            signer.0.signed,
            stack::used(top)
        );
        async_uart::set_idle_timeout(IDLE_READ_MS);
        let lost = loop {
            queue_readings(&mut device);
            match device.poll_async(&mut conn, now()).await {
                Ok(Some(Incoming::Connected)) => {
                    say!(
                        "MQTT{} session up (session present: {})",
                        if cfg!(feature = "mqtt5") { " 5" } else { "" },
                        device.session().session_present()
                    )
                }
                Ok(Some(Incoming::Delivered)) => {
                    say!("delivered ({} still queued)", device.session().queued())
                }
                Ok(Some(Incoming::Command { name, payload })) => {
                    say!("command {} ({} bytes)", name.as_str(), payload.len());
                    if name == "halt" {
                        let _ = device.disconnect_async(&mut conn).await;
                        say!("halting; peak stack: {} bytes", stack::used(top));
                        exit(true)
                    }
                    let mut ack: heapless::String<48> = heapless::String::new();
                    let _ = topic::suffix::ack(&name).write_to(&mut ack);
                    let _ = device.publish(&ack, &payload, QoS::AtLeastOnce);
                }
                Ok(Some(other)) => say!("ignored: {other:?}"),
                Ok(None) => {}
                Err(e) => break e,
            }
        };
        device.disconnected(now(), rng.next_u32());
        say!(
            "connection lost ({lost:?}); reconnecting in {} ms",
            device.reconnect_at().0.saturating_sub(ticks::millis())
        );
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    #[cfg(not(feature = "minimal"))]
    say!("panic: {_info}");
    exit(false)
}
