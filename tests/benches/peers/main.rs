//! Side-by-side broker benchmarks on loopback, in one run, every server started by this tool
//! with equivalent mutual-TLS settings: fleet-broker, Mosquitto (`require_certificate`,
//! `use_identity_as_username`, `crlfile`), rumqttd (`verify-client-cert`; it has no CRL support)
//! and a bare rustls server with the broker's own TLS configuration (the ceiling).
//!
//!     scripts/bench [SCENARIO...] [--secs S] [--conc C] [--sessions N] [--crl-sizes A,B,..]
//!                   [--peers bare,fleet-broker,mosquitto,rumqttd]
//!     cargo bench -p fleet-tests --bench peers -- [same arguments]   (after building the release fleet-broker)
//!
//! Scenarios (default: all of them, in this order):
//! - `admissions`: TCP + TLS 1.3 full handshake (P-256 client certificate, no resumption) +
//!   CONNECT/CONNACK + DISCONNECT per second, for each CRL size (default 0, 100k, 1M entries);
//! - `revoke`: revoke → disconnect latency over 100 revocations of connected devices;
//! - `ingest`: QoS 1 and QoS 0 PUBLISH throughput from 100 concurrently connected devices;
//! - `memory`: resident memory per idle mTLS session with N sessions (default 10,000);
//! - `storm`: N devices (default 20,000, `--devices`) with the SDK's reconnect policy, the server
//!   stopped (SIGTERM, SIGKILL) and restarted: time until 50/99/100% are back, against the raw
//!   handshake ceiling; Mosquitto in the same run;
//! - `soak` (only when named; `--minutes`, default 60): 1,000 devices publishing and reconnecting
//!   at random; RSS, open fds and p99 PUBACK latency every minute, and the drift;
//! - `cluster`: three nodes on NATS JetStream + PostgreSQL: cross-node delivery latency, QoS 1
//!   ingest through JetStream beside one node and Mosquitto, revoke → cut on three nodes;
//! - `rotation` (only when named; `--devices`, default 1,000 here): that many SDK devices
//!   rotating their certificates at once through `fleet-provision serve`: issuer CSRs/s, latency,
//!   time until the whole fleet runs on new certificates, beside an `openssl x509 -req` loop;
//! - `commands` (only when named; `--devices`, default 10,000 here): 3 commands queued for each
//!   offline device, then the whole fleet reconnecting: commands queued/s, bytes per queued
//!   command, delivery rate and duplicates, beside Mosquitto with persistent sessions.
//!
//! Clients run in this process on the same cores as the server under test, so every figure is
//! a lower bound, comparable only with the other figures of the same run.

mod client;
mod cluster;
mod commands;
mod rotation;
mod servers;
mod soak;
mod storm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use client::Identity;
use fleet_provision::home::Home;
use fleet_provision::pki::{self, LoadedCa};
use fleet_provision::station::{MintOptions, Station};
use fleet_provision::{DeviceId, RevocationReason, SerialNumber};
use fleet_registry::RevokedEntry;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use servers::{Peer, Server};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

struct Args {
    scenarios: Vec<String>,
    secs: f64,
    conc: usize,
    sessions: usize,
    /// Devices of the storm (and of the rotation, when given).
    devices: usize,
    /// `--devices` was given.
    devices_set: bool,
    /// Length of the soak.
    minutes: u64,
    crl_sizes: Vec<usize>,
    /// Servers to measure (default: all).
    peers: Vec<Peer>,
}

