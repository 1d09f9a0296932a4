//! `shared`: a shared subscription's throughput. Three backend consumers join
//! `$share/bench/devices/+/telemetry` (QoS 1, each delivery acknowledged at once) while the 100
//! devices publish 48-byte QoS 1 messages for `--secs` (16 in flight per device); the rate is
//! what the consumers received (against what the publishers had acknowledged), with how the
//! messages were split between them. fleet-broker beside Mosquitto's shared subscriptions (both offer them to 3.1.1 and
//! MQTT 5 clients: `--mqtt` picks).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::client::{self, Identity};
use crate::servers::Peer;
use crate::{ingest_rate, Args, Env, Report};

/// The filter every consumer shares.
const FILTER: &str = "$share/bench/devices/+/telemetry";

/// One consumer: what it received while the clock ran.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
}

/// Connects `who`, joins the group and acknowledges every delivery until the connection ends.
/// `None` if it could not connect or subscribe.
async fn consumer(
    addr: SocketAddr,
    who: &Identity,
    tally: Arc<Tally>,
) -> Option<tokio::task::JoinHandle<()>> {
    let s = client::session(addr, who, 120).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    let mut out = BytesMut::new();
    subscribe(&mut out, FILTER);
    wr.write_all(&out).await.ok()?;
    let (acks, mut to_ack) = mpsc::unbounded_channel::<u16>();
    let (subscribed, got_suback) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    let reader = tokio::spawn(async move {
        client::read_packets(&mut rd, |p| {
            match p {
                Packet::Publish(p) => {
                    tally.received.fetch_add(1, Ordering::Relaxed);
                    if p.pkid != 0 {
                        let _ = acks.send(p.pkid);
                    }
                }
                // The v5 SUBACK is read as its 3.1.1 counterpart would be (anything else).
                _ => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
            }
            true
        })
        .await;
    });
    tokio::time::timeout(Duration::from_secs(10), got_suback).await.ok()?.ok()?;
    Some(tokio::spawn(async move {
        let mut out = BytesMut::with_capacity(4096);
        while let Some(pkid) = to_ack.recv().await {
            out.clear();
            for id in std::iter::once(pkid).chain(std::iter::from_fn(|| to_ack.try_recv().ok())) {
                out.put_slice(&[0x40, 2]);
                out.put_u16(id);
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        reader.abort();
    }))
}

/// A SUBSCRIBE to `filter` at QoS 1 in the run's protocol (packet id 1; v5: no properties, the
/// options byte is the QoS).
fn subscribe(out: &mut BytesMut, filter: &str) {
    let v5 = client::mqtt5();
    let len = 2 + usize::from(v5) + 2 + filter.len() + 1;
    out.put_u8(0x82);
    out.put_u8(len as u8);
    out.put_u16(1);
    if v5 {
        out.put_u8(0);
    }
    out.put_u16(filter.len() as u16);
    out.put_slice(filter.as_bytes());
    out.put_u8(1);
}

pub(crate) async fn scenario_shared(env: &Env, ids: &[Arc<Identity>], a: &Args, report: &mut Report) {
    println!(
        "\n== shared: 3 consumers on {FILTER} (QoS 1, acknowledging each), {} devices publishing QoS 1 for {} s",
        ids.len(),
        a.secs
    );
    let mut consumers = Vec::new();
    for i in 1..=3 {
        consumers.push(env.service(&format!("bench-share-{i}")).await);
    }
    let mut by: BTreeMap<&str, f64> = BTreeMap::new();
    for subject in a.subjects(&[Peer::FleetBroker, Peer::Mosquitto]) {
        let name = subject.name();
        let Some(server) = env.start_subject(&subject) else { continue };
        let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
        let mut tasks = Vec::new();
        for (who, tally) in consumers.iter().zip(&tallies) {
            match consumer(server.addr, who, tally.clone()).await {
                Some(t) => tasks.push(t),
                None => println!("  {name}: consumer {} could not join the group", who.id),
            }
        }
        if tasks.len() < 3 {
            continue;
        }
        let t0 = Instant::now();
        let cpu0 = server.cpu_secs();
        let (published, _, acked) = ingest_rate(server.addr, ids, QoS::AtLeastOnce, a.secs).await;
        // What was acknowledged reaches the consumers shortly after the publishers stop.
        let deadline = Instant::now() + Duration::from_secs(10);
        let total = || tallies.iter().map(|t| t.received.load(Ordering::Relaxed)).sum::<u64>();
        let mut last = (total(), Instant::now());
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = total();
            if now == last.0 {
                break;
            }
            last = (now, Instant::now());
        }
        let elapsed = last.1.duration_since(t0).as_secs_f64().max(a.secs);
        let received = total();
        let cpu_us = (server.cpu_secs() - cpu0) * 1e6 / received.max(1) as f64;
        let split: Vec<String> = tallies
            .iter()
            .map(|t| {
                format!("{:.0}%", 100.0 * t.received.load(Ordering::Relaxed) as f64 / received.max(1) as f64)
            })
            .collect();
        for t in tasks {
            t.abort();
        }
        drop(server);
        let rate = received as f64 / elapsed;
        by.insert(name, rate);
        report.add(
            "shared",
            format!(
                "| {name} | {rate:.0} msg/s to the group | publishers {published:.0} msg/s ({acked} acked), {received} received | split {} | {cpu_us:.1} µs server CPU/msg |",
                split.join(" / ")
            ),
        );
    }
    if let (Some(f), Some(m)) = (by.get(Peer::FleetBroker.name()), by.get(Peer::Mosquitto.name())) {
        if *m > 0.0 {
            report.add(
                "ratios",
                format!("| shared subscription, 3 consumers: fleet-broker / mosquitto | {:.2}× |", f / m),
            );
        }
    }
}
