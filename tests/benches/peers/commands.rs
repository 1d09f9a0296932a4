//! `commands` (only when named; `--devices`, default 10,000 here): N offline devices, 3 commands
//! queued for each by a backend service, then the whole fleet reconnecting at once.
//!
//! Measured per server: how fast the service's QoS 1 commands are accepted (fleet-broker: stored
//! in the registry before each PUBACK), what the queue costs (resident memory of the server and,
//! for fleet-broker, registry bytes on disk, per queued command), and on the mass reconnect the
//! time until every device has received and acknowledged all of its commands, the delivery rate,
//! duplicates (a command seen twice by one device) and the server's peak RSS.
//!
//! The peer is Mosquitto with persistent sessions (clean session = 0), its queue in memory (no
//! `persistence`): it queues only for a client it already knows, so every device first connects
//! once with clean session = 0, subscribes and leaves (not timed). fleet-broker queues for any
//! registered device, connected before or not.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;

use crate::client::{self, Identity, Tls};
use crate::servers::{self, Peer, Server};
use crate::{Args, Env, Report, Subject};

/// Commands queued per device.
const PER_DEVICE: usize = 3;
/// QoS 1 commands the service keeps in flight.
const WINDOW: usize = 64;
/// The longest a phase is watched.
const GIVE_UP: Duration = Duration::from_secs(300);

/// TLS + CONNECT (clean session = 0) → CONNACK accepted, then SUBSCRIBE to the device's
/// commands. Returns the session, or `None` on any failure.
async fn persistent_session(addr: SocketAddr, who: &Identity) -> Option<Tls> {
    let mut s = client::tls(addr, who).await?;
    let mut out = BytesMut::new();
    let mut c = Connect::new(who.id.clone());
    c.keep_alive = 600;
    c.clean_session = false;
    Packet::Connect(c).write(&mut out, 1 << 16).ok()?;
    let mut sub = Subscribe::new(format!("devices/{}/commands/#", who.id), QoS::AtLeastOnce);
    sub.pkid = 1;
    Packet::Subscribe(sub).write(&mut out, 1 << 16).ok()?;
    s.write_all(&out).await.ok()?;
    let mut buf = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf).await.ok()?;
    matches!(buf, [0x20, 2, _, 0]).then_some(s)
}

