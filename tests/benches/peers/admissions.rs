//! `admissions`: TCP + TLS 1.3 full handshake (P-256 client certificate, no resumption) +
//! CONNECT/CONNACK + DISCONNECT per second, `--conc` clients for `--secs` against each server,
//! for each CRL size of `--crl-sizes` (a synthetic CRL signed by the device CA, or the station's
//! empty one). Also the server's CPU per admission and the ratios of fleet-broker to the others.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{self, Identity};
use crate::servers::Peer;
use crate::{mean_rate, Args, Env, Report};

/// Admissions per second against `addr` for `secs` with `conc` clients, and the failed attempts.
/// `bare`: handshake only (the bare rustls server speaks no MQTT).
pub(crate) async fn admissions_per_sec(
    addr: SocketAddr,
    ids: &[Arc<Identity>],
    bare: bool,
    secs: f64,
    conc: usize,
) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (ids, done, failed) = (ids.to_vec(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < until {
                let who = &ids[i % ids.len()];
                let ok = if bare {
                    client::handshake_only(addr, who).await
                } else {
                    client::admit(addr, who).await
                };
                if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                i += conc;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (mean_rate(done.load(Ordering::Relaxed), secs), failed.load(Ordering::Relaxed))
}

pub(crate) async fn scenario_admissions(env: &Env, ids: &[Arc<Identity>], a: &Args, report: &mut Report) {
    println!(
        "\n== admissions: TLS 1.3 full handshake (P-256 client cert) + CONNECT/CONNACK, {} s each, {} concurrent clients",
        a.secs, a.conc
    );
    let mut by: BTreeMap<(usize, &str), f64> = BTreeMap::new();
    let mut cpu: BTreeMap<(usize, &str), f64> = BTreeMap::new();
    for &n in &a.crl_sizes {
        if n > 0 {
            let t = Instant::now();
            env.write_synthetic_crl(n);
            println!("-- CRL with {n} revoked serials (signed in {:.1} s)", t.elapsed().as_secs_f64());
        } else {
            env.station.write_crl(&env.home.join("crl.pem")).await.expect("crl");
            println!("-- empty CRL");
        }
        for subject in a.subjects(&Peer::ALL) {
            let name = subject.name();
            if n > 0 && !subject.peer.checks_crl() {
                println!("  {name:<30} no CRL support: not measured");
                continue;
            }
            let t = Instant::now();
            let Some(server) = env.start_subject(&subject) else { continue };
            let startup = t.elapsed().as_secs_f64();
            let rss_start = server.rss_kib() as f64 / 1024.0;
            let cpu0 = server.cpu_secs();
            let (rate, failed) =
                admissions_per_sec(server.addr, ids, subject.is(Peer::Bare), a.secs, a.conc).await;
            let cpu_us = (server.cpu_secs() - cpu0) * 1e6 / (rate * a.secs).max(1.0);
            let rss_end = server.rss_kib() as f64 / 1024.0;
            cpu.insert((n, name), cpu_us);
            by.insert((n, name), rate);
            let base = by.get(&(0, name)).copied();
            let vs_empty = match base {
                Some(b) if n > 0 && b > 0.0 => format!("{:.2}× its empty-CRL rate", rate / b),
                _ => String::new(),
            };
            report.add(
                "admissions",
                format!(
                    "| {name} | {n} | {rate:.0} | {cpu_us:.0} µs | {failed} | {startup:.1} s | {rss_start:.1} → {rss_end:.1} MiB | {vs_empty} |"
                ),
            );
        }
        let get = |name: &str| by.get(&(n, name)).copied().unwrap_or(0.0);
        let cpu_of = |name: &str| cpu.get(&(n, name)).copied().unwrap_or(0.0);
        let fb = Peer::FleetBroker.name();
        for (other, what) in [
            ("fleet-broker-before", "fleet-broker-before"),
            (Peer::Bare.name(), "bare rustls"),
            (Peer::Mosquitto.name(), "mosquitto"),
            (Peer::Rumqttd.name(), "rumqttd"),
        ] {
            if get(other) > 0.0 && get(fb) > 0.0 {
                report.add(
                    "ratios",
                    format!("| CRL {n}: fleet-broker / {what} | {:.2}× |", get(fb) / get(other)),
                );
            }
            if cpu_of(other) > 0.0 && cpu_of(fb) > 0.0 {
                report.add(
                    "ratios",
                    format!(
                        "| CRL {n}: server CPU per admission, fleet-broker / {what} | {:.2}× |",
                        cpu_of(fb) / cpu_of(other)
                    ),
                );
            }
        }
    }
    env.station.write_crl(&env.home.join("crl.pem")).await.expect("crl");
}