impl Args {
    fn wants(&self, p: Peer) -> bool {
        self.peers.contains(&p)
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        secs: 5.0,
        conc: 16,
        sessions: 10_000,
        devices: 20_000,
        devices_set: false,
        minutes: 60,
        crl_sizes: vec![0, 100_000, 1_000_000],
        peers: Peer::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--secs" => a.secs = value("--secs")?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--conc" => a.conc = value("--conc")?.parse().map_err(|e| format!("--conc: {e}"))?,
            "--sessions" => {
                a.sessions = value("--sessions")?.parse().map_err(|e| format!("--sessions: {e}"))?
            }
            "--minutes" => a.minutes = value("--minutes")?.parse().map_err(|e| format!("--minutes: {e}"))?,
            "--devices" => {
                a.devices = value("--devices")?.parse().map_err(|e| format!("--devices: {e}"))?;
                a.devices_set = true;
            }
            "--crl-sizes" => {
                a.crl_sizes = value("--crl-sizes")?
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse().map_err(|e| format!("--crl-sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--peers" => {
                a.peers = value("--peers")?
                    .split(',')
                    .map(|s| Peer::parse(s.trim()).ok_or(format!("--peers: unknown server {s:?}")))
                    .collect::<Result<_, _>>()?
            }
            "admissions" | "revoke" | "ingest" | "memory" | "storm" | "soak" | "cluster" | "rotation" | "commands" => {
                a.scenarios.push(arg)
            }
            "-h" | "--help" => {
                return Err(
                    "usage: peers [admissions|revoke|ingest|memory|storm|soak|cluster|rotation|commands]... [--secs S] [--conc C] \
                            [--sessions N] [--crl-sizes 0,100000,1000000] \
                            [--peers bare,fleet-broker,mosquitto,rumqttd]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios =
            ["admissions", "revoke", "ingest", "memory", "storm", "cluster"].map(String::from).to_vec();
    }
    if a.secs <= 0.0 || a.conc == 0 {
        return Err("--secs and --conc must be positive".into());
    }
    Ok(a)
}

/// The fleet the benchmarks run against: one home, identities minted by the station.
struct Env {
    dir: tempfile::TempDir,
    home: PathBuf,
    station: Station,
}

impl Env {
    async fn new() -> Env {
        Self::with_db(None).await
    }

    /// A fleet whose registry is at `db` (default: SQLite in the home).
    async fn with_db(db: Option<&str>) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        let station = Station::init(Home::new(&home), "Bench", db).await.expect("init");
        station.server_cert(&["localhost".into()], &[], &home.join("broker-tls")).await.expect("server cert");
        Env { dir, home, station }
    }

    async fn mint(&self, prefix: &str, count: usize) -> Vec<Arc<Identity>> {
        let opts = MintOptions {
            count,
            prefix: prefix.into(),
            out: self.dir.path().join(prefix),
            broker_host: "localhost".into(),
            broker_port: 8883,
            chunk: 1024,
        };
        let minted = self.station.mint(&opts, &|_| {}).await.expect("mint");
        minted.iter().map(|d| Arc::new(Identity::load(&d.dir))).collect()
    }

    /// A backend service identity.
    async fn service(&self, name: &str) -> Identity {
        let minted =
            self.station.service_cert(name, &self.dir.path().join(name)).await.expect("service cert");
        Identity::load(&minted.dir)
    }

    fn start(&self, peer: Peer) -> Option<Server> {
        match servers::start(peer, &self.home, self.dir.path()) {
            Ok(s) => Some(s),
            Err(e) => {
                println!("  {:<30} skipped: {e}", peer.name());
                None
            }
        }
    }

    /// Replaces HOME/crl.pem by a CRL signed by the device CA listing `n` random serials.
    fn write_synthetic_crl(&self, n: usize) {
        let home = Home::new(&self.home);
        let read =
            |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ca = LoadedCa::from_pem(&read(home.device_ca()), &read(home.device_ca_key())).expect("device CA");
        let now = time::OffsetDateTime::now_utc();
        let entries: Vec<RevokedEntry> = (0..n)
            .map(|_| RevokedEntry {
                serial: SerialNumber::random(),
                revoked_at: now.unix_timestamp() - 3600,
                reason: RevocationReason::KeyCompromise,
            })
            .collect();
        let crl =
            pki::sign_crl(&ca, 1_000_000 + n as u64, &entries, now, time::Duration::days(7)).expect("crl");
        fleet_provision::home::write_replace(&home.crl(), crl.pem().expect("pem").as_bytes())
            .expect("write crl");
    }
}

/// Results, printed again at the end as the table rows for BENCHMARKS.md.
#[derive(Default)]
struct Report {
    rows: BTreeMap<String, Vec<String>>,
}

impl Report {
    fn add(&mut self, section: &str, row: String) {
        println!("  {row}");
        self.rows.entry(section.to_owned()).or_default().push(row);
    }
}

fn mean_rate(done: u64, secs: f64) -> f64 {
    done as f64 / secs
}

/// Admissions per second against `addr` for `secs` with `conc` clients.
async fn admissions_per_sec(
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

async fn scenario_admissions(env: &Env, ids: &[Arc<Identity>], a: &Args, report: &mut Report) {
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
        for peer in Peer::ALL.into_iter().filter(|&p| a.wants(p)) {
            if n > 0 && !peer.checks_crl() {
                println!("  {:<30} no CRL support: not measured", peer.name());
                continue;
            }
            let t = Instant::now();
            let Some(server) = env.start(peer) else { continue };
            let startup = t.elapsed().as_secs_f64();
            let cpu0 = server.cpu_secs();
            let (rate, failed) =
                admissions_per_sec(server.addr, ids, peer == Peer::Bare, a.secs, a.conc).await;
            let cpu_us = (server.cpu_secs() - cpu0) * 1e6 / (rate * a.secs).max(1.0);
            cpu.insert((n, peer.name()), cpu_us);
            by.insert((n, peer.name()), rate);
            let base = by.get(&(0, peer.name())).copied();
            let vs_empty = match base {
                Some(b) if n > 0 && b > 0.0 => format!("{:.2}× its empty-CRL rate", rate / b),
                _ => String::new(),
            };
            report.add(
                "admissions",
                format!(
                    "| {} | {n} | {rate:.0} | {cpu_us:.0} µs | {failed} | {startup:.1} s | {vs_empty} |",
                    peer.name()
                ),
            );
        }
        let get = |p: Peer| by.get(&(n, p.name())).copied().unwrap_or(0.0);
        let fb = get(Peer::FleetBroker);
        for (other, what) in
            [(Peer::Bare, "bare rustls"), (Peer::Mosquitto, "mosquitto"), (Peer::Rumqttd, "rumqttd")]
        {
            if get(other) > 0.0 && fb > 0.0 {
                report.add("ratios", format!("| CRL {n}: fleet-broker / {what} | {:.2}× |", fb / get(other)));
            }
            let cpu_of = |p: Peer| cpu.get(&(n, p.name())).copied().unwrap_or(0.0);
            if cpu_of(other) > 0.0 && cpu_of(Peer::FleetBroker) > 0.0 {
                report.add(
                    "ratios",
                    format!(
                        "| CRL {n}: server CPU per admission, fleet-broker / {what} | {:.2}× |",
                        cpu_of(Peer::FleetBroker) / cpu_of(other)
                    ),
                );
            }
        }
    }
    env.station.write_crl(&env.home.join("crl.pem")).await.expect("crl");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Connects every identity and returns, per session, a receiver that fires when it closes.
async fn open_sessions(
    addr: SocketAddr,
    ids: &[Arc<Identity>],
) -> Vec<Option<tokio::sync::oneshot::Receiver<Instant>>> {
    let mut closed = Vec::new();
    for who in ids {
        match client::session(addr, who, 120).await {
            Some(s) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let (mut rd, _wr) = tokio::io::split(s);
                    client::read_packets(&mut rd, |_| true).await;
                    let _ = tx.send(Instant::now());
                });
                closed.push(Some(rx));
            }
            None => closed.push(None),
        }
    }
    closed
}

async fn revoke(env: &Env, who: &Identity) -> Duration {
    let t = Instant::now();
    let id = DeviceId::parse(&who.id).expect("device id");
    env.station.revoke_device(&id, RevocationReason::KeyCompromise).await.expect("revoke");
    t.elapsed()
}

/// How long each revocation took to cut its session, and the revoke calls themselves.
struct RevokeTimes {
    cut: Vec<Duration>,
    calls: Vec<Duration>,
    /// Sessions never opened or never cut within 5 s.
    never: usize,
}

/// Revokes each of `ids` at a random moment and waits for its session (from `open_sessions`)
/// to close.
async fn revoke_each(
    env: &Env,
    ids: &[Arc<Identity>],
    sessions: Vec<Option<tokio::sync::oneshot::Receiver<Instant>>>,
) -> RevokeTimes {
    let mut r = RevokeTimes { cut: Vec::new(), calls: Vec::new(), never: 0 };
    for (who, closed) in ids.iter().zip(sessions) {
        let Some(closed) = closed else {
            r.never += 1;
            continue;
        };
        // Revocations arrive at random moments, not in step with the broker's poll.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 250)).await;
        let t = Instant::now();
        r.calls.push(revoke(env, who).await);
        match tokio::time::timeout(Duration::from_secs(5), closed).await {
            Ok(Ok(at)) => r.cut.push(at.saturating_duration_since(t)),
            _ => r.never += 1,
        }
    }
    r
}

async fn scenario_revoke(env: &Env, a: &Args, report: &mut Report) {
    const N: usize = 100;
    println!(
        "\n== revoke → disconnect: {N} connected devices revoked one by one (`fleet-provision revoke` path)"
    );
    // fleet-broker: each revocation, then wait for that session to close.
    let ids = env.mint("rvf", N).await;
    if let Some(server) = a.wants(Peer::FleetBroker).then(|| env.start(Peer::FleetBroker)).flatten() {
        let sessions = open_sessions(server.addr, &ids).await;
        let RevokeTimes { cut: mut lat, mut calls, never } = revoke_each(env, &ids, sessions).await;
        lat.sort();
        calls.sort();
        let refused = client::session(server.addr, &ids[0], 30).await.is_none();
        report.add(
            "revoke",
            format!(
                "| fleet-broker | {} / {N} cut | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | revoke command p50 {:.0} ms | reconnect {} | {never} never cut |",
                lat.len(),
                percentile(&lat, 50.0).as_secs_f64() * 1e3,
                percentile(&lat, 99.0).as_secs_f64() * 1e3,
                lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                percentile(&calls, 50.0).as_secs_f64() * 1e3,
                if refused { "refused" } else { "ADMITTED" },
            ),
        );
    }
    // Peers: they cannot see the registry; their only revocation input is the CRL file.
    for (peer, prefix) in
        [(Peer::Mosquitto, "rvm"), (Peer::Rumqttd, "rvr")].into_iter().filter(|&(p, _)| a.wants(p))
    {
        let ids = env.mint(prefix, N).await;
        let Some(server) = env.start(peer) else { continue };
        let sessions = open_sessions(server.addr, &ids).await;
        let t = Instant::now();
        for who in &ids {
            revoke(env, who).await;
        }
        // Mosquitto re-reads its configuration on SIGHUP; rumqttd has nothing to reload.
        let how = if peer == Peer::Mosquitto {
            server.hangup();
            "CRL rewritten + SIGHUP"
        } else {
            "CRL rewritten (ignored: no CRL support)"
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut cut = 0;
        let mut connected = 0;
        for mut closed in sessions.into_iter().flatten() {
            connected += 1;
            if closed.try_recv().is_ok() {
                cut += 1;
            }
        }
        let refused = client::session(server.addr, &ids[0], 30).await.is_none();
        report.add(
            "revoke",
            format!(
                "| {} | {cut} / {connected} cut within {:.0} s | – | {how} | reconnect {} | {} never cut |",
                peer.name(),
                t.elapsed().as_secs_f64(),
                if refused { "refused" } else { "ADMITTED" },
                connected - cut,
            ),
        );
    }
}

/// Publishes from every device for `secs`: QoS 1 with a window of in-flight messages per device
/// (rate = PUBACKs received), or QoS 0 (rate = messages the server handled: every device ends
/// with PINGREQ and the clock stops at the last PINGRESP).
async fn ingest_rate(addr: SocketAddr, ids: &[Arc<Identity>], qos: QoS, secs: f64) -> (f64, u64, u64) {
    const WINDOW: usize = 16;
    let payload = [0x5au8; 48];
    let acked = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for who in ids {
        if let Some(s) = client::session(addr, who, 120).await {
            streams.push((who.id.clone(), s));
        }
    }
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (id, s) in streams {
        let (acked, sent) = (acked.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(s);
            let window = Arc::new(Semaphore::new(WINDOW));
            let w2 = window.clone();
            let acked2 = acked.clone();
            let reader = tokio::spawn(async move {
                client::read_packets(&mut rd, |p| match p {
                    Packet::PubAck(_) => {
                        if Instant::now() <= until {
                            acked2.fetch_add(1, Ordering::Relaxed);
                        }
                        w2.add_permits(1);
                        true
                    }
                    Packet::PingResp => false,
                    _ => true,
                })
                .await;
                Instant::now()
            });
            let topic = format!("devices/{id}/telemetry");
            let mut out = BytesMut::with_capacity(256);
            let mut pkid: u16 = 0;
            while Instant::now() < until {
                out.clear();
                if qos == QoS::AtLeastOnce {
                    let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(2), window.acquire()).await
                    else {
                        break;
                    };
                    p.forget();
                    pkid = pkid.wrapping_add(1).max(1);
                }
                client::publish(&mut out, &topic, qos, pkid, &payload);
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = client::ping(&mut wr).await;
            // The server may still be working through what the socket buffers hold.
            let end = tokio::time::timeout(Duration::from_secs(300), reader).await;
            let _ = wr.write_all(&[0xe0, 0]).await;
            end.ok().and_then(|r| r.ok())
        }));
    }
    let mut last = start;
    for t in tasks {
        if let Ok(Some(end)) = t.await {
            last = last.max(end);
        }
    }
    let sent = sent.load(Ordering::Relaxed);
    let acked = acked.load(Ordering::Relaxed);
    let rate = if qos == QoS::AtLeastOnce {
        mean_rate(acked, secs)
    } else {
        mean_rate(sent, last.duration_since(start).as_secs_f64())
    };
    (rate, sent, acked)
}

async fn stored_rows(env: &Env) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry")
        .fetch_one(env.station.registry().pool())
        .await
        .unwrap_or(-1)
}

