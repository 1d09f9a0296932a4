//! `storm`: the whole fleet reconnecting after the broker restarts (issue 17).
//!
//! N devices hold sessions; each runs the SDK's reconnect policy (`fleet-device`'s
//! `transport_down`: 500 ms × 2^attempt up to 60 s, jittered to [d/2, d], reset on CONNACK; a
//! connect attempt gives up after 10 s). The server is stopped (SIGTERM, then separately
//! SIGKILL) and started again on the same port at once; from its restart the tool measures the
//! time until 50 / 99 / 100% of the devices are admitted again, the most connect attempts in
//! flight at once, attempts that timed out, CONNACK 3 ("server unavailable") refusals, the
//! server's peak RSS and its CPU per admission. The raw ceiling is N ÷ the server's admissions/s
//! measured just before.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{self, Identity};
use crate::servers::{self, Peer};
use crate::{admissions_per_sec, Args, Env, Report};

/// The SDK's defaults (`device/src/mqtt/session.rs`).
const BACKOFF_MIN_MS: u64 = 500;
const BACKOFF_MAX_MS: u64 = 60_000;
/// How long a device waits for TLS + CONNACK before it gives up on an attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a storm is watched before it is reported as not recovered.
const GIVE_UP: Duration = Duration::from_secs(180);

/// What the devices saw, shared by their tasks.
#[derive(Default)]
struct Fleet {
    /// Devices with a live session.
    connected: AtomicUsize,
    /// Connect attempts in flight now.
    pending: AtomicUsize,
    timeouts: AtomicU64,
    unavailable: AtomicU64,
    other_failures: AtomicU64,
    /// Devices admitted since the restart (each counted once: its first admission after it).
    back: AtomicUsize,
    /// Set at the restart.
    epoch: AtomicU64,
}

/// The SDK's reconnect delay after `attempt` failures, jittered.
fn backoff(attempt: u32) -> Duration {
    let d = BACKOFF_MIN_MS.saturating_mul(1u64 << attempt.min(20)).min(BACKOFF_MAX_MS);
    Duration::from_millis(d / 2 + rand::random::<u64>() % (d / 2 + 1))
}

