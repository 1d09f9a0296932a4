//! `fleet-provision` end to end through its CLI, checked by OpenSSL (a verifier nobody here
//! wrote), on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleet_device::credentials::Credentials;
use fleet_tests::{require_program, run, PgCluster};

struct Station {
    dir: tempfile::TempDir,
    db: Option<String>,
}

impl Station {
    fn new(db: Option<String>) -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir"), db }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn home(&self) -> PathBuf {
        self.path("home")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fleet-provision"));
        c.arg("--home").arg(self.home()).args(args).current_dir(self.dir.path()).env_remove("FLEET_HOME");
        c.env_remove("FLEET_DATABASE_URL");
        if let Some(db) = &self.db {
            c.arg("--database-url").arg(db);
        }
        c
    }
    fn try_run(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "fleet-provision {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "fleet-provision {args:?} should fail");
        assert_eq!(out.status.code(), Some(1), "clean error exit expected, got {:?}: {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "panic: {stderr}");
        stderr
    }
    fn list_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["list", "--json"])).expect("list --json")
    }
    fn init(&self) {
        self.ok(&["init", "--org", "Acme Test"]);
        self.ok(&[
            "server-cert",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--out",
            s(&self.path("broker")),
        ]);
    }
    fn mint(&self, n: usize) -> Vec<PathBuf> {
        let out = self.path("devices");
        self.ok(&["mint", "--count", &n.to_string(), "--out", s(&out), "--broker-port", "18883"]);
        device_dirs(&out)
    }
}

