//! `ingest`: PUBLISH throughput of 48-byte messages to `devices/<id>/telemetry` from 100
//! concurrently connected devices for `--secs`, QoS 1 (16 in flight per device) then QoS 0, with
//! the server's CPU per message and, for fleet-broker, the rows stored against those acknowledged
//! (the server is killed first: whatever was acknowledged must already be in SQLite).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::client::{self, Identity};
use crate::servers::Peer;
use crate::{mean_rate, Args, Env, Report};

/// Publishes from every device for `secs`: QoS 1 with a window of in-flight messages per device
/// (rate = PUBACKs received), or QoS 0 (rate = messages the server handled: every device ends
/// with PINGREQ and the clock stops at the last PINGRESP).
pub(crate) async fn ingest_rate(
    addr: SocketAddr,
    ids: &[Arc<Identity>],
    qos: QoS,
    secs: f64,
) -> (f64, u64, u64) {
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

/// Waits until the broker's telemetry log (HOME/telemetry-log) is copied into the table up to
/// where it stands now: the seconds that took (`None`: no log, the broker stores in SQLite
/// directly).
async fn copy_caught_up(env: &Env) -> Option<f64> {
    let t = std::time::Instant::now();
    let (id, last) = fleet_broker::store_log_position(&env.home.join("telemetry-log")).ok()??;
    while env.station.registry().telemetry_fed(id).await.ok()? < last {
        if t.elapsed() > Duration::from_secs(120) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(t.elapsed().as_secs_f64())
}

pub(crate) async fn stored_rows(env: &Env) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM telemetry")
        .fetch_one(env.station.registry().pool())
        .await
        .unwrap_or(-1)
}

pub(crate) async fn scenario_ingest(env: &Env, ids: &[Arc<Identity>], a: &Args, report: &mut Report) {
    println!(
        "\n== ingest: {} devices publishing 48-byte messages to devices/<id>/telemetry for {} s (QoS 1: 16 in flight per device)",
        ids.len(),
        a.secs
    );
    let mut by: BTreeMap<(u8, &str), f64> = BTreeMap::new();
    let mut cpu: BTreeMap<(u8, &str), f64> = BTreeMap::new();
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        for subject in a.subjects(&[Peer::FleetBroker, Peer::Mosquitto, Peer::Rumqttd]) {
            let name = subject.name();
            let Some(server) = env.start_subject(&subject) else { continue };
            let before = stored_rows(env).await;
            let cpu0 = server.cpu_secs();
            // The clients run in this process, on the same two cores: their CPU is reported
            // beside the server's, so a run the clients saturated shows as such.
            let client0 = crate::servers::cpu_secs(std::process::id());
            let wall = std::time::Instant::now();
            let (rate, sent, acked) = ingest_rate(server.addr, ids, qos, a.secs).await;
            let handled = if qos == QoS::AtLeastOnce { acked } else { sent };
            let cpu_us = (server.cpu_secs() - cpu0) * 1e6 / handled.max(1) as f64;
            let client_secs = crate::servers::cpu_secs(std::process::id()) - client0;
            let client_us = client_secs * 1e6 / handled.max(1) as f64;
            let client_cores = client_secs / wall.elapsed().as_secs_f64().max(1e-9);
            // The telemetry log's copy into the table runs behind the PUBACKs: how long it takes
            // to catch up, and the server's CPU per message with it (the figure to compare).
            let copied = match (&subject.peer, &subject.before) {
                (Peer::FleetBroker, None) => copy_caught_up(env).await,
                _ => None,
            };
            let with_copy = copied.map(|lag| {
                let us = (server.cpu_secs() - cpu0) * 1e6 / handled.max(1) as f64;
                format!("; table copy caught up {lag:.1} s after the window, {us:.1} µs/msg with it")
            });
            let cpu_us = match copied {
                Some(_) => (server.cpu_secs() - cpu0) * 1e6 / handled.max(1) as f64,
                None => cpu_us,
            };
            drop(server); // SIGKILL: whatever was acknowledged must already be stored
            tokio::time::sleep(Duration::from_millis(200)).await;
            let durable = match subject.peer {
                Peer::FleetBroker => format!(
                    "{}, {} rows in the table ≥ {acked} acked{}",
                    if copied.is_some() { "telemetry log → SQLite" } else { "SQLite" },
                    stored_rows(env).await - before,
                    with_copy.unwrap_or_default()
                ),
                Peer::Mosquitto => "memory only (persistence off, the default)".into(),
                _ => "memory only (in-process commit log)".into(),
            };
            by.insert((qos as u8, name), rate);
            cpu.insert((qos as u8, name), cpu_us);
            report.add(
                "ingest",
                format!(
                    "| {name} | QoS {} | {rate:.0} msg/s | {cpu_us:.1} µs server CPU/msg | clients {client_us:.1} µs/msg, {client_cores:.2} cores | {sent} sent, {acked} acked | {durable} |",
                    qos as u8
                ),
            );
        }
        let fb = by.get(&(qos as u8, Peer::FleetBroker.name())).copied().unwrap_or(0.0);
        let fb_cpu = cpu.get(&(qos as u8, Peer::FleetBroker.name())).copied().unwrap_or(0.0);
        for other in ["fleet-broker-before", Peer::Mosquitto.name(), Peer::Rumqttd.name()] {
            if let Some(&o) = by.get(&(qos as u8, other)).filter(|&&o| o > 0.0) {
                report
                    .add("ratios", format!("| QoS {}: fleet-broker / {other} | {:.2}× |", qos as u8, fb / o));
            }
            if let Some(&o) = cpu.get(&(qos as u8, other)).filter(|&&o| o > 0.0) {
                report.add(
                    "ratios",
                    format!(
                        "| QoS {}: server CPU per message, fleet-broker / {other} | {:.2}× |",
                        qos as u8,
                        fb_cpu / o
                    ),
                );
            }
        }
    }
}
