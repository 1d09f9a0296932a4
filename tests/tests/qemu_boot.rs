//! The A/B bootloader of the QEMU board (embassy-boot, `--bin bootloader`) with the application
//! built for it (`--features ota`), against the real broker.
//!
//! The update flash (BOOTLOADER STATE, ACTIVE, DFU) is a host file the firmware reaches through
//! semihosting (firmware-examples/qemu-mps2-an386/src/ota_layout.rs says why), built and read
//! here through embassy-boot itself (`fleet_tests::ota_flash`). The bootloader is the only
//! `-kernel` image; each application image is the same build stamped with its own version (and
//! the key its successors are signed with, made at test time), and the console shows which one
//! runs. Resets are the firmware's own SYSRESETREQ, and QEMU is also stopped and started again
//! on the same flash file, or killed outright.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::qemu::{send_command, Flow, Qemu};
use ed25519_dalek::SigningKey;
use fleet_tests::fixture::{BrokerCommand, BrokerLog, Fleet, Launched};
use fleet_tests::ota_flash::{self, FlashFile, Image, State};

fn firmware_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../firmware-examples/qemu-mps2-an386")
}

/// The bootloader (`cargo build --release --bins`), checked to end below the execution region.
fn bootloader() -> PathBuf {
    let elf = fleet_tests::firmware_image(
        "qemu-mps2-an386",
        &firmware_dir().join("target/thumbv7em-none-eabihf/release/bootloader"),
    );
    for (paddr, seg) in ota_flash::elf_segments(&std::fs::read(&elf).unwrap()).unwrap() {
        assert!(
            paddr as usize + seg.len() <= ota_flash::BOOTLOADER_MAX as usize,
            "the bootloader reaches into the execution region: {paddr:#x}+{:#x}",
            seg.len()
        );
    }
    elf
}

/// The application built for the bootloader (scripts/test builds it into `target/ota`).
fn application() -> Image {
    let elf = fleet_tests::firmware_image(
        "qemu-mps2-an386 (--bin fleet-firmware-mps2-an386 --features ota --target-dir target/ota)",
        &firmware_dir().join("target/ota/thumbv7em-none-eabihf/release/fleet-firmware-mps2-an386"),
    );
    Image::from_elf(&elf).unwrap()
}

/// A fleet of one device, its broker, the signing key of this test's releases, and a
/// directory for the flash file.
struct Bench {
    fleet: Fleet,
    broker: Launched,
    bins: PathBuf,
    key: SigningKey,
    dir: tempfile::TempDir,
    bootloader: PathBuf,
    app: Image,
}

impl Bench {
    fn new() -> Bench {
        fleet_tests::require_program("qemu-system-arm", "qemu-system-arm");
        let fleet = Fleet::with_lifetime_blocking(1, None, None);
        let broker = BrokerCommand::new(&fleet.home())
            .log(BrokerLog::Append(fleet.home().join("broker.log")))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        Bench {
            fleet,
            broker,
            bins: fleet_tests::workspace_bin_dir(&["fleet-broker", "fleet-sim"]),
            key: ota_flash::generate_key(),
            dir: tempfile::tempdir().unwrap(),
            bootloader: bootloader(),
            app: application(),
        }
    }

    /// The application stamped as `version`, trusting this test's key for its successors.
    fn release(&self, version: &str) -> Image {
        self.app.stamped(version, &self.key).unwrap()
    }

    fn flash(&self) -> FlashFile {
        FlashFile::open(&self.dir.path().join(ota_flash::FLASH_FILE))
    }

    /// A new flash file with `active` in ACTIVE, everything else erased.
    fn create_flash(&self, active: &Image) -> FlashFile {
        FlashFile::create(self.flash().path(), active).unwrap()
    }

    fn port(&self) -> u16 {
        self.broker.mqtt.port()
    }

    fn command(&self, name: &str, payload: &str) {
        send_command(&self.bins, &self.fleet.service, self.port(), &self.fleet.id(0), name, payload);
    }

