//! Certificate lifecycle in the field (issue 13, docs/spec/rotation.md), with the real programs:
//! `fleet-broker`, the online issuer `fleet-provision serve`, and devices on the SDK
//! (`fleet-sim`, one thread per device, its identity in two credential slots).
//!
//! Each test drives an adversary or a failure, not only the happy path: a CSR for another id, a
//! device forging the issuer's answer, the issuer down, a power loss while the new identity is
//! written, a claim past its quota, the old key used after the grace period.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fleet_device::credentials::Credentials;
use fleet_device::store::{CredentialStore, Slot, SlotStorage};
use fleet_registry::{DeviceId, Status};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;

fn bins() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-provision", "fleet-broker", "fleet-sim"])
}

/// A running `fleet-provision serve`; killed on drop.
struct Issuer {
    child: Child,
    log: PathBuf,
}

impl Issuer {
    fn start(fleet: &Fleet, broker: &BrokerProc, identity: &Path, extra: &[&str]) -> Issuer {
        let log = fleet.dir.path().join(format!("issuer-{}.log", rand_suffix()));
        let mut cmd = Command::new(bins().join("fleet-provision"));
        cmd.arg("--home").arg(fleet.home());
        if let Some(db) = &fleet.db {
            cmd.args(["--database-url", db]);
        }
        let child = cmd
            .arg("serve")
            .arg("--identity")
            .arg(identity)
            .args(["--port", &broker.port(), "--tick", "1s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("FLEET_HOME")
            .env_remove("FLEET_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn fleet-provision serve");
        let issuer = Issuer { child, log };
        let t = Instant::now();
        while !issuer.log().contains("issuer connected") {
            assert!(t.elapsed() < PATIENCE, "issuer did not connect:\n{}", issuer.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        issuer
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn issuer_identity(fleet: &Fleet) -> PathBuf {
    let dir = fleet.dir.path().join("issuer");
    fleet.station().await.issuer_cert("issuer-1", &dir).await.unwrap();
    dir
}

/// `fleet-sim run` over the fleet's devices; returns its stdout.
fn sim_run(fleet: &Fleet, broker: &BrokerProc, secs: u32, extra: &[&str]) -> String {
    let out = Command::new(bins().join("fleet-sim"))
        .args(["run", "--port", &broker.port(), "--duration", &secs.to_string(), "--rate", "2"])
        .arg("--devices")
        .arg(fleet.dir.path().join("devices"))
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fleet-sim failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// `event <ms> <device> <what> <detail>` lines of a fleet-sim run.
fn events<'a>(out: &'a str, what: &str) -> Vec<(u64, &'a str, &'a str)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.splitn(5, ' ');
            (w.next()? == "event").then_some(())?;
            let (ms, dev, kind) = (w.next()?.parse().ok()?, w.next()?, w.next()?);
            (kind == what).then_some((ms, dev, w.next().unwrap_or("")))
        })
        .collect()
}

/// The active bundle in a device's `slots.bin`, as the device would load it at boot.
fn active_bundle(device_dir: &Path) -> Vec<u8> {
    struct File(Vec<u8>);
    impl SlotStorage for File {
        type Error = ();
        fn slot_size(&self) -> usize {
            4096
        }
        fn read(&mut self, slot: Slot, buf: &mut [u8]) -> Result<(), ()> {
            let at = if slot == Slot::A { 0 } else { 4096 };
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
        fn write(&mut self, _: Slot, _: &[u8]) -> Result<(), ()> {
            Err(())
        }
    }
    let mut st = CredentialStore::new(File(std::fs::read(device_dir.join("slots.bin")).unwrap()));
    let (mut buf, mut out) = (vec![0u8; 4096], vec![0u8; 4096]);
    let n = st.load(&mut buf, &mut out).unwrap();
    out.truncate(n);
    out
}

fn cert_serial(der: &[u8]) -> String {
    fleet_provision::pki::summarize(der).unwrap().serial.to_hex()
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) {
    let (t, within) = (Instant::now(), within.max(PATIENCE));
    while !f().await {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `openssl verify` of a DER certificate against the fleet's root and device CA.
fn openssl_verify(fleet: &Fleet, der: &[u8]) {
    let pem = fleet_provision::pki::pem_encode("CERTIFICATE", der);
    let path = fleet.dir.path().join(format!("issued-{}.pem", rand_suffix()));
    std::fs::write(&path, pem).unwrap();
    let home = fleet_registry::Home::new(fleet.home());
    let out = Command::new(fleet_tests::require_program("openssl", "openssl"))
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(home.root_ca())
        .arg("-untrusted")
        .arg(home.device_ca())
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": OK"),
        "openssl verify: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A device inside its renewal window rotates end to end: fresh key on the device, CSR to the
/// issuer, new certificate staged in the spare slot, admitted, committed, announced; after the
/// grace period the old certificate is revoked (superseded) and refused, while the device goes
/// on with the new one. The issuer and the registry never hold the new private key.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_rotates_its_key_and_the_old_certificate_dies_after_the_grace_period() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let issuer = Issuer::start(&fleet, &broker, &identity, &["--grace", "2s", "--renew-within", "3650d"]);
    let old_cert = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let old_serial = cert_serial(Credentials::decode(&old_cert).unwrap().cert_der);

    let out = tokio::task::block_in_place(|| sim_run(&fleet, &broker, 6, &["--rotate-within", "3650d"]));
    assert_eq!(events(&out, "rotated").len(), 2, "{out}");
    assert!(out.contains("fleet-sim: 2 certificate rotations"), "{out}");

    // The device's active slot holds the new identity: a new key, a certificate for it.
    let id = fleet.id(0);
    let bundle = active_bundle(&fleet.devices[0]);
    let creds = Credentials::decode(&bundle).unwrap();
    let new_serial = cert_serial(creds.cert_der);
    assert_ne!(new_serial, old_serial);
    let old_creds = Credentials::decode(&old_cert).unwrap();
    assert_ne!(creds.key_der, old_creds.key_der, "the key was rotated, not only the certificate");
    openssl_verify(&fleet, creds.cert_der);

    // After the grace period: the old certificate revoked as superseded, the new one active.
    let st = fleet.station().await;
    let device = DeviceId::parse(&id).unwrap();
    wait_until("the old certificate superseded", Duration::from_secs(10), || async {
        st.registry().certificates_of(&device).await.unwrap().iter().any(|c| c.status == Status::Revoked)
    })
    .await;
    let certs = st.registry().certificates_of(&device).await.unwrap();
    assert_eq!(certs.len(), 2);
    for c in &certs {
        if c.serial.to_hex() == old_serial {
            assert_eq!((c.status, c.revocation_reason.as_deref()), (Status::Revoked, Some("superseded")));
        } else {
            assert_eq!((c.status, c.key_source.as_str()), (Status::Active, "rotation"));
        }
    }
    // The old key is refused (the factory's cert.pem/key.pem), the new identity is not.
    let t = Instant::now();
    loop {
        let mut old = Raw::device(broker.mqtt, &fleet.devices[0]).await;
        let refused = match &mut old {
            Ok(c) => {
                connack_code(&c.mqtt_connect(&id, 30).await)
                    != Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
            }
            Err(_) => true,
        };
        if refused {
            break;
        }
        assert!(t.elapsed() < PATIENCE, "the superseded certificate is still admitted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = tokio::task::block_in_place(|| sim_run(&fleet, &broker, 2, &["--rotate-within", "1d"]));
    assert!(again.contains(&new_serial) && again.contains("connected"), "{again}");

    // The issuance log verifies after the rotations.
    let report = st.verify_log().await.unwrap();
    assert!(report.disagreements.is_empty(), "{:?}", report.disagreements);

    // The new private key never left the device: not in the registry database, not in the
    // issuer's or the broker's logs, not in any stored message.
    let secret = &creds.key_der[7..39];
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("issuer log".into(), issuer.log().into_bytes()),
        ("broker log".into(), broker.log().into_bytes()),
    ];
    for entry in std::fs::read_dir(fleet.home()).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("registry.db") {
            places.push((entry.path().display().to_string(), std::fs::read(entry.path()).unwrap()));
        }
    }
    for (_, payload) in fleet.telemetry_rows(&id).await {
        places.push(("telemetry".into(), payload));
    }
    for (what, bytes) in &places {
        assert!(!bytes.windows(32).any(|w| w == secret), "the device's new private key is in the {what}");
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!String::from_utf8_lossy(bytes).contains(&hex), "the key, in hex, is in the {what}");
    }
}

/// The issuer checks the CSR against the topic it came on (the broker proved the topic is the
/// sender's): a CSR naming another device is rejected with `id_mismatch`, one from a device not
/// yet due with `not_due`; a device cannot forge the issuer's answer nor ask for another device.
#[tokio::test(flavor = "multi_thread")]
async fn csrs_for_another_id_or_out_of_policy_are_rejected_and_answers_cannot_be_forged() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let issuer = Issuer::start(&fleet, &broker, &identity, &[]);
    let (a, b) = (fleet.id(0), fleet.id(1));
    let mut c = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(
        connack_code(&c.mqtt_connect(&a, 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    subscribe(&mut c, &format!("devices/{a}/certs/rejected"), 1).await;
    let csr_for = |id: &str| {
        let key = fleet_device::csr::generate_key(&mut rand::rngs::OsRng);
        let mut buf = [0u8; 512];
        let n = fleet_device::csr::build(id, &key, &mut buf).unwrap();
        buf[..n].to_vec()
    };
    let ask = |id: &str, csr: Vec<u8>, pkid: u16| {
        let mut p = Publish::new(format!("devices/{id}/certs/csr"), QoS::AtLeastOnce, csr);
        p.pkid = pkid;
        Packet::Publish(p)
    };
    // A CSR naming device B, sent by A on A's topic.
    c.send(ask(&a, csr_for(&b), 10)).await.unwrap();
    let p = answer(&mut c).await;
    assert_eq!(p.topic, format!("devices/{a}/certs/rejected"));
    assert!(p.payload.starts_with(b"id_mismatch: "), "{:?}", String::from_utf8_lossy(&p.payload));
    // Its own id, but a 5-year certificate is not due for renewal (default window 30 days).
    c.send(ask(&a, csr_for(&a), 11)).await.unwrap();
    let p = answer(&mut c).await;
    assert!(p.payload.starts_with(b"not_due: "), "{:?}", String::from_utf8_lossy(&p.payload));
    // Garbage is a bad CSR, never a crash of the issuer.
    c.send(ask(&a, b"\x30\x03\x02\x01\x00".to_vec(), 12)).await.unwrap();
    let p = answer(&mut c).await;
    assert!(p.payload.starts_with(b"bad_csr: "), "{:?}", String::from_utf8_lossy(&p.payload));
    // A CN that carries a log line (from B, whose CSR ration is untouched): the rejection
    // quotes it, escaped (found by the attack review).
    let mut cb = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(
        connack_code(&cb.mqtt_connect(&b, 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    subscribe(&mut cb, &format!("devices/{b}/certs/rejected"), 1).await;
    cb.send(ask(&b, csr_naming("x\n2030-01-01T00:00:00Z  INFO issuer: certificate issued device=x"), 15))
        .await
        .unwrap();
    let p = answer(&mut cb).await;
    assert_eq!(p.topic, format!("devices/{b}/certs/rejected"));
    wait_until("the rejection logged", PATIENCE, || async { issuer.log().contains("2030-01-01") }).await;
    assert!(!issuer.log().lines().any(|l| l.starts_with("2030-01-01")), "a forged line:\n{}", issuer.log());
    drop(cb);
    // Forging the issuer's answer to itself is refused by the broker's ACL (QoS 1: cut off).
    let mut forged = Publish::new(format!("devices/{a}/certs/issued"), QoS::AtLeastOnce, vec![0x30, 0]);
    forged.pkid = 13;
    c.send(Packet::Publish(forged)).await.unwrap();
    assert!(c.closed_within(PATIENCE).await, "a device published an issuer answer");
    // Nor may A ask on B's topic.
    let mut c = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(
        connack_code(&c.mqtt_connect(&a, 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success),
        "A must be admitted, or the close below proves nothing"
    );
    c.send(ask(&b, csr_for(&b), 14)).await.unwrap();
    assert!(c.closed_within(PATIENCE).await, "a device asked for another device");
    // Both closes were the ACL's (the forged answer and the ask on B's topic).
    broker.wait_metric("fleet_acl_denied_total{action=\"publish\"}", 2.0, Duration::from_secs(5)).await;
    // Nothing was issued.
    let st = fleet.station().await;
    for id in [&a, &b] {
        let certs = st.registry().certificates_of(&DeviceId::parse(id).unwrap()).await.unwrap();
        assert_eq!(certs.len(), 1, "{id} got a certificate");
    }
}

/// The issuer's next answer on a raw device session.
async fn answer(c: &mut Raw) -> Publish {
    next_publish(c, PATIENCE).await.expect("an answer from the issuer")
}

/// With the issuer down the device keeps its identity and its session, and repeats its CSR with
/// exponential back-off; when the issuer comes back, the rotation completes.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_issuer_down_the_device_keeps_its_identity_and_retries_with_backoff() {
    let fleet = Fleet::new(1, None).await;
    // The device's answer timeout here is 0.5 s (30 s by default): the broker's CSR ration
    // (one per 10 s after 3) would drop its fifth try.
    let broker = BrokerProc::start(&fleet, &["--csr-interval-secs", "0.2"]);
    let identity = issuer_identity(&fleet).await;
    let mut sim = Command::new(bins().join("fleet-sim"))
        .args(["run", "--port", &broker.port(), "--duration", "11", "--rate", "2"])
        .args(["--rotate-within", "3650d", "--answer-timeout-ms", "500"])
        .arg("--devices")
        .arg(fleet.dir.path().join("devices"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The issuer comes back after the device's third unanswered CSR (0.5 s, then 1 s apart),
    // however long the machine takes to get there.
    let lines = lines_of(sim.stdout.take().unwrap());
    let mut out = tokio::task::block_in_place(|| {
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(wait_line(&lines, "csr-sent", |l| events(l, "csr-sent").len() == 1));
        }
        seen
    });
    let _issuer = Issuer::start(&fleet, &broker, &identity, &["--renew-within", "3650d"]);
    assert!(tokio::task::block_in_place(|| sim.wait()).unwrap().success(), "fleet-sim failed");
    out.extend(lines.try_iter());
    let out = out.join("\n");
    let sent: Vec<u64> = events(&out, "csr-sent").iter().map(|e| e.0).collect();
    assert!(sent.len() >= 4, "{out}");
    let gaps: Vec<u64> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    // 0.5 s, 1 s, 2 s, 4 s: each wait about twice the one before.
    for w in gaps.windows(2) {
        assert!(w[1] * 10 >= w[0] * 17, "no back-off between CSRs: gaps {gaps:?}\n{out}");
    }
    assert_eq!(events(&out, "rotated").len(), 1, "{out}");
    // One session with the old identity the whole time the issuer was down (no reconnect), then
    // the one with the new identity; telemetry acknowledged throughout.
    let row = out.lines().find(|l| l.starts_with(&fleet.id(0))).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[4], "0", "refusals: {row}");
    assert!(cols[2].parse::<u32>().unwrap() >= 15, "acked: {row}");
    let rows = fleet.telemetry_rows(&fleet.id(0)).await;
    assert!(rows.iter().filter(|(t, _)| t.ends_with("/telemetry")).count() >= 15);
}

/// A power loss while the issued identity is written to the spare slot: at the next boot the
/// device runs its old identity (the half-written slot fails its checksum), and rotates again.
#[tokio::test(flavor = "multi_thread")]
async fn a_power_loss_while_storing_the_new_identity_leaves_the_old_one_working() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let _issuer = Issuer::start(
        &fleet,
        &broker,
        &identity,
        &["--renew-within", "3650d", "--min-interval", "0s", "--grace", "1s"],
    );
    let factory = Credentials::decode(&std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap())
        .map(|c| cert_serial(c.cert_der))
        .unwrap();
    for cut in ["10", "300"] {
        let out = tokio::task::block_in_place(|| {
            sim_run(&fleet, &broker, 4, &["--rotate-within", "3650d", "--power-loss-at-stage", cut])
        });
        assert_eq!(events(&out, "power-lost").len(), 1, "{out}");
        assert_eq!(
            cert_serial(Credentials::decode(&active_bundle(&fleet.devices[0])).unwrap().cert_der),
            factory
        );
    }
    // Reboot: the old identity is admitted (the device asks to rotate once connected with it),
    // no half-written candidate is offered, and this time the rotation completes.
    let out = tokio::task::block_in_place(|| sim_run(&fleet, &broker, 5, &["--rotate-within", "3650d"]));
    assert!(events(&out, "candidate-found").is_empty(), "{out}");
    let due = events(&out, "rotation-due");
    let rotated = events(&out, "rotated");
    assert_eq!((due.len(), rotated.len()), (1, 1), "{out}");
    assert!(due[0].0 < rotated[0].0);
    let now = cert_serial(Credentials::decode(&active_bundle(&fleet.devices[0])).unwrap().cert_der);
    assert_ne!(now, factory);
    assert_eq!(rotated[0].2, now);
}

/// Claim-based first boot: devices that hold only the batch's claim credentials get their own
/// identities from the issuer (within the claim's quota), store them and connect as themselves;
/// the station never sees their keys. A claim past its quota, or revoked, gets no more.
#[tokio::test(flavor = "multi_thread")]
async fn devices_boot_from_a_claim_within_its_quota_and_a_revoked_claim_is_refused() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let _issuer = Issuer::start(&fleet, &broker, &identity, &[]);
    let claim_dir = fleet.dir.path().join("claim");
    let st = fleet.station().await;
    let opts = fleet_provision::lifecycle::ClaimOptions {
        name: "batch-7".into(),
        id_prefix: "sensor".into(),
        quota: 3,
        days: 7,
        out: claim_dir.clone(),
        broker_host: "localhost".into(),
        broker_port: 8883,
    };
    st.claim_cert(&opts).await.unwrap();
    let out_dir = fleet.dir.path().join("claimed");
    let claim_with = |claim_dir: &Path, out_dir: &Path, count: u32| {
        Command::new(bins().join("fleet-sim"))
            .args(["claim", "--port", &broker.port(), "--prefix", "sensor", "--duration", "8"])
            .args(["--count", &count.to_string(), "--answer-timeout-ms", "1000"])
            .arg("--claim")
            .arg(claim_dir)
            .arg("--out")
            .arg(out_dir)
            .output()
            .unwrap()
    };
    let claim = |count: u32| claim_with(&claim_dir, &out_dir, count);
    let first = tokio::task::block_in_place(|| claim(4));
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(!first.status.success(), "4 devices on a quota of 3 all booted?\n{text}");
    assert!(text.contains("fleet-sim: 3 of 4 devices have their own identity"), "{text}");
    assert!(!events(&text, "claim-rejected").is_empty() && text.contains("claim_exhausted"), "{text}");
    // Each has its own identity in its slots, certified for its own key, and recorded as claimed.
    let mut ids = Vec::new();
    for e in std::fs::read_dir(&out_dir).unwrap().flatten() {
        let bundle = active_bundle(&e.path());
        let creds = Credentials::decode(&bundle).unwrap();
        assert!(creds.device_id.starts_with("sensor-"));
        openssl_verify(&fleet, creds.cert_der);
        let id = DeviceId::parse(creds.device_id).unwrap();
        let certs = st.registry().certificates_of(&id).await.unwrap();
        assert_eq!((certs.len(), certs[0].key_source.as_str()), (1, "claim"));
        ids.push(id);
    }
    assert_eq!(ids.len(), 3);
    let claim_record = st.registry().claim(&DeviceId::parse("batch-7").unwrap()).await.unwrap().unwrap();
    assert_eq!((claim_record.used, claim_record.quota), (3, 3));
    // A claimed device runs like any other.
    let again = Command::new(bins().join("fleet-sim"))
        .args(["run", "--port", &broker.port(), "--duration", "2", "--rotate-within", "1d"])
        .arg("--devices")
        .arg(&out_dir)
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&again.stdout);
    assert_eq!(
        again.lines().filter(|l| l.starts_with("sensor-") && l.ends_with("connected")).count(),
        3,
        "{again}"
    );
    // A revoked claim cannot even connect. Another claim, with quota left (so only its
    // revocation can stop it): one device boots from it, then it is revoked, and the next gets
    // nothing although the quota allows one more.
    let spare_dir = fleet.dir.path().join("claim-spare");
    st.claim_cert(&fleet_provision::lifecycle::ClaimOptions {
        name: "batch-8".into(),
        quota: 2,
        out: spare_dir.clone(),
        ..opts
    })
    .await
    .unwrap();
    let spare_out = fleet.dir.path().join("claimed-spare");
    let control = tokio::task::block_in_place(|| claim_with(&spare_dir, &spare_out, 1));
    let text = String::from_utf8_lossy(&control.stdout);
    assert!(control.status.success(), "the spare claim did not boot a device:\n{text}");
    assert_eq!(broker.metric(&refused(Refusal::Revoked)).await, 0.0);
    let spare = DeviceId::parse("batch-8").unwrap();
    let seen = broker.metric("fleet_revocations_seen_total").await;
    st.revoke_device(&spare, fleet_registry::RevocationReason::CessationOfOperation).await.unwrap();
    broker.wait_metric("fleet_revocations_seen_total", seen + 1.0, Duration::from_secs(10)).await;
    let late = tokio::task::block_in_place(|| claim_with(&spare_dir, &fleet.dir.path().join("late"), 1));
    let text = String::from_utf8_lossy(&late.stdout);
    assert!(!late.status.success(), "a revoked claim booted a device:\n{text}");
    assert!(!text.contains("claim_exhausted"), "refused for the quota, not the revocation:\n{text}");
    broker.wait_metric(&refused(Refusal::Revoked), 1.0, Duration::from_secs(10)).await;
    let spare_record = st.registry().claim(&spare).await.unwrap().unwrap();
    assert_eq!((spare_record.used, spare_record.quota), (1, 2));
    let report = st.verify_log().await.unwrap();
    assert!(report.disagreements.is_empty(), "{:?}", report.disagreements);
}

/// `fleet-provision rotate <id>`: the operator's request reaches the device through the issuer
/// (retained `certs/rotate`), which then accepts its CSR although the certificate is not due.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_forced_rotation_reaches_the_device() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let _issuer = Issuer::start(&fleet, &broker, &identity, &[]);
    let fp = |args: &[&str]| {
        let out = Command::new(bins().join("fleet-provision"))
            .arg("--home")
            .arg(fleet.home())
            .args(args)
            .env_remove("FLEET_HOME")
            .env_remove("FLEET_DATABASE_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Nothing expires within 30 days: nothing selected.
    assert!(fp(&["rotate", "--expiring-within", "30d"]).contains("requested for 0 device"));
    assert!(fp(&["rotate", &fleet.id(1)]).contains("requested for 1 device"));
    let out = tokio::task::block_in_place(|| sim_run(&fleet, &broker, 5, &[]));
    let rotated = events(&out, "rotated");
    assert_eq!(rotated.len(), 1, "{out}");
    assert_eq!(rotated[0].1, fleet.id(1));
    assert_eq!(events(&out, "rotate-requested").len(), 1, "{out}");
    // Fulfilled: the request is gone and a second run rotates nothing.
    let st = fleet.station().await;
    assert!(st.registry().rotation_requests().await.unwrap().is_empty());
    let out = tokio::task::block_in_place(|| sim_run(&fleet, &broker, 3, &[]));
    assert!(events(&out, "rotated").is_empty() && events(&out, "rotate-requested").is_empty(), "{out}");
}

#[tokio::test]
async fn while_the_issuer_runs_the_crl_follows_every_revocation_whoever_made_it() {
    use common::admin::{operator, Client};
    let fleet = Fleet::new(3, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0", "--reload-poll-ms", "100"]);
    let identity = issuer_identity(&fleet).await;
    let issuer = Issuer::start(&fleet, &broker, &identity, &["--grace", "1s", "--renew-within", "3650d"]);
    let api = Client::new(&broker, &fleet, Some(&alice));
    let crl_listed = || {
        let (_, s) = api.get("/api/v1/summary");
        (s["crl"]["number"].as_u64().unwrap_or(0), s["crl"]["revoked"].as_u64().unwrap_or(0))
    };
    let (n0, listed0) = crl_listed();

    // An operator revokes through the broker, which holds no CA key: the issuer signs the CRL
    // and the broker loads it.
    let id = fleet.id(0);
    let (code, r) =
        api.call("POST", &format!("/api/v1/devices/{id}/revoke"), Some(br#"{"reason":"keyCompromise"}"#));
    assert_eq!(code, 200, "{r}");
    let serial = r["revoked_serials"][0].as_str().unwrap().to_owned();
    let t = Instant::now();
    while crl_listed().1 < listed0 + 1 {
        assert!(t.elapsed() < PATIENCE, "the CRL did not follow the revocation:\n{}", issuer.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(crl_listed().0 > n0);
    let text = Command::new(fleet_tests::require_program("openssl", "openssl"))
        .args(["crl", "-noout", "-text", "-in"])
        .arg(fleet.home().join("crl.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_uppercase();
    assert!(text.contains(&serial.to_uppercase()), "{serial} not in the CRL:\n{text}");
    assert!(issuer.log().contains("CRL signed after revocations"), "{}", issuer.log());

    // The station's CLI revokes (it writes a CRL itself): the issuer, following the registry,
    // signs a fresh one after it.
    let crl_text = || {
        let out = Command::new(fleet_tests::require_program("openssl", "openssl"))
            .args(["crl", "-noout", "-text", "-in"])
            .arg(fleet.home().join("crl.pem"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_uppercase()
    };
    let signed = || issuer.log().matches("CRL signed after revocations").count();
    let before = signed();
    let cli_victim = fleet.id(1);
    let cli_serial = fleet.station().await.show(&DeviceId::parse(&cli_victim).unwrap()).await.unwrap();
    let cli_serial = cli_serial.certificates[0].serial.to_hex();
    station_cli(&fleet, &["revoke", &cli_victim, "--reason", "keyCompromise"]);
    let t = Instant::now();
    while signed() <= before {
        assert!(
            t.elapsed() < PATIENCE,
            "the issuer did not re-sign after the CLI's revocation:\n{}",
            issuer.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(crl_text().contains(&cli_serial.to_uppercase()), "{cli_serial} not in the CRL");

    // A rotation's supersede (the issuer revokes the old certificate after the grace period):
    // the CRL lists the old serial.
    let dir = fleet.devices[2].clone();
    let old_serial = cert_serial(
        Credentials::decode(&std::fs::read(dir.join("credentials.bin")).unwrap()).unwrap().cert_der,
    );
    let out = Command::new(bins().join("fleet-sim"))
        .args(["run", "--port", &broker.port(), "--duration", "6", "--rate", "2", "--rotate-within", "3650d"])
        .arg("--devices")
        .arg(dir.parent().unwrap())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(events(&out, "rotated").iter().any(|e| e.1 == fleet.id(2)), "{out}");
    let t = Instant::now();
    while !crl_text().contains(&old_serial.to_uppercase()) {
        assert!(
            t.elapsed() < PATIENCE,
            "the superseded serial {old_serial} never reached the CRL:\n{}",
            issuer.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- persistent sessions across certificates ----

/// `fleet-provision` with the fleet's home; its stdout.
fn station_cli(fleet: &Fleet, args: &[&str]) -> String {
    let out = Command::new(bins().join("fleet-provision"))
        .arg("--home")
        .arg(fleet.home())
        .args(args)
        .env_remove("FLEET_HOME")
        .env_remove("FLEET_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet-provision {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A device directory for `cert` and `key` (PEM files), trusting the fleet's broker.
fn identity_dir(fleet: &Fleet, name: &str, cert: &Path, key: &Path) -> PathBuf {
    let dir = fleet.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fleet.devices[0].join("broker-trust.pem"), dir.join("broker-trust.pem")).unwrap();
    std::fs::copy(cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(key, dir.join("key.pem")).unwrap();
    dir
}

/// The attack: a thief holding device E's key parks a session (clean session = 0) subscribed only
/// to E's telemetry. The operator re-keys E (`fleet-provision rekey`); the real E connects on its
/// new certificate with clean session = 0. It must start clean (session present = 0), so that,
/// like the SDK, it subscribes to its commands and receives them; resuming the thief's session it
/// would send no SUBSCRIBE and never receive a command again. The same holds for a renewed
/// certificate (new serial, old one still valid, so no revocation discards the kept session):
/// a session is resumed only by the certificate that parked it.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_parked_on_one_certificate_is_never_resumed_on_another() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let dev = fleet.id(0);
    let mut thief = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connect_session(&mut thief, &dev, false).await, (true, false));
    subscribe(&mut thief, &format!("devices/{dev}/telemetry"), 1).await;
    thief.send(Packet::Disconnect).await.unwrap();
    drop(thief);
    broker.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(3)).await;

    // The operator re-keys E with a key generated on the device.
    let openssl = fleet_tests::require_program("openssl", "openssl");
    let (key, csr, cert) =
        (fleet.dir.path().join("e.key"), fleet.dir.path().join("e.csr"), fleet.dir.path().join("e.pem"));
    let ok =
        |args: &[&std::ffi::OsStr]| assert!(Command::new(&openssl).args(args).status().unwrap().success());
    ok(&[
        "ecparam".as_ref(),
        "-name".as_ref(),
        "prime256v1".as_ref(),
        "-genkey".as_ref(),
        "-noout".as_ref(),
        "-out".as_ref(),
        key.as_os_str(),
    ]);
    let subj = format!("/CN={dev}");
    ok(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-key".as_ref(),
        key.as_os_str(),
        "-subj".as_ref(),
        subj.as_ref(),
        "-out".as_ref(),
        csr.as_os_str(),
    ]);
    let said = station_cli(
        &fleet,
        &["rekey", &dev, "--csr", csr.to_str().unwrap(), "--out", cert.to_str().unwrap()],
    );
    assert!(said.contains("re-keyed"), "{said}");
    let real = identity_dir(&fleet, "real-e", &cert, &key);

    let mut e = Raw::device(broker.mqtt, &real).await.unwrap();
    assert_eq!(connect_session(&mut e, &dev, false).await, (true, false), "the thief's session was resumed");
    // Not resumed: like the SDK, E subscribes, and its commands arrive.
    subscribe(&mut e, &format!("devices/{dev}/commands/#"), 1).await;
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert!(connect_session(&mut svc, "backend", true).await.0);
    let mut p = Publish::new(format!("devices/{dev}/commands/blink"), QoS::AtLeastOnce, b"3".to_vec());
    p.pkid = 1;
    svc.send(Packet::Publish(p)).await.unwrap();
    let got = next_publish(&mut e, PATIENCE).await.expect("E's command");
    assert_eq!(got.topic, format!("devices/{dev}/commands/blink"));
    e.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(got.pkid))).await.unwrap();
    e.send(Packet::Disconnect).await.unwrap();
    drop(e);
    broker.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(3)).await;

    // A renewed certificate (same key, new serial; the re-keyed one stays valid) starts clean
    // too: no revocation is involved, only the serial that parked the session.
    let renewed = fleet.dir.path().join("renewed.pem");
    station_cli(&fleet, &["renew", &dev, "--out", renewed.to_str().unwrap()]);
    let renewed = identity_dir(&fleet, "renewed-e", &renewed, &key);
    let mut e = Raw::device(broker.mqtt, &renewed).await.unwrap();
    assert_eq!(connect_session(&mut e, &dev, false).await, (true, false), "resumed on another certificate");
    assert!(
        broker.metric("fleet_parked_sessions_discarded_total{reason=\"other_certificate\"}").await >= 1.0
    );
    // The certificate that parked a session still resumes it.
    subscribe(&mut e, &format!("devices/{dev}/commands/#"), 1).await;
    e.send(Packet::Disconnect).await.unwrap();
    drop(e);
    broker.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(3)).await;
    let mut e = Raw::device(broker.mqtt, &renewed).await.unwrap();
    assert_eq!(connect_session(&mut e, &dev, false).await, (true, true));
}

/// Devices fill the broker's retained-message budget (`max_retained_bytes`) to the last byte;
/// an operator then asks device 1 to rotate. The issuer's retained `certs/rotate` counts
/// against a budget of its own, so the request still reaches the device and it rotates.
#[tokio::test(flavor = "multi_thread")]
async fn devices_filling_the_retained_budget_cannot_stop_a_forced_rotation() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &["--max-retained-bytes", "2000"]);
    let filler = fleet.id(0);
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(connect_session(&mut d, &filler, true).await.0);
    let topic = format!("devices/{filler}/state/blob");
    let mut p = Publish::new(&topic, QoS::AtLeastOnce, vec![b'x'; 2000 - topic.len()]);
    p.pkid = 1;
    p.retain = true;
    d.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(d.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    // Full: one more retained byte from any device is refused.
    let mut more = Publish::new(format!("devices/{filler}/state/more"), QoS::AtLeastOnce, b"y".to_vec());
    more.pkid = 2;
    more.retain = true;
    d.send(Packet::Publish(more)).await.unwrap();
    assert!(d.closed_within(PATIENCE).await, "the retained budget was not full");
    assert!(broker.metric("fleet_limits_total{limit=\"retained_bytes\"}").await >= 1.0);

    let identity = issuer_identity(&fleet).await;
    let issuer = Issuer::start(&fleet, &broker, &identity, &[]);
    assert!(station_cli(&fleet, &["rotate", &fleet.id(1)]).contains("requested for 1 device"));
    let out = tokio::task::block_in_place(|| sim_run(&fleet, &broker, 5, &[]));
    let requested = events(&out, "rotate-requested");
    assert!(
        requested.iter().any(|e| e.1 == fleet.id(1)),
        "the rotation request did not reach the device:\n{out}\n{}",
        issuer.log()
    );
    assert!(events(&out, "rotated").iter().any(|e| e.1 == fleet.id(1)), "{out}");
}

/// A CSR for a fresh P-256 key naming `id`.
fn csr_naming(id: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, id);
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// One stolen device key flooding its own `certs/csr` (QoS 0, as fast as its link allows)
/// once took the online issuer from the whole fleet: every CSR reached the issuer, which
/// decides one at a time, and another device's operator-forced rotation got no answer. The
/// broker now rations CSRs per identity (`csr_interval_secs`, broker-wide so reconnecting
/// does not help): the flood is dropped at the broker (counted) and the other device's
/// rotation is answered while it goes on (found by the attack review).
#[tokio::test(flavor = "multi_thread")]
async fn one_stolen_device_flooding_csrs_cannot_take_the_issuer_from_the_fleet() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let _issuer = Issuer::start(&fleet, &broker, &identity, &[]);
    let (attacker, victim) = (fleet.id(0), fleet.id(1));
    let rotate = Command::new(bins().join("fleet-provision"))
        .arg("--home")
        .arg(fleet.home())
        .args(["rotate", &victim])
        .env_remove("FLEET_HOME")
        .env_remove("FLEET_DATABASE_URL")
        .output()
        .unwrap();
    assert!(rotate.status.success(), "{}", String::from_utf8_lossy(&rotate.stderr));

    let mut dev = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&attacker, 60).await), Some(ConnectReturnCode::Success));
    let topic = format!("devices/{attacker}/certs/csr");
    let csr = csr_naming(&attacker);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = Publish::new(&topic, QoS::AtMostOnce, csr.clone());
                if dev.send(Packet::Publish(p)).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        }
    });
    // The flood is on: the broker is dropping it.
    broker.wait_metric("fleet_limits_total{limit=\"csr_rate\"}", 1_000.0, PATIENCE).await;

    // The victim's operator-requested rotation is answered during the flood.
    let mut v = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&v.mqtt_connect(&victim, 60).await), Some(ConnectReturnCode::Success));
    subscribe(&mut v, &format!("devices/{victim}/certs/issued"), 1).await;
    let mut p = Publish::new(format!("devices/{victim}/certs/csr"), QoS::AtLeastOnce, csr_naming(&victim));
    p.pkid = 3;
    v.send(Packet::Publish(p)).await.unwrap();
    let t = Instant::now();
    let issued = loop {
        match next_publish(&mut v, PATIENCE).await {
            Some(p) if p.topic.ends_with("/certs/issued") => break Some(p),
            Some(_) => {}
            None => break None,
        }
        if t.elapsed() > PATIENCE {
            break None;
        }
    };
    assert!(issued.is_some(), "the issuer did not answer the victim during the flood");
    // The flood went on the whole time (the send loop only stops when told).
    assert!(!flood.is_finished(), "the flooding session ended before the answer");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.await.unwrap();
    let dropped = broker.metric("fleet_limits_total{limit=\"csr_rate\"}").await;
    assert!(sent > 1_000 && dropped > 1_000.0, "sent {sent}, dropped at the broker {dropped}");
}

// ---- the issuer's decisions, one per rejection reason of docs/spec/rotation.md ----

/// The rejection label of an issuer decision (panics on a grant).
fn rejected_as(
    r: Result<fleet_provision::lifecycle::Granted, fleet_provision::lifecycle::Rejected>,
) -> &'static str {
    match r {
        Ok(g) => panic!("granted a certificate for {}", g.device_id),
        Err(r) => r.label,
    }
}

/// A CSR built by the device SDK for `id` with `key`.
fn sdk_csr(id: &str, key: &p256::ecdsa::SigningKey) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let n = fleet_device::csr::build(id, key, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// Every reason the issuer's decision functions give (docs/spec/rotation.md, "Rejection
/// reasons"), each reached with a well-formed CSR built by the device SDK (the reasons `unbound`
/// and `unavailable` are the serving loop's: `bus.rs::the_issuer_certifies_only_csrs_bound_to_the_askers_certificate`,
/// and the registry error below). The device's own checks of what it is issued: a
/// certificate for another key is `WrongKey`, one naming another device `WrongId`.
#[tokio::test(flavor = "multi_thread")]
async fn every_rejection_reason_is_reached_with_a_real_csr_and_the_device_checks_what_it_is_issued() {
    use fleet_device::mqtt::Millis;
    use fleet_device::rotation::{RotationConfig, RotationError, Rotator};
    use fleet_provision::lifecycle::{ClaimOptions, Policy};

    let fleet = Fleet::new(3, None).await;
    let st = fleet.station().await;
    let id = |i: usize| DeviceId::parse(&fleet.id(i)).unwrap();
    let (a, b, c) = (id(0), id(1), id(2));
    let fresh = || fleet_device::csr::generate_key(&mut rand::rngs::OsRng);
    let due = Policy { renew_within: 3650 * 86_400, min_interval: 3_600, grace: 3_600 };
    let rotate = |who: &DeviceId, csr: Vec<u8>, policy: Policy| {
        let (st, who) = (&st, who.clone());
        async move { st.rotate_from_csr(&who, &csr, &policy).await.unwrap() }
    };

    // bad_csr: a real CSR whose signature no longer verifies.
    let mut broken = sdk_csr(a.as_str(), &fresh());
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    assert_eq!(rejected_as(rotate(&a, broken, due).await), "bad_csr");
    // id_mismatch: B's CSR on A's topic.
    assert_eq!(rejected_as(rotate(&a, sdk_csr(b.as_str(), &fresh()), due).await), "id_mismatch");
    // unknown_device: an id never registered, and a service's id.
    let ghost = DeviceId::parse("dev-000000000000").unwrap();
    assert_eq!(rejected_as(rotate(&ghost, sdk_csr(ghost.as_str(), &fresh()), due).await), "unknown_device");
    let svc = DeviceId::parse("backend").unwrap();
    assert_eq!(rejected_as(rotate(&svc, sdk_csr("backend", &fresh()), due).await), "unknown_device");
    // revoked.
    fleet.revoke(2).await;
    assert_eq!(rejected_as(rotate(&c, sdk_csr(c.as_str(), &fresh()), due).await), "revoked");
    // same_key: A's current key (the factory's key.pem).
    let pem = std::fs::read_to_string(fleet.devices[0].join("key.pem")).unwrap();
    let current = p256::ecdsa::SigningKey::from(p256::SecretKey::from_sec1_pem(&pem).unwrap());
    assert_eq!(rejected_as(rotate(&a, sdk_csr(a.as_str(), &current), due).await), "same_key");
    // not_due: a 5-year certificate, a 30-day window.
    assert_eq!(rejected_as(rotate(&a, sdk_csr(a.as_str(), &fresh()), Policy::default()).await), "not_due");

    // A rotation the SDK drives: its CSR is granted and its check takes the certificate.
    let mut rot = Rotator::new(RotationConfig::default());
    rot.start(&mut rand::rngs::OsRng, Millis(0));
    let mut buf = [0u8; 512];
    let csr = rot.poll_csr(a.as_str(), Millis(0), &mut buf).unwrap().unwrap().to_vec();
    let granted = rotate(&a, csr, due).await.expect("the SDK's CSR is granted");
    assert_eq!(rot.check(&granted.cert.der, a.as_str()).unwrap(), &granted.cert.der[..]);
    // rate_limited: another key within the minimum interval.
    assert_eq!(rejected_as(rotate(&a, sdk_csr(a.as_str(), &fresh()), due).await), "rate_limited");
    // WrongKey: A's new certificate offered to a rotation that generated another key.
    let mut other = Rotator::new(RotationConfig::default());
    other.start(&mut rand::rngs::OsRng, Millis(0));
    assert_eq!(other.check(&granted.cert.der, a.as_str()), Err(RotationError::WrongKey));
    // WrongId: a certificate for this rotation's own key that names B.
    let csr_b = other.poll_csr(b.as_str(), Millis(0), &mut buf).unwrap().unwrap().to_vec();
    let for_b = rotate(&b, csr_b, due).await.expect("B's rotation is granted");
    assert_eq!(other.check(&for_b.cert.der, b.as_str()).unwrap(), &for_b.cert.der[..]);
    assert_eq!(other.check(&for_b.cert.der, a.as_str()), Err(RotationError::WrongId));

    // The claim's reasons.
    st.claim_cert(&ClaimOptions {
        name: "batch-9".into(),
        id_prefix: "sensor".into(),
        quota: 1,
        days: 7,
        out: fleet.dir.path().join("claim"),
        broker_host: "localhost".into(),
        broker_port: 8883,
    })
    .await
    .unwrap();
    let batch = DeviceId::parse("batch-9").unwrap();
    let claim = |who: &DeviceId, csr: Vec<u8>| {
        let (st, who) = (&st, who.clone());
        async move { st.claim_from_csr(&who, &csr).await.unwrap() }
    };
    assert_eq!(rejected_as(claim(&batch, sdk_csr("probe-000000000001", &fresh())).await), "bad_id");
    assert_eq!(rejected_as(claim(&a, sdk_csr("sensor-000000000001", &fresh())).await), "claim_invalid");
    let first = fresh();
    claim(&batch, sdk_csr("sensor-000000000001", &first)).await.expect("within the quota");
    assert_eq!(rejected_as(claim(&batch, sdk_csr("sensor-000000000001", &fresh())).await), "id_taken");
    assert_eq!(rejected_as(claim(&batch, sdk_csr("sensor-000000000002", &fresh())).await), "claim_exhausted");
    st.revoke_device(&batch, fleet_registry::RevocationReason::CessationOfOperation).await.unwrap();
    assert_eq!(rejected_as(claim(&batch, sdk_csr("sensor-000000000003", &fresh())).await), "claim_invalid");

    // unavailable: the serving loop answers it when a decision fails; a decision fails when the
    // registry cannot be read.
    st.registry().pool().close().await;
    assert!(st.rotate_from_csr(&a, &sdk_csr(a.as_str(), &fresh()), &due).await.is_err());
}

/// `unavailable`, end to end: the registry goes away under a running issuer (PostgreSQL stopped
/// as in a crash); a device's well-formed, due CSR is answered `unavailable` on its
/// `certs/rejected` (not silence, not a crash), the issuer logs why, and once the registry is
/// back the same device asking again is certified.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_registry_down_the_issuer_answers_unavailable_and_certifies_once_it_is_back() {
    let pg = fleet_tests::PgCluster::start();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let identity = issuer_identity(&fleet).await;
    let issuer = Issuer::start(&fleet, &broker, &identity, &["--renew-within", "3650d"]);
    let issuer_log = || issuer.log();

    let a = fleet.id(0);
    let mut c = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(
        connack_code(&c.mqtt_connect(&a, 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    subscribe(&mut c, &format!("devices/{a}/certs/rejected"), 1).await;
    subscribe(&mut c, &format!("devices/{a}/certs/issued"), 2).await;
    // QoS 0: with the registry down the broker cannot store a QoS 1 message, and would close the
    // session instead of acknowledging it (faults.rs); the CSR is routed to the issuer either way.
    let ask = |key: &p256::ecdsa::SigningKey| {
        Packet::Publish(Publish::new(format!("devices/{a}/certs/csr"), QoS::AtMostOnce, sdk_csr(&a, key)))
    };

    pg.stop();
    let key = fleet_device::csr::generate_key(&mut rand::rngs::OsRng);
    c.send(ask(&key)).await.unwrap();
    let p = answer(&mut c).await;
    assert_eq!(p.topic, format!("devices/{a}/certs/rejected"));
    assert!(p.payload.starts_with(b"unavailable: "), "{:?}", String::from_utf8_lossy(&p.payload));
    assert!(issuer_log().contains("cannot decide a CSR"), "{}", issuer_log());

    // The registry is back: the device asks again (as its back-off would) and is certified.
    pg.restart();
    let t = Instant::now();
    let issued = loop {
        c.send(ask(&key)).await.unwrap();
        let p = answer(&mut c).await;
        if p.topic.ends_with("/certs/issued") {
            break p;
        }
        assert!(
            p.payload.starts_with(b"unavailable: ") && t.elapsed() < PATIENCE,
            "{}: {:?}",
            p.topic,
            String::from_utf8_lossy(&p.payload)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A chain: the new certificate for the device's key, then the device CA.
    let creds_der = issued.payload.to_vec();
    let new_serial = cert_serial(&creds_der);
    let st = fleet.station().await;
    let certs = st.registry().certificates_of(&DeviceId::parse(&a).unwrap()).await.unwrap();
    assert!(certs.iter().any(|c| c.serial.to_hex() == new_serial), "{new_serial} not registered: {certs:?}");
}
