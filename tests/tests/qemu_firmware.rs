//! The Cortex-M4F example firmware running in QEMU (mps2-an386) against the real broker:
//! provision → broker → firmware connects over UART↔TCP with mutual TLS, its telemetry is stored
//! and seen by a service, the command it is sent comes back acknowledged; once revoked it is
//! refused; flashed with another PKI's bundle it refuses the broker.
#![allow(clippy::unwrap_used)] // test code

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-provision", "fleet-broker", "fleet-sim"])
}

fn firmware() -> PathBuf {
    let elf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(
        "../firmware-examples/qemu-mps2-an386/target/thumbv7em-none-eabihf/release/fleet-firmware-mps2-an386",
    );
    assert!(
        elf.is_file(),
        "firmware not built: run `cargo build --release` in firmware-examples/qemu-mps2-an386 (./scripts/test does)"
    );
    elf
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Pki {
    home: PathBuf,
    device_dir: PathBuf,
    device_id: String,
}

fn provision(bins: &Path, root: &Path, name: &str) -> Pki {
    let home = root.join(name);
    let fp =
        |args: &[&str]| run(Command::new(bins.join("fleet-provision")).arg("--home").arg(&home).args(args));
    fp(&["init", "--org", name]);
    fp(&["server-cert", "--dns", "localhost", "--ip", "127.0.0.1"]);
    fp(&["service-cert", "--name", "ops", "--out", home.join("ops").to_str().unwrap()]);
    fp(&["mint", "--count", "1", "--out", home.join("devices").to_str().unwrap()]);
    let device_dir = std::fs::read_dir(home.join("devices")).unwrap().next().unwrap().unwrap().path();
    let device_id = device_dir.file_name().unwrap().to_str().unwrap().to_owned();
    Pki { home, device_dir, device_id }
}

struct Broker {
    child: Child,
    port: u16,
    metrics: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(bins: &Path, pki: &Pki) -> Broker {
    let mut child = Command::new(bins.join("fleet-broker"))
        .arg("--home")
        .arg(&pki.home)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(pki.home.join("broker.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mqtt = lines.next().unwrap().unwrap();
    let metrics = lines.next().unwrap().unwrap();
    let port = mqtt.split("127.0.0.1:").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let metrics = metrics.split("http://").nth(1).unwrap().trim_end_matches("/metrics").to_owned();
    Broker { child, port, metrics }
}

fn metrics(b: &Broker) -> String {
    let mut s = TcpStream::connect(&b.metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Boots the firmware with `bundle` in its credentials region; returns (exit ok, output lines).
/// `on_line` sees each line as it arrives.
fn boot(port: u16, bundle: &Path, mut on_line: impl FnMut(&str)) -> (bool, Vec<String>) {
    let qemu = fleet_tests::require_program("qemu-system-arm", "qemu-system-arm");
    let mut child = Command::new(qemu)
        .args(["-machine", "mps2-an386", "-nographic", "-monitor", "none"])
        .args(["-semihosting-config", "enable=on,target=native"])
        // Virtual time = instructions executed (1 ns each): the firmware's SysTick figure for
        // the TLS handshake becomes an instruction count (BENCHMARKS.md).
        .args(["-icount", "shift=0,align=off,sleep=off"])
        .args(["-serial", &format!("tcp:127.0.0.1:{port}")])
        .arg("-device")
        .arg(format!("loader,file={},addr=0x003f0000,force-raw=on", bundle.display()))
        .arg("-kernel")
        .arg(firmware())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                if l.contains("TLS established in") {
                    eprintln!("{l}");
                }
                on_line(&l);
                lines.push(l);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            lines.push("(timed out)".into());
            return (false, lines);
        }
    }
    let status = child.wait().unwrap();
    (status.success(), lines)
}

fn telemetry_topics(home: &Path, device: &str) -> Vec<(String, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}", home.join("registry.db").display());
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
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
    let root = tempfile::tempdir().unwrap();
    let pki = provision(&bins, root.path(), "qemu-fleet");
    let broker = start_broker(&bins, &pki);
    let bundle = pki.device_dir.join("credentials.bin");

    // A service watches telemetry while the firmware runs.
    let mut watch = Command::new(bins.join("fleet-sim"))
        .args(["watch", "--identity"])
        .arg(pki.home.join("ops"))
        .args(["--port", &broker.port.to_string(), "--duration", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let send_command = || {
        run(Command::new(bins.join("fleet-sim"))
            .args(["command", "--identity"])
            .arg(pki.home.join("ops"))
            .args([
                "--port",
                &broker.port.to_string(),
                "--device",
                &pki.device_id,
                "--name",
                "blink",
                "--payload",
                "3",
            ]));
    };
    let (ok, lines) = boot(broker.port, &bundle, |l| {
        if l.contains("telemetry stored by the broker") {
            send_command();
        }
    });
    let _ = watch.kill();
    let mut watched = String::new();
    watch.stdout.take().unwrap().read_to_string(&mut watched).unwrap();
    let _ = watch.wait();
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
    std::thread::sleep(Duration::from_millis(1200)); // let the broker pick up the fresh CRL too
    let (ok, lines) = boot(broker.port, &bundle, |_| {});
    assert!(!ok, "a revoked device must not complete: {lines:?}");
    assert!(!lines.iter().any(|l| l.contains("MQTT session up")), "revoked device got a session: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("refused") || l.contains("connection lost")), "{lines:?}");
    let m = metrics(&broker);
    assert!(m.contains("fleet_handshakes_total{outcome=\"refused\",reason=\"revoked\"}"), "{m}");
}

#[test]
fn firmware_with_another_pkis_bundle_refuses_the_broker() {
    let bins = bin_dir();
    let root = tempfile::tempdir().unwrap();
    let pki = provision(&bins, root.path(), "fleet-a");
    let foreign = provision(&bins, root.path(), "fleet-b");
    let broker = start_broker(&bins, &pki);
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
    let bins = bin_dir();
    let root = tempfile::tempdir().unwrap();
    let pki = provision(&bins, root.path(), "fleet-rogue");
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
