//! fleetgate example firmware for a Cortex-M4F (QEMU `mps2-an386`).
//!
//! It reads its identity from the credentials flash region (written at the factory from
//! `fleet-provision mint` output; the image itself holds no secret), opens mutual TLS 1.3 to the
//! broker over UART0 (QEMU bridges the UART to TCP), publishes one telemetry reading, waits for a
//! command, acknowledges it, and exits through semihosting: status 0 when the command was
//! acknowledged, 1 otherwise. One line per step goes to the semihosting console, prefixed
//! `FLEETGATE:` for tests to read.
//!
//! Its identities live in two slots of the credentials region (`flash`): the factory's bundle is
//! copied there at first boot. When the certificate expires within 30 days (or an operator asks),
//! it rotates: a new P-256 key generated here, a CSR to the issuer over MQTT, the issued
//! certificate staged in the spare slot, a new session with it, and the slot committed once the
//! broker admitted it. Flashed with a batch *claim* instead of an identity, its first boot asks
//! for its own identity the same way (docs/spec/rotation.md).
//!
//! Built with feature `ota` it is the application of the A/B bootloader (`--bin bootloader`):
//! linked at the execution region, it says which image it is, confirms itself once the broker
//! admitted it, takes update offers through `fleet_device::ota` (download, verify, swap, confirm)
//! and the `reboot` command (`ota`).
//!
//! TEST-ONLY parts, marked below: the RNG is seeded from the host's /dev/urandom and the clock
//! read from the host, both over semihosting, because QEMU's board has no TRNG or RTC. A real
//! board uses its TRNG and RTC; the SDK takes both as parameters.
#![no_std]
#![no_main]

#[macro_use]
mod console;
mod flash;
#[cfg(feature = "_ota")]
mod host_flash;
#[cfg(feature = "_ota")]
mod ota;
#[cfg(feature = "_ota")]
#[allow(dead_code)] // the bootloader's part of the layout
mod ota_layout;
mod qemu_ldm;
mod semihost;
mod stack;
mod systick;
mod ticks;
mod uart;

use console::exit;
use cortex_m_rt::entry;
use fleet_device::client::{ClientError, Device, Incoming};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::{Millis, QoS, SessionConfig};
use fleet_device::rotation::{renewal_due, RotationConfig, Rotator};
use fleet_device::store::{CredentialStore, StoreError};
use fleet_device::tls::x509;
use fleet_device::topic;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

/// One telemetry sample (postcard on the wire).
#[derive(Serialize)]
struct Reading {
    seq: u32,
    temp_centi_c: i32,
}

fn now() -> Millis {
    Millis(semihost::clock_centis().saturating_mul(10))
}

#[entry]
fn main() -> ! {
    let top = stack::paint();
    run(top)
}

/// Is this bundle a batch claim (`urn:fleetgate:claim:` identity) rather than a device's own?
fn is_claim(creds: &Credentials<'_>) -> bool {
    x509::parse(creds.cert_der)
        .ok()
        .and_then(|c| c.san)
        .is_some_and(|san| x509::uris(san).any(|u| u.starts_with(topic::uri::CLAIM.as_bytes())))
}

