//! Broker nodes as one fleet over NATS (issue 12, routing step): two `fleet-broker` processes on
//! one PostgreSQL registry and one `nats-server`. A service on one node gets the telemetry of a
//! device on the other, and its commands reach that device; a node subscribes in NATS only to
//! what its own sessions hold, for as long as they hold it.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn a_service_on_one_node_gets_telemetry_from_a_device_on_another_and_its_commands_cross_back() {
    let cluster = Cluster::builder().devices(2).nodes(2).start().await;
    let (fleet, nats) = (&cluster.fleet, &cluster.nats);
    let [node1, node2] = &cluster.nodes[..] else { unreachable!("two nodes") };
    let (id0, id1) = (fleet.id(0), fleet.id(1));

    // The backend service on node 2 watches every device's telemetry.
    let mut svc = Raw::device(node2.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut svc, "devices/+/telemetry", 1).await;
    bus::wait_subscription(nats, "fleet.t.devices.*.telemetry", true).await;

    // Device 0 on node 1, device 1 on node 2; each listens for its commands.
    let mut dev0 = Raw::device(node1.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev0.mqtt_connect(&id0, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut dev0, &format!("devices/{id0}/commands/#"), 1).await;
    let mut dev1 = Raw::device(node2.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&dev1.mqtt_connect(&id1, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut dev1, &format!("devices/{id1}/commands/#"), 1).await;
    let commands0 = format!("fleet.t.devices.{id0}.commands.>");
    bus::wait_subscription(nats, &commands0, true).await;

    // Telemetry from node 1 reaches the service on node 2 (and is stored, PUBACK as usual).
    let mut p = Publish::new(format!("devices/{id0}/telemetry"), QoS::AtLeastOnce, b"t=21.5".to_vec());
    p.pkid = 7;
    dev0.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(dev0.recv(PATIENCE).await, Some(Packet::PubAck(a)) if a.pkid == 7));
    let got = next_publish(&mut svc, PATIENCE).await.expect("telemetry crossed no node");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (format!("devices/{id0}/telemetry").as_str(), &b"t=21.5"[..])
    );

    // A command from the service on node 2 reaches device 0 on node 1, and only device 0.
    let mut cmd = Publish::new(format!("devices/{id0}/commands/reboot"), QoS::AtLeastOnce, b"now".to_vec());
    cmd.pkid = 2;
    svc.send(Packet::Publish(cmd)).await.unwrap();
    let got = next_publish(&mut dev0, PATIENCE).await.expect("command crossed no node");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (format!("devices/{id0}/commands/reboot").as_str(), &b"now"[..])
    );
    assert!(
        next_publish(&mut dev1, Duration::from_millis(300)).await.is_none(),
        "device 1 got device 0's command"
    );
    // The service never gets its own command back, nor a second copy of the telemetry.
    assert!(next_publish(&mut svc, Duration::from_millis(300)).await.is_none());

    // When device 0 leaves, node 1 drops the subscription for its commands.
    drop(dev0);
    bus::wait_subscription(nats, &commands0, false).await;
    // Stored once (through the stream and the nodes' SQL sink), though both nodes run a sink.
    fleet.wait_telemetry_rows(&id0, 1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fleet.telemetry_rows(&id0).await.len(), 1, "stored twice");
}

#[tokio::test]
async fn a_cluster_node_needs_a_shared_postgresql_registry() {
    let fleet = Fleet::new(1, None).await;
    let nats = fleet_tests::NatsServer::start_open();
    let out = std::process::Command::new(broker_bin())
        .arg("--home")
        .arg(fleet.home())
        .args(nats.node_args("n1"))
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("PostgreSQL"), "{err}");
}

