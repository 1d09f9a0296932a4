//! Mint throughput: `fleet-provision`'s library against a loop of `openssl` commands doing the
//! same work (P-256 key, CSR, certificate signed by the device CA, files), in one run.
//!
//!     cargo bench -p fleet-provision --bench mint [-- N_FLEET N_OPENSSL]
//!
//! fleet-provision's figure includes the registry row (SQLite, committed before the files), the
//! issuance-log entry, the credentials bundle and five files per device; the OpenSSL loop does not
//! touch a registry, so the comparison favours OpenSSL. Both run on one core (the station is
//! single-threaded; the OpenSSL loop runs one process at a time).

use std::process::Command;
use std::time::Instant;

use fleet_provision::home::Home;
use fleet_provision::station::{MintOptions, Station};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n_fleet: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let n_openssl: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    let station =
        rt.block_on(Station::init(Home::new(dir.path().join("home")), "Bench", None)).expect("init");
    let opts = MintOptions {
        count: n_fleet,
        prefix: "bench".into(),
        out: dir.path().join("fleet"),
        broker_host: "localhost".into(),
        broker_port: 8883,
        chunk: 256,
    };
    let start = Instant::now();
    let minted = rt.block_on(station.mint(&opts, &|_| {})).expect("mint");
    let fleet_secs = start.elapsed().as_secs_f64();
    assert_eq!(minted.len(), n_fleet);
    let fleet_rate = n_fleet as f64 / fleet_secs;

    let home = station.home();
    let out = dir.path().join("openssl");
    std::fs::create_dir_all(&out).expect("mkdir");
    let run = |args: &[&str]| {
        let ok = Command::new("openssl").args(args).current_dir(&out).output().map(|o| o.status.success());
        assert!(matches!(ok, Ok(true)), "openssl {args:?} failed (is openssl installed?)");
    };
    let ca = home.device_ca();
    let ca_key = home.device_ca_key();
    let start = Instant::now();
    for i in 0..n_openssl {
        let key = format!("d{i}.key");
        let csr = format!("d{i}.csr");
        let crt = format!("d{i}.pem");
        run(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
        run(&["req", "-new", "-key", &key, "-subj", &format!("/O=Bench/CN=d{i}"), "-out", &csr]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca.to_str().expect("utf-8"),
            "-CAkey",
            ca_key.to_str().expect("utf-8"),
            "-set_serial",
            &format!("0x{:032x}", i + 1),
            "-days",
            "1825",
            "-out",
            &crt,
        ]);
    }
    let openssl_secs = start.elapsed().as_secs_f64();
    let openssl_rate = n_openssl as f64 / openssl_secs;

    println!("mint benchmark (one core each)");
    println!("  fleet-provision mint : {n_fleet:>6} identities in {fleet_secs:>7.3} s = {fleet_rate:>8.0} identities/s (key + cert + registry row + log + bundle + files)");
    println!("  openssl command loop : {n_openssl:>6} identities in {openssl_secs:>7.3} s = {openssl_rate:>8.1} identities/s (ecparam + req + x509)");
    println!("  ratio                : {:.1}x", fleet_rate / openssl_rate);
}