async fn device(addr: SocketAddr, who: Arc<Identity>, fleet: Arc<Fleet>, stop: Arc<AtomicBool>) {
    let mut attempt = 0u32;
    let mut seen_epoch = 0;
    while !stop.load(Ordering::Relaxed) {
        fleet.pending.fetch_add(1, Ordering::Relaxed);
        let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, client::session_outcome(addr, &who, 900)).await;
        fleet.pending.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(client::Outcome::Admitted(s)) => {
                attempt = 0;
                let epoch = fleet.epoch.load(Ordering::Relaxed);
                if epoch != 0 && seen_epoch != epoch {
                    seen_epoch = epoch;
                    fleet.back.fetch_add(1, Ordering::Relaxed);
                }
                fleet.connected.fetch_add(1, Ordering::Relaxed);
                let (mut rd, _wr) = tokio::io::split(*s);
                tokio::select! {
                    _ = client::read_packets(&mut rd, |_| true) => {}
                    _ = async { while !stop.load(Ordering::Relaxed) { tokio::time::sleep(Duration::from_millis(200)).await } } => {}
                }
                fleet.connected.fetch_sub(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Ok(client::Outcome::Unavailable) => {
                fleet.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            Ok(client::Outcome::Failed) => {
                fleet.other_failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                fleet.timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// One storm against `peer`: connect everyone, stop the server with `signal`, restart it.
async fn storm(
    env: &Env,
    peer: Peer,
    ids: &[Arc<Identity>],
    signal: &str,
    ceiling: f64,
    report: &mut Report,
) {
    let n = ids.len();
    let port = free_port();
    let start = || servers::start_on(peer, &env.home, env.dir(), port);
    let Ok(mut server) = start() else {
        println!("  {}: did not start", peer.name());
        return;
    };
    let addr = server.addr;
    let fleet = Arc::new(Fleet::default());
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let (who, fleet, stop) = (who.clone(), fleet.clone(), stop.clone());
            tokio::spawn(async move {
                // The fleet arrives over a few seconds, not in one instant.
                tokio::time::sleep(Duration::from_micros((i as u64 * 3_000_000) / n.max(1) as u64)).await;
                device(addr, who, fleet, stop).await
            })
        })
        .collect();
    while fleet.connected.load(Ordering::Relaxed) < n && t.elapsed() < GIVE_UP {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = fleet.connected.load(Ordering::Relaxed);
    let rss_before = server.rss_kib();
    println!(
        "  {}: {settled} / {n} connected in {:.1} s; stopping it ({signal})",
        peer.name(),
        t.elapsed().as_secs_f64()
    );

    server.signal(signal);
    server.wait();
    for c in [&fleet.timeouts, &fleet.unavailable, &fleet.other_failures] {
        c.store(0, Ordering::Relaxed);
    }
    // From here on every admission is one to the new process.
    fleet.back.store(0, Ordering::Relaxed);
    fleet.epoch.store(2 + rand::random::<u32>() as u64, Ordering::Relaxed);
    // The clock starts when the new process is started.
    let t0 = Instant::now();
    let Ok(restarted) = start() else {
        println!("  {}: did not restart", peer.name());
        stop.store(true, Ordering::Relaxed);
        return;
    };
    server = restarted;
    let cpu0 = server.cpu_secs();
    let (mut t50, mut t99, mut t100) = (None, None, None);
    let (mut peak_pending, mut peak_rss) = (0, 0);
    while t0.elapsed() < GIVE_UP {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let back = fleet.back.load(Ordering::Relaxed);
        peak_pending = peak_pending.max(fleet.pending.load(Ordering::Relaxed));
        peak_rss = peak_rss.max(server.rss_kib());
        let at = t0.elapsed().as_secs_f64();
        if back * 2 >= n {
            t50.get_or_insert(at);
        }
        if back * 100 >= n * 99 && t99.is_none() {
            t99 = Some(at);
            println!(
                "    99% back at {at:.1} s: {} connect attempts timed out so far, {} got CONNACK 3, {} failed",
                fleet.timeouts.load(Ordering::Relaxed),
                fleet.unavailable.load(Ordering::Relaxed),
                fleet.other_failures.load(Ordering::Relaxed)
            );
        }
        if back >= n {
            t100 = Some(at);
            break;
        }
    }
    let cpu = server.cpu_secs() - cpu0;
    let back = fleet.back.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let secs = |t: Option<f64>| t.map_or("never".to_owned(), |s| format!("{s:.1} s"));
    let ideal = n as f64 / ceiling.max(1.0);
    report.add(
        "storm",
        format!(
            "| {} | {signal} | {back} / {n} | {} | **{}** ({}) | {} | {peak_pending} | {} | {} | {} | {:.0} → {:.0} MiB | {:.0} µs |",
            peer.name(),
            secs(t50),
            secs(t99),
            t99.map_or("–".to_owned(), |s| format!("{:.1}× the ceiling's {ideal:.1} s", s / ideal)),
            secs(t100),
            fleet.timeouts.load(Ordering::Relaxed),
            fleet.unavailable.load(Ordering::Relaxed),
            fleet.other_failures.load(Ordering::Relaxed),
            rss_before as f64 / 1024.0,
            peak_rss as f64 / 1024.0,
            if back > 0 { cpu * 1e6 / back as f64 } else { 0.0 },
        ),
    );
}

pub(crate) async fn scenario_storm(env: &Env, a: &Args, report: &mut Report) {
    let limit = crate::fd_limit() as usize;
    let n = a.devices.min(limit.saturating_sub(2_000));
    println!(
        "\n== storm: {n} devices with the SDK's reconnect policy; the server is stopped (SIGTERM, SIGKILL) and restarted"
    );
    if n < a.devices {
        println!("  (asked for {}; the open-file limit {limit} allows {n})", a.devices);
    }
    let t = Instant::now();
    let ids = env.mint("storm", n).await;
    println!("  minted {n} identities in {:.1} s", t.elapsed().as_secs_f64());
    for peer in [Peer::FleetBroker, Peer::Mosquitto].into_iter().filter(|&p| a.wants(p)) {
        // The raw ceiling: admissions/s of this server with 16 clients, just before.
        let Some(server) = env.start(peer) else { continue };
        let (ceiling, _) =
            admissions_per_sec(server.addr, &ids[..ids.len().min(2_000)], false, 3.0, 16).await;
        drop(server);
        println!(
            "  {}: {ceiling:.0} admissions/s → the ceiling re-admits {n} in {:.1} s",
            peer.name(),
            n as f64 / ceiling.max(1.0)
        );
        for signal in ["TERM", "KILL"] {
            storm(env, peer, &ids, signal, ceiling, report).await;
        }
    }
}