/// Lowercase hex of `bytes` into a string of capacity `N`.
fn hex<const N: usize>(prefix: &str, bytes: &[u8]) -> heapless::String<N> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = heapless::String::new();
    let _ = s.push_str(prefix);
    for b in bytes {
        let _ = s.push(char::from(DIGITS[usize::from(b >> 4)]));
        let _ = s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// After this firmware closed a session, the UART link is down until QEMU's chardev reconnects
/// (1 s): wait, dropping whatever was still in flight from the old connection.
fn pause_for_reconnect(uart: &mut uart::Uart0) {
    let until = semihost::clock_centis() + 250;
    while semihost::clock_centis() < until {
        uart.drain();
    }
}

type Store = CredentialStore<flash::Slots>;

/// The TLS receive buffer: one whole record. fleet-broker caps its records at 4 KiB by default
/// (`max_tls_record_size`), so 4,352 bytes hold any record with its tag and padding; a broker
/// without a cap needs 16,640 bytes (`rx_buffer_for`).
const RX_BUFFER: usize = fleet_device::client::rx_buffer_for(fleet_device::client::FLEET_BROKER_RECORD);

/// The session's outbox: messages and their size (OTA status reports take up to 256 bytes).
#[cfg(not(feature = "_ota"))]
const OUTBOX: usize = 4;
#[cfg(not(feature = "_ota"))]
const OUTBOX_MESSAGE: usize = 128;
#[cfg(feature = "_ota")]
const OUTBOX: usize = 8;
#[cfg(feature = "_ota")]
const OUTBOX_MESSAGE: usize = fleet_device::ota::STATUS_MAX;

/// Everything below `top` (painted) is the SDK's and this function's stack.
#[inline(never)]
fn run(top: usize) -> ! {
    if let Some(mut p) = cortex_m::Peripherals::take() {
        qemu_ldm::enable(&mut p.SCB);
        ticks::start(p.SYST);
    }
    // TEST-ONLY entropy and wall clock (see the crate docs).
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(semihost::host_entropy());
    let unix_now = semihost::host_unix_time();
    let mut uart = uart::Uart0::init();
    #[cfg(feature = "_ota")]
    announce_image();
    let mut store = CredentialStore::new(flash::Slots);
    let mut buf = [0u8; flash::SLOT];
    let mut bundle = [0u8; flash::SLOT];
    if let Err(StoreError::Empty) = store.load(&mut buf, &mut bundle) {
        first_boot(&mut store, &mut uart, &mut rng, unix_now, &mut buf, &mut bundle);
    }
    loop {
        // A staged identity (a rotation not yet confirmed) is tried first.
        let (n, trying) = match store.candidate(&mut buf, &mut bundle) {
            Ok(Some(n)) => (n, true),
            _ => match store.load(&mut buf, &mut bundle) {
                Ok(n) => (n, false),
                Err(e) => {
                    say!("no valid identity in the credential slots: {e:?}");
                    exit(false)
                }
            },
        };
        let (head, _) = bundle.split_at(n);
        // `buf` is free again: the session's scratch for the store.
        match session(head, trying, &mut store, &mut buf, &mut uart, &mut rng, unix_now, top) {
            Next::Done => exit(true),
            Next::Reconnect => pause_for_reconnect(&mut uart),
            #[cfg(feature = "_ota")]
            Next::Reboot => {
                pause_for_reconnect(&mut uart);
                ota::reboot()
            }
        }
    }
}

/// Which image runs, and how the bootloader started it.
#[cfg(feature = "_ota")]
fn announce_image() {
    use embassy_boot::State;
    let how = match ota::state() {
        Ok(State::Swap) => "trial boot, it confirms itself once the broker admits it",
        Ok(State::Revert) => "the bootloader rolled the update back to this image",
        Ok(_) => "confirmed image",
        Err(e) => {
            say!("update flash unreadable: {e:?}");
            exit(false)
        }
    };
    say!("firmware {}: {how}", ota::ImageInfo::read().version());
    say!(
        "OTA updater: {} bytes of RAM besides its {}-byte write buffer",
        core::mem::size_of::<ota::Updater<'static>>(),
        fleet_device::ota::MAX_CHUNK
    );
}

/// No session could be had: the program ends (status 1). An image on trial (feature `ota`)
/// resets the board instead, so that the bootloader rolls it back.
fn give_up(_uart: &mut uart::Uart0) -> ! {
    #[cfg(feature = "_ota")]
    if ota::on_trial() {
        say!("this image is on trial and cannot reach the broker: resetting, the bootloader rolls it back");
        pause_for_reconnect(_uart);
        ota::reboot()
    }
    exit(false)
}

/// The factory's bundle becomes the first identity; a claim is exchanged for the device's own.
fn first_boot(
    store: &mut Store,
    uart: &mut uart::Uart0,
    rng: &mut rand_chacha::ChaCha20Rng,
    unix_now: Option<i64>,
    buf: &mut [u8; flash::SLOT],
    bundle: &mut [u8; flash::SLOT],
) {
    let factory = flash::factory();
    let creds = match Credentials::decode(factory) {
        Ok(c) => c,
        Err(e) => {
            say!("no valid credentials in the credentials region: {e}");
            exit(false)
        }
    };
    let n = if is_claim(&creds) {
        let n = claim(creds, uart, rng, unix_now, bundle);
        pause_for_reconnect(uart);
        n
    } else {
        let n = creds.encoded_len();
        bundle[..n].copy_from_slice(&factory[..n]);
        n
    };
    if let Err(e) = store.provision(&bundle[..n], buf) {
        say!("cannot store the identity: {e:?}");
        exit(false)
    }
}

/// Claim-based first boot: a session as `claims/<claim>/<nonce>`, a CSR for a new id with a key
/// generated here, the issued identity written into `out`. Returns its length.
fn claim(
    creds: Credentials<'_>,
    uart: &mut uart::Uart0,
    rng: &mut rand_chacha::ChaCha20Rng,
    unix_now: Option<i64>,
    out: &mut [u8; flash::SLOT],
) -> usize {
    // TEST-ONLY id: a real board names itself from its unique id (e.g. the MCU's UID).
    let (mut uid, mut nonce) = ([0u8; 6], [0u8; 16]);
    rng.fill_bytes(&mut uid);
    rng.fill_bytes(&mut nonce);
    let id: heapless::String<16> = hex("dev-", &uid);
    let mut client: heapless::String<128> = heapless::String::new();
    let _ = topic::claim_session(creds.device_id, &hex::<32>("", &nonce)).write_to(&mut client);
    say!("first boot with claim {}: asking for an identity as {}", creds.device_id, id.as_str());
    let mut device: Device<'_, 2, 32> = Device::new_claim(creds, &client, SessionConfig::default());
    let mut rx = [0u8; RX_BUFFER];
    let mut tx = [0u8; fleet_device::client::MIN_TX_BUFFER];
    let mut conn = match device.connect(&mut *uart, &mut rx, &mut tx, &mut *rng, unix_now, now()) {
        Ok(c) => c,
        Err(e) => {
            say!("claim session refused: {e:?}");
            exit(false)
        }
    };
    let mut rot = Rotator::new(RotationConfig { answer_timeout_ms: 10_000, ..RotationConfig::default() });
    let mut csr = [0u8; 512];
    loop {
        if device.session().is_connected() {
            match rot.poll_csr(&id, now(), &mut csr) {
                Ok(Some(req)) => {
                    if device.publish_now(&mut conn, topic::suffix::CERTS_CSR, req, now()).is_err() {
                        exit(false)
                    }
                    say!("claim: CSR sent ({} bytes), key generated on this MCU", req.len());
                }
                Ok(None) => {}
                Err(e) => {
                    say!("CSR: {e:?}");
                    exit(false)
                }
            }
        }
        match device.poll(&mut conn, now()) {
            Ok(Some(Incoming::Connected)) => rot.start(&mut *rng, now()),
            Ok(Some(Incoming::Certificate { der })) => match rot.bundle(&creds, &id, &der, out) {
                Ok(n) => {
                    let _ = device.disconnect(&mut conn);
                    let _ = conn.close();
                    say!("first boot: identity {} issued; reconnecting as itself", id.as_str());
                    return n;
                }
                Err(e) => {
                    say!("issued certificate refused: {e:?}");
                    rot.rejected(now());
                }
            },
            Ok(Some(Incoming::CertificateRejected { reason })) => {
                say!("claim refused by the issuer: {}", reason.as_str());
                exit(false)
            }
            Ok(_) => {}
            Err(e) => {
                say!("claim session lost: {e:?}");
                exit(false)
            }
        }
    }
}

enum Next {
    /// Telemetry stored and a command acknowledged.
    Done,
    /// A new identity is staged: connect again with it.
    Reconnect,
    /// Reset the board (feature `ota`: an update was marked, or a reboot asked for).
    #[cfg(feature = "_ota")]
    Reboot,
}

/// One session with `bundle`'s identity (`trying`: a staged one, committed once admitted).
#[allow(clippy::too_many_arguments)]
fn session(
    bundle: &[u8],
    trying: bool,
    store: &mut Store,
    scratch: &mut [u8; flash::SLOT],
    uart: &mut uart::Uart0,
    rng: &mut rand_chacha::ChaCha20Rng,
    unix_now: Option<i64>,
    top: usize,
) -> Next {
    let creds = match Credentials::decode(bundle) {
        Ok(c) => c,
        Err(e) => {
            say!("stored identity unreadable: {e}");
            exit(false)
        }
    };
    say!("device {} -> {}:{}", creds.device_id, creds.broker_host, creds.broker_port);
    // A persistent session (clean session = 0): the broker keeps the subscriptions and what was
    // sent while this board slept; commands queued meanwhile arrive right after CONNACK.
    let cfg = SessionConfig { clean_session: false, ..SessionConfig::default() };
    let mut device: Device<'_, OUTBOX, OUTBOX_MESSAGE> = Device::new(creds, cfg);
    let mut rx = [0u8; RX_BUFFER];
    let mut tx = [0u8; fleet_device::client::MIN_TX_BUFFER];
    let (t0, w0) = (ticks::now(), uart::waiting_ticks());
    let mut conn = match device.connect(&mut *uart, &mut rx, &mut tx, &mut *rng, unix_now, now()) {
        Ok(c) => c,
        Err(ClientError::Tls { error, rejection }) => {
            say!("TLS refused: {error:?}, broker rejection: {rejection:?}");
            give_up(uart)
        }
        Err(e) => {
            say!("connect failed: {e:?}");
            give_up(uart)
        }
    };
    let handshake = ticks::now() - t0;
    let waiting = u64::from(uart::waiting_ticks().wrapping_sub(w0));
    let compute = handshake - waiting;
    say!(
        "TLS established in {handshake} core ticks, {compute} computing and {waiting} waiting for the broker ({} M instructions computing under qemu -icount shift=0, x40 per tick), p256-cm4: {}, stack used so far: {} bytes",
        compute * 40 / 1_000_000,
        fleet_device::tls::ecc::FAST,
        stack::used(top)
    );
    let mut rot = Rotator::new(RotationConfig { answer_timeout_ms: 10_000, ..RotationConfig::default() });
    let mut csr = [0u8; 512];
    // The store's second buffer (commit and stage need two; `scratch` is the first).
    let mut tmp = [0u8; flash::SLOT];
    let mut delivered: i32 = 0;
    // What an update command asked for once its acknowledgement is stored.
    #[cfg(feature = "_ota")]
    let mut ota_after: Option<ota::After> = None;
    // The SDK's updater (fleet_device::ota): offers, chunks, status reports. Its write buffer
    // holds one chunk.
    #[cfg(feature = "_ota")]
    let (mut ota_word, mut ota_buf) = (
        embassy_boot::AlignedBuffer([0u8; ota_layout::WRITE as usize]),
        embassy_boot::AlignedBuffer([0u8; fleet_device::ota::MAX_CHUNK]),
    );
    #[cfg(feature = "_ota")]
    let mut updater = match ota::updater(&mut ota_word.0, &mut ota_buf.0) {
        Ok(u) => u,
        Err(e) => {
            say!("update flash unusable: {e:?}");
            exit(false)
        }
    };
    // The QoS 1 messages in the outbox, in order: true for an OTA status report (their
    // acknowledgements are not the telemetry's or a command's).
    #[cfg(feature = "_ota")]
    let mut sent: heapless::Deque<bool, OUTBOX> = heapless::Deque::new();
    loop {
        if device.session().is_connected() {
            if let Ok(Some(req)) = rot.poll_csr(creds.device_id, now(), &mut csr) {
                if device.publish_now(&mut conn, topic::suffix::CERTS_CSR, req, now()).is_err() {
                    exit(false)
                }
                say!("rotation: CSR sent ({} bytes), key generated on this MCU", req.len());
            }
        }
        match device.poll(&mut conn, now()) {
            Ok(Some(Incoming::Connected)) => {
                if device.session().session_present() {
                    say!("MQTT session up (persistent session resumed)");
                } else {
                    say!("MQTT session up");
                }
                // Admitted by the broker with its certificate: the image keeps its place. The
                // SDK confirms an update it installed (and reports it); `confirm` covers an
                // image marked some other way.
                #[cfg(feature = "_ota")]
                updater.connected();
                #[cfg(feature = "_ota")]
                match ota::confirm() {
                    Ok(true) => say!(
                        "firmware {} confirmed: the bootloader keeps it",
                        ota::ImageInfo::read().version()
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        say!("cannot confirm the image: {e:?}");
                        exit(false)
                    }
                }
                let cert = creds.cert_der;
                if trying {
                    if store.commit(scratch, &mut tmp).is_err() {
                        say!("cannot commit the new identity");
                        exit(false)
                    }
                    let _ = device.publish(topic::suffix::CERTS_ACTIVE, b"", QoS::AtLeastOnce);
                    #[cfg(feature = "_ota")]
                    let _ = sent.push_back(false);
                    delivered = -1; // that announcement's acknowledgement comes first
                    say!("rotated: the broker admitted the new identity; it is now the active one");
                } else if unix_now.is_some_and(|t| renewal_due(cert, t, 30 * 86_400)) {
                    say!("certificate expires within 30 days: rotating");
                    rot.start(&mut *rng, now());
                    continue;
                }
                if let Err(e) = device.publish_telemetry(&Reading { seq: 1, temp_centi_c: 2150 }) {
                    say!("queue failed: {e:?}");
                    exit(false)
                }
                #[cfg(feature = "_ota")]
                let _ = sent.push_back(false);
            }
            Ok(Some(Incoming::Delivered)) => {
                #[cfg(feature = "_ota")]
                if sent.pop_front() == Some(true) {
                    // An OTA report stored; once `verified` is, the swap needs a reset.
                    if updater.reset_due() && !sent.iter().any(|&ota| ota) {
                        say!("update verified and reported: resetting into the bootloader's swap");
                        let _ = device.disconnect(&mut conn);
                        let _ = conn.close();
                        return Next::Reboot;
                    }
                    continue;
                }
                delivered += 1;
                if delivered == 1 {
                    say!("telemetry stored by the broker");
                } else if delivered >= 2 {
                    say!("command acknowledged");
                    #[cfg(feature = "_ota")]
                    match ota_after.take() {
                        Some(ota::After::Reboot) => {
                            let _ = device.disconnect(&mut conn);
                            let _ = conn.close();
                            return Next::Reboot;
                        }
                        None => {}
                    }
                    say!("peak stack: {} bytes", stack::used(top));
                    return Next::Done;
                }
            }
            Ok(Some(Incoming::Command { name, payload })) => {
                say!("command {} ({} bytes)", name.as_str(), payload.len());
                let mut ack: heapless::String<48> = heapless::String::new();
                let _ = topic::suffix::ack(&name).write_to(&mut ack);
                #[cfg(feature = "_ota")]
                if let Some((after, reply)) = ota::command(&name, &payload) {
                    if device.publish(&ack, reply.as_bytes(), QoS::AtLeastOnce).is_err() {
                        exit(false)
                    }
                    let _ = sent.push_back(false);
                    ota_after = Some(after);
                    continue;
                }
                if device.publish(&ack, &payload, QoS::AtLeastOnce).is_err() {
                    exit(false)
                }
                #[cfg(feature = "_ota")]
                let _ = sent.push_back(false);
            }
            #[cfg(feature = "_ota")]
            Ok(Some(Incoming::OtaOffer { manifest })) => {
                if updater.offer(&manifest, now()) {
                    say!("update offered: downloading it into DFU");
                } else {
                    say!("update offer not taken");
                }
            }
            #[cfg(feature = "_ota")]
            Ok(Some(Incoming::OtaChunk { payload })) => updater.chunk(&payload, now()),
            Ok(Some(Incoming::CommandTooLarge { name_len, payload_len })) => {
                say!("command too large for this firmware ({name_len} B name, {payload_len} B payload): ignored")
            }
            // MQTT 5 (feature `mqtt5`): the broker refused a message; it is not retried.
            #[cfg(feature = "mqtt5")]
            Ok(Some(Incoming::Refused { reason })) => {
                say!("message refused by the broker (reason 0x{reason:02x})")
            }
            Ok(Some(Incoming::RotateRequested)) => {
                say!("the operator asked for a rotation");
                rot.start(&mut *rng, now());
            }
            Ok(Some(Incoming::Certificate { der })) => {
                match rot.bundle(&creds, creds.device_id, &der, scratch) {
                    Ok(n) => {
                        let _ = device.disconnect(&mut conn);
                        let _ = conn.close();
                        if let Err(e) = store.stage(&scratch[..n], &mut tmp) {
                            say!("cannot stage the new identity: {e:?}");
                            exit(false)
                        }
                        say!("rotation: new certificate staged in the spare slot; reconnecting with it");
                        return Next::Reconnect;
                    }
                    Err(e) => {
                        say!("issued certificate refused: {e:?}");
                        rot.rejected(now());
                    }
                }
            }
            Ok(Some(Incoming::CertificateRejected { reason })) => {
                say!("rotation refused by the issuer: {}", reason.as_str());
                rot.rejected(now());
            }
            Ok(None) => {}
            Err(ClientError::Session(e)) => {
                say!("session refused: {e:?}");
                exit(false)
            }
            Err(e) => {
                say!("connection lost: {e:?}");
                exit(false)
            }
        }
        // What the updater has to say: chunk requests at once (QoS 0, outside the outbox),
        // status reports through the outbox (QoS 1).
        #[cfg(feature = "_ota")]
        while device.session().is_connected() {
            let Some(m) = updater.poll_transmit(now()) else { break };
            if m.qos == QoS::AtMostOnce {
                if device.send_now(&mut conn, m.suffix, m.payload, m.qos, now()).is_err() {
                    say!("connection lost while asking for a chunk");
                    exit(false)
                }
                continue;
            }
            say!("OTA status {}", core::str::from_utf8(m.payload).unwrap_or("?"));
            if device.publish(m.suffix, m.payload, m.qos).is_ok() {
                let _ = sent.push_back(true);
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
