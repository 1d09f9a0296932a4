//! fleetgate example firmware for a real board: an STM32F429ZI (Nucleo-F429ZI) on Ethernet,
//! with embassy and the SDK's async API.
//!
//! Boot: the hardware RNG seeds the TLS RNG, DHCP brings the network up, DNS resolves the broker
//! named in the credentials bundle (flashed at the factory to the last 128 KiB sector,
//! 0x081E_0000; the image holds no secret). Then the device loop: TCP, mutual TLS 1.3 with the
//! broker verified strictly, a persistent MQTT session, a reading every 60 s, keep-alive PINGs
//! while idle, commands answered on `acks/<name>`, and reconnect with jittered back-off.
//!
//! Built in `./scripts/test` (compile-only: no board in CI); the same loop runs executed in QEMU
//! (`firmware-examples/qemu-mps2-an386`, `--bin async_device`). Flash with probe-rs:
//! `cargo run --release` after writing `credentials.bin` (see `.cargo/config.toml`).
#![no_std]
#![no_main]

use embassy_executor::Spawner;
use embassy_net::dns::DnsQueryType;
use embassy_net::tcp::TcpSocket;
use embassy_net::StackResources;
use embassy_stm32::eth::{Ethernet, GenericPhy, PacketQueue, Sma};
use embassy_stm32::peripherals::{ETH, ETH_SMA};
use embassy_stm32::rng::Rng;
use embassy_stm32::{bind_interrupts, eth, peripherals, rng, Config};
use embassy_time::{with_timeout, Duration, Instant, Timer};
use embedded_io::ErrorKind;
use fleet_device::client::{rx_buffer_for, Device, Incoming, FLEET_BROKER_RECORD, MIN_TX_BUFFER};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, QoS, SessionConfig};
use fleet_device::topic;
use fleet_device::transport::RecordBoundary;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;
use static_cell::StaticCell;

bind_interrupts!(struct Irqs {
    ETH => eth::InterruptHandler;
    HASH_RNG => rng::InterruptHandler<peripherals::RNG>;
});

type EthDevice = Ethernet<'static, ETH, GenericPhy<Sma<'static, ETH_SMA>>>;

/// Where the factory writes `credentials.bin`: the last 128 KiB sector of the 2 MiB flash.
const CREDENTIALS: usize = 0x081E_0000;
const CREDENTIALS_LEN: usize = 16 * 1024;
const TELEMETRY_MS: u64 = 60_000;
/// A read with nothing for this long returns, so the loop publishes on schedule.
const IDLE_READ: Duration = Duration::from_millis(250);

#[derive(Serialize)]
struct Reading {
    seq: u32,
    uptime_s: u32,
}

fn credentials_region() -> &'static [u8] {
    // SAFETY: the sector at CREDENTIALS is mapped flash, written only by the factory station
    // (never by this firmware), and lives for the whole program.
    unsafe { core::slice::from_raw_parts(CREDENTIALS as *const u8, CREDENTIALS_LEN) }
}

fn now() -> Millis {
    Millis(Instant::now().as_millis())
}

/// A TCP socket whose idle reads end with `TimedOut` (the SDK's `poll_async` then returns
/// `Ok(None)`). embassy-net's reads are cancel-safe, so the timeout loses no byte; the SDK's
/// `RecordBoundary` around it keeps a timeout from cutting a TLS record.
struct Link<'a>(TcpSocket<'a>);

impl embedded_io_async::ErrorType for Link<'_> {
    type Error = ErrorKind;
}

impl embedded_io_async::Read for Link<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        match with_timeout(IDLE_READ, self.0.read(buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(_)) => Err(ErrorKind::ConnectionReset),
            Err(_) => Err(ErrorKind::TimedOut),
        }
    }
}

