//! A cluster as it is deployed (issue 12): three `fleet-broker` nodes on one PostgreSQL registry
//! and one `nats-server -js`, with HAProxy (TCP mode, health-checked on `/healthz`) as the
//! address devices use. Routing across nodes, takeover, revocation on every node, a node killed
//! with -9 under QoS 1 load, and NATS stopped mid-run.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;

/// The cluster of these tests, with `devices` devices: every node has the per-source
/// pre-admission cap raised because behind HAProxy every device comes from the proxy's address.
fn cluster(devices: usize) -> ClusterBuilder {
    Cluster::builder().devices(devices).node_args(&["--max-pre-admission-per-source", "10000"])
}

async fn connected(addr: SocketAddr, dir: &std::path::Path, id: &str) -> Raw {
    let mut c = Raw::device(addr, dir).await.unwrap();
    assert_eq!(
        connack_code(&c.mqtt_connect(id, 30).await),
        Some(ConnectReturnCode::Success),
        "{id} at {addr}"
    );
    c
}

async fn publish_acked(c: &mut Raw, topic: &str, payload: &[u8], pkid: u16) -> bool {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = pkid;
    if c.send(Packet::Publish(p)).await.is_err() {
        return false;
    }
    matches!(c.recv(PATIENCE).await, Some(Packet::PubAck(a)) if a.pkid == pkid)
}

#[tokio::test]
async fn three_nodes_behind_haproxy_route_take_over_and_revoke_everywhere() {
    let cluster = cluster(5).nodes(3).haproxy().start().await;
    let (fleet, nats, nodes, lb) = (&cluster.fleet, &cluster.nats, &cluster.nodes, cluster.lb_addr());

    // A service on node 3 watches every device's telemetry; devices on nodes 1 and 2 publish.
    let mut svc = Raw::device(nodes[2].mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut svc, "devices/+/telemetry", 1).await;
    let (id0, id1) = (fleet.id(0), fleet.id(1));
    let mut dev0 = connected(nodes[0].mqtt, &fleet.devices[0], &id0).await;
    subscribe(&mut dev0, &format!("devices/{id0}/commands/#"), 1).await;
    let mut dev1 = connected(nodes[1].mqtt, &fleet.devices[1], &id1).await;
    // The subscriptions travel to NATS asynchronously.
    bus::wait_subscription(nats, "fleet.t.devices.*.telemetry", true).await;
    bus::wait_subscription(nats, &format!("fleet.t.devices.{id0}.commands.>"), true).await;
    assert!(publish_acked(&mut dev0, &format!("devices/{id0}/telemetry"), b"from-node-1", 1).await);
    assert!(publish_acked(&mut dev1, &format!("devices/{id1}/telemetry"), b"from-node-2", 1).await);
    let mut seen = BTreeSet::new();
    for _ in 0..2 {
        let p = next_publish(&mut svc, PATIENCE).await.expect("telemetry did not reach node 3");
        seen.insert(p.payload.to_vec());
    }
    assert_eq!(seen, BTreeSet::from([b"from-node-1".to_vec(), b"from-node-2".to_vec()]));

    // A command from the service on node 3 reaches the device on node 1.
    let mut cmd = Publish::new(format!("devices/{id0}/commands/reboot"), QoS::AtLeastOnce, b"now".to_vec());
    cmd.pkid = 2;
    svc.send(Packet::Publish(cmd)).await.unwrap();
    let got = next_publish(&mut dev0, PATIENCE).await.expect("command did not reach node 1");
    assert_eq!(&got.payload[..], b"now");

    // Takeover across nodes: device 0 connecting through node 3 cuts its session on node 1.
    let t = Instant::now();
    let _dev0_again = connected(nodes[2].mqtt, &fleet.devices[0], &id0).await;
    assert!(dev0.closed_within(PATIENCE).await, "no takeover across nodes");
    assert!(t.elapsed() < LATENCY_BOUND, "the takeover took {:?}", t.elapsed());

    // Devices 2, 3, 4 on nodes 1, 2, 3; each revoked: each cut within a second, on its node.
    let mut live = Vec::new();
    for (i, n) in (2..5).zip(nodes) {
        live.push(connected(n.mqtt, &fleet.devices[i], &fleet.id(i)).await);
    }
    for (k, mut c) in live.into_iter().enumerate() {
        fleet.revoke(k + 2).await;
        let t = Instant::now(); // the registry has committed the revocation
        assert!(c.closed_within(PATIENCE).await, "device {} on node {} not cut", k + 2, k + 1);
        assert!(t.elapsed() < LATENCY_BOUND, "cut {:?} after the commit", t.elapsed());
    }
    // Refused by every node afterwards, and through the load balancer.
    for i in 2..5 {
        for addr in nodes.iter().map(|n| n.mqtt).chain([lb]) {
            let code = match Raw::device(addr, &fleet.devices[i]).await {
                Ok(mut c) => connack_code(&c.mqtt_connect(&fleet.id(i), 30).await),
                Err(_) => None, // refused at the handshake (CRL)
            };
            assert_ne!(code, Some(ConnectReturnCode::Success), "revoked device {i} admitted at {addr}");
        }
    }
    // The revocations also travelled over NATS: every node heard of the other nodes' ones.
    for n in nodes.iter() {
        n.wait_metric("fleet_cluster_revocations_received_total", 1.0, Duration::from_secs(2)).await;
    }
    // The telemetry is in the table (through the stream and the SQL sinks), once.
    fleet.wait_telemetry_rows(&id0, 1, Duration::from_secs(5)).await;
    fleet.wait_telemetry_rows(&id1, 1, Duration::from_secs(5)).await;

    // A backend can read the stream itself, with its read-only identity: the example consumer
    // prints both messages.
    let consumer =
        fleet_tests::workspace_bin_dir(&["examples/stream_consumer"]).join("examples/stream_consumer");
    let reader = nats.identity(fleet_tests::READER);
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(consumer).arg(nats.url()).arg(&reader).arg("2").output(),
    )
    .await
    .expect("the example consumer did not get two messages")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for (id, payload) in [(&id0, "from-node-1"), (&id1, "from-node-2")] {
        let line = format!(" {id} qos=1 ");
        assert!(
            text.lines()
                .any(|l| l.contains(&line) && l.ends_with(&format!("devices/{id}/telemetry {payload}"))),
            "{text}"
        );
    }
}

