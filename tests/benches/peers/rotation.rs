//! `rotation`: N devices (default 1,000, `--devices`) on the SDK (`fleet-sim`, one thread each)
//! all inside their renewal window at once, against the release `fleet-broker` and the online
//! issuer (`fleet-provision serve`): the issuer's CSRs per second, per-device rotation latency
//! (CSR sent → running on the new certificate), and the time until the whole fleet runs on new
//! certificates. The peer: `openssl x509 -req` signing the same kind of CSRs with the same CA,
//! one process per CSR (how a shell-script rotation service signs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers;
use crate::{percentile, Args, Env, Report};

fn bin(name: &str) -> PathBuf {
    fleet_tests::workspace_bin_dir(&[name]).join(name)
}

/// `event <ms> <device> <what> ...` lines: (ms, device) of each `what`.
fn events(out: &str, what: &str) -> Vec<(u64, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            (w.next()? == "event").then_some(())?;
            let ms = w.next()?.parse().ok()?;
            let dev = w.next()?.to_owned();
            (w.next()? == what).then_some((ms, dev))
        })
        .collect()
}

pub(crate) async fn scenario_rotation(a: &Args, report: &mut Report) {
    // One thread per device in fleet-sim: at most 2,000.
    let n = if a.devices_set { a.devices.min(2_000) } else { 1_000 };
    println!("\n== rotation: {n} devices rotating at once (fleet-sim on the SDK, fleet-provision serve, fleet-broker)");
    let env = Env::new().await;
    let t = Instant::now();
    let _ = env.mint("rot", n).await;
    println!("  minted {n} devices in {:.1} s", t.elapsed().as_secs_f64());
    let issuer_dir = env.dir().join("issuer");
    env.station.issuer_cert("issuer-bench", &issuer_dir).await.expect("issuer cert");
    // All devices connect from 127.0.0.1 at once: lift the per-source pre-admission cap.
    let server =
        match servers::start_fleet_broker_on(&env.home, 0, &["--max-pre-admission-per-source", "4096"]) {
            Ok(s) => s,
            Err(e) => {
                println!("  fleet-broker did not start: {e}");
                return;
            }
        };
    let port = server.addr.port().to_string();
    let log = env.dir().join("issuer.log");
    let mut issuer = Command::new(bin("fleet-provision"))
        .arg("--home")
        .arg(&env.home)
        .args(["serve", "--identity", issuer_dir.to_str().unwrap_or_default(), "--port", &port])
        .args(["--renew-within", "3650d", "--grace", "2s"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("issuer log"))
        .spawn()
        .expect("spawn fleet-provision serve");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = servers::cpu_secs(issuer.id());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let dir = env.dir().join("rot");
        move || {
            Command::new(bin("fleet-sim"))
                .args(["run", "--port", &port, "--rate", "0.2", "--duration", "180"])
                .args(["--rotate-within", "3650d", "--exit-when-rotated", "--answer-timeout-ms", "30000"])
                .arg("--devices")
                .arg(dir)
                .output()
                .expect("fleet-sim")
        }
    })
    .await
    .expect("join");
    let wall = started.elapsed();
    let issuer_cpu = servers::cpu_secs(issuer.id()) - cpu0;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let sent = events(&out, "csr-sent");
    let staged = events(&out, "staged");
    let rotated = events(&out, "rotated");
    if rotated.is_empty() {
        println!("  no device rotated: {}", out.lines().rev().take(5).collect::<Vec<_>>().join(" / "));
        let _ = issuer.kill();
        let _ = issuer.wait();
        return;
    }
    let first_csr = sent.iter().map(|e| e.0).min().unwrap_or(0);
    let last_staged = staged.iter().map(|e| e.0).max().unwrap_or(0);
    let last_rotated = rotated.iter().map(|e| e.0).max().unwrap_or(0);
    let csr_rate = staged.len() as f64 / ((last_staged.saturating_sub(first_csr)).max(1) as f64 / 1000.0);
    let mut latency: Vec<Duration> = rotated
        .iter()
        .filter_map(|(t, dev)| {
            let s = sent.iter().filter(|e| &e.1 == dev).map(|e| e.0).min()?;
            Some(Duration::from_millis(t.saturating_sub(s)))
        })
        .collect();
    latency.sort();
    let _ = issuer.kill();
    let _ = issuer.wait();
    drop(server);
    let rounds = sent.len() as f64 / rotated.len().max(1) as f64;
    report.add(
        "rotation",
        format!(
            "| {n} devices | {}/{n} rotated | all on new certificates {:.1} s after start ({:.1} s after the first CSR) | issuer {csr_rate:.0} CSRs/s, {:.2} ms CPU per CSR | latency p50 {:.0} ms, p99 {:.0} ms | CSRs sent per device {rounds:.2} | wall {:.1} s |",
            rotated.len(),
            last_rotated as f64 / 1000.0,
            last_rotated.saturating_sub(first_csr) as f64 / 1000.0,
            issuer_cpu * 1000.0 / staged.len().max(1) as f64,
            percentile(&latency, 50.0).as_secs_f64() * 1000.0,
            percentile(&latency, 99.0).as_secs_f64() * 1000.0,
            wall.as_secs_f64(),
        ),
    );
    // The peer: openssl signing CSRs with the same device CA, one process each.
    if let Some(rate) = openssl_rate(&env.home, env.dir(), 100) {
        report
            .add("rotation", format!("| openssl x509 -req, 100 CSRs, one process each | {rate:.0} CSRs/s |"));
        report.add(
            "ratios",
            format!("| rotation: issuer CSRs/s / openssl x509 -req loop | {:.2}× |", csr_rate / rate),
        );
    }
}

/// CSRs per second signed by `openssl x509 -req` with the device CA (`count` of them).
fn openssl_rate(home: &Path, work: &Path, count: usize) -> Option<f64> {
    let openssl =
        ["/usr/bin/openssl", "/usr/local/bin/openssl"].into_iter().find(|p| Path::new(p).is_file())?;
    let h = fleet_registry::Home::new(home);
    let dir = work.join("openssl-csrs");
    std::fs::create_dir_all(&dir).ok()?;
    let mut csrs = Vec::new();
    for i in 0..count {
        let key = fleet_device::csr::generate_key(&mut rand::rngs::OsRng);
        let mut buf = [0u8; 512];
        let len = fleet_device::csr::build(&format!("dev-{i:012x}"), &key, &mut buf).ok()?;
        let p = dir.join(format!("{i}.der"));
        std::fs::write(&p, &buf[..len]).ok()?;
        csrs.push(p);
    }
    let t = Instant::now();
    for (i, csr) in csrs.iter().enumerate() {
        let ok = Command::new(openssl)
            .args(["x509", "-req", "-inform", "DER", "-days", "1825", "-sha256", "-in"])
            .arg(csr)
            .arg("-CA")
            .arg(h.device_ca())
            .arg("-CAkey")
            .arg(h.device_ca_key())
            .args(["-set_serial", &format!("0x{:032x}", rand::random::<u128>() >> 2)])
            .arg("-out")
            .arg(dir.join(format!("{i}.pem")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
    }
    Some(count as f64 / t.elapsed().as_secs_f64())
}
