//! The whole fleet reconnecting at once after the broker restarts (issue 17, at a small scale;
//! `./scripts/bench storm` measures 20,000 devices): every device runs the SDK's reconnect
//! policy, the broker is killed with -9 and started again on the same port, and every device
//! must be back, with no handshake timing out in the broker.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::ConnectReturnCode;

const DEVICES: usize = 500;

/// The SDK's reconnect delay (`fleet-device` `transport_down`): 500 ms × 2^attempt up to 60 s,
/// jittered to [d/2, d].
fn backoff(attempt: u32) -> Duration {
    let d = 500u64.saturating_mul(1 << attempt.min(20)).min(60_000);
    Duration::from_millis(d / 2 + rand::random::<u64>() % (d / 2 + 1))
}

/// One device: connect, hold the session until it ends, back off, again. Counts admissions.
async fn device(
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
    id: String,
    admitted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut attempt = 0;
    while !stop.load(Ordering::Relaxed) {
        let attempt_result = tokio::time::timeout(Duration::from_secs(10), async {
            let mut c = Raw::device(addr, &dir).await.ok()?;
            (connack_code(&c.mqtt_connect(&id, 600).await) == Some(ConnectReturnCode::Success)).then_some(c)
        })
        .await;
        if let Ok(Some(mut c)) = attempt_result {
            attempt = 0;
            admitted.fetch_add(1, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                if c.closed_within(Duration::from_millis(200)).await {
                    break;
                }
            }
            continue;
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
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