async fn scenario_ingest(env: &Env, ids: &[Arc<Identity>], a: &Args, report: &mut Report) {
    println!(
        "\n== ingest: {} devices publishing 48-byte messages to devices/<id>/telemetry for {} s (QoS 1: 16 in flight per device)",
        ids.len(),
        a.secs
    );
    let mut by: BTreeMap<(u8, &str), f64> = BTreeMap::new();
    let mut cpu: BTreeMap<(u8, &str), f64> = BTreeMap::new();
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        for peer in [Peer::FleetBroker, Peer::Mosquitto, Peer::Rumqttd].into_iter().filter(|&p| a.wants(p)) {
            let Some(server) = env.start(peer) else { continue };
            let before = stored_rows(env).await;
            let cpu0 = server.cpu_secs();
            let (rate, sent, acked) = ingest_rate(server.addr, ids, qos, a.secs).await;
            let handled = if qos == QoS::AtLeastOnce { acked } else { sent };
            let cpu_us = (server.cpu_secs() - cpu0) * 1e6 / handled.max(1) as f64;
            drop(server); // SIGKILL: whatever was acknowledged must already be stored
            tokio::time::sleep(Duration::from_millis(200)).await;
            let durable = match peer {
                Peer::FleetBroker => {
                    format!("SQLite, {} rows stored ≥ {acked} acked", stored_rows(env).await - before)
                }
                Peer::Mosquitto => "memory only (persistence off, the default)".into(),
                _ => "memory only (in-process commit log)".into(),
            };
            by.insert((qos as u8, peer.name()), rate);
            cpu.insert((qos as u8, peer.name()), cpu_us);
            report.add(
                "ingest",
                format!(
                    "| {} | QoS {} | {rate:.0} msg/s | {cpu_us:.1} µs server CPU/msg | {sent} sent, {acked} acked | {durable} |",
                    peer.name(),
                    qos as u8
                ),
            );
        }
        let fb = by.get(&(qos as u8, Peer::FleetBroker.name())).copied().unwrap_or(0.0);
        let fb_cpu = cpu.get(&(qos as u8, Peer::FleetBroker.name())).copied().unwrap_or(0.0);
        for other in [Peer::Mosquitto, Peer::Rumqttd] {
            if let Some(&o) = by.get(&(qos as u8, other.name())).filter(|&&o| o > 0.0) {
                report.add(
                    "ratios",
                    format!("| QoS {}: fleet-broker / {} | {:.2}× |", qos as u8, other.name(), fb / o),
                );
            }
            if let Some(&o) = cpu.get(&(qos as u8, other.name())).filter(|&&o| o > 0.0) {
                report.add(
                    "ratios",
                    format!(
                        "| QoS {}: server CPU per message, fleet-broker / {} | {:.2}× |",
                        qos as u8,
                        other.name(),
                        fb_cpu / o
                    ),
                );
            }
        }
    }
}