/// One session per device across the cluster: the device connecting on node 2 cuts its session
/// on node 1 within a second (`takeover`), and the new session goes on.
#[tokio::test]
async fn a_connect_on_another_node_takes_the_session_over_at_once() {
    let cluster = Cluster::builder().devices(1).nodes(2).start().await;
    let fleet = &cluster.fleet;
    let [node1, node2] = &cluster.nodes[..] else { unreachable!("two nodes") };
    let id = fleet.id(0);
    let mut first = Raw::device(node1.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&first.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let t = Instant::now();
    let mut second = Raw::device(node2.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&second.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    assert!(first.closed_within(PATIENCE).await, "the session on node 1 outlived the takeover");
    assert!(t.elapsed() < LATENCY_BOUND, "takeover took {:?}", t.elapsed());
    node1.wait_metric(&kicks(CloseReason::Takeover), 1.0, Duration::from_secs(2)).await;
    assert_eq!(node2.metric(&kicks(CloseReason::Takeover)).await, 0.0, "the new session was cut");
    // The new session works.
    second.send(Packet::PingReq).await.unwrap();
    assert!(matches!(second.recv(PATIENCE).await, Some(Packet::PingResp)));
    // And back again: node 1 takes it from node 2.
    let mut third = Raw::device(node1.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&third.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    assert!(second.closed_within(PATIENCE).await, "the session on node 2 outlived the takeover");
    node2.wait_metric(&kicks(CloseReason::Takeover), 1.0, Duration::from_secs(2)).await;
}

/// Session claims replayed, malformed or flooded on a device's session subject never cut its
/// live session, even from a node's identity: only a claim newer than the session's start does
/// (what another node admitting the device sends), and only from a node (`Fleet-Node`): the
/// same newer claim without it (what a JetStream delivery of a stored device payload would
/// look like) cuts nothing.
#[tokio::test]
async fn replayed_malformed_and_flooded_claims_do_not_cut_a_session() {
    let cluster = Cluster::builder().devices(1).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let id = fleet.id(0);
    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let subject = format!("fleet.s.{}", id.replace('.', "%2E"));
    bus::wait_subscription(nats, &subject, true).await;
    let peer = bus::client(nats, "n3").await;
    // An old claim (a replay of an earlier session's), garbage, and a flood of both.
    for i in 0..2000u32 {
        let payload = match i % 3 {
            0 => format!("{} 42", i),
            1 => "not a claim".to_owned(),
            _ => String::new(),
        };
        peer.publish_with_headers(subject.clone(), bus::from_node(), payload.into()).await.unwrap();
    }
    peer.flush().await.unwrap();
    dev.send(Packet::PingReq).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PingResp)), "session cut by stale claims");
    assert_eq!(node.metric(&kicks(CloseReason::Takeover)).await, 0.0);
    // A newer claim that no node sent: refused, counted.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    peer.publish(subject.clone(), format!("{} 7", now + 1_000_000_000).into()).await.unwrap();
    peer.flush().await.unwrap();
    node.wait_metric("fleet_cluster_refused_total{reason=\"not_from_node\"}", 1.0, Duration::from_secs(3))
        .await;
    dev.send(Packet::PingReq).await.unwrap();
    assert!(
        matches!(dev.recv(PATIENCE).await, Some(Packet::PingResp)),
        "a claim without Fleet-Node cut the session"
    );
    // Control: a claim newer than the session from a node (another node admitting the device)
    // cuts it.
    peer.publish_with_headers(subject, bus::from_node(), format!("{} 7", now + 2_000_000_000).into())
        .await
        .unwrap();
    peer.flush().await.unwrap();
    assert!(dev.closed_within(PATIENCE).await, "a newer claim did not take over");
}

/// Malformed revocation announcements flooded on the cluster's revocation subject never cut a
/// live session nor stop the node from admitting, and neither does a well-formed forged one
/// (a real device and its real serial, from a node's identity): a node acts on an
/// announcement only once the registry confirms the revocation, so a forged `fleet.r` cannot
/// lock a device out (it did, until restart, before the check). A real revocation announced
/// twice is harmless: applying one is idempotent.
#[tokio::test]
async fn forged_malformed_and_flooded_revocation_announcements_cut_nothing() {
    let cluster = Cluster::builder().devices(2).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let id = fleet.id(0);
    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let serial = fleet.station().await.show(&fleet_provision::DeviceId::parse(&id).unwrap()).await.unwrap();
    let serial = serial.certificates[0].serial.to_hex();
    let peer = bus::client(nats, "n3").await;
    for i in 0..2000u32 {
        let payload = match i % 4 {
            0 => id.clone(),
            1 => format!("{id} zz"),
            2 => "../.. 4a0b".to_owned(),
            _ => String::new(),
        };
        peer.publish_with_headers("fleet.r", bus::from_node(), payload.into()).await.unwrap();
    }
    // The forgery: well-formed, from a node's identity, naming the live device's certificate.
    peer.publish_with_headers("fleet.r", bus::from_node(), format!("{id} {serial}").into()).await.unwrap();
    peer.flush().await.unwrap();
    node.wait_metric(
        "fleet_cluster_refused_total{reason=\"unconfirmed_revocation\"}",
        1.0,
        Duration::from_secs(3),
    )
    .await;
    dev.send(Packet::PingReq).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PingResp)), "session cut");
    // Not locked out: the device connects again (its old session is taken over).
    let mut again = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&again.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let mut other = Raw::device(node.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&other.mqtt_connect(&fleet.id(1), 30).await), Some(ConnectReturnCode::Success));
    assert_eq!(node.metric("fleet_cluster_revocations_received_total").await, 1.0);
    // Control: a real revocation, announced the same way, is applied (the registry confirms).
    fleet.revoke(1).await;
    peer.publish_with_headers(
        "fleet.r",
        bus::from_node(),
        format!("{} {}", fleet.id(1), {
            let st = fleet.station().await;
            st.show(&fleet_provision::DeviceId::parse(&fleet.id(1)).unwrap()).await.unwrap().certificates[0]
                .serial
                .to_hex()
        })
        .into(),
    )
    .await
    .unwrap();
    peer.flush().await.unwrap();
    assert!(other.closed_within(PATIENCE).await, "a confirmed revocation did not cut");
}

