//! `cluster`: three fleet-broker nodes on one PostgreSQL registry and one `nats-server -js`,
//! beside a single node (SQLite) and Mosquitto in the same run:
//! - cross-node delivery latency at a fixed rate (devices on nodes 1 and 2, a service on node 3,
//!   QoS 0), and the same on one node for the in-process baseline;
//! - QoS 1 ingest through JetStream (devices spread over the three nodes; PUBACK after the
//!   JetStream ack) vs the single node's SQLite commit vs Mosquitto's in-memory QoS 1;
//! - revoke → cut with the devices spread over the three nodes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;

use crate::client::{self, Identity};
use crate::servers::{self, Peer, Server};
use crate::{ingest_rate, open_sessions, percentile, revoke_each, stored_rows, Args, Env, Report};
use fleet_tests::fixture::ClusterBuilder;

/// Messages per second of the latency run, over all publishing devices.
const RATE: u64 = 10_000;
/// Publishing devices of the latency run.
const PUBLISHERS: usize = 20;

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The service subscribes to every device's telemetry on `service_at`; devices publish QoS 0
/// from `publish_at` (round robin) at `RATE` msg/s for `secs`, each payload stamped with its
/// send time. Returns the delivery latencies and how many were sent.
async fn delivery_latency(
    service_at: SocketAddr,
    publish_at: &[SocketAddr],
    service: &Identity,
    devices: &[Arc<Identity>],
    secs: f64,
) -> (Vec<Duration>, u64) {
    let Some(s) = client::session(service_at, service, 120).await else { return (Vec::new(), 0) };
    let (mut rd, mut wr) = tokio::io::split(s);
    let mut out = BytesMut::new();
    let mut sub = Subscribe::new("devices/+/telemetry", QoS::AtMostOnce);
    sub.pkid = 1;
    Packet::Subscribe(sub).write(&mut out, 1 << 16).expect("encode subscribe");
    wr.write_all(&out).await.expect("subscribe");
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (lat2, subscribed) = (lat.clone(), Arc::new(tokio::sync::Notify::new()));
    let sub_done = subscribed.clone();
    let reader = tokio::spawn(async move {
        client::read_packets(&mut rd, |p| {
            match p {
                Packet::SubAck(_) => sub_done.notify_one(),
                Packet::Publish(p) if p.payload.len() >= 8 => {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or_default());
                    let ns = unix_nanos().saturating_sub(sent);
                    lat2.lock().unwrap_or_else(|e| e.into_inner()).push(Duration::from_nanos(ns));
                }
                _ => {}
            }
            true
        })
        .await;
    });
    subscribed.notified().await;
    // The subscription reaches NATS asynchronously.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut pubs = Vec::new();
    for (i, who) in devices.iter().take(PUBLISHERS).enumerate() {
        if let Some(s) = client::session(publish_at[i % publish_at.len()], who, 120).await {
            pubs.push((who.id.clone(), s));
        }
    }
    let per_device = Duration::from_secs_f64(pubs.len() as f64 / RATE as f64);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (id, mut s) in pubs {
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/{id}/telemetry");
            let mut tick = tokio::time::interval(per_device);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut out = BytesMut::new();
            let mut sent = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                out.clear();
                let mut payload = unix_nanos().to_be_bytes().to_vec();
                payload.resize(48, 0);
                client::publish(&mut out, &topic, QoS::AtMostOnce, 0, &payload);
                if s.write_all(&out).await.is_err() {
                    break;
                }
                sent += 1;
            }
            // Keep the session while the last messages travel.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = s.write_all(&[0xe0, 0]).await;
            sent
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap_or(0);
    }
    reader.abort();
    let mut l = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    l.sort();
    (l, sent)
}