/// What a device saw acknowledged: (message number, when).
type Acked = Arc<Mutex<Vec<(u64, Instant)>>>;

/// One device of the load: publishes `i:n` QoS 1 through the load balancer, one in flight,
/// reconnecting (and retransmitting the unacknowledged message with DUP) when its node goes.
async fn device_load(
    lb: SocketAddr,
    dir: std::path::PathBuf,
    id: String,
    stop: Arc<AtomicBool>,
    acked: Acked,
) {
    let topic = format!("devices/{id}/telemetry");
    let mut n: u64 = 0;
    let mut dup = false;
    while !stop.load(Ordering::Relaxed) {
        let mut c = match Raw::device(lb, &dir).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if connack_code(&c.mqtt_connect(&id, 30).await) != Some(ConnectReturnCode::Success) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let pkid = (n % 65_535) as u16 + 1;
            let mut p = Publish::new(topic.as_str(), QoS::AtLeastOnce, format!("{id}:{n}").into_bytes());
            p.pkid = pkid;
            p.dup = dup;
            if c.send(Packet::Publish(p)).await.is_err() {
                dup = true;
                break;
            }
            match c.recv(Duration::from_secs(5)).await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => {
                    acked.lock().unwrap().push((n, Instant::now()));
                    n += 1;
                    dup = false;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                _ => {
                    dup = true;
                    break;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_node_killed_under_load_loses_no_acknowledged_message_and_its_devices_move() {
    const DEVICES: usize = 50;
    let mut cluster = cluster(DEVICES).nodes(3).haproxy().start().await;
    let (fleet, nats, lb) = (&cluster.fleet, &cluster.nats, cluster.lb_addr());
    let nodes = &mut cluster.nodes;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Acked> = (0..DEVICES).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            tokio::spawn(device_load(
                lb,
                fleet.devices[i].clone(),
                fleet.id(i),
                stop.clone(),
                acked[i].clone(),
            ))
        })
        .collect();
    // Every node holds sessions before one dies.
    for n in nodes.iter() {
        n.wait_metric("fleet_sessions_live", 5.0, Duration::from_secs(20)).await;
    }
    // Every device has messages acknowledged before the kill.
    let acked_by_all =
        |since: Instant| acked.iter().all(|a| a.lock().unwrap().iter().any(|(_, at)| *at > since));
    let t = Instant::now();
    while !acked_by_all(t) {
        assert!(t.elapsed() < PATIENCE, "not every device got a message acknowledged before the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victims = nodes[0].metric("fleet_sessions_live").await;
    nodes[0].kill9();
    let killed_at = Instant::now();
    // Run on until every device has been acknowledged again after the kill (the killed node's
    // devices through HAProxy to the survivors), however long that takes on this machine.
    while !acked_by_all(killed_at) && killed_at.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a little more load after the move
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // Every device published after the kill: the killed node's devices came back through
    // HAProxy to the survivors.
    let mut total = 0;
    for (i, a) in acked.iter().enumerate() {
        let a = a.lock().unwrap();
        assert!(a.iter().any(|(_, at)| *at > killed_at), "device {i} never came back after the kill");
        total += a.len();
    }
    assert!(victims >= 1.0, "the killed node held no session");
    eprintln!("{total} messages acknowledged; node 1 held {victims} sessions when killed");

    // Every acknowledged message is in the stream and, once the sinks catch up, in the table,
    // exactly once (retransmissions through another node were de-duplicated).
    let st = fleet.station().await;
    let t = Instant::now();
    let stored: HashMap<String, usize> = loop {
        use sqlx::Row;
        let rows =
            sqlx::query("SELECT payload FROM telemetry").fetch_all(st.registry().pool()).await.unwrap();
        let mut m: HashMap<String, usize> = HashMap::new();
        for r in &rows {
            *m.entry(String::from_utf8(r.get::<Vec<u8>, _>(0)).unwrap()).or_default() += 1;
        }
        let missing = (0..DEVICES)
            .flat_map(|i| acked[i].lock().unwrap().iter().map(move |(n, _)| (i, *n)).collect::<Vec<_>>())
            .filter(|(i, n)| !m.contains_key(&format!("{}:{n}", fleet.id(*i))))
            .count();
        if missing == 0 {
            break m;
        }
        assert!(t.elapsed() < 3 * PATIENCE, "{missing} acknowledged messages not in the table");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dups: Vec<_> = stored.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "stored more than once: {:?}", &dups[..dups.len().min(5)]);
    let in_stream = nats.stream_messages("FLEET");
    assert!(in_stream >= total as u64, "stream holds {in_stream} messages, {total} were acknowledged");
    // The table is the stream: once caught up, as many rows as stream messages.
    let t = Instant::now();
    loop {
        use sqlx::Row;
        let rows: i64 = sqlx::query("SELECT COUNT(*) FROM telemetry")
            .fetch_one(st.registry().pool())
            .await
            .unwrap()
            .get(0);
        if rows as u64 == in_stream {
            break;
        }
        assert!(t.elapsed() < 3 * PATIENCE, "table {rows} rows, stream {in_stream} messages");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn nats_stopped_mid_run_no_puback_without_a_stored_message_and_recovery_after() {
    let mut cluster = cluster(2).node_args(&["--nats-timeout-secs", "1"]).start().await;
    let (fleet, n, nats) = (&cluster.fleet, &cluster.nodes[0], &mut cluster.nats);
    let id = fleet.id(0);
    let topic = format!("devices/{id}/telemetry");
    let mut dev = connected(n.mqtt, &fleet.devices[0], &id).await;
    assert!(publish_acked(&mut dev, &topic, b"before", 1).await);
    assert_eq!(n.metric("fleet_cluster_connected").await, 1.0);
    assert_eq!(n.healthz().await, (200, "ok\n".to_owned()));

    nats.stop();
    let t = Instant::now();
    while n.metric("fleet_cluster_connected").await != 0.0 {
        assert!(t.elapsed() < PATIENCE, "the node did not notice NATS went away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A message that cannot be stored is never acknowledged; its session closes.
    let mut p = Publish::new(topic.as_str(), QoS::AtLeastOnce, b"during".to_vec());
    p.pkid = 2;
    dev.send(Packet::Publish(p)).await.unwrap();
    let got = dev.recv(Duration::from_secs(4)).await;
    assert!(got.is_none(), "PUBACK without a stored message: {got:?}");
    // New devices are turned away with "server unavailable", and the health check says why.
    let mut other = Raw::device(n.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(
        connack_code(&other.mqtt_connect(&fleet.id(1), 30).await),
        Some(ConnectReturnCode::ServiceUnavailable)
    );
    n.wait_refused(Refusal::ClusterUnavailable, 1.0, PATIENCE).await;
    let (status, body) = n.healthz().await;
    assert_eq!(status, 503, "/healthz while NATS is down: {body}");
    assert!(body.contains("NATS connection down"), "{body}");

    // NATS comes back: the node recovers by itself, the device retransmits, stored once.
    nats.restart();
    let t = Instant::now();
    while n.metric("fleet_cluster_connected").await != 1.0 {
        assert!(t.elapsed() < PATIENCE, "the node did not reconnect to NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n.healthz().await, (200, "ok\n".to_owned()), "/healthz after NATS came back");
    let mut dev = connected(n.mqtt, &fleet.devices[0], &id).await;
    let mut p = Publish::new(topic.as_str(), QoS::AtLeastOnce, b"during".to_vec());
    (p.pkid, p.dup) = (2, true);
    dev.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PubAck(a)) if a.pkid == 2));
    assert!(publish_acked(&mut dev, &topic, b"after", 3).await);
    fleet.wait_telemetry_rows(&id, 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payloads: Vec<Vec<u8>> = fleet.telemetry_rows(&id).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![b"before".to_vec(), b"during".to_vec(), b"after".to_vec()]);
}
