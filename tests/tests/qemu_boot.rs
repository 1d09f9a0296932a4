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
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// A fleet of devices (the board is the one whose id sorts first: a campaign's first wave), its
/// broker, the signing key of this test's releases, and a directory for the flash file.
struct Bench {
    fleet: Fleet,
    board: usize,
    broker: Launched,
    bins: PathBuf,
    key: SigningKey,
    dir: tempfile::TempDir,
    bootloader: PathBuf,
    app: Image,
}

impl Bench {
    fn new() -> Bench {
        Bench::with_devices(1)
    }

    fn with_devices(n: usize) -> Bench {
        fleet_tests::require_program("qemu-system-arm", "qemu-system-arm");
        let fleet = Fleet::with_lifetime_blocking(n, None, None);
        let board = (0..n).min_by_key(|&i| fleet.id(i)).unwrap();
        let broker = BrokerCommand::new(&fleet.home())
            .args(&["--ota-poll-ms", "100"])
            .log(BrokerLog::Append(fleet.home().join("broker.log")))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        Bench {
            fleet,
            board,
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

    /// The board's device id.
    fn board_id(&self) -> String {
        self.fleet.id(self.board)
    }

    fn command(&self, name: &str, payload: &str) {
        send_command(&self.bins, &self.fleet.service, self.port(), &self.board_id(), name, payload);
    }

    /// QEMU with the bootloader on this bench's flash file, the UART to `port`.
    fn boot(&self, port: u16, on_line: impl FnMut(&str) -> Flow) -> (bool, Vec<String>) {
        let bundle = self.fleet.devices[self.board].join("credentials.bin");
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

/// The byte offset in an `OTA status` console line of state `downloading`.
fn downloading_offset(line: &str) -> Option<u32> {
    let json = line.split_once("OTA status ")?.1;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    (v["state"] == "downloading").then(|| v["offset"].as_u64())?.map(|o| o as u32)
}

/// Campaign `id` as `ota status --campaign <id> --json` shows it.
fn campaign(bench: &Bench, id: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&station(bench, &["ota", "status", "--campaign", id, "--json"])).unwrap();
    v[0].clone()
}

/// The state of `device`'s job in campaign `c`.
fn job_of(c: &serde_json::Value, device: &str) -> String {
    let jobs = c["jobs"].as_array().unwrap();
    let j =
        jobs.iter().find(|j| j["device_id"] == device).unwrap_or_else(|| panic!("no job of {device}: {c}"));
    j["state"].as_str().unwrap_or_default().to_owned()
}

/// `ota start` for `release` (board/version) and `devices`; the campaign's id.
fn start_campaign(bench: &Bench, release: &str, devices: &str, waves: &str) -> String {
    let out = station(
        bench,
        &[
            "ota",
            "start",
            "--release",
            release,
            "--devices",
            devices,
            "--waves",
            waves,
            "--abort-if-failed",
            "0%",
        ],
    );
    out.split_whitespace().find(|w| w.starts_with("ota-")).unwrap().to_owned()
}

/// The device's whole update path in QEMU through fleet-broker and the station, with nothing
/// stood in. A campaign of another board's release (`nucleo-f429zi/2.0.0`) in two waves, the
/// board first: v1 refuses it (`wrong_board`, nothing downloaded), the campaign stops itself
/// (threshold 0 %) and the second wave's device is never offered it. Then a campaign of the
/// board's own v2: the board downloads it in chunks from fleet-broker into DFU, and QEMU is
/// killed mid-download (a power cut); started again, v1 resumes at the recorded sector
/// boundary without a new offer, verifies (SHA-512, embassy-boot's signature check), reports
/// `verified` and resets; the bootloader swaps; v2 runs on trial, reconnects, confirms itself and
/// reports `rebooted` and `confirmed`, which the station shows; after a restart of QEMU it is
/// still v2.
#[test]
fn a_first_wave_that_refuses_stops_its_campaign_and_a_download_resumes_after_a_power_cut() {
    let bench = Bench::with_devices(2);
    let key = station_key(&bench);
    let v1 = bench.app.stamped("1.0.0", &key).unwrap();
    let v2 = bench.app.stamped("2.0.0", &key).unwrap();
    let flash = bench.create_flash(&v1);
    let image = bench.dir.path().join("v2.bin");
    std::fs::write(&image, v2.bytes()).unwrap();
    for board in ["nucleo-f429zi", "mps2-an386"] {
        let img = image.to_str().unwrap();
        station(
            &bench,
            &["release", "--image", img, "--version", "2.0.0", "--board", board, "--max-size", "384KiB"],
        );
        station(&bench, &["ota", "publish", "--release", &format!("{board}/2.0.0")]);
    }
    let (board, other) = (bench.board_id(), bench.fleet.id(1 - bench.board));
    let wrong = start_campaign(&bench, "nucleo-f429zi/2.0.0", &format!("{board},{other}"), "50%,100%");

    // (1) The wrong board's offer is refused and its campaign stops; then the board's own
    // release is offered, and the power is cut a third of the way into the download.
    let third = v2.len() / 3;
    let mut cut_at = 0;
    let mut own = None;
    let (_, lines) = bench.boot(bench.port(), |l| {
        if l.contains("\"reason\":\"wrong_board\"") && own.is_none() {
            let t = std::time::Instant::now();
            let c = loop {
                let c = campaign(&bench, &wrong);
                if c["state"] == "aborted" {
                    break c;
                }
                assert!(t.elapsed() < Duration::from_secs(10), "the campaign did not stop: {c:#}");
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(job_of(&c, &board), "failed", "{c:#}");
            assert_eq!(job_of(&c, &other), "cancelled", "the second wave was offered: {c:#}");
            own = Some(start_campaign(&bench, "mps2-an386/2.0.0", &board, "100%"));
        }
        match downloading_offset(l) {
            Some(o) if o >= third => {
                cut_at = o;
                Flow::Kill
            }
            _ => Flow::Go,
        }
    });
    assert_eq!(lines.last().map(String::as_str), Some("(killed)"), "{lines:#?}\n{}", bench.broker_log());
    in_order(
        &lines,
        &[
            "firmware 1.0.0: confirmed image",
            "MQTT session up",
            "update offer not taken",
            "\"state\":\"failed\",\"offset\":0,\"size\":",
            "update offered: downloading it into DFU",
            "\"state\":\"downloading\",\"offset\":0,",
        ],
    );
    assert!(cut_at >= third, "{lines:#?}");
    assert_eq!(flash.state().unwrap(), State::Boot, "nothing marked before the download ended");
    let own = own.unwrap();
    assert_eq!(job_of(&campaign(&bench, &own), &board), "downloading");

    // (2) Power back: the download resumes from the record, v2 is verified, swapped in and
    // confirmed once it reached the broker.
    let mut resumed_at = None;
    let (ok, lines) = bench.boot(bench.port(), |l| {
        if resumed_at.is_none() {
            resumed_at = downloading_offset(l);
        }
        if l.contains("\"state\":\"confirmed\"") {
            bench.command("blink", "3");
        }
        Flow::Go
    });
    assert!(ok, "firmware failed: {lines:#?}\nbroker log:\n{}", bench.broker_log());
    let resumed_at = resumed_at.expect("a downloading report at the start");
    // The record holds each sector boundary passed: at least the one before the report that
    // triggered the cut (the download may have gone on until QEMU died).
    assert!(
        resumed_at >= cut_at / 4096 * 4096 && resumed_at > 0 && resumed_at % 4096 == 0,
        "resumed at {resumed_at}, cut at {cut_at}"
    );
    assert!(resumed_at < v2.len(), "resumed at {resumed_at}");
    in_order(
        &lines,
        &[
            "firmware 1.0.0: confirmed image",
            "MQTT session up",
            "\"state\":\"verified\"",
            "update verified and reported: resetting",
            "bootloader: swapped the update into ACTIVE: trial boot",
            "firmware 2.0.0: trial boot",
            "MQTT session up",
            "\"state\":\"rebooted\"",
            "\"state\":\"confirmed\",\"offset\":",
            "command acknowledged",
        ],
    );
    assert!(
        !lines.iter().any(|l| l.contains("\"state\":\"downloading\",\"offset\":0,")),
        "no download from 0 again: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"version\":\"2.0.0\",\"state\":\"confirmed\"")
            && l.contains("\"running\":\"2.0.0\"}")),
        "{lines:#?}"
    );
    assert_eq!(boots(&lines), ["firmware 1.0.0", "firmware 2.0.0"], "{lines:#?}");
    assert_eq!(flash.state().unwrap(), State::Boot);
    assert_eq!(flash.active(v2.len()).unwrap(), v2.bytes(), "ACTIVE holds v2");
    let t = std::time::Instant::now();
    while job_of(&campaign(&bench, &own), &board) != "confirmed" {
        assert!(t.elapsed() < Duration::from_secs(10), "{:#}", campaign(&bench, &own));
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = campaign(&bench, &wrong);
    assert_eq!(job_of(&c, &other), "cancelled", "{c:#}");

    // (3) QEMU stopped and started again: v2, without a swap, and nothing more to report.
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
    assert!(!lines.iter().any(|l| l.contains("OTA status")), "{lines:#?}");
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

/// `fleet-provision` on the bench's station; its stdout.
fn station(bench: &Bench, args: &[&str]) -> String {
    let bin = fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision");
    let out = Command::new(bin).arg("--home").arg(bench.fleet.home()).args(args).output().unwrap();
    assert!(out.status.success(), "fleet-provision {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The station's firmware signing key (`fleet-provision firmware-key`: PKCS#8 v1, RFC 8410, the
/// 32-byte seed last), to stamp the images that trust it.
fn station_key(bench: &Bench) -> SigningKey {
    station(bench, &["firmware-key"]);
    let pem = std::fs::read(bench.fleet.home().join("private/firmware.key")).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let seed: [u8; 32] = block.contents[block.contents.len() - 32..].try_into().unwrap();
    let key = SigningKey::from_bytes(&seed);
    assert_eq!(
        key.verifying_key().as_bytes().as_slice(),
        std::fs::read(bench.fleet.home().join("firmware.pub")).unwrap(),
        "the seed read is the station's key"
    );
    key
}

/// The whole path with nothing stood in: the station signs v2 (`release`), publishes it and
/// starts a campaign while the board is off (asleep); fleet-broker queues the offer, the board
/// (v1) gets it when it connects, downloads v2 from fleet-broker's chunk serving, verifies,
/// resets; the bootloader swaps; v2 confirms and reports, and the station's `ota status` says
/// the job is confirmed.
#[test]
fn a_campaign_started_while_the_board_sleeps_updates_it_through_fleet_broker() {
    let bench = Bench::new();
    let key = station_key(&bench);
    let v1 = bench.app.stamped("1.0.0", &key).unwrap();
    let v2 = bench.app.stamped("2.0.0", &key).unwrap();
    let flash = bench.create_flash(&v1);
    let image = bench.dir.path().join("v2.bin");
    std::fs::write(&image, v2.bytes()).unwrap();
    station(
        &bench,
        &[
            "release",
            "--image",
            image.to_str().unwrap(),
            "--version",
            "2.0.0",
            "--board",
            "mps2-an386",
            "--max-size",
            "384KiB",
        ],
    );
    station(&bench, &["ota", "publish", "--release", "mps2-an386/2.0.0"]);
    let out = station(
        &bench,
        &[
            "ota",
            "start",
            "--release",
            "mps2-an386/2.0.0",
            "--devices",
            "all",
            "--waves",
            "100%",
            "--abort-if-failed",
            "0%",
        ],
    );
    let campaign = out.split_whitespace().find(|w| w.starts_with("ota-")).unwrap().to_owned();
    let job = || {
        let v: serde_json::Value =
            serde_json::from_str(&station(&bench, &["ota", "status", "--campaign", &campaign, "--json"]))
                .unwrap();
        v[0]["jobs"][0]["state"].as_str().unwrap_or_default().to_owned()
    };
    let t = std::time::Instant::now();
    while job() != "queued" {
        assert!(t.elapsed() < Duration::from_secs(10), "the offer was never queued: {}", job());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Offer to confirmation as the console shows it (BENCHMARKS.md: QEMU update time).
    let (mut offered, mut confirmed) = (None, None);
    let (ok, lines) = bench.boot(bench.port(), |l| {
        if l.contains("update offered: downloading it into DFU") {
            offered.get_or_insert_with(std::time::Instant::now);
        }
        if l.contains("\"state\":\"confirmed\"") {
            confirmed.get_or_insert_with(std::time::Instant::now);
            bench.command("blink", "3");
        }
        Flow::Go
    });
    assert!(ok, "firmware failed: {lines:#?}\nbroker log:\n{}", bench.broker_log());
    if let (Some(o), Some(c)) = (offered, confirmed) {
        eprintln!("QEMU: offer to confirmed {:.1} s ({} bytes)", (c - o).as_secs_f64(), v2.len());
    }
    in_order(
        &lines,
        &[
            "firmware 1.0.0: confirmed image",
            "MQTT session up",
            "update offered: downloading it into DFU",
            "\"state\":\"downloading\",\"offset\":0,",
            "\"state\":\"verified\"",
            "update verified and reported: resetting",
            "bootloader: swapped the update into ACTIVE: trial boot",
            "firmware 2.0.0: trial boot",
            "MQTT session up",
            "\"state\":\"rebooted\"",
            "\"state\":\"confirmed\",\"offset\":",
            "command acknowledged",
        ],
    );
    assert_eq!(boots(&lines), ["firmware 1.0.0", "firmware 2.0.0"], "{lines:#?}");
    assert_eq!(flash.state().unwrap(), State::Boot);
    assert_eq!(flash.active(v2.len()).unwrap(), v2.bytes(), "ACTIVE holds v2");
    let t = std::time::Instant::now();
    while job() != "confirmed" {
        assert!(t.elapsed() < Duration::from_secs(10), "the job is {}, not confirmed", job());
        std::thread::sleep(Duration::from_millis(100));
    }
}