/// Stream messages not (yet) in the SQL table.
async fn stream_rows_lag(env: &Env, nats: &fleet_tests::NatsServer) -> i64 {
    nats.stream_messages("FLEET") as i64 - stored_rows(env).await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// QoS 1 ingest with the devices split over `addrs`, all at once; total PUBACKs per second.
async fn spread_ingest(addrs: &[SocketAddr], ids: &[Arc<Identity>], secs: f64) -> (f64, u64, u64) {
    let per = ids.len().div_ceil(addrs.len());
    let runs: Vec<_> = addrs
        .iter()
        .zip(ids.chunks(per))
        .map(|(&a, chunk)| {
            let chunk = chunk.to_vec();
            tokio::spawn(async move { ingest_rate(a, &chunk, QoS::AtLeastOnce, secs).await })
        })
        .collect();
    let mut total = (0.0, 0, 0);
    for r in runs {
        if let Ok((r, s, k)) = r.await {
            total = (total.0 + r, total.1 + s, total.2 + k);
        }
    }
    total
}

pub(crate) async fn scenario_cluster(env: &Env, devices: &[Arc<Identity>], a: &Args, report: &mut Report) {
    println!(
        "\n== cluster: 3 fleet-broker nodes + nats-server -js (TLS, shipped config) + PostgreSQL, vs one node (SQLite) and Mosquitto; {} s each",
        a.secs
    );
    let pg = fleet_tests::PgCluster::start();
    let db = pg.create_database("fleet");
    let cenv = Env::with_db(Some(&db)).await;
    // The bus as shipped (TLS, certificates mapped to users, permissions).
    let nats = fleet_tests::NatsServer::start(&cenv.home, Some(&db));
    let cdevices = cenv.mint("cdev", devices.len()).await;
    let service = cenv.service("cluster-svc").await;
    let cluster = ClusterBuilder::default().nodes(3);
    let start_nodes = |extra: &[&str]| -> Option<Vec<Server>> {
        let base = servers::fleet_broker(&cenv.home).ok()?.database_url(Some(&db));
        let nodes = cluster.launch_nodes(&base, &nats, extra).ok()?;
        nodes.into_iter().map(|n| servers::serve(Peer::FleetBroker.name(), n.child, n.mqtt).ok()).collect()
    };
    let Some(nodes) = start_nodes(&[]) else {
        println!("  skipped: the cluster nodes did not start");
        return;
    };
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();

    // Delivery latency: across nodes, then within one node for the baseline.
    let (lat, sent) = delivery_latency(addrs[2], &addrs[..2], &service, &cdevices, a.secs).await;
    let line = |what: &str, lat: &[Duration], sent: u64| {
        format!(
            "| {what} | {RATE} msg/s | {} / {sent} delivered | p50 {:.2} ms | p99 {:.2} ms | max {:.1} ms |",
            lat.len(),
            ms(percentile(lat, 50.0)),
            ms(percentile(lat, 99.0)),
            ms(lat.last().copied().unwrap_or_default())
        )
    };
    report.add("cluster latency", line("cross-node (devices on nodes 1-2, service on node 3)", &lat, sent));
    let (lat1, sent1) = delivery_latency(addrs[0], &addrs[..1], &service, &cdevices, a.secs).await;
    report.add("cluster latency", line("same node (cluster member)", &lat1, sent1));

    // QoS 1 ingest: JetStream through three nodes (each also feeding the SQL table from the
    // stream), the same without the SQL sink, then one node (SQLite), then Mosquitto.
    let rows_before = stored_rows(&cenv).await;
    let stream_before = nats.stream_messages("FLEET");
    let (cluster_rate, sent, acked) = spread_ingest(&addrs, &cdevices, a.secs).await;
    let t = Instant::now();
    let lag = stream_rows_lag(&cenv, &nats).await;
    let mut behind = lag;
    while behind > 0 && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        behind = stream_rows_lag(&cenv, &nats).await;
    }
    let caught_up = t.elapsed().as_secs_f64();
    let sunk = stored_rows(&cenv).await - rows_before;
    let stored = nats.stream_messages("FLEET") - stream_before;
    report.add(
        "cluster ingest",
        format!(
            "| 3 nodes, JetStream (file, R1) + SQL sink | QoS 1 | {cluster_rate:.0} msg/s | {sent} sent, {acked} acked, {stored} stored | sink {lag} rows behind at the end, caught up in {caught_up:.1} s ({:.0} rows/s overall) |",
            sunk as f64 / (a.secs + caught_up)
        ),
    );
    drop(nodes);
    let Some(bare_nodes) = start_nodes(&["--nats-sql-sink", "false"]) else { return };
    let bare: Vec<SocketAddr> = bare_nodes.iter().map(|n| n.addr).collect();
    let (stream_only, sent, acked) = spread_ingest(&bare, &cdevices, a.secs).await;
    report.add(
        "cluster ingest",
        format!("| 3 nodes, JetStream (file, R1), no SQL sink | QoS 1 | {stream_only:.0} msg/s | {sent} sent, {acked} acked | backends read the stream |"),
    );
    let (one_node, ..) = spread_ingest(&bare[..1], &cdevices, a.secs).await;
    report.add(
        "cluster ingest",
        format!("| 1 node, JetStream (file, R1), no SQL sink | QoS 1 | {one_node:.0} msg/s | | |"),
    );
    drop(bare_nodes);
    let mut peers = Vec::new();
    for peer in [Peer::FleetBroker, Peer::Mosquitto].into_iter().filter(|&p| a.wants(p)) {
        let Some(server) = env.start(peer) else { continue };
        let (rate, sent, acked) = ingest_rate(server.addr, devices, QoS::AtLeastOnce, a.secs).await;
        let what = if peer == Peer::FleetBroker {
            "1 node, SQLite (single-node default)"
        } else {
            "mosquitto (memory)"
        };
        report.add(
            "cluster ingest",
            format!("| {what} | QoS 1 | {rate:.0} msg/s | {sent} sent, {acked} acked | |"),
        );
        peers.push((peer, rate));
    }
    for (peer, rate) in peers.into_iter().filter(|(_, r)| *r > 0.0) {
        for (what, r) in [("+ SQL sink", cluster_rate), ("stream only", stream_only)] {
            report.add(
                "ratios",
                format!(
                    "| cluster QoS 1 (3 nodes, JetStream {what}) / {} QoS 1 | {:.2}× |",
                    peer.name(),
                    r / rate
                ),
            );
        }
    }
    let Some(nodes) = start_nodes(&[]) else { return };
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();

    // Revoke → cut, devices spread over the three nodes.
    const N: usize = 60;
    let ids = cenv.mint("crv", N).await;
    let mut sessions = Vec::new();
    for (i, chunk) in ids.chunks(N / 3).enumerate() {
        sessions.extend(open_sessions(addrs[i % 3], chunk).await);
    }
    let crate::RevokeTimes { mut cut, never, .. } = revoke_each(&cenv, &ids, sessions).await;
    cut.sort();
    report.add(
        "cluster revoke",
        format!(
            "| 3 nodes (PostgreSQL NOTIFY + NATS fan-out) | {} / {N} cut | p50 {:.0} ms | p99 {:.0} ms | max {:.0} ms | {never} never cut |",
            cut.len(),
            ms(percentile(&cut, 50.0)),
            ms(percentile(&cut, 99.0)),
            ms(cut.last().copied().unwrap_or_default()),
        ),
    );
}
