//! The whole fleet reconnecting at once after the broker restarts (issue 17, at a small scale;
//! `./scripts/bench storm` measures 20,000 devices): every device runs the SDK's own MQTT
//! session (`fleet_device::mqtt::Session`: its CONNECT, its back-off and jitter, not a copy of
//! them), the broker is killed with -9 and started again on the same port, and every device must
//! be back, with no handshake timing out in the broker.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fleet_device::mqtt::{Event, Millis, SessionConfig};
use tokio::io::AsyncReadExt;

const DEVICES: usize = 500;

/// The device's MQTT session: the SDK's own state machine (`fleet_device::mqtt::Session`), whose
/// `transport_down` picks the reconnect delay (back-off with jitter) and `reconnect_at` says when.
type SdkSession<'a> = fleet_device::mqtt::Session<'a, 4, 256>;

/// Milliseconds since `start`, the session's clock.
fn millis(start: Instant) -> Millis {
    Millis(start.elapsed().as_millis() as u64)
}

/// One connection attempt driven by the session: TLS, then the session's CONNECT, then its
/// handling of the answer. `Some` once the session says `Connected`.
async fn connect(
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    session: &mut SdkSession<'_>,
    start: Instant,
) -> Option<Raw> {
    let mut c = Raw::device(addr, dir).await.ok()?;
    session.transport_up(millis(start));
    let mut out = [0u8; 512];
    while let Some(n) = session.poll_transmit(millis(start), &mut out).ok()? {
        c.send_raw(&out[..n]).await.ok()?;
        if !session.is_connected() {
            break; // the CONNECT: wait for its answer
        }
    }
    let mut input = Vec::new();
    loop {
        let mut buf = [0u8; 512];
        let n = c.tls.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        input.extend_from_slice(&buf[..n]);
        loop {
            let (used, event) = session.handle(millis(start), &input).ok()?;
            let connected = event == Some(Event::Connected);
            if used == 0 {
                break;
            }
            input.drain(..used);
            if connected {
                return Some(c);
            }
        }
    }
}

/// One device: the SDK session decides when to connect; hold the session until it ends, tell
/// the session, again. Counts admissions.
async fn device(
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
    id: String,
    admitted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let start = Instant::now();
    let cfg = SessionConfig { keep_alive_secs: 600, ..SessionConfig::default() };
    let mut session = SdkSession::new(&id, cfg);
    while !stop.load(Ordering::Relaxed) {
        let at = session.reconnect_at().expect("a disconnected session says when to reconnect");
        let now = millis(start);
        if at > now {
            tokio::time::sleep(Duration::from_millis((at.0 - now.0).min(200))).await;
            continue;
        }
        let attempt = tokio::time::timeout(Duration::from_secs(10), connect(addr, &dir, &mut session, start));
        if let Ok(Some(mut c)) = attempt.await {
            admitted.fetch_add(1, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                if c.closed_within(Duration::from_millis(200)).await {
                    break;
                }
            }
        }
        session.transport_down(millis(start), rand::random());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_fleet_comes_back_after_a_kill_and_restart() {
    let fleet = Fleet::new(DEVICES, None).await;
    // Every device is on 127.0.0.1 here: the per-source pre-admission cap must not be the limit.
    let args = ["--max-pre-admission-per-source", "10000"];
    let mut broker = BrokerProc::start(&fleet, &args);
    let addr = broker.mqtt;
    let admitted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            tokio::spawn(device(addr, fleet.devices[i].clone(), fleet.id(i), admitted.clone(), stop.clone()))
        })
        .collect();
    broker.wait_metric("fleet_sessions_live", DEVICES as f64, Duration::from_secs(60)).await;

    broker.kill9();
    let before = admitted.swap(0, Ordering::Relaxed);
    assert!(before >= DEVICES);
    let broker = BrokerProc::start_on(&fleet, addr.port(), &args);
    let t = Instant::now();
    while admitted.load(Ordering::Relaxed) < DEVICES {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{} of {DEVICES} devices back after 60 s",
            admitted.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{DEVICES} devices back in {:.1} s", t.elapsed().as_secs_f64());
    broker.wait_metric("fleet_sessions_live", DEVICES as f64, Duration::from_secs(5)).await;
    assert_eq!(broker.metric(&refused(Refusal::HandshakeTimeout)).await, 0.0, "handshakes timed out");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}