/// Connects every device once with a persistent session and leaves (Mosquitto queues only for
/// known clients). Returns how many made it.
async fn register_sessions(addr: SocketAddr, ids: &[Arc<Identity>]) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (ids, next, ok) = (ids.to_vec(), next.clone(), ok.clone());
            tokio::spawn(async move {
                while let Some(who) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Some(mut s) = persistent_session(addr, who).await {
                        // Wait for the SUBACK (the subscription is in the kept session).
                        let mut b = [0u8; 5];
                        if tokio::io::AsyncReadExt::read_exact(&mut s, &mut b).await.is_ok() {
                            let _ = s.write_all(&[0xe0, 0]).await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    ok.load(Ordering::Relaxed)
}

/// The service publishes `PER_DEVICE` QoS 1 commands to each device, `WINDOW` in flight.
/// Returns (accepted, seconds).
async fn queue_commands(
    addr: SocketAddr,
    service: &Identity,
    ids: &[Arc<Identity>],
    per_device: usize,
) -> (u64, f64) {
    let Some(s) = client::session(addr, service, 600).await else { return (0, 0.0) };
    let (mut rd, mut wr) = tokio::io::split(s);
    let permits = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let acked = Arc::new(AtomicU64::new(0));
    let total = (ids.len() * per_device) as u64;
    let reader = {
        let (permits, acked) = (permits.clone(), acked.clone());
        tokio::spawn(async move {
            client::read_packets(&mut rd, |p| {
                if matches!(p, Packet::PubAck(_)) {
                    permits.add_permits(1);
                    acked.fetch_add(1, Ordering::Relaxed) + 1 < total
                } else {
                    true
                }
            })
            .await
        })
    };
    let t = Instant::now();
    let mut out = BytesMut::new();
    'send: for k in 0..per_device {
        for (i, who) in ids.iter().enumerate() {
            let Ok(p) = tokio::time::timeout(GIVE_UP, permits.acquire()).await else { break 'send };
            p.expect("semaphore").forget();
            // Packet ids cycle below 65,535; at most WINDOW are in flight, so none collide.
            let pkid = ((k * ids.len() + i) % 65_000) as u16 + 1;
            out.clear();
            let topic = format!("devices/{}/commands/set-interval-{k}", who.id);
            client::publish(&mut out, &topic, QoS::AtLeastOnce, pkid, br#"{"interval_s":300}"#);
            if wr.write_all(&out).await.is_err() {
                break 'send;
            }
        }
    }
    let _ = tokio::time::timeout(GIVE_UP, reader).await;
    let secs = t.elapsed().as_secs_f64();
    let _ = wr.write_all(&[0xe0, 0]).await;
    (acked.load(Ordering::Relaxed), secs)
}

/// What the reconnecting fleet saw.
#[derive(Default)]
struct Seen {
    /// Commands received (first copies).
    delivered: AtomicU64,
    /// A command a device had already received, received again.
    duplicates: AtomicU64,
    /// Devices that got all their commands.
    complete: AtomicUsize,
    /// Connect attempts that failed (retried).
    failed_attempts: AtomicU64,
    /// Milliseconds from the start until the last device completed.
    last_ms: AtomicU64,
}

/// One device: connect (retrying), receive and acknowledge `PER_DEVICE` commands, leave.
async fn wake(addr: SocketAddr, who: Arc<Identity>, seen: Arc<Seen>, t0: Instant) {
    // Across attempts: a command seen in an earlier connection and again is a duplicate.
    let mut names = std::collections::HashSet::new();
    while t0.elapsed() < GIVE_UP {
        // A device gives up on a connect attempt after 10 s (as the SDK does) and retries.
        let attempt = tokio::time::timeout(Duration::from_secs(10), persistent_session(addr, &who)).await;
        let Ok(Some(s)) = attempt else {
            seen.failed_attempts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(250 + rand::random::<u64>() % 500)).await;
            continue;
        };
        let (mut rd, mut wr) = tokio::io::split(s);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u16>();
        let reader = {
            let seen = seen.clone();
            let names = &mut names;
            async move {
                client::read_packets(&mut rd, |p| {
                    if let Packet::Publish(p) = p {
                        let _ = tx.send(p.pkid);
                        if names.insert(p.topic) {
                            seen.delivered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            seen.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        return names.len() < PER_DEVICE;
                    }
                    true
                })
                .await;
            } // `tx` dropped here: the writer sends what is left and ends
        };
        let writer = async {
            let mut out = BytesMut::new();
            while let Some(pkid) = rx.recv().await {
                out.clear();
                Packet::PubAck(PubAck::new(pkid)).write(&mut out, 1 << 16).expect("encode puback");
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(reader, writer) }).await;
        if names.len() >= PER_DEVICE {
            // Let the last PUBACK reach the server before DISCONNECT.
            let _ = wr.flush().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = wr.write_all(&[0xe0, 0]).await;
            seen.complete.fetch_add(1, Ordering::Relaxed);
            seen.last_ms.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
            return;
        }
        seen.failed_attempts.fetch_add(1, Ordering::Relaxed);
    }
}

fn registry_bytes(home: &Path) -> u64 {
    ["registry.db", "registry.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(home.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

struct Figures {
    queued_per_s: f64,
    mem_bytes_per_command: f64,
    delivered_per_s: f64,
}

async fn run_peer(
    env: &Env,
    subject: &Subject,
    ids: &[Arc<Identity>],
    service: &Identity,
    report: &mut Report,
) -> Option<Figures> {
    let n = ids.len();
    let peer = subject.peer;
    // Everyone reconnects from 254 loopback addresses at once: lift the per-source cap.
    let lifted = ["--max-pre-admission-per-source", "4096"];
    let server: Server = match (peer, &subject.before) {
        (Peer::FleetBroker, None) => servers::start_fleet_broker(&env.home, &lifted).ok()?,
        (Peer::FleetBroker, Some(bin)) => servers::start_broker_program(bin, &env.home, 0, &lifted).ok()?,
        _ => env.start(peer)?,
    };
    let addr = server.addr;
    if peer == Peer::Mosquitto {
        let t = Instant::now();
        let known = register_sessions(addr, ids).await;
        println!(
            "  {}: {known} / {n} persistent sessions created in {:.1} s",
            peer.name(),
            t.elapsed().as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss0, disk0) = (server.rss_kib(), registry_bytes(&env.home));
    let (cpu0, client0) = (server.cpu_secs(), servers::cpu_secs(std::process::id()));
    let (accepted, secs) = queue_commands(addr, service, ids, PER_DEVICE).await;
    // Server CPU per accepted command: steadier than the rate of a phase this short. The
    // client's (this process, on the same two cores) beside it: together they say whether the
    // machine was saturated.
    let cpu_us = (server.cpu_secs() - cpu0) * 1e6 / accepted.max(1) as f64;
    let client_secs = servers::cpu_secs(std::process::id()) - client0;
    let client_us = client_secs * 1e6 / accepted.max(1) as f64;
    let total = (n * PER_DEVICE) as u64;
    if accepted < total {
        println!("  {}: only {accepted} / {total} commands accepted", peer.name());
    }
    // Past fleet-broker's 2 s idle-buffer release, as in `memory`.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (rss1, disk1) = (server.rss_kib(), registry_bytes(&env.home));
    let mem_per = (rss1.saturating_sub(rss0) * 1024) as f64 / accepted.max(1) as f64;
    let disk = if peer == Peer::FleetBroker {
        format!("{:.0} B on disk", disk1.saturating_sub(disk0) as f64 / accepted.max(1) as f64)
    } else {
        "memory only".into()
    };

    // The mass reconnect: every device within 3 s.
    let seen = Arc::new(Seen::default());
    let peak = Arc::new(AtomicU64::new(server.rss_kib()));
    let t0 = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let (who, seen) = (who.clone(), seen.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(i as u64 * 3_000_000 / n.max(1) as u64)).await;
                wake(addr, who, seen, t0).await
            })
        })
        .collect();
    let mut shown = Instant::now();
    while seen.complete.load(Ordering::Relaxed) < n && t0.elapsed() < GIVE_UP {
        peak.fetch_max(server.rss_kib(), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if shown.elapsed() >= Duration::from_secs(10) {
            shown = Instant::now();
            println!(
                "    {:>5.0} s: {} / {n} devices have all their commands, {} failed attempts",
                t0.elapsed().as_secs_f64(),
                seen.complete.load(Ordering::Relaxed),
                seen.failed_attempts.load(Ordering::Relaxed)
            );
        }
    }
    for t in tasks {
        t.abort();
    }
    let complete = seen.complete.load(Ordering::Relaxed);
    let delivered = seen.delivered.load(Ordering::Relaxed);
    let last = seen.last_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    let rate = delivered as f64 / last.max(0.001);
    report.add(
        "commands",
        format!(
            "| {} | {n} devices × {PER_DEVICE} | queued {accepted} in {secs:.1} s = **{:.0}/s**, server CPU {cpu_us:.1} µs per command, client {client_us:.1} µs ({:.2} cores) | queue cost {mem_per:.0} B RSS, {disk} per command ({:.1} → {:.1} MiB) | reconnect: {complete}/{n} devices had all in {last:.1} s = **{rate:.0} commands/s** | duplicates {} | failed attempts {} | peak RSS {:.1} MiB |",
            subject.name(),
            accepted as f64 / secs.max(0.001),
            client_secs / secs.max(0.001),
            rss0 as f64 / 1024.0,
            rss1 as f64 / 1024.0,
            seen.duplicates.load(Ordering::Relaxed),
            seen.failed_attempts.load(Ordering::Relaxed),
            peak.load(Ordering::Relaxed) as f64 / 1024.0,
        ),
    );
    drop(server);
    Some(Figures {
        queued_per_s: accepted as f64 / secs.max(0.001),
        mem_bytes_per_command: mem_per,
        delivered_per_s: rate,
    })
}

pub(crate) async fn scenario_commands(env: &Env, a: &Args, report: &mut Report) {
    let n = if a.devices_set { a.devices } else { 10_000 };
    println!("\n== commands: {n} offline devices × {PER_DEVICE} queued commands, then all reconnect");
    let limit = crate::fd_limit();
    // Each process (this one, the server) holds one socket per device at the peak.
    if limit < (n as u64) + 1024 {
        println!("  skipped: open-file limit {limit} < {}; raise it (scripts/bench does)", n + 1024);
        return;
    }
    let t = Instant::now();
    let ids = env.mint("cmd", n).await;
    println!("  minted {n} devices in {:.1} s", t.elapsed().as_secs_f64());
    let service = env.service("cmd-svc").await;
    let mut figures = Vec::new();
    for subject in a.subjects(&[Peer::FleetBroker, Peer::Mosquitto]) {
        if let Some(f) = run_peer(env, &subject, &ids, &service, report).await {
            figures.push((subject.name(), f));
        }
    }
    let of = |name: &str| figures.iter().find(|(n, _)| *n == name).map(|(_, f)| f);
    if let (Some(b), Some(f)) = (of("fleet-broker-before"), of(Peer::FleetBroker.name())) {
        report.add(
            "ratios",
            format!(
                "| commands: queued/s fleet-broker / fleet-broker-before | {:.2}× |",
                f.queued_per_s / b.queued_per_s.max(0.001)
            ),
        );
    }
    if let (Some(f), Some(m)) = (of(Peer::FleetBroker.name()), of(Peer::Mosquitto.name())) {
        report.add(
            "ratios",
            format!(
                "| commands: queued/s fleet-broker (stored in the registry) / Mosquitto (in memory) | {:.2}× |",
                f.queued_per_s / m.queued_per_s.max(0.001)
            ),
        );
        report.add(
            "ratios",
            format!(
                "| commands: delivery rate on a mass reconnect, fleet-broker / Mosquitto | {:.2}× |",
                f.delivered_per_s / m.delivered_per_s.max(0.001)
            ),
        );
        report.add(
            "ratios",
            format!(
                "| commands: RSS per queued command, fleet-broker / Mosquitto | {:.2}× |",
                f.mem_bytes_per_command / m.mem_bytes_per_command.max(1.0)
            ),
        );
    }
}

/// `fleet-wide` (only when named; `--devices`, default 100,000): a backend service sends one
/// command to every device of the fleet (all offline), with its in-flight window of 64, through
/// fleet-broker: the time until every command is stored and acknowledged. Mosquitto is not run
/// here: it queues only for clients that connected once with a persistent session (100,000 TLS
/// sessions before the timed part); its rate is the `commands` scenario's.
pub(crate) async fn scenario_fleet_wide(env: &Env, a: &Args, report: &mut Report) {
    let n = if a.devices_set { a.devices } else { 100_000 };
    println!("\n== fleet-wide: one command to each of {n} offline devices from one service (fleet-broker)");
    let t = Instant::now();
    let ids = env.mint("fw", n).await;
    println!("  minted {n} devices in {:.1} s", t.elapsed().as_secs_f64());
    let service = env.service("fw-svc").await;
    let Ok(server) = servers::start_fleet_broker(&env.home, &[]) else {
        println!("  fleet-broker did not start");
        return;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = server.cpu_secs();
    let (accepted, secs) = queue_commands(server.addr, &service, &ids, 1).await;
    let cpu = server.cpu_secs() - cpu0;
    report.add(
        "fleet-wide",
        format!(
            "| one command to each of {n} devices | {accepted} / {n} accepted in {secs:.1} s | {:.0} commands/s | server CPU {:.1} µs per command |",
            accepted as f64 / secs.max(0.001),
            cpu * 1e6 / accepted.max(1) as f64
        ),
    );
}