fn device_dirs(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn openssl(args: &[&str]) -> Output {
    require_program("openssl", "openssl");
    run(Command::new("openssl").args(args))
}

fn openssl_ok(args: &[&str]) -> bool {
    openssl(args).status.success()
}

fn openssl_verify(args: &[&str]) -> bool {
    openssl(&[&["verify"], args].concat()).status.success()
}

fn openssl_text(args: &[&str]) -> String {
    String::from_utf8(openssl(args).stdout).expect("utf-8")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_owned()
}

fn show(st: &Station, id: &str) -> serde_json::Value {
    serde_json::from_str(&st.ok(&["show", id, "--json"])).expect("show --json")
}

/// The whole station flow; run on each database.
fn full_flow(st: &Station) {
    st.init();
    let home = st.home();
    let chain = home.join("device-ca-chain.pem");
    let devices = st.mint(5);
    assert_eq!(devices.len(), 5);

    // Every minted certificate chains to device CA + root, and the bundle matches the PEM files.
    for d in &devices {
        assert!(openssl_verify(&["-CAfile", s(&chain), s(&d.join("cert.pem"))]), "{d:?}");
        let bundle = std::fs::read(d.join("credentials.bin")).expect("bundle");
        let c = Credentials::decode(&bundle).expect("bundle decodes");
        assert_eq!(c.device_id, name_of(d));
        assert_eq!((c.broker_host, c.broker_port), ("localhost", 18883));
        let der = openssl(&["x509", "-in", s(&d.join("cert.pem")), "-outform", "DER"]).stdout;
        assert_eq!(c.cert_der, &der[..]);
        let key = openssl(&["ec", "-in", s(&d.join("key.pem")), "-outform", "DER"]).stdout;
        assert_eq!(c.key_der, &key[..], "key.pem must be the SEC1 key in the bundle");
        let ca = openssl(&["x509", "-in", s(&home.join("server-ca.pem")), "-outform", "DER"]).stdout;
        assert_eq!(c.server_ca_der, &ca[..]);
        let text = openssl_text(&["x509", "-in", s(&d.join("cert.pem")), "-noout", "-text"]);
        assert!(text.contains(&format!("URI:urn:fleetgate:device:{}", c.device_id)), "{text}");
        assert!(text.contains("TLS Web Client Authentication") && text.contains("CA:FALSE"), "{text}");
        assert!(text.contains("prime256v1"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join("key.pem")).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "device key mode");
        }
    }

    // Serials are unique and at least 64 bits.
    let list = st.list_json();
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let mut serials: Vec<&str> = rows.iter().map(|r| r["serial"].as_str().unwrap()).collect();
    assert!(serials.iter().all(|s| s.len() >= 16));
    serials.sort_unstable();
    serials.dedup();
    assert_eq!(serials.len(), 5);

    // The broker certificate verifies against the server CA, not against the device CA.
    let leaf = st.path("broker-leaf.pem");
    let pem = std::fs::read_to_string(st.path("broker/cert.pem")).unwrap();
    let end = pem.find("-----END CERTIFICATE-----").unwrap() + 25;
    std::fs::write(&leaf, &pem[..end]).unwrap();
    let server_ca = home.join("server-ca.pem");
    assert!(openssl_verify(&["-partial_chain", "-CAfile", s(&server_ca), "-purpose", "sslserver", s(&leaf)]));
    assert!(!openssl_verify(&["-partial_chain", "-CAfile", s(&home.join("device-ca.pem")), s(&leaf)]));
    assert!(!openssl_verify(&["-CAfile", s(&chain), s(&leaf)]));
    // And a device certificate is not a server certificate.
    assert!(!openssl_verify(&[
        "-CAfile",
        s(&chain),
        "-purpose",
        "sslserver",
        s(&devices[0].join("cert.pem"))
    ]));

    // Revoke one; the fresh CRL rejects it and accepts the rest.
    let victim = name_of(&devices[1]);
    let out = st.ok(&["revoke", &victim, "--reason", "keyCompromise"]);
    assert!(out.contains("revoked device"), "{out}");
    let crl_pem = st.path("crl.pem");
    st.ok(&["crl", "--out", s(&crl_pem)]);
    let crl_text = openssl_text(&["crl", "-in", s(&crl_pem), "-noout", "-text"]);
    assert!(crl_text.contains("Key Compromise"), "{crl_text}");
    let verify_crl = openssl(&["crl", "-in", s(&crl_pem), "-noout", "-CAfile", s(&chain)]);
    assert!(String::from_utf8_lossy(&verify_crl.stderr).contains("verify OK"), "CRL signature must verify");
    let bundle = st.path("chain+crl.pem");
    std::fs::write(&bundle, [std::fs::read(&chain).unwrap(), std::fs::read(&crl_pem).unwrap()].concat())
        .unwrap();
    for d in &devices {
        let ok = openssl_verify(&["-crl_check", "-CAfile", s(&bundle), s(&d.join("cert.pem"))]);
        assert_eq!(ok, name_of(d) != victim, "{d:?}");
    }
    // The revoke also refreshed HOME/crl.pem.
    assert!(
        openssl_text(&["crl", "-in", s(&home.join("crl.pem")), "-noout", "-text"]).contains("Key Compromise")
    );

    // CRL numbers strictly increase; DER output parses.
    let number = |text: &str| -> u64 {
        let i = text.find("CRL Number:").unwrap();
        text[i..].lines().nth(1).unwrap().trim().parse().unwrap()
    };
    let crl_der = st.path("crl.der");
    st.ok(&["crl", "--out", s(&crl_der), "--der"]);
    let der_text = openssl_text(&["crl", "-inform", "DER", "-in", s(&crl_der), "-noout", "-text"]);
    assert!(number(&der_text) > number(&crl_text));

    // Statuses.
    let shown = show(st, &victim);
    assert_eq!(shown["status"], "revoked");
    assert_eq!(shown["certificates"][0]["revocation_reason"], "keyCompromise");
    let revoked: serde_json::Value =
        serde_json::from_str(&st.ok(&["list", "--status", "revoked", "--json"])).unwrap();
    assert_eq!(revoked.as_array().unwrap().len(), 1);

    // Renew: new serial, same key, both certificates listed; renewing a revoked device is refused.
    let keep = name_of(&devices[0]);
    let renewed = st.path("renewed.pem");
    st.ok(&["renew", &keep, "--out", s(&renewed)]);
    assert!(openssl_verify(&["-CAfile", s(&chain), s(&renewed)]));
    let shown = show(st, &keep);
    assert_eq!(shown["certificates"].as_array().unwrap().len(), 2);
    let pubkey = |p: &Path| openssl(&["x509", "-in", s(p), "-noout", "-pubkey"]).stdout;
    assert_eq!(pubkey(&renewed), pubkey(&devices[0].join("cert.pem")), "renew keeps the device key");
    assert!(st.fails(&["renew", &victim]).contains("revoked"));

    // Revoke a single certificate by serial: the device stays active.
    let serial = shown["certificates"][1]["serial"].as_str().unwrap().to_owned();
    st.ok(&["revoke", "--serial", &serial]);
    assert_eq!(show(st, &keep)["status"], "active");

    // A CSR from a device-generated key.
    let key = st.path("csr-key.pem");
    let csr = st.path("req.csr");
    assert!(openssl_ok(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", s(&key)]));
    assert!(openssl_ok(&["req", "-new", "-key", s(&key), "-subj", "/CN=csr-device-1", "-out", s(&csr)]));
    let cert = st.path("csr-device-1.pem");
    st.ok(&["sign-csr", "--csr", s(&csr), "--out", s(&cert)]);
    assert!(openssl_verify(&["-CAfile", s(&chain), "-purpose", "sslclient", s(&cert)]));
    assert_eq!(show(st, "csr-device-1")["certificates"][0]["key_source"], "csr");

    // A service identity.
    st.ok(&["service-cert", "--name", "backend", "--out", s(&st.path("svc"))]);
    assert!(openssl_verify(&["-CAfile", s(&chain), s(&st.path("svc/cert.pem"))]));
    assert_eq!(st.list_json().as_array().unwrap().len(), 7);

    let out = st.ok(&["verify-log"]);
    assert!(out.contains("issuance log OK"), "{out}");
}

#[test]
fn full_flow_on_sqlite() {
    full_flow(&Station::new(None));
}

#[test]
fn full_flow_on_postgres() {
    let pg = PgCluster::start();
    let url = pg.create_database("fleet");
    full_flow(&Station::new(Some(url)));
}

#[test]
fn init_refuses_to_overwrite_and_protects_keys() {
    let st = Station::new(None);
    st.init();
    let before = std::fs::read(st.home().join("private/device-ca.key")).unwrap();
    let err = st.fails(&["init", "--org", "Other"]);
    assert!(err.contains("already holds a CA hierarchy"), "{err}");
    assert_eq!(std::fs::read(st.home().join("private/device-ca.key")).unwrap(), before);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for k in ["root-ca.key", "device-ca.key", "server-ca.key"] {
            let path = st.home().join("private").join(k);
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{k}");
        }
    }
    // Intermediates: path length 0 and CA key usages; root: path length 1.
    let text = openssl_text(&["x509", "-in", s(&st.home().join("device-ca.pem")), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0") && text.contains("Certificate Sign, CRL Sign"), "{text}");
    let text = openssl_text(&["x509", "-in", s(&st.home().join("root-ca.pem")), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:1"), "{text}");
    let chain = st.home().join("device-ca-chain.pem");
    assert!(openssl_verify(&["-CAfile", s(&chain), s(&st.home().join("device-ca.pem"))]));
}

fn registry_snapshot(st: &Station) -> (serde_json::Value, String) {
    let log = st.ok(&["verify-log"]);
    (st.list_json(), log)
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let st = Station::new(None);
    // Missing home.
    let err = st.fails(&["list"]);
    assert!(err.contains("not an initialised fleet home"), "{err}");
    st.init();
    let dev = st.mint(1);
    let existing = name_of(&dev[0]);
    let before = registry_snapshot(&st);
    let out = st.path("out.pem");
    let sign = |csr: &Path| st.fails(&["sign-csr", "--csr", s(csr), "--out", s(&out)]);

    // Corrupt, foreign and missing CSRs.
    std::fs::write(st.path("garbage.csr"), b"this is not a CSR").unwrap();
    assert!(sign(&st.path("garbage.csr")).contains("CSR is not readable"));
    assert!(sign(&dev[0].join("cert.pem")).contains("CSR is not readable"), "a certificate is not a CSR");
    assert!(sign(&st.path("nope.csr")).contains("nope.csr"));

    // RSA and P-384 keys.
    let (rsa_key, rsa_csr) = (st.path("rsa.key"), st.path("rsa.csr"));
    assert!(openssl_ok(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        s(&rsa_key),
        "-subj",
        "/CN=rsa-dev",
        "-out",
        s(&rsa_csr)
    ]));
    assert!(sign(&rsa_csr).contains("RSA"));
    let (k384, c384) = (st.path("p384.key"), st.path("p384.csr"));
    assert!(openssl_ok(&["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", s(&k384)]));
    assert!(openssl_ok(&["req", "-new", "-key", s(&k384), "-subj", "/CN=p384-dev", "-out", s(&c384)]));
    assert!(sign(&c384).contains("P-256"));

    // Bad signature: flip a bit inside the signature of a good CSR.
    let key = st.path("ec.key");
    let csr = st.path("ec.csr.der");
    assert!(openssl_ok(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", s(&key)]));
    assert!(openssl_ok(&[
        "req",
        "-new",
        "-key",
        s(&key),
        "-subj",
        "/CN=sig-dev",
        "-outform",
        "DER",
        "-out",
        s(&csr)
    ]));
    let mut der = std::fs::read(&csr).unwrap();
    let n = der.len();
    der[n - 3] ^= 0x01;
    std::fs::write(st.path("badsig.der"), &der).unwrap();
    assert!(sign(&st.path("badsig.der")).contains("signature does not verify"));

    // CA:TRUE or serverAuth requested.
    let ca_csr = st.path("ca.csr");
    assert!(openssl_ok(&[
        "req",
        "-new",
        "-key",
        s(&key),
        "-subj",
        "/CN=ca-dev",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-out",
        s(&ca_csr)
    ]));
    assert!(sign(&ca_csr).contains("CA:TRUE"));
    let sa_csr = st.path("sa.csr");
    assert!(openssl_ok(&[
        "req",
        "-new",
        "-key",
        s(&key),
        "-subj",
        "/CN=sa-dev",
        "-addext",
        "extendedKeyUsage=serverAuth",
        "-out",
        s(&sa_csr)
    ]));
    assert!(sign(&sa_csr).contains("clientAuth"));

    // CN / --device-id mismatch, invalid id.
    let good_csr = st.path("good.csr");
    assert!(openssl_ok(&["req", "-new", "-key", s(&key), "-subj", "/CN=good-dev", "-out", s(&good_csr)]));
    let err = st.fails(&["sign-csr", "--csr", s(&good_csr), "--device-id", "other", "--out", s(&out)]);
    assert!(err.contains("does not match"), "{err}");
    let err = st.fails(&["sign-csr", "--csr", s(&good_csr), "--device-id", "good/dev", "--out", s(&out)]);
    assert!(err.contains("does not match") || err.contains("invalid device id"), "{err}");

    // Unknown device ids and serials.
    assert!(st.fails(&["show", "ghost"]).contains("unknown device id"));
    assert!(st.fails(&["renew", "ghost"]).contains("unknown device id"));
    assert!(st.fails(&["revoke", "ghost"]).contains("unknown device id"));
    assert!(st.fails(&["revoke", "--serial", "abcdef"]).contains("unknown certificate serial"));
    assert!(st.fails(&["revoke", "--serial", "xyz"]).contains("invalid serial"));
    assert!(st.fails(&["show", "Bad/Id"]).contains("invalid device id"));

    // Duplicate id: a service named like an existing device.
    let err = st.fails(&["service-cert", "--name", &existing, "--out", s(&st.path("svc-dup"))]);
    assert!(err.contains("already registered"), "{err}");

    // Bad mint arguments.
    assert!(st.fails(&["mint", "--count", "0", "--out", s(&st.path("x"))]).contains("at least 1"));
    assert!(st.fails(&["mint", "--prefix", "BAD PREFIX", "--out", s(&st.path("x"))]).contains("prefix"));

    assert!(!out.exists(), "no certificate may be written on refusal");
    assert_eq!(registry_snapshot(&st), before, "refusals must not change the registry or log");
}

#[test]
fn corrupt_database_is_reported_not_panicked() {
    let st = Station::new(None);
    st.init();
    for f in ["registry.db-wal", "registry.db-shm"] {
        let _ = std::fs::remove_file(st.home().join(f));
    }
    std::fs::write(st.home().join("registry.db"), vec![0x42u8; 8192]).unwrap();
    let err = st.fails(&["list"]);
    assert!(err.contains("registry database error") || err.contains("migration"), "{err}");
    let err = st.fails(&["mint", "--out", s(&st.path("devs"))]);
    assert!(err.contains("database") || err.contains("migration"), "{err}");
    assert!(device_dirs(&st.path("devs")).is_empty(), "nothing minted against a corrupt registry");
}

fn sqlite_exec(st: &Station, sql: &str) {
    let url = format!("sqlite://{}", st.home().join("registry.db").display());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    });
}

#[test]
fn tampered_log_is_detected() {
    let cases = [
        ("UPDATE issuance_log SET detail = '{\"role\":\"device\"}' WHERE seq = 3", "edited"),
        ("DELETE FROM issuance_log WHERE seq = 2", "missing"),
        ("DELETE FROM issuance_log WHERE seq = (SELECT MAX(seq) FROM issuance_log)", "newest"),
        ("UPDATE certificates SET cert_der = X'3000' WHERE rowid = 1", "differs"),
        ("UPDATE issuance_log SET at = at + 1 WHERE seq = 4", "edited"),
        (
            "UPDATE certificates SET status = 'active', revoked_seq = NULL WHERE status = 'revoked'",
            "disagrees",
        ),
        // The attack from the hostile review: un-revoke by plain SQL, keeping revoked_seq so
        // the old cross-check passed; the next CRL would have dropped the device.
        ("UPDATE certificates SET status = 'active' WHERE status = 'revoked'", "status `active` disagrees"),
        (
            "UPDATE devices SET status = 'active', revoked_at = NULL WHERE status = 'revoked'",
            "status `active` disagrees",
        ),
        ("UPDATE certificates SET revocation_reason = 'superseded' WHERE status = 'revoked'", "revocation"),
        ("UPDATE certificates SET revoked_at = revoked_at + 100 WHERE status = 'revoked'", "revocation"),
        ("UPDATE certificates SET not_after = not_after + 86400000 WHERE rowid = 2", "not_after"),
        ("UPDATE devices SET role = 'service' WHERE rowid = 2", "role"),
        ("DELETE FROM certificates WHERE status = 'revoked'", "missing from the registry"),
    ];
    for (sql, expect) in cases {
        let st = Station::new(None);
        st.init();
        let devices = st.mint(3);
        st.ok(&["revoke", &name_of(&devices[0])]);
        st.ok(&["verify-log"]);
        sqlite_exec(&st, sql);
        let err = st.fails(&["verify-log"]);
        assert!(err.contains("issuance log verification failed") && err.contains(expect), "{sql}: {err}");
    }
}

#[test]
fn killed_mid_mint_leaves_registry_and_files_consistent() {
    let st = Station::new(None);
    st.init();
    let out = st.path("devices");
    let mut child = st
        .cmd(&["mint", "--count", "20000", "--chunk", "25", "--out", s(&out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mint");
    // Wait until it is well into the batch, then kill -9.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while device_dirs(&out).len() < 60 {
        assert!(std::time::Instant::now() < deadline, "mint made no progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    let dirs = device_dirs(&out);
    assert!(dirs.len() < 20000, "the kill must land mid-batch");

    let registered: std::collections::HashMap<String, String> = st
        .list_json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["device_id"].as_str().unwrap().to_owned(), r["serial"].as_str().unwrap().to_owned()))
        .collect();
    // Every device directory is complete and its certificate is in the registry.
    for d in &dirs {
        let id = name_of(d);
        let bundle = std::fs::read(d.join("credentials.bin")).unwrap_or_else(|_| panic!("{id} incomplete"));
        assert_eq!(Credentials::decode(&bundle).expect("complete bundle").device_id, id);
        let serial = openssl_text(&["x509", "-in", s(&d.join("cert.pem")), "-noout", "-serial"]);
        let serial = serial.trim().trim_start_matches("serial=").to_lowercase();
        assert_eq!(registered.get(&id), Some(&serial), "{id}: files without a registry row");
    }
    // Registry rows without files are at most one chunk's worth (committed, files not yet written).
    assert!(
        registered.len() >= dirs.len() && registered.len() - dirs.len() <= 25,
        "{} vs {}",
        registered.len(),
        dirs.len()
    );
    st.ok(&["verify-log"]);
    // The next run cleans up any partial directory and carries on.
    st.ok(&["mint", "--count", "2", "--out", s(&out)]);
    let leftovers = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn closed_stdout_is_not_a_panic() {
    let st = Station::new(None);
    st.init();
    st.mint(30);
    // `list | head -n 1`: the reader goes away after one line.
    let mut child = st
        .cmd(&["list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // close the read end before the child writes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}

fn ec_csr(st: &Station, name: &str, subj: &str) -> (PathBuf, PathBuf) {
    let (key, csr) = (st.path(&format!("{name}.key")), st.path(&format!("{name}.csr")));
    assert!(openssl_ok(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", s(&key)]));
    assert!(openssl_ok(&["req", "-new", "-key", s(&key), "-subj", subj, "-out", s(&csr)]));
    (key, csr)
}

fn key_pub(key: &Path) -> String {
    openssl_text(&["pkey", "-in", s(key), "-pubout"])
}

fn cert_pub(cert: &Path) -> String {
    openssl_text(&["x509", "-in", s(cert), "-noout", "-pubkey"])
}

/// An attacker with any CSR naming an existing device (or a service, or a reserved name) gets
/// nothing; only the explicit `rekey` replaces a device's key, and it revokes the old
/// certificate (superseded) in the same transaction, so a later `renew` certifies the new key.
#[test]
fn a_csr_never_rekeys_an_existing_device_only_rekey_does() {
    let st = Station::new(None);
    st.init();
    let devices = st.mint(1);
    let victim = name_of(&devices[0]);
    st.ok(&["service-cert", "--name", "backend", "--out", s(&st.path("svc"))]);
    let out = st.path("stolen.pem");
    let before = registry_snapshot(&st);

    let (_, by_cn) = ec_csr(&st, "attacker", &format!("/CN={victim}"));
    let err = st.fails(&["sign-csr", "--csr", s(&by_cn), "--out", s(&out)]);
    assert!(err.contains("already exists") && err.contains("rekey"), "{err}");
    let (_, no_cn) = ec_csr(&st, "attacker2", "/O=evil");
    let err = st.fails(&["sign-csr", "--csr", s(&no_cn), "--device-id", &victim, "--out", s(&out)]);
    assert!(err.contains("already exists"), "{err}");
    let (_, svc) = ec_csr(&st, "svc", "/CN=backend");
    assert!(st.fails(&["sign-csr", "--csr", s(&svc), "--out", s(&out)]).contains("already exists"));
    for reserved in ["broker", "admin", "service"] {
        let (_, r) = ec_csr(&st, reserved, &format!("/CN={reserved}"));
        let err = st.fails(&["sign-csr", "--csr", s(&r), "--out", s(&out)]);
        assert!(err.contains("reserved"), "{reserved}: {err}");
    }
    let (_, fresh) = ec_csr(&st, "fresh", "/CN=fresh-dev");
    let err = st.fails(&["sign-csr", "--csr", s(&fresh), "--days", "36000", "--out", s(&out)]);
    assert!(err.contains("outlive the issuing CA"), "{err}");
    assert!(st.fails(&["mint", "--days", "36000", "--out", s(&st.path("long"))]).contains("outlive"));
    assert!(!out.exists());
    assert_eq!(registry_snapshot(&st), before, "refused CSRs must not change the registry or log");

    // The operator re-keys deliberately.
    let old_serial = show(&st, &victim)["certificates"][0]["serial"].as_str().unwrap().to_owned();
    let (new_key, new_csr) = ec_csr(&st, "new", &format!("/CN={victim}"));
    let (_, other_cn) = ec_csr(&st, "other", "/CN=someone-else");
    let rekeyed = st.path("rekeyed.pem");
    assert!(st
        .fails(&["rekey", &victim, "--csr", s(&other_cn), "--out", s(&rekeyed)])
        .contains("does not match"));
    assert!(st
        .fails(&["rekey", "ghost", "--csr", s(&no_cn), "--out", s(&rekeyed)])
        .contains("unknown device"));
    let said = st.ok(&["rekey", &victim, "--csr", s(&new_csr), "--out", s(&rekeyed)]);
    assert!(said.contains(&old_serial), "{said}");
    assert_eq!(cert_pub(&rekeyed), key_pub(&new_key));
    let shown = show(&st, &victim);
    assert_eq!(shown["status"], "active");
    let certs = shown["certificates"].as_array().unwrap();
    let old = certs.iter().find(|c| c["serial"] == old_serial.as_str()).unwrap();
    assert_eq!(old["status"], "revoked");
    assert_eq!(old["revocation_reason"], "superseded");
    // OpenSSL sees the old certificate revoked by the fresh CRL, the new one good.
    let chain = st.home().join("device-ca-chain.pem");
    let crl = st.home().join("crl.pem");
    let verify =
        |cert: &Path| openssl_verify(&["-CAfile", s(&chain), "-CRLfile", s(&crl), "-crl_check", s(cert)]);
    assert!(!verify(&devices[0].join("cert.pem")), "superseded certificate still passes the CRL");
    assert!(verify(&rekeyed));
    // renew now certifies the new key, never the old one.
    let renewed = st.path("renewed.pem");
    st.ok(&["renew", &victim, "--out", s(&renewed)]);
    assert_eq!(cert_pub(&renewed), key_pub(&new_key));
    let log = st.ok(&["verify-log"]);
    assert!(log.contains("issuance log OK"), "{log}");
}

#[test]
fn db_roles_prints_least_privilege_grants_and_refuses_sqlite() {
    let st = Station::new(None);
    st.init();
    let sql = st.ok(&["db-roles", "--print", "--broker-role", "ingest"]);
    assert!(sql.contains("GRANT SELECT ON devices, certificates, _sqlx_migrations TO ingest;"), "{sql}");
    assert!(sql.contains("GRANT INSERT ON telemetry TO ingest;"), "{sql}");
    // The broker settles commands (status updates), moves firmware jobs and campaigns (their
    // state columns only) and its telemetry log's copy position, and may touch nothing else:
    // no other UPDATE, never the issuance log.
    assert!(sql.contains("GRANT SELECT, INSERT, UPDATE ON commands TO ingest;"), "{sql}");
    let updates: Vec<&str> = sql.lines().filter(|l| l.contains("UPDATE")).collect();
    assert_eq!(
        updates,
        [
            "GRANT SELECT, INSERT, UPDATE ON telemetry_feed TO ingest;",
            "GRANT SELECT, INSERT, UPDATE ON commands TO ingest;",
            "GRANT UPDATE (state, wave, reason, updated_at) ON ota_campaigns TO ingest;",
            "GRANT UPDATE (state, reason, progress, command_id, updated_at) ON ota_jobs TO ingest;",
        ],
        "{sql}"
    );
    assert!(sql.contains("GRANT SELECT ON ota_campaigns, ota_jobs TO ingest;"), "{sql}");
    assert!(sql.contains("GRANT SELECT ON releases TO ingest;"), "{sql}");
    assert!(!sql.contains("issuance_log") && !sql.contains("DELETE"), "{sql}");
    assert!(st.fails(&["db-roles"]).contains("PostgreSQL"));
    assert!(st
        .fails(&["db-roles", "--print", "--broker-role", "x; DROP TABLE devices"])
        .contains("invalid role name"));
}

/// `list --expiring-within` names the active identities whose newest certificate expires
/// within the window (the devices to rotate), not the long-lived ones nor revoked ones.
#[test]
fn list_expiring_within_names_the_devices_to_rotate() {
    let st = Station::new(None);
    st.init();
    let long = st.mint(1);
    let soon_out = st.path("soon");
    st.ok(&["mint", "--count", "2", "--days", "10", "--out", s(&soon_out)]);
    let soon = device_dirs(&soon_out);
    let id = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    st.ok(&["revoke", &id(&soon[1])]);
    let listed: serde_json::Value =
        serde_json::from_str(&st.ok(&["list", "--expiring-within", "30d", "--json"])).unwrap();
    let ids: Vec<&str> =
        listed.as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id(&soon[0]).as_str()], "only the active 10-day device");
    let text = st.ok(&["list", "--expiring-within", "9d"]);
    assert!(!text.contains(&id(&soon[0])) && !text.contains(&id(&long[0])), "{text}");
    // A bad duration is a usage error (clap: exit 2), with the fix in the message.
    let out = st.try_run(&["list", "--expiring-within", "30x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("unit is d, h, m or s"), "{err}");
}

/// Rows of a query on the SQLite registry, every column as text.
fn sqlite_rows(st: &Station, sql: &str) -> Vec<Vec<String>> {
    use sqlx::Row;
    let url = format!("sqlite://{}", st.home().join("registry.db").display());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap();
        let out = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        r.try_get::<String, _>(i)
                            .or_else(|_| r.try_get::<i64, _>(i).map(|n| n.to_string()))
                            .unwrap()
                    })
                    .collect()
            })
            .collect();
        pool.close().await;
        out
    })
}

/// `openssl x509 -serial` of the first certificate in a PEM file, lowercase hex.
fn openssl_serial(cert: &Path) -> String {
    let out = openssl_text(&["x509", "-in", s(cert), "-noout", "-serial"]);
    out.trim().trim_start_matches("serial=").to_lowercase()
}

/// The word after `serial ` in a CLI line.
fn printed_serial(out: &str) -> String {
    let at = out.find("serial ").unwrap_or_else(|| panic!("no serial printed: {out}")) + "serial ".len();
    out[at..].split(|c: char| !c.is_ascii_hexdigit()).next().unwrap().to_lowercase()
}

/// The serials the issuance log recorded for `event` entries of `subject`, oldest first.
fn logged_serials(st: &Station, event: &str, subject: &str) -> Vec<String> {
    let sql = format!(
        "SELECT serial FROM issuance_log WHERE event = '{event}' AND device_id = '{subject}' ORDER BY seq"
    );
    sqlite_rows(st, &sql).into_iter().map(|mut r| r.remove(0)).collect()
}

/// Every certificate the station issues, of every role, is printed, recorded in the registry and
/// written to the issuance log with the serial OpenSSL reads from the certificate itself. The
/// broker certificate's printed and logged serial was once a random number never put into it.
#[test]
fn every_role_prints_records_and_logs_the_certificates_own_serial() {
    let st = Station::new(None);
    st.ok(&["init", "--org", "Acme Test"]);
    let broker = st.path("broker");
    let said = st.ok(&["server-cert", "--dns", "localhost", "--out", s(&broker)]);
    let own = openssl_serial(&broker.join("cert.pem"));
    assert_eq!(printed_serial(&said), own, "server-cert printed another serial than its certificate's");
    assert_eq!(
        logged_serials(&st, "server-cert", "localhost"),
        std::slice::from_ref(&own),
        "server-cert log entry"
    );
    let said = st.ok(&["server-cert", "--renew", "--out", s(&broker)]);
    let renewed = openssl_serial(&broker.join("cert.pem"));
    assert_eq!(printed_serial(&said), renewed, "server-cert --renew");
    assert_eq!(logged_serials(&st, "server-cert", "localhost"), [own, renewed]);

    // Client roles: printed, registry (`show`), log (`issue` entry), certificate.
    let check = |id: &str, said: &str, cert: &Path| {
        let own = openssl_serial(cert);
        assert_eq!(printed_serial(said), own, "{id}: printed serial");
        let shown = show(&st, id);
        let recorded: Vec<&str> =
            shown["certificates"].as_array().unwrap().iter().map(|c| c["serial"].as_str().unwrap()).collect();
        assert!(recorded.contains(&own.as_str()), "{id}: registry serials {recorded:?}, certificate {own}");
        assert_eq!(logged_serials(&st, "issue", id).last(), Some(&own), "{id}: logged serial");
    };
    let said = st.ok(&["service-cert", "--name", "backend", "--out", s(&st.path("svc"))]);
    check("backend", &said, &st.path("svc/cert.pem"));
    let said = st.ok(&["issuer-cert", "--name", "issuer-1", "--out", s(&st.path("iss"))]);
    check("issuer-1", &said, &st.path("iss/cert.pem"));
    let said = st.ok(&[
        "operator-cert",
        "--name",
        "alice",
        "--p12-password",
        "secret-pw",
        "--out",
        s(&st.path("op")),
    ]);
    check("alice", &said, &st.path("op/cert.pem"));
    let said = st.ok(&["claim-cert", "--name", "batch-1", "--quota", "5", "--out", s(&st.path("claim"))]);
    check("batch-1", &said, &st.path("claim/cert.pem"));
    let devices = st.path("devices");
    let said = st.ok(&["mint", "--count", "1", "--out", s(&devices)]);
    let dev = device_dirs(&devices).remove(0);
    check(&name_of(&dev), &said, &dev.join("cert.pem"));
    let (_, csr) = ec_csr(&st, "csr", "/CN=csr-device-1");
    let signed = st.path("signed.pem");
    let said = st.ok(&["sign-csr", "--csr", s(&csr), "--out", s(&signed)]);
    check("csr-device-1", &said, &signed);
    let (_, csr) = ec_csr(&st, "rekey", "/CN=csr-device-1");
    let rekeyed = st.path("rekeyed.pem");
    let said = st.ok(&["rekey", "csr-device-1", "--csr", s(&csr), "--out", s(&rekeyed)]);
    check("csr-device-1", said.lines().next().unwrap(), &rekeyed);
    let renewed = st.path("renewed.pem");
    let said = st.ok(&["renew", "csr-device-1", "--out", s(&renewed)]);
    check("csr-device-1", &said, &renewed);
    st.ok(&["verify-log"]);
}

/// Rewrites the serial of log entry `seq` (and of the registry row, if any) to `to`, then
/// recomputes the hash chain and the anchor as an attacker with the database would: only the
/// serial / certificate mismatch remains.
fn rewrite_logged_serial(st: &Station, seq: i64, to: &str) {
    use sha2::{Digest, Sha256};
    let from =
        sqlite_rows(st, &format!("SELECT serial FROM issuance_log WHERE seq = {seq}")).remove(0).remove(0);
    sqlite_exec(st, &format!("UPDATE issuance_log SET serial = '{to}' WHERE seq = {seq}"));
    sqlite_exec(st, &format!("UPDATE certificates SET serial = '{to}' WHERE serial = '{from}'"));
    let rows =
        sqlite_rows(st, "SELECT seq, at, event, device_id, serial, detail FROM issuance_log ORDER BY seq");
    let mut prev = "0".repeat(64);
    for r in rows {
        let mut h = Sha256::new();
        for part in [&prev, &r[0], &r[1], &r[2], &r[3], &r[4], &r[5]] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        let hash = hex::encode(h.finalize());
        sqlite_exec(
            st,
            &format!("UPDATE issuance_log SET prev_hash = '{prev}', hash = '{hash}' WHERE seq = {}", r[0]),
        );
        sqlite_exec(st, &format!("UPDATE log_anchor SET hash = '{hash}' WHERE id = 1"));
        prev = hash;
    }
}

/// A log (and registry) rewritten so that an entry names a serial its certificate does not hold
/// (a CRL listing that serial would not revoke the certificate) fails `verify-log`, for the
/// broker certificate's entry and for every client role's, though the hash chain is intact.
#[test]
fn a_logged_serial_that_is_not_the_certificates_own_fails_verify_log() {
    let setup = || {
        let st = Station::new(None);
        st.init();
        st.mint(1);
        st.ok(&["service-cert", "--name", "backend", "--out", s(&st.path("svc"))]);
        st.ok(&["issuer-cert", "--name", "issuer-1", "--out", s(&st.path("iss"))]);
        st.ok(&[
            "operator-cert",
            "--name",
            "alice",
            "--p12-password",
            "secret-pw",
            "--out",
            s(&st.path("op")),
        ]);
        st.ok(&["claim-cert", "--name", "batch-1", "--quota", "5", "--out", s(&st.path("claim"))]);
        st.ok(&["verify-log"]);
        st
    };
    let forged = "4a0b0c0d0e0f10111213141516171819";
    let probe = setup();
    let entries = sqlite_rows(
        &probe,
        "SELECT seq, event, detail FROM issuance_log WHERE event IN ('server-cert', 'issue') ORDER BY seq",
    );
    let mut roles = std::collections::BTreeSet::new();
    for e in entries {
        let role = if e[1] == "server-cert" {
            "server".to_owned()
        } else {
            serde_json::from_str::<serde_json::Value>(&e[2]).unwrap()["role"].as_str().unwrap().to_owned()
        };
        roles.insert(role.clone());
        let st = setup();
        let seq: i64 = e[0].parse().unwrap();
        rewrite_logged_serial(&st, seq, forged);
        let err = st.fails(&["verify-log"]);
        assert!(
            err.contains("issuance log verification failed")
                && err.contains(forged)
                && (err.contains("holds") || err.contains("own serial")),
            "{role} (entry {seq}): {err}"
        );
    }
    let want: std::collections::BTreeSet<String> =
        ["server", "device", "service", "issuer", "operator", "claim"].map(String::from).into();
    assert_eq!(roles, want);
}