    /// `ota-apply`'s payload: length and signature (hex) of the update in DFU.
    fn apply_payload(image: &Image, signature: &[u8; 64]) -> String {
        let hex: String = signature.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {hex}", image.len())
    }

    /// QEMU with the bootloader on this bench's flash file, the UART to `port`.
    fn boot(&self, port: u16, on_line: impl FnMut(&str) -> Flow) -> (bool, Vec<String>) {
        let bundle = self.fleet.devices[0].join("credentials.bin");
        Qemu {
            elf: &self.bootloader,
            icount: false,
            limit: Duration::from_secs(120),
            port,
            bundle: &bundle,
            cwd: Some(self.dir.path()),
        }
        .run(on_line)
    }

    fn broker_log(&self) -> String {
        std::fs::read_to_string(self.fleet.home().join("broker.log")).unwrap_or_default()
    }
}

/// Panics unless `steps` appear in `lines` in this order (each line holds its step).
fn in_order(lines: &[String], steps: &[&str]) {
    let mut at = 0;
    for step in steps {
        match lines[at..].iter().position(|l| l.contains(step)) {
            Some(i) => at += i + 1,
            None => panic!("missing or out of order: `{step}` in\n{}", lines.join("\n")),
        }
    }
}

/// The console lines of the bootloader and the application versions, in order.
fn boots(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| {
            let l = l.strip_prefix("FLEETGATE: ")?;
            // `firmware <version>: <how it was started>`, one per boot.
            let head = l.split_once(": ")?.0;
            (head.starts_with("firmware ") && head.split(' ').count() == 2).then_some(head)
        })
        .collect()
}

/// Bootloader + v1 in ACTIVE: the bootloader copies it to the execution region and starts it;
/// it reports its version, reaches the broker and does its job; again after a restart of QEMU.
#[test]
fn bootloader_starts_v1_from_the_flash_file_and_it_reports_its_version() {
    let bench = Bench::new();
    let v1 = bench.release("1.0.0");
    bench.create_flash(&v1);
    for run in 0..2 {
        let (ok, lines) = bench.boot(bench.port(), |l| {
            if l.contains("telemetry stored by the broker") {
                bench.command("blink", "3");
            }
            Flow::Go
        });
        assert!(ok, "run {run} failed: {lines:#?}\nbroker log:\n{}", bench.broker_log());
        in_order(
            &lines,
            &[
                "bootloader: ACTIVE as it is",
                &format!("bootloader: starting the application at 0x{:08x}", ota_flash::EXEC_ADDR),
                "firmware 1.0.0: confirmed image",
                "MQTT session up",
                "command blink",
                "command acknowledged",
            ],
        );
        assert_eq!(boots(&lines), ["firmware 1.0.0"], "{lines:#?}");
    }
    assert_eq!(bench.flash().state().unwrap(), State::Boot);
    assert_eq!(bench.flash().active(v1.len()).unwrap(), v1.bytes());
}