impl embedded_io_async::Write for Link<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.0.write(buf).await.map_err(|_| ErrorKind::ConnectionReset)
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        self.0.flush().await.map_err(|_| ErrorKind::ConnectionReset)
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, EthDevice>) -> ! {
    runner.run().await
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_stm32::init(Config::default());
    let mut hw_rng = Rng::new(p.RNG, Irqs);
    let mut seed = [0u8; 32];
    hw_rng.async_fill_bytes(&mut seed).await.ok();
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);

    static PACKETS: StaticCell<PacketQueue<4, 4>> = StaticCell::new();
    let mac = [0x02, 0x00, 0x00, 0x0f, 0x1e, 0x07];
    let eth = Ethernet::new(
        PACKETS.init(PacketQueue::new()),
        p.ETH,
        Irqs,
        p.PA1,
        p.PA7,
        p.PC4,
        p.PC5,
        p.PG13,
        p.PB13,
        p.PG11,
        mac,
        p.ETH_SMA,
        p.PA2,
        p.PC1,
    );
    static RESOURCES: StaticCell<StackResources<2>> = StaticCell::new();
    let config = embassy_net::Config::dhcpv4(Default::default());
    let (stack, runner) =
        embassy_net::new(eth, config, RESOURCES.init(StackResources::new()), rng.next_u64());
    match net_task(runner) {
        Ok(task) => spawner.spawn(task),
        Err(_) => return,
    }
    stack.wait_config_up().await;

    let Ok(creds) = Credentials::decode(credentials_region()) else {
        // No identity flashed: nothing to do but wait for the factory.
        return;
    };
    let cfg = SessionConfig { clean_session: false, ..SessionConfig::default() };
    let mut device: Device<'_, 8, 64> = Device::new(creds, cfg);
    let (mut tcp_rx, mut tcp_tx) = ([0u8; 1024], [0u8; 1024]);
    let mut tls_rx = [0u8; rx_buffer_for(FLEET_BROKER_RECORD)];
    let mut tls_tx = [0u8; MIN_TX_BUFFER];
    let mut seq = 0u32;
    let mut next_reading = Instant::now();
    loop {
        Timer::at(Instant::from_millis(device.reconnect_at().0)).await;
        let address = match stack.dns_query(creds.broker_host, DnsQueryType::A).await {
            Ok(a) if !a.is_empty() => a[0],
            _ => {
                device.disconnected(now(), rng.next_u32());
                continue;
            }
        };
        let mut socket = TcpSocket::new(stack, &mut tcp_rx, &mut tcp_tx);
        socket.set_timeout(Some(Duration::from_secs(30)));
        if socket.connect((address, creds.broker_port)).await.is_err() {
            device.disconnected(now(), rng.next_u32());
            continue;
        }
        // No RTC set: certificate dates are not checked (pass the RTC's time when there is one).
        // Timeouts between TLS records only (RecordBoundary); 40 idle periods inside one: gone.
        let link = RecordBoundary::new(Link(socket), 40);
        let connected = device.connect_async(link, &mut tls_rx, &mut tls_tx, &mut rng, None, now()).await;
        let Ok(mut conn) = connected else {
            device.disconnected(now(), rng.next_u32());
            continue;
        };
        loop {
            if Instant::now() >= next_reading && device.session().is_connected() {
                seq += 1;
                let uptime_s = Instant::now().as_secs() as u32;
                let _ = device.publish_telemetry(&Reading { seq, uptime_s });
                next_reading += Duration::from_millis(TELEMETRY_MS);
            }
            match device.poll_async(&mut conn, now()).await {
                Ok(Some(Incoming::Command { name, payload })) => {
                    let mut ack: heapless::String<48> = heapless::String::new();
                    let _ = topic::suffix::ack(&name).write_to(&mut ack);
                    let _ = device.publish(&ack, &payload, QoS::AtLeastOnce);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        drop(conn);
        device.disconnected(now(), rng.next_u32());
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    cortex_m::peripheral::SCB::sys_reset()
}
