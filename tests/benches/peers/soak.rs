//! `soak`: 1,000 devices publishing QoS 1 about once a second and reconnecting at random
//! moments, for `--minutes` (default 60; not part of the test command). Every minute: the
//! server's RSS, its open file descriptors, live sessions, messages acknowledged and the p99
//! PUBACK latency of that minute. The drift is the last minute against the first warm one
//! (minute 5, or the middle of a shorter run).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;

use crate::client::{self, Identity};
use crate::servers::Peer;
use crate::{percentile, Args, Env, Report};

const DEVICES: usize = 1_000;

#[derive(Default)]
struct Stats {
    latencies: Mutex<Vec<Duration>>,
    acked: AtomicU64,
    reconnects: AtomicU64,
}

/// One device: sessions of random length (30–120 s), a QoS 1 message every 0.5–1.5 s in each.
async fn device(addr: SocketAddr, who: Arc<Identity>, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let topic = format!("devices/{}/telemetry", who.id);
    let mut pkid: u16 = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(s) = client::session(addr, &who, 60).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let (mut rd, mut wr) = tokio::io::split(s);
        let (tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            client::read_packets(&mut rd, |p| {
                if let Packet::PubAck(a) = p {
                    let _ = tx.send((a.pkid, Instant::now()));
                }
                true
            })
            .await;
        });
        let until = Instant::now() + Duration::from_secs(30 + rand::random::<u64>() % 91);
        let mut out = BytesMut::new();
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500 + rand::random::<u64>() % 1000)).await;
            pkid = pkid.wrapping_add(1).max(1);
            out.clear();
            client::publish(&mut out, &topic, QoS::AtLeastOnce, pkid, b"soak-reading-0123456789");
            let sent = Instant::now();
            if wr.write_all(&out).await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(10), acks.recv()).await {
                Ok(Some((id, at))) if id == pkid => {
                    stats.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(at - sent);
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
        let _ = wr.write_all(&[0xe0, 0]).await;
        reader.abort();
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

pub(crate) async fn scenario_soak(env: &Env, a: &Args, report: &mut Report) {
    println!(
        "\n== soak: {DEVICES} devices, QoS 1 about once a second, reconnecting every 30-120 s, {} minutes",
        a.minutes
    );
    let ids = env.mint("soak", DEVICES).await;
    let Some(server) = env.start(Peer::FleetBroker) else { return };
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = ids
        .iter()
        .map(|who| tokio::spawn(device(server.addr, who.clone(), stats.clone(), stop.clone())))
        .collect();
    let mut rows = Vec::new();
    for minute in 1..=a.minutes {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut lat = std::mem::take(&mut *stats.latencies.lock().unwrap_or_else(|e| e.into_inner()));
        lat.sort();
        let row = (
            minute,
            server.rss_kib(),
            open_fds(server.pid()),
            stats.acked.swap(0, Ordering::Relaxed),
            stats.reconnects.swap(0, Ordering::Relaxed),
            percentile(&lat, 99.0),
        );
        // Printed as it is measured (an hour is long to wait for a table).
        report.add(
            "soak",
            format!(
                "| {} | {:.1} MiB | {} fds | {} acked | {} reconnects | p99 PUBACK {:.1} ms |",
                row.0,
                row.1 as f64 / 1024.0,
                row.2,
                row.3,
                row.4,
                row.5.as_secs_f64() * 1e3
            ),
        );
        rows.push(row);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let warm = rows.get(4.min(rows.len() / 2));
    if let (Some(w), Some(last)) = (warm, rows.last()) {
        let drift = |a: f64, b: f64| if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 };
        report.add(
            "soak",
            format!(
                "| drift, minute {} → {} | RSS {:+.1}% | fds {:+.1}% | | | p99 {:+.1}% |",
                w.0,
                last.0,
                drift(w.1 as f64, last.1 as f64),
                drift(w.2 as f64, last.2 as f64),
                drift(w.5.as_secs_f64(), last.5.as_secs_f64())
            ),
        );
    }
}