fn fd_limit() -> u64 {
    servers::proc_field("/proc/self/limits", "Max open files", 3).unwrap_or(1024)
}

async fn scenario_memory(env: &Env, a: &Args, report: &mut Report) {
    let n = a.sessions;
    println!("\n== memory: resident set of each server with {n} idle mTLS sessions");
    let limit = fd_limit();
    if limit < (n as u64) + 1024 {
        println!(
            "  skipped: open-file limit {limit} < {n} sessions; raise it (ulimit -n {}; scripts/bench does)",
            n * 2 + 1024
        );
        return;
    }
    let t = Instant::now();
    let ids = env.mint("mem", n).await;
    println!("  minted {n} identities in {:.1} s", t.elapsed().as_secs_f64());
    for peer in Peer::ALL.into_iter().filter(|&p| a.wants(p)) {
        let Some(server) = env.start(peer) else { continue };
        let before = server.rss_kib();
        let held = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
        let next = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (ids, held, next, addr) = (ids.clone(), held.clone(), next.clone(), server.addr);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(who) = ids.get(i) else { break };
                    let s = if peer == Peer::Bare {
                        match client::tls(addr, who).await {
                            Some(mut s) => {
                                let mut b = [0u8; 1];
                                tokio::io::AsyncReadExt::read(&mut s, &mut b)
                                    .await
                                    .ok()
                                    .filter(|&k| k == 1)
                                    .map(|_| s)
                            }
                            None => None,
                        }
                    } else {
                        client::session(addr, who, 600).await
                    };
                    if let Some(s) = s {
                        held.lock().await.push(s);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let open = held.lock().await.len();
        let took = t.elapsed().as_secs_f64();
        // Idle means idle: past fleet-broker's 2 s buffer release.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after = server.rss_kib();
        let per = if open > 0 { (after.saturating_sub(before)) as f64 / open as f64 } else { 0.0 };
        report.add(
            "memory",
            format!(
                "| {} | {open} / {n} | {:.1} MiB → {:.1} MiB | **{per:.1} KiB** | connected in {took:.0} s |",
                peer.name(),
                before as f64 / 1024.0,
                after as f64 / 1024.0
            ),
        );
        drop(server);
        held.lock().await.clear();
    }
}

fn main() {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("--serve-bare") {
        let home: PathBuf = raw.next().map(PathBuf::from).unwrap_or_default();
        servers::serve_bare(Path::new(&home));
        return;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let env = Env::new().await;
        let devices = env.mint("dev", 100).await;
        let mut report = Report::default();
        for peer in [Peer::Mosquitto, Peer::Rumqttd] {
            if let Err(e) = servers::program(peer) {
                println!("note: {}: {e}", peer.name());
            }
        }
        for s in &args.scenarios {
            match s.as_str() {
                "admissions" => scenario_admissions(&env, &devices, &args, &mut report).await,
                "revoke" => scenario_revoke(&env, &args, &mut report).await,
                "ingest" => scenario_ingest(&env, &devices, &args, &mut report).await,
                "memory" => scenario_memory(&env, &args, &mut report).await,
                "storm" => storm::scenario_storm(&env, &args, &mut report).await,
                "soak" => soak::scenario_soak(&env, &args, &mut report).await,
                "cluster" => cluster::scenario_cluster(&env, &devices, &args, &mut report).await,
                "rotation" => rotation::scenario_rotation(&args, &mut report).await,
                "commands" => commands::scenario_commands(&env, &args, &mut report).await,
                _ => unreachable!("validated in parse_args"),
            }
        }
        println!("\n== summary (rows for BENCHMARKS.md)");
        for (section, rows) in &report.rows {
            println!("[{section}]");
            for r in rows {
                println!("{r}");
            }
        }
    });
}