/// v2 written into DFU while v1 runs; an `ota-apply` with a signature by another key is refused
/// (v1 stays); with the right one v1 marks it through embassy-boot's ed25519 check and resets
/// (SYSRESETREQ); the bootloader swaps; v2 runs on trial and confirms itself once the broker
/// admits it; after another SYSRESETREQ and after a restart of QEMU it is still v2.
#[test]
fn a_signed_update_is_swapped_in_confirms_itself_and_stays_across_resets_and_restarts() {
    let bench = Bench::new();
    let (v1, v2) = (bench.release("1.0.0"), bench.release("2.0.0"));
    let flash = bench.create_flash(&v1);
    let forged = ota_flash::sign(&v2, &ota_flash::generate_key());
    let good = ota_flash::sign(&v2, &bench.key);
    let mut stored = 0;
    let t = Instant::now();
    let mut swap_started: Option<Instant> = None;
    let mut swap_time = Duration::ZERO;
    let (ok, lines) = bench.boot(bench.port(), |l| {
        if l.contains("telemetry stored by the broker") {
            stored += 1;
            match stored {
                // v1 runs: the download path's part, done from the host: v2 into DFU.
                1 => {
                    flash.place_update(&v2).unwrap();
                    bench.command("ota-apply", &Bench::apply_payload(&v2, &forged));
                }
                // v2 on trial, confirmed: a plain reset.
                2 => bench.command("reboot", "now"),
                _ => bench.command("blink", "3"),
            }
        }
        if l.contains("update in DFU verified") {
            eprintln!("{l}");
        }
        if l.contains("update refused") {
            bench.command("ota-apply", &Bench::apply_payload(&v2, &good));
        }
        if l.contains("resetting (SYSRESETREQ)") && swap_started.is_none() {
            swap_started = Some(Instant::now());
        }
        if l.contains("firmware 2.0.0: trial boot") {
            swap_time = swap_started.map(|s| s.elapsed()).unwrap_or_default();
        }
        Flow::Go
    });
    eprintln!("from v1's SYSRESETREQ to v2 running: {swap_time:?}; whole run {:?}", t.elapsed());
    assert!(ok, "firmware failed: {lines:#?}\nbroker log:\n{}", bench.broker_log());
    in_order(
        &lines,
        &[
            "firmware 1.0.0: confirmed image",
            "update refused (Signature): staying on 1.0.0",
            "update in DFU verified",
            "resetting (SYSRESETREQ)",
            "bootloader: swapped the update into ACTIVE: trial boot",
            "firmware 2.0.0: trial boot",
            "MQTT session up",
            "firmware 2.0.0 confirmed: the bootloader keeps it",
            "reboot requested",
            "resetting (SYSRESETREQ)",
            "bootloader: ACTIVE as it is",
            "firmware 2.0.0: confirmed image",
            "command blink",
            "command acknowledged",
        ],
    );
    assert_eq!(boots(&lines), ["firmware 1.0.0", "firmware 2.0.0", "firmware 2.0.0"], "{lines:#?}");
    assert_eq!(flash.state().unwrap(), State::Boot);
    assert_eq!(flash.active(v2.len()).unwrap(), v2.bytes(), "ACTIVE holds v2");

    // QEMU stopped and started again on the same flash file: v2, without a swap.
    let (ok, lines) = bench.boot(bench.port(), |l| {
        if l.contains("telemetry stored by the broker") {
            bench.command("blink", "3");
        }
        Flow::Go
    });
    assert!(ok, "firmware failed after a restart: {lines:#?}");
    in_order(
        &lines,
        &["bootloader: ACTIVE as it is", "firmware 2.0.0: confirmed image", "command acknowledged"],
    );
    assert_eq!(boots(&lines), ["firmware 2.0.0"], "{lines:#?}");
}

/// A stand-in for the network between the board and the broker: the first `refuse` connections
/// get a TLS handshake_failure alert and are closed, the later ones are spliced to the broker.
struct Gate {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Gate {
    fn start(broker: u16, refuse: usize) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut board) = conn else { return };
                let n = count.fetch_add(1, Ordering::SeqCst);
                if n < refuse {
                    std::thread::spawn(move || {
                        let mut hello = [0u8; 1024];
                        let _ = board.read(&mut hello);
                        // Alert record: fatal handshake_failure; then end of stream. The socket is
                        // closed only once the board has closed its side: a close with unread
                        // bytes would send a reset, which may discard the alert on its way.
                        let _ = board.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
                        let _ = board.shutdown(Shutdown::Write);
                        let _ = board.set_read_timeout(Some(Duration::from_secs(10)));
                        while matches!(board.read(&mut hello), Ok(n) if n > 0) {}
                    });
                    continue;
                }
                let Ok(broker) = TcpStream::connect(("127.0.0.1", broker)) else { return };
                for (mut from, mut to) in
                    [(board.try_clone().unwrap(), broker.try_clone().unwrap()), (broker, board)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Gate { port, accepted }
    }
}