/// The command queue is the cluster's: a command a service on node 2 sends to a device that is
/// offline is delivered when the device connects to node 1, and the service on node 2 sees
/// queued → delivered → acknowledged (issue 16).
#[tokio::test]
async fn a_command_queued_on_one_node_reaches_its_device_on_another_and_the_status_comes_back() {
    let cluster = Cluster::builder().devices(1).nodes(2).start().await;
    let (fleet, nats) = (&cluster.fleet, &cluster.nats);
    let [node1, node2] = &cluster.nodes[..] else { unreachable!("two nodes") };
    let id = fleet.id(0);

    let mut svc = Raw::device(node2.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut svc, "status/devices/+/commands/#", 1).await;
    bus::wait_subscription(nats, "fleet.t.status.devices.*.commands.>", true).await;
    let mut cmd = Publish::new(format!("devices/{id}/commands/blink"), QoS::AtLeastOnce, b"3".to_vec());
    cmd.pkid = 5;
    svc.send(Packet::Publish(cmd)).await.unwrap();
    let mut statuses = Vec::new();
    let mut acked = false;
    let t = Instant::now();
    // The PUBACK (stored) and the `queued` status, in either order.
    while !(acked && statuses.len() == 1) && t.elapsed() < PATIENCE {
        match svc.recv(PATIENCE).await {
            Some(Packet::PubAck(a)) if a.pkid == 5 => acked = true,
            Some(Packet::Publish(p)) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                statuses.push(v["status"].as_str().unwrap().to_owned());
            }
            _ => {}
        }
    }
    assert!(acked, "the command was not stored");
    assert_eq!(statuses, ["queued"]);

    // The device wakes up on the other node.
    let mut dev = Raw::device(node1.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut dev, &format!("devices/{id}/commands/#"), 1).await;
    let got = next_publish(&mut dev, PATIENCE).await.expect("the queued command never came");
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (format!("devices/{id}/commands/blink").as_str(), &b"3"[..])
    );
    dev.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(got.pkid))).await.unwrap();

    let t = Instant::now();
    while statuses.len() < 3 && t.elapsed() < PATIENCE {
        if let Some(p) = next_publish(&mut svc, Duration::from_millis(500)).await {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            statuses.push(v["status"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(statuses, ["queued", "delivered", "acknowledged"]);
    // Settled for every node: a new session on node 2 gets nothing.
    drop(dev);
    let mut again = Raw::device(node2.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&again.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut again, &format!("devices/{id}/commands/#"), 1).await;
    assert!(next_publish(&mut again, Duration::from_millis(800)).await.is_none(), "delivered twice");
}

#[tokio::test]
async fn the_admin_api_on_one_node_sees_and_revokes_a_device_on_another() {
    use common::admin::{conforms, operator, Client};
    // The nodes start once the operator exists.
    let cluster = Cluster::builder().devices(2).nodes(0).start().await;
    let fleet = &cluster.fleet;
    let alice = operator(fleet, "alice").await;
    let node1 = cluster.node("n1", &["--admin-listen", "127.0.0.1:0"]);
    let node2 = cluster.node("n2", &[]);
    let api = Client::new(&node1, fleet, Some(&alice));
    let id = fleet.id(0);

    // The device and a refused connection are on node 2; node 1 serves the API.
    let mut dev = Raw::device(node2.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let mut wrong = Raw::device(node2.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&wrong.mqtt_connect("not-me", 30).await), Some(ConnectReturnCode::BadClientId));

    let (code, s) = api.get("/api/v1/summary");
    assert_eq!(code, 200, "{s}");
    conforms("Summary", &s);
    assert_eq!(s["sessions_live"], 1, "{s}");
    assert_eq!(s["nodes"].as_array().unwrap().len(), 2, "both nodes answered: {s}");
    assert_eq!(
        (s["admitted"].as_u64(), s["refused"]["client_id_mismatch"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    let (_, page) = api.get("/api/v1/devices");
    conforms("DevicePage", &page);
    assert_eq!(
        page["devices"].as_array().unwrap().iter().find(|d| d["device"] == id.as_str()).unwrap()["online"],
        true
    );
    let (_, d) = api.get(&format!("/api/v1/devices/{id}"));
    conforms("Device", &d);
    assert_eq!(d["session"]["node"], node2.mqtt.to_string(), "{d}");
    assert_eq!(d["events"][0]["kind"], "admitted", "{d}");

    // Revoked through node 1: node 2 cuts it at once (timed from the answer: the commit).
    let (code, r) =
        api.call("POST", &format!("/api/v1/devices/{id}/revoke"), Some(br#"{"reason":"keyCompromise"}"#));
    let t = Instant::now();
    assert_eq!(code, 200, "{r}");
    assert!(dev.closed_within(PATIENCE).await, "node 2 did not cut the session");
    assert!(t.elapsed() < LATENCY_BOUND, "node 2 cut the session {:?} after the commit", t.elapsed());
    let (_, d) = api.get(&format!("/api/v1/devices/{id}"));
    assert!(d["session"].is_null(), "{d}");
    assert!(
        d["events"].as_array().unwrap().iter().any(|e| e["kind"] == "closed" && e["reason"] == "revoked"),
        "{d}"
    );
}

#[tokio::test]
async fn malformed_flooded_and_garbage_answered_admin_questions_leave_the_views_right() {
    use common::admin::{operator, Client};
    use futures_util::StreamExt;
    // The nodes start once the operator exists.
    let cluster = Cluster::builder().devices(1).nodes(0).start().await;
    let (fleet, nats) = (&cluster.fleet, &cluster.nats);
    let alice = operator(fleet, "alice").await;
    let node1 = cluster.node("n1", &["--admin-listen", "127.0.0.1:0"]);
    let node2 = cluster.node("n2", &[]);
    let id = fleet.id(0);
    let mut dev = Raw::device(node2.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));

    // A node's identity floods the question subject: garbage, no reply subject, oversized, and
    // a valid question replayed; and it answers every question with garbage.
    let peer = bus::client(nats, "n3").await;
    let mut garbage_answers = peer.subscribe("fleet.admin.q").await.unwrap();
    let answerer = peer.clone();
    let liar = tokio::spawn(async move {
        while let Some(m) = garbage_answers.next().await {
            if let Some(to) = m.reply {
                let _ = answerer.publish_with_headers(to, bus::from_node(), "{not json".into()).await;
            }
        }
    });
    let inbox = peer.new_inbox();
    let mut answers = peer.subscribe(inbox.clone()).await.unwrap();
    for i in 0..2000u32 {
        let body: Vec<u8> = match i % 4 {
            0 => b"\xff\x00garbage".to_vec(),
            1 => vec![b'{'; 70_000],
            2 => br#"{"minutes":1,"devices":[],"detail":false}"#.to_vec(),
            _ => br#"{"minutes":"x"}"#.to_vec(),
        };
        if i % 8 == 2 {
            peer.publish_with_headers("fleet.admin.q", bus::from_node(), body.into()).await.unwrap();
        // no reply subject
        } else {
            peer.publish_with_reply_and_headers(
                "fleet.admin.q",
                inbox.clone(),
                bus::from_node(),
                body.into(),
            )
            .await
            .unwrap();
        }
    }
    peer.flush().await.unwrap();
    // Only the valid questions (with a reply subject) got the nodes' answers: 250 per node,
    // two nodes (the rest of the inbox is the liar's garbage).
    let mut n = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), answers.next()).await {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
            assert!(v["node"].is_string(), "{v}");
            n += 1;
        }
    }
    assert_eq!(n, 2 * 250, "answers to 250 valid questions from 2 nodes");

    // The views are still right: the liar's answers are dropped, the device is on node 2.
    let api = Client::new(&node1, fleet, Some(&alice));
    let (code, s) = api.get("/api/v1/summary");
    assert_eq!(code, 200, "{s}");
    assert_eq!((s["sessions_live"].as_u64(), s["nodes"].as_array().map(Vec::len)), (Some(1), Some(2)), "{s}");
    let (_, d) = api.get(&format!("/api/v1/devices/{id}"));
    assert_eq!(d["session"]["node"], node2.mqtt.to_string(), "{d}");
    dev.send(Packet::PingReq).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PingResp)), "session cut");
    liar.abort();
}
