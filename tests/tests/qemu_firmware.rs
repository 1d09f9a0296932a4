//! The Cortex-M4F example firmware running in QEMU (mps2-an386) against the real broker:
//! provision → broker → firmware connects over UART↔TCP with mutual TLS, its telemetry is stored
//! and seen by a service, the command it is sent comes back acknowledged; once revoked it is
//! refused; flashed with another PKI's bundle it refuses the broker.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::qemu::{Flow, Qemu};
use fleet_tests::fixture::{BrokerCommand, BrokerLog, Fleet, Launched};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-provision", "fleet-broker", "fleet-sim"])
}

/// The image of `bin` in firmware-examples/qemu-mps2-an386, checked to be built from the
/// current sources (`fleet_tests::firmware_image`).
fn image(bin: &str) -> PathBuf {
    let elf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-examples/qemu-mps2-an386/target/thumbv7em-none-eabihf/release")
        .join(bin);
    fleet_tests::firmware_image("qemu-mps2-an386", &elf)
}

fn firmware() -> PathBuf {
    image("fleet-firmware-mps2-an386")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A provisioned fleet of one device (the library's fixture), seen as the firmware tests use it.
struct Pki {
    /// Holds the home and the identities; removed on drop.
    _fleet: Fleet,
    home: PathBuf,
    device_dir: PathBuf,
    device_id: String,
    /// The backend service's identity directory.
    service: PathBuf,
}

fn provision() -> Pki {
    provision_for(None)
}

/// As `provision`, the device's certificate valid for `days` only.
fn provision_for(days: Option<i64>) -> Pki {
    let fleet = Fleet::with_lifetime_blocking(1, None, days);
    let (home, device_dir, device_id, service) =
        (fleet.home(), fleet.devices[0].clone(), fleet.id(0), fleet.service.clone());
    Pki { _fleet: fleet, home, device_dir, device_id, service }
}

/// A broker of the fleet (the library's launcher); its log appended to `home/broker.log`, so a
/// restarted broker's follows the first one's.
struct Broker {
    /// The process (killed on drop) and its addresses.
    launched: Launched,
    port: u16,
    metrics: std::net::SocketAddr,
}

fn start_broker(pki: &Pki) -> Broker {
    start_broker_on(pki, 0)
}

/// A broker on `port` (0: any free port).
fn start_broker_on(pki: &Pki, port: u16) -> Broker {
    let launched = BrokerCommand::new(&pki.home)
        .port(port)
        .log(BrokerLog::Append(pki.home.join("broker.log")))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let (port, metrics) = (launched.mqtt.port(), launched.metrics.unwrap());
    Broker { launched, port, metrics }
}

fn metrics(b: &Broker) -> String {
    let mut s = TcpStream::connect(b.metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The async (embassy) example firmware.
fn async_firmware() -> PathBuf {
    image("async_device")
}

/// Boots the firmware with `bundle` in its credentials region; returns (exit ok, output lines).
/// `on_line` sees each line as it arrives.
fn boot(port: u16, bundle: &Path, on_line: impl FnMut(&str)) -> (bool, Vec<String>) {
    boot_elf(&firmware(), true, Duration::from_secs(60), port, bundle, on_line)
}

/// Boots `elf`: with `icount`, virtual time is instructions executed (1 ns each) and the
/// firmware's SysTick figure for the TLS handshake becomes an instruction count
/// (BENCHMARKS.md); without it, virtual time is real time (timers, keep-alive, back-off).
fn boot_elf(
    elf: &Path,
    icount: bool,
    limit: Duration,
    port: u16,
    bundle: &Path,
    mut on_line: impl FnMut(&str),
) -> (bool, Vec<String>) {
    Qemu { elf, icount, limit, port, bundle, cwd: None }.run(|l| {
        on_line(l);
        Flow::Go
    })
}

fn telemetry_topics(home: &Path, device: &str) -> Vec<(String, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}", home.join("registry.db").display());
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        // Everything the broker acknowledged so far: its telemetry log copied up to here.
        if let Some((id, last)) = fleet_broker::store_log_position(&home.join("telemetry-log")).unwrap() {
            let t = Instant::now();
            loop {
                let fed: Option<i64> =
                    sqlx::query_scalar("SELECT fed_seq FROM telemetry_feed WHERE log_id = $1")
                        .bind(id)
                        .fetch_optional(&pool)
                        .await
                        .unwrap();
                if fed.unwrap_or(0) >= i64::try_from(last).unwrap() {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the telemetry log is not copied into the registry"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let rows = sqlx::query("SELECT topic, payload FROM telemetry WHERE device_id = $1 ORDER BY id")
            .bind(device)
            .fetch_all(&pool)
            .await
            .unwrap();
        use sqlx::Row;
        rows.iter().map(|r| (r.get::<String, _>(0), r.get::<Vec<u8>, _>(1))).collect()
    })
}

#[test]
fn firmware_in_qemu_connects_publishes_gets_a_command_and_is_cut_off_when_revoked() {
    let bins = bin_dir();
    let pki = provision();
    let broker = start_broker(&pki);
    let bundle = pki.device_dir.join("credentials.bin");

    // A service watches telemetry while the firmware runs.
    let mut watch = Command::new(bins.join("fleet-sim"))
        .args(["watch", "--identity"])
        .arg(&pki.service)
        .args(["--port", &broker.port.to_string(), "--duration", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // It prints `watching` once its subscription is granted.
    let watched_lines = {
        let (tx, rx) = mpsc::channel();
        let out = watch.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        rx
    };
    match watched_lines.recv_timeout(Duration::from_secs(20)) {
        Ok(l) if l.starts_with("watching") => {}
        other => panic!("fleet-sim watch did not subscribe: {other:?}"),
    }
    let send_command = || send_command(&bins, &pki, broker.port, &pki.device_id, "blink", "3");
    let (ok, lines) = boot(broker.port, &bundle, |l| {
        if l.contains("telemetry stored by the broker") {
            send_command();
        }
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let watched: String = watched_lines.iter().map(|l| l + "\n").collect(); // to EOF
    let log = std::fs::read_to_string(pki.home.join("broker.log")).unwrap_or_default();
    assert!(ok, "firmware failed: {lines:#?}\nbroker log:\n{log}");
    let text = lines.join("\n");
    for expected in [
        "TLS established",
        "MQTT session up",
        "telemetry stored by the broker",
        "command blink",
        "command acknowledged",
        "peak stack:",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in {text}");
    }
    // Its telemetry row and its acknowledgement are in the broker's database; the service saw it.
    let rows = telemetry_topics(&pki.home, &pki.device_id);
    let topics: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        topics,
        vec![format!("devices/{}/telemetry", pki.device_id), format!("devices/{}/acks/blink", pki.device_id)]
    );
    assert_eq!(rows[1].1, b"3");
    assert!(
        watched.contains(&format!("devices/{}/telemetry", pki.device_id)),
        "service did not see it: {watched}"
    );

    // Revoke it: the next boot is refused, and the broker says why.
    run(Command::new(bins.join("fleet-provision"))
        .arg("--home")
        .arg(&pki.home)
        .args(["revoke", &pki.device_id]));
    // The broker has seen the revocation (its registry feed) before the device boots again.
    let t = Instant::now();
    while !metrics(&broker).lines().any(|l| l.starts_with("fleet_revocations_seen_total 1")) {
        assert!(t.elapsed() < Duration::from_secs(20), "the broker never saw the revocation");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, lines) = boot(broker.port, &bundle, |_| {});
    assert!(!ok, "a revoked device must not complete: {lines:?}");
    assert!(!lines.iter().any(|l| l.contains("MQTT session up")), "revoked device got a session: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("refused") || l.contains("connection lost")), "{lines:?}");
    let m = metrics(&broker);
    assert!(m.contains("fleet_handshakes_total{outcome=\"refused\",reason=\"revoked\"}"), "{m}");
}

#[test]
fn firmware_with_another_pkis_bundle_refuses_the_broker() {
    let pki = provision();
    let foreign = provision();
    let broker = start_broker(&pki);
    let (ok, lines) = boot(broker.port, &foreign.device_dir.join("credentials.bin"), |_| {});
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("TLS refused") && l.contains("WrongIssuer")), "{lines:?}");
    assert!(telemetry_topics(&pki.home, &foreign.device_id).is_empty());
}

/// The firmware against a broker impersonator that sends no Certificate and no CertificateVerify
/// (embedded-tls completes such a handshake): refused, and not one MQTT byte reaches it.
#[test]
fn firmware_refuses_a_server_that_never_authenticates() {
    use fleet_tests::rogue_tls::{Mode, RogueServer};
    let pki = provision();
    let cert = std::fs::read_to_string(pki.home.join("broker-tls/cert.pem")).unwrap();
    let cert_der = fleet_tests::rogue_tls::first_certificate_der(&cert);
    // The attacker has no broker key; a random one stands in (this mode never signs).
    let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let rogue = RogueServer::start(Mode::NoCertificate, cert_der, key);
    let (ok, lines) = boot(rogue.addr.port(), &pki.device_dir.join("credentials.bin"), |_| {});
    let report = rogue.finish();
    assert!(!ok, "firmware completed against a server that never authenticated: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("TLS refused") && l.contains("NoCertificate")), "{lines:?}");
    assert_eq!(report.app_bytes, 0, "firmware sent MQTT to an unauthenticated server: {report:?}");
    assert_ne!(report.client_sent_certificate, Some(true), "firmware showed its certificate: {report:?}");
}

/// A running `fleet-provision serve` (the online issuer); killed on drop.
struct IssuerProc(Child);

impl Drop for IssuerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_issuer(bins: &Path, pki: &Pki, broker: &Broker) -> IssuerProc {
    let fp = |args: &[&str]| {
        run(Command::new(bins.join("fleet-provision")).arg("--home").arg(&pki.home).args(args))
    };
    let dir = pki.home.join("issuer");
    fp(&["issuer-cert", "--name", "issuer-1", "--out", dir.to_str().unwrap()]);
    let log = pki.home.join("issuer.log");
    let child = Command::new(bins.join("fleet-provision"))
        .arg("--home")
        .arg(&pki.home)
        .args([
            "serve",
            "--identity",
            dir.to_str().unwrap(),
            "--port",
            &broker.port.to_string(),
            "--grace",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("issuer connected") {
        assert!(t.elapsed() < Duration::from_secs(30), "issuer did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    IssuerProc(child)
}

fn certificates(home: &Path, device: &str) -> Vec<(String, String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}", home.join("registry.db").display());
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let rows = sqlx::query(
            "SELECT serial, status, key_source FROM certificates WHERE device_id = $1 ORDER BY issued_at",
        )
        .bind(device)
        .fetch_all(&pool)
        .await
        .unwrap();
        use sqlx::Row;
        rows.iter().map(|r| (r.get::<String, _>(0), r.get::<String, _>(1), r.get::<String, _>(2))).collect()
    })
}

/// `fleet-sim command`: the fleet's service sends command `name` with `payload` to `device`.
fn send_command(bins: &Path, pki: &Pki, port: u16, device: &str, name: &str, payload: &str) {
    common::qemu::send_command(bins, &pki.service, port, device, name, payload)
}

fn command_when_stored(bins: &Path, pki: &Pki, port: u16, device: &str) {
    send_command(bins, pki, port, device, "blink", "3");
}

/// The firmware rotates in QEMU: its certificate (10 days left) is inside the 30-day window, so
/// it generates a new key on the emulated MCU, sends its CSR over MQTT, stages the issued
/// certificate in the spare slot of its credentials region, reconnects with it, commits it, and
/// then does its job as the new identity. The old certificate is superseded a second later.
#[test]
fn firmware_in_qemu_rotates_its_key_and_reconnects_with_the_new_identity() {
    let bins = bin_dir();
    let pki = provision_for(Some(10));
    let broker = start_broker(&pki);
    let _issuer = start_issuer(&bins, &pki, &broker);
    let device = pki.device_id.clone();
    let (ok, lines) = boot(broker.port, &pki.device_dir.join("credentials.bin"), |l| {
        if l.contains("telemetry stored by the broker") {
            command_when_stored(&bins, &pki, broker.port, &device);
        }
    });
    let text = lines.join("\n");
    let log = std::fs::read_to_string(pki.home.join("broker.log")).unwrap_or_default();
    let issuer = std::fs::read_to_string(pki.home.join("issuer.log")).unwrap_or_default();
    assert!(ok, "firmware failed: {text}\nbroker log:\n{log}\nissuer log:\n{issuer}");
    let order = [
        "certificate expires within 30 days: rotating",
        "rotation: CSR sent",
        "rotation: new certificate staged in the spare slot",
        "rotated: the broker admitted the new identity",
        "telemetry stored by the broker",
        "command acknowledged",
    ];
    let mut at = 0;
    for step in order {
        let i =
            text[at..].find(step).unwrap_or_else(|| panic!("missing or out of order: `{step}` in {text}"));
        at += i + step.len();
    }
    assert_eq!(text.matches("TLS established").count(), 2, "{text}");
    // The registry: the factory certificate superseded after the grace period, the new one
    // (a key from the device's CSR) active.
    let t = Instant::now();
    loop {
        let certs = certificates(&pki.home, &pki.device_id);
        if certs.len() == 2 && certs[0].1 == "revoked" {
            assert_eq!(
                (certs[0].2.as_str(), certs[1].1.as_str(), certs[1].2.as_str()),
                ("station", "active", "rotation")
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not superseded: {certs:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows = telemetry_topics(&pki.home, &pki.device_id);
    assert!(rows.iter().any(|r| r.0.ends_with("/acks/blink")), "{rows:?}");
}

/// Claim-based first boot in QEMU: the credentials region holds only the batch's claim; the
/// firmware generates its key, gets its own identity from the issuer, stores it, reconnects as
/// itself and does its job. The station never saw the key; the claim's quota counts it.
#[test]
fn firmware_in_qemu_boots_from_a_claim_and_becomes_its_own_device() {
    let bins = bin_dir();
    let pki = provision();
    let fp = |args: &[&str]| {
        run(Command::new(bins.join("fleet-provision")).arg("--home").arg(&pki.home).args(args))
    };
    let claim_dir = pki.home.join("claim");
    fp(&["claim-cert", "--name", "batch-q", "--quota", "1", "--out", claim_dir.to_str().unwrap()]);
    let broker = start_broker(&pki);
    let _issuer = start_issuer(&bins, &pki, &broker);
    let mut device = String::new();
    let (ok, lines) = boot(broker.port, &claim_dir.join("credentials.bin"), |l| {
        if let Some(rest) = l.split("asking for an identity as ").nth(1) {
            device = rest.trim().to_owned();
        }
        if l.contains("telemetry stored by the broker") {
            command_when_stored(&bins, &pki, broker.port, &device);
        }
    });
    let text = lines.join("\n");
    let issuer = std::fs::read_to_string(pki.home.join("issuer.log")).unwrap_or_default();
    assert!(ok, "firmware failed: {text}\nissuer log:\n{issuer}");
    for expected in [
        "first boot with claim batch-q",
        "claim: CSR sent",
        "identity dev-",
        "reconnecting as itself",
        "telemetry stored by the broker",
        "command acknowledged",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in {text}");
    }
    assert!(device.starts_with("dev-"), "{text}");
    let certs = certificates(&pki.home, &device);
    assert_eq!(certs.len(), 1);
    assert_eq!((certs[0].1.as_str(), certs[0].2.as_str()), ("active", "claim"));
    assert!(telemetry_topics(&pki.home, &device).iter().any(|r| r.0.ends_with("/acks/blink")));
    // The quota of 1 is used up: a second device from the same claim is refused.
    let (ok, lines) = boot(broker.port, &claim_dir.join("credentials.bin"), |_| {});
    assert!(!ok);
    assert!(lines.iter().any(|l| l.contains("claim_exhausted")), "{lines:?}");
}

/// `fleet-provision commands <id> --json`: (name, status) newest first.
fn command_statuses(bins: &Path, pki: &Pki) -> Vec<(String, String)> {
    let out = run(Command::new(bins.join("fleet-provision")).arg("--home").arg(&pki.home).args([
        "commands",
        &pki.device_id,
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c["status"].as_str().unwrap().to_owned()))
        .collect()
}

/// A sleeping board gets what was sent while it slept (issue 16): a command sent while the
/// firmware is off is stored, delivered on its next boot exactly once, and acknowledged; the
/// firmware's persistent session is resumed on the boot after (CONNACK session present, no new
/// SUBSCRIBE) and brings only the command sent since, never the first one again.
#[test]
fn firmware_in_qemu_gets_commands_sent_while_it_was_off_once_each_on_a_persistent_session() {
    let bins = bin_dir();
    let pki = provision();
    let broker = start_broker(&pki);
    let bundle = pki.device_dir.join("credentials.bin");
    let send =
        |name: &str, payload: &str| send_command(&bins, &pki, broker.port, &pki.device_id, name, payload);
    send("blink", "3");
    assert_eq!(command_statuses(&bins, &pki), [("blink".to_owned(), "queued".to_owned())]);

    let (ok, lines) = boot(broker.port, &bundle, |_| {});
    let text = lines.join("\n");
    assert!(ok, "firmware failed: {text}");
    assert!(text.contains("MQTT session up") && !text.contains("session resumed"), "{text}");
    assert_eq!(lines.iter().filter(|l| l.contains("command blink")).count(), 1, "{text}");
    assert!(text.contains("command acknowledged"), "{text}");
    assert_eq!(command_statuses(&bins, &pki), [("blink".to_owned(), "acknowledged".to_owned())]);

    // Asleep again; another command; the next boot resumes the kept session.
    send("reboot", "now");
    let (ok, lines) = boot(broker.port, &bundle, |_| {});
    let text = lines.join("\n");
    assert!(ok, "firmware failed: {text}");
    assert!(text.contains("MQTT session up (persistent session resumed)"), "{text}");
    assert_eq!(lines.iter().filter(|l| l.contains("command reboot")).count(), 1, "{text}");
    assert!(!text.contains("command blink"), "delivered twice: {text}");
    assert_eq!(
        command_statuses(&bins, &pki),
        [("reboot".to_owned(), "acknowledged".to_owned()), ("blink".to_owned(), "acknowledged".to_owned())]
    );
    let acks: Vec<String> = telemetry_topics(&pki.home, &pki.device_id)
        .into_iter()
        .filter(|r| r.0.contains("/acks/"))
        .map(|r| r.0.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(acks, ["blink", "reboot"]);
}

/// The async (embassy) firmware as a device that runs for days, in QEMU against the real
/// broker: it signs its handshakes through its (mock) secure element, idles through more than
/// two keep-alive intervals on one connection (PINGs, no reconnect), notices the broker's death
/// (kill -9) by the missing PINGRESP, queues telemetry while it backs off, reconnects to the
/// restarted broker with a resumed persistent session, drains its outbox (every reading stored
/// once, in order), answers a command sent after the reconnect, and halts on request.
#[test]
fn async_firmware_in_qemu_idles_survives_a_broker_restart_and_answers_a_command() {
    let bins = bin_dir();
    let pki = provision();
    let mut broker = Some(start_broker(&pki));
    let port = broker.as_ref().unwrap().port;
    let bundle = pki.device_dir.join("credentials.bin");
    let send = |name: &str| send_command(&bins, &pki, port, &pki.device_id, name, "1");
    #[derive(PartialEq, Debug)]
    enum Stage {
        FirstReading,
        Idling(Instant),
        BrokerDown,
        Reconnected,
        CommandSent,
        Halting,
    }
    let mut stage = Stage::FirstReading;
    let mut lost_before_kill = false;
    let (ok, lines) = boot_elf(&async_firmware(), false, Duration::from_secs(120), port, &bundle, |l| {
        match &stage {
            Stage::FirstReading if l.contains("delivered") => stage = Stage::Idling(Instant::now()),
            // The next reading 8 s later, on the same connection, after more than two 3 s
            // keep-alive intervals of silence: then the broker dies.
            Stage::Idling(since) if l.contains("delivered") && since.elapsed() > Duration::from_secs(5) => {
                let mut b = broker.take().unwrap();
                b.launched.child.kill9();
                // Down for longer than the telemetry period: readings queue meanwhile.
                std::thread::sleep(Duration::from_secs(10));
                broker = Some(start_broker_on(&pki, port));
                stage = Stage::BrokerDown;
            }
            Stage::FirstReading | Stage::Idling(_) if l.contains("connection lost") => {
                lost_before_kill = true
            }
            Stage::BrokerDown if l.contains("MQTT session up") => {
                stage = Stage::Reconnected;
            }
            Stage::Reconnected if l.contains("delivered (0 still queued)") => {
                send("blink");
                stage = Stage::CommandSent;
            }
            Stage::CommandSent if l.contains("command blink") => stage = Stage::Halting,
            Stage::Halting if l.contains("delivered") => send("halt"),
            _ => {}
        }
    });
    let text = lines.join("\n");
    assert!(ok, "firmware failed (stage {stage:?}): {text}");
    let broker_log = std::fs::read_to_string(pki.home.join("broker.log")).unwrap_or_default();
    assert!(!lost_before_kill, "the session dropped while idle: {text}\nbroker:\n{broker_log}");
    assert!(text.contains("key in the secure element"), "{text}");
    assert!(text.contains("TLS established (connection 2)"), "{text}");
    assert!(!text.contains("TLS established (connection 3)"), "reconnected more than once: {text}");
    assert!(text.contains("2 signatures by the secure element"), "{text}");
    assert!(text.contains("queued while the session is down"), "{text}");
    assert!(text.contains("halting"), "{text}");
    let rows = telemetry_topics(&pki.home, &pki.device_id);
    let seqs: Vec<u32> = rows
        .iter()
        .filter(|r| r.0.ends_with("/telemetry"))
        .map(|r| postcard::from_bytes::<(u32, i32)>(&r.1).unwrap().0)
        .collect();
    assert!(seqs.len() >= 3, "{seqs:?}");
    assert_eq!(seqs, (1..=seqs.len() as u32).collect::<Vec<_>>(), "every reading stored once, in order");
    assert!(rows.iter().any(|r| r.0.ends_with("/acks/blink")), "{rows:?}");
    drop(broker);
}

/// The async image built with the SDK's `mqtt5` feature (scripts/test builds it into
/// `target/mqtt5`) speaks MQTT 5 to the broker in QEMU: telemetry under its topic alias stored
/// under the full topic, a command received and acknowledged.
#[test]
fn async_firmware_in_qemu_speaks_mqtt5() {
    let bins = bin_dir();
    let elf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-examples/qemu-mps2-an386/target/mqtt5/thumbv7em-none-eabihf/release/async_device");
    let elf =
        fleet_tests::firmware_image("qemu-mps2-an386 (--features mqtt5 --target-dir target/mqtt5)", &elf);
    let pki = provision();
    let broker = start_broker(&pki);
    let bundle = pki.device_dir.join("credentials.bin");
    let send = |name: &str| send_command(&bins, &pki, broker.port, &pki.device_id, name, "1");
    let mut readings = 0;
    let (ok, lines) = boot_elf(&elf, false, Duration::from_secs(120), broker.port, &bundle, |l| {
        if l.contains("delivered") {
            readings += 1;
            match readings {
                2 => send("blink"),
                4 => send("halt"),
                _ => {}
            }
        }
    });
    let text = lines.join("\n");
    assert!(ok, "firmware failed: {text}");
    assert!(text.contains("MQTT 5 session up"), "{text}");
    assert!(text.contains("command blink"), "{text}");
    let rows = telemetry_topics(&pki.home, &pki.device_id);
    let telemetry = rows.iter().filter(|r| r.0 == format!("devices/{}/telemetry", pki.device_id)).count();
    assert!(telemetry >= 3, "telemetry under its alias, stored under the full topic: {rows:?}");
    assert!(rows.iter().any(|r| r.0.ends_with("/acks/blink")), "{rows:?}");
}

/// The SDK's P-256 on the Cortex-M4F (`p256-cm4`) against the Wycheproof vectors (every
/// verdict as expected) and the generic RustCrypto code, both ways, on random keys and digests,
/// with tampered signatures: run in QEMU (`--bin crosscheck`).
#[test]
fn p256_cm4_agrees_with_the_generic_p256_in_qemu() {
    let qemu = fleet_tests::require_program("qemu-system-arm", "qemu-system-arm");
    let elf = image("crosscheck");
    let out = Command::new(qemu)
        .args(["-machine", "mps2-an386", "-nographic", "-monitor", "none"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .args(["-icount", "shift=0,align=off,sleep=off"])
        .arg("-kernel")
        .arg(&elf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("p256-cm4 in use: true"), "{text}");
    assert!(text.contains("wycheproof: 484 vectors, 0 disagreements"), "{text}");
    assert!(text.contains("64 cases, 0 disagreements"), "{text}");
}