/// v2 confirmed in ACTIVE, v3 written into DFU and marked from the host (embassy-boot's
/// `verify_and_mark_updated`). v3 runs on trial but the broker is out of reach (its first
/// connection is refused), so it never confirms: it resets itself and the bootloader reverts to
/// v2, which reaches the broker and confirms. Then v3 again, and QEMU is killed while v3 runs on
/// trial (a power cut): the next start reverts to v2 as well.
#[test]
fn an_update_that_never_confirms_is_rolled_back_at_the_next_reset() {
    let bench = Bench::new();
    let (v2, v3) = (bench.release("2.0.0"), bench.release("3.0.0"));
    let flash = bench.create_flash(&v2);
    let stage_v3 = || {
        flash.place_update(&v3).unwrap();
        // A signature by another key marks nothing.
        let forged = ota_flash::sign(&v3, &ota_flash::generate_key());
        assert!(flash.mark_update(bench.key.verifying_key().as_bytes(), &forged, v3.len()).is_err());
        assert_eq!(flash.state().unwrap(), State::Boot);
        let good = ota_flash::sign(&v3, &bench.key);
        flash.mark_update(bench.key.verifying_key().as_bytes(), &good, v3.len()).unwrap();
        assert_eq!(flash.state().unwrap(), State::Swap);
    };
    stage_v3();

    // (1) v3 cannot reach the broker: it resets (SYSRESETREQ), the bootloader reverts.
    let gate = Gate::start(bench.port(), 1);
    let (ok, lines) = bench.boot(gate.port, |l| {
        if l.contains("telemetry stored by the broker") {
            bench.command("blink", "3");
        }
        Flow::Go
    });
    assert!(ok, "firmware failed: {lines:#?}\nbroker log:\n{}", bench.broker_log());
    in_order(
        &lines,
        &[
            "bootloader: swapped the update into ACTIVE: trial boot",
            "firmware 3.0.0: trial boot",
            "this image is on trial and cannot reach the broker",
            "resetting (SYSRESETREQ)",
            "bootloader: the update was never confirmed: reverted ACTIVE to the previous image",
            "firmware 2.0.0: the bootloader rolled the update back to this image",
            "MQTT session up",
            "firmware 2.0.0 confirmed",
            "command acknowledged",
        ],
    );
    assert_eq!(boots(&lines), ["firmware 3.0.0", "firmware 2.0.0"], "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("firmware 3.0.0 confirmed")), "{lines:#?}");
    assert!(gate.accepted.load(Ordering::SeqCst) >= 2, "v2 came through the gate after the refusal");
    assert_eq!(flash.state().unwrap(), State::Boot);
    assert_eq!(flash.active(v2.len()).unwrap(), v2.bytes(), "ACTIVE holds v2 again");

    // (2) v3 again; the power is cut while it runs on trial (QEMU killed, the gate refusing
    // everything meanwhile): the next start of QEMU reverts.
    stage_v3();
    let closed = Gate::start(bench.port(), usize::MAX);
    let (_, lines) =
        bench.boot(
            closed.port,
            |l| {
                if l.contains("firmware 3.0.0: trial boot") {
                    Flow::Kill
                } else {
                    Flow::Go
                }
            },
        );
    assert_eq!(lines.last().map(String::as_str), Some("(killed)"), "{lines:#?}");
    assert_eq!(flash.state().unwrap(), State::Swap, "v3 never confirmed");
    let (ok, lines) = bench.boot(bench.port(), |l| {
        if l.contains("telemetry stored by the broker") {
            bench.command("blink", "3");
        }
        Flow::Go
    });
    assert!(ok, "firmware failed after the power cut: {lines:#?}");
    in_order(
        &lines,
        &[
            "bootloader: the update was never confirmed: reverted ACTIVE to the previous image",
            "firmware 2.0.0: the bootloader rolled the update back to this image",
            "firmware 2.0.0 confirmed",
            "command acknowledged",
        ],
    );
    assert_eq!(boots(&lines), ["firmware 2.0.0"], "{lines:#?}");
    assert_eq!(flash.active(v2.len()).unwrap(), v2.bytes());
}
