//! The cluster bus (NATS) as a trust boundary (issue 25): nats-server runs the configuration
//! fleetgate ships (`deploy/nats/nats-server.conf`: TLS, certificates mapped to users,
//! per-user permissions), and every attack is a well-formed message, not garbage.
//!
//! - Outsiders (no TLS, no certificate, a device's certificate) do not get onto the bus; the
//!   backend's stream reader may read the stream and nothing else: its forged CSR, telemetry,
//!   command, claim, revocation and admin question are refused by nats-server and reach no one.
//! - A node's identity (a compromised or buggy node) still cannot make another node hand its
//!   subscribers (the issuer among them) a message whose origin could not have published it.
//! - A node refuses an unprotected bus unless told it is insecure; credentials in the URL are
//!   used, and never printed.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};

/// The issuer's MQTT session on `node`, subscribed where the online issuer listens: whatever
/// reaches it, `fleet-provision serve` would answer (certify a key, mint a device).
async fn issuer_on(fleet: &Fleet, node: &BrokerProc) -> Raw {
    let dir = fleet.dir.path().join("issuer");
    fleet.station().await.issuer_cert("issuer-1", &dir).await.unwrap();
    let mut issuer = Raw::device(node.mqtt, &dir).await.unwrap();
    assert_eq!(connack_code(&issuer.mqtt_connect("issuer-1", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut issuer, "devices/+/certs/csr", 1).await;
    subscribe(&mut issuer, "claims/+/+/certs/csr", 2).await;
    issuer
}

/// Publishes every forgery of `attempts` (subject, headers, the refusal it must meet) from
/// `peer`, then waits until `node` has counted each refusal.
async fn forge_all(
    peer: &async_nats::Client,
    node: &BrokerProc,
    attempts: &[(String, async_nats::HeaderMap, &str)],
    payload: bytes::Bytes,
) {
    for (subject, headers, _) in attempts {
        peer.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await.unwrap();
    }
    peer.flush().await.unwrap();
    for reason in ["not_from_node", "no_origin", "origin_denied"] {
        let n = attempts.iter().filter(|a| a.2 == reason).count() as f64;
        node.wait_metric(
            &format!("fleet_cluster_refused_total{{reason=\"{reason}\"}}"),
            n,
            Duration::from_secs(3),
        )
        .await;
    }
}

async fn serial_of(fleet: &Fleet, i: usize) -> String {
    let id = fleet_provision::DeviceId::parse(&fleet.id(i)).unwrap();
    fleet.station().await.show(&id).await.unwrap().certificates[0].serial.to_hex()
}

#[tokio::test]
async fn outsiders_are_refused_and_the_stream_reader_may_only_read() {
    let cluster = Cluster::builder().devices(2).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let mut issuer = issuer_on(fleet, node).await;
    let (id, victim) = (fleet.id(0), fleet.id(1));
    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut dev, &format!("devices/{id}/commands/#"), 1).await;
    bus::wait_subscription(nats, &format!("fleet.t.devices.{id}.commands.>"), true).await;
    bus::wait_subscription(nats, "fleet.t.devices.*.certs.csr", true).await;

    let _ = rustls::crypto::ring::default_provider().install_default();
    // No TLS, TLS without a certificate, a device's certificate: not on the bus.
    assert!(async_nats::connect(nats.url()).await.is_err(), "plain connection accepted");
    let trust = nats.identity("n1").join("broker-trust.pem");
    let no_cert = async_nats::ConnectOptions::new()
        .add_root_certificates(trust.clone())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(3))
        .connect(nats.url())
        .await;
    assert!(no_cert.is_err(), "TLS without a client certificate accepted");
    assert!(
        bus::client_with(nats, &fleet.devices[1], &trust).await.is_err(),
        "a device's certificate got onto the bus"
    );

    // The stream reader connects, and every well-formed forgery it tries is refused.
    let refusals = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = refusals.clone();
    let reader_dir = nats.identity(fleet_tests::READER);
    let reader = async_nats::ConnectOptions::new()
        .add_root_certificates(trust.clone())
        .add_client_certificate(reader_dir.join("cert.pem"), reader_dir.join("key.pem"))
        .require_tls(true)
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    let stored_before = nats.stream_messages("FLEET");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap();
    let csr = csr.der().to_vec();
    let mut stored = async_nats::HeaderMap::new();
    stored.insert("Fleet-Device", victim.as_str());
    stored.insert("Fleet-QoS", "1");
    stored.insert("Fleet-Received-At", "1700000000000");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let forgeries: Vec<(String, async_nats::HeaderMap, Vec<u8>)> = vec![
        // A CSR on a device's rotation topic and on a claim session's: the issuer would certify
        // the reader's key for the victim, or mint it a device.
        (
            format!("fleet.t.devices.{victim}.certs.csr"),
            bus::relayed_from(&format!("device 01 {victim}")),
            csr.clone(),
        ),
        ("fleet.t.claims.batch.0123456789abcdef.certs.csr".into(), bus::from_node(), csr),
        // Telemetry stored as the victim, a command and its "acknowledged" status.
        (format!("fleet.m.devices.{victim}.telemetry"), stored, b"t=99".to_vec()),
        (
            format!("fleet.t.devices.{id}.commands.unlock"),
            bus::relayed_from("service 01 backend"),
            b"now".to_vec(),
        ),
        (
            format!("fleet.t.status.devices.{id}.commands.unlock"),
            bus::relayed_from("broker"),
            br#"{"status":"acknowledged"}"#.to_vec(),
        ),
        // A newer session claim (cut the device) and a revocation (lock it out).
        (format!("fleet.s.{id}"), bus::from_node(), format!("{} 7", now + 1_000_000_000).into_bytes()),
        ("fleet.r".into(), bus::from_node(), format!("{id} {}", serial_of(fleet, 0).await).into_bytes()),
    ];
    for (subject, headers, payload) in &forgeries {
        reader.publish_with_headers(subject.clone(), headers.clone(), payload.clone().into()).await.unwrap();
    }
    // Reading every session's peer and serial: an admin question, and listening for them.
    let question = br#"{"minutes":1,"devices":[],"detail":true}"#.to_vec();
    let asked =
        tokio::time::timeout(Duration::from_secs(2), reader.request("fleet.admin.q", question.into())).await;
    assert!(!matches!(asked, Ok(Ok(_))), "the reader got an answer to an admin question");
    assert!(reader.subscribe("fleet.admin.q").await.is_ok()); // refused asynchronously, below
    reader.flush().await.unwrap();

    let t = Instant::now();
    while refusals.lock().unwrap().len() < forgeries.len() + 2 && t.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refusals.lock().unwrap().clone();
    for (subject, _, _) in &forgeries {
        assert!(
            refused
                .iter()
                .any(|r| r.to_lowercase().contains("permissions violation") && r.contains(subject.as_str())),
            "publish to {subject} was not refused: {refused:?}"
        );
    }
    assert!(
        refused.iter().any(|r| r.to_lowercase().contains("permissions violation for subscription")),
        "{refused:?}"
    );
    // And nothing reached anyone: no CSR at the issuer, no command at the device, the device's
    // session alive and not revoked, nothing stored.
    assert!(next_publish(&mut issuer, Duration::from_millis(500)).await.is_none(), "the issuer got a CSR");
    assert!(next_publish(&mut dev, Duration::from_millis(200)).await.is_none(), "the device got a command");
    dev.send(Packet::PingReq).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PingResp)), "session cut");
    assert_eq!(nats.stream_messages("FLEET"), stored_before, "the reader stored a message");

    // What it may do: fetch from the consumer the nodes made for it (cluster_ha runs the
    // example consumer end to end). It may not make or change a consumer (a push consumer
    // delivering onto the nodes' subjects), nor reach the nodes' SQL-sink consumer, nor name a
    // reply subject that lands in the nodes' account (a stored subject: re-stored forever).
    let fetch = |consumer: &str, reply: String, within: Duration| {
        let reader = reader.clone();
        let subject = format!("$JS.API.CONSUMER.MSG.NEXT.FLEET.{consumer}");
        async move {
            let mut sub = reader.subscribe(reply.clone()).await.unwrap();
            reader
                .publish_with_reply(subject, reply, r#"{"batch":1,"expires":1000000000}"#.into())
                .await
                .unwrap();
            reader.flush().await.unwrap();
            tokio::time::timeout(within, futures_util::StreamExt::next(&mut sub)).await.ok().flatten()
        }
    };
    // Two stored messages for it to read.
    for pkid in [1, 2] {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            format!("devices/{id}/telemetry"),
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            b"t=20".to_vec(),
        );
        p.pkid = pkid;
        dev.send(Packet::Publish(p)).await.unwrap();
        assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PubAck(a)) if a.pkid == pkid));
    }
    let got =
        fetch("analytics", reader.new_inbox(), PATIENCE).await.expect("no answer from its own consumer");
    assert!(got.status.is_none() && got.reply.is_some(), "not a stored message: {got:?}");
    assert_eq!(&got.payload[..], b"t=20");
    let before = nats.stream_messages("FLEET");
    let _ = fetch("analytics", format!("fleet.m.devices.{victim}.telemetry"), Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nats.stream_messages("FLEET"), before, "a reply subject wrote into the stream");
    let js = async_nats::jetstream::new(reader.clone());
    let made = js
        .create_consumer_on_stream(
            async_nats::jetstream::consumer::push::Config {
                durable_name: Some("analytics-push".into()),
                deliver_subject: format!("fleet.s.{id}"),
                ..Default::default()
            },
            "FLEET",
        )
        .await;
    assert!(made.is_err(), "the reader made a consumer");
    assert!(
        fetch("fleet-sql-sink", reader.new_inbox(), Duration::from_secs(3)).await.is_none(),
        "the reader fetched from the SQL sink"
    );
}

/// Defence in depth: with a node's own identity (a compromised or buggy node), a message is
/// handed to another node's subscribers only if it carries `Fleet-Node` and an origin whose
/// publish ACL allows its topic. The issuer never sees a CSR on a device's topic from anyone
/// but that device, nor on a claim session's from anyone but that session.
#[tokio::test]
async fn a_node_hands_its_subscribers_only_what_the_origin_could_have_published() {
    let cluster = Cluster::builder().devices(2).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let mut issuer = issuer_on(fleet, node).await;
    bus::wait_subscription(nats, "fleet.t.devices.*.certs.csr", true).await;
    bus::wait_subscription(nats, "fleet.t.claims.*.*.certs.csr", true).await;
    let (id, victim) = (fleet.id(0), fleet.id(1));
    let peer = bus::client(nats, "n3").await;
    let csr = || bytes::Bytes::from_static(b"0\x82csr");
    let to_victim = format!("fleet.t.devices.{victim}.certs.csr");
    let to_claim = "fleet.t.claims.batch.0123456789abcdef.certs.csr";
    let attempts = [
        // No Fleet-Node: not a node's (a stored message pushed onto the subject looks so).
        (to_victim.clone(), async_nats::HeaderMap::new(), "not_from_node"),
        // From a node, but no origin: which client sent it is unknown.
        (to_victim.clone(), bus::from_node(), "no_origin"),
        // Another device's identity, a service's, the broker's, an operator's.
        (to_victim.clone(), bus::relayed_from(&format!("device 01 {id}")), "origin_denied"),
        (to_victim.clone(), bus::relayed_from("service 01 backend"), "origin_denied"),
        (to_victim.clone(), bus::relayed_from("broker"), "origin_denied"),
        (to_victim.clone(), bus::relayed_from(&format!("operator 01 {victim}")), "origin_denied"),
        // A claim session's topic from a device, and from another nonce of the claim.
        (to_claim.to_owned(), bus::relayed_from(&format!("device 01 {id}")), "origin_denied"),
        (to_claim.to_owned(), bus::relayed_from("claim 01 claims/batch/fedcba9876543210"), "origin_denied"),
    ];
    forge_all(&peer, node, &attempts, csr()).await;
    assert!(
        next_publish(&mut issuer, Duration::from_millis(300)).await.is_none(),
        "a forged CSR reached the issuer"
    );

    // Control: what a node relays for the device itself, and for the claim session itself,
    // reaches the issuer.
    peer.publish_with_headers(to_victim.clone(), bus::relayed_from(&format!("device 01 {victim}")), csr())
        .await
        .unwrap();
    peer.publish_with_headers(to_claim, bus::relayed_from("claim 01 claims/batch/0123456789abcdef"), csr())
        .await
        .unwrap();
    peer.flush().await.unwrap();
    let a = next_publish(&mut issuer, Duration::from_secs(3))
        .await
        .expect("the device's own CSR was not relayed");
    let b = next_publish(&mut issuer, PATIENCE).await.expect("the claim's own CSR was not relayed");
    let mut topics = [a.topic, b.topic];
    topics.sort();
    assert_eq!(
        topics,
        ["claims/batch/0123456789abcdef/certs/csr".to_owned(), format!("devices/{victim}/certs/csr")]
    );
}

/// The subjects that carry a shared subscription's messages between nodes (`fleet.g.<queue>.…`,
/// a hand-off of a member that left) and a node's answers on a service's Response Topic (origin
/// `reply <service>`) are held to the same checks: a node's identity forging a hand-off of
/// another device's telemetry, or a "reply" onto a device's commands or certificate answers,
/// reaches no member and no device; a well-formed hand-off from the device itself does (control).
#[tokio::test]
async fn forged_hand_offs_and_replies_reach_no_member_and_no_device() {
    let cluster = Cluster::builder().devices(2).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let (id, victim) = (fleet.id(0), fleet.id(1));
    // A backend in a shared group (a 3.1.1 client: shares are offered to it too), and the
    // victim device subscribed to its commands and certificate answers.
    let mut member = Raw::device(node.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&member.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut member, "$share/ingest/devices/+/telemetry", 1).await;
    let mut device = Raw::device(node.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&device.mqtt_connect(&victim, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut device, &format!("devices/{victim}/commands/#"), 1).await;
    subscribe(&mut device, &format!("devices/{victim}/certs/#"), 2).await;
    let queue = "ingest%2Fdevices%2F%2B%2Ftelemetry";
    bus::wait_subscription(nats, &format!("fleet.g.{queue}.>"), true).await;
    bus::wait_subscription(nats, &format!("fleet.t.devices.{victim}.commands.>"), true).await;

    let peer = bus::client(nats, "n3").await;
    let handoff = format!("fleet.g.{queue}.devices.{victim}.telemetry");
    let payload = || bytes::Bytes::from_static(b"forged");
    let attempts = [
        (handoff.clone(), async_nats::HeaderMap::new(), "not_from_node"),
        (handoff.clone(), bus::relayed_from(&format!("device 01 {id}")), "origin_denied"),
        (handoff.clone(), bus::relayed_from("broker"), "origin_denied"),
        // A "reply" onto the victim's telemetry: the broker answers only under `responses/`.
        (handoff.clone(), bus::relayed_from("reply backend"), "origin_denied"),
        // A hand-off whose subject names another group's queue: no topic for this group.
        (
            format!("fleet.g.other.devices.{victim}.telemetry"),
            bus::relayed_from(&format!("device 01 {victim}")),
            "none",
        ),
        // The broker answering a service, onto the victim's commands and certificate answers.
        (
            format!("fleet.t.devices.{victim}.commands.unlock"),
            bus::relayed_from("reply backend"),
            "origin_denied",
        ),
        (
            format!("fleet.t.devices.{victim}.certs.issued"),
            bus::relayed_from("reply backend"),
            "origin_denied",
        ),
        (
            format!("fleet.t.devices.{victim}.commands.unlock"),
            bus::relayed_from("reply ../backend"),
            "no_origin",
        ),
    ];
    forge_all(&peer, node, &attempts, payload()).await;
    assert!(
        next_publish(&mut member, Duration::from_millis(300)).await.is_none(),
        "a forged hand-off reached a member"
    );
    assert!(
        next_publish(&mut device, Duration::from_millis(300)).await.is_none(),
        "a forged reply reached the device"
    );

    // Control: a hand-off of the victim's own telemetry reaches the member.
    peer.publish_with_headers(handoff, bus::relayed_from(&format!("device 01 {victim}")), payload())
        .await
        .unwrap();
    peer.flush().await.unwrap();
    let p = next_publish(&mut member, PATIENCE).await.expect("the device's own hand-off did not arrive");
    assert_eq!(p.topic, format!("devices/{victim}/telemetry"));
}

/// A member joining and leaving a shared group in a loop (a backend's churn, or one that means
/// harm) does not pile up NATS subscriptions on its node: a set of the group's queue
/// subscriptions lingers after its last member leaves (so nothing the server already sent is
/// lost), but a group keeps at most two lingering sets.
#[tokio::test]
async fn joining_and_leaving_a_shared_group_in_a_loop_does_not_pile_up_subscriptions() {
    let cluster = Cluster::builder().start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let mut member = Raw::device(node.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&member.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    let filter = "$share/churn/devices/+/telemetry";
    let routed = "\"fleet.t.devices.*.telemetry\"";
    let count = || nats.monitor("/connz?subs=1").matches(routed).count();
    for i in 0..10u16 {
        subscribe(&mut member, filter, 2 * i + 1).await;
        let mut unsub = rumqttc::mqttbytes::v4::Unsubscribe::new(filter);
        unsub.pkid = 2 * i + 2;
        member.send(Packet::Unsubscribe(unsub)).await.unwrap();
        let t = Instant::now();
        while !matches!(member.recv(Duration::from_secs(1)).await, Some(Packet::UnsubAck(_))) {
            assert!(t.elapsed() < PATIENCE, "no UNSUBACK");
        }
    }
    // Each set holds one subscription on the filter's subject: at most the two lingering ones
    // (and never the ten made) until they fall idle.
    let t = Instant::now();
    while count() > 2 {
        assert!(t.elapsed() < PATIENCE, "{} subscriptions on {routed} after 10 joins and leaves", count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The group still works: a member that joins again gets the fleet's telemetry.
    subscribe(&mut member, filter, 100).await;
    bus::wait_subscription(nats, "fleet.t.devices.*.telemetry", true).await;
    let mut device = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    let id = fleet.id(0);
    assert_eq!(connack_code(&device.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let mut p = rumqttc::mqttbytes::v4::Publish::new(
        format!("devices/{id}/telemetry"),
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        "21.5",
    );
    p.pkid = 1;
    device.send(Packet::Publish(p)).await.unwrap();
    let got = next_publish(&mut member, PATIENCE).await.expect("the group still delivers");
    assert_eq!(got.topic, format!("devices/{id}/telemetry"));
}

#[tokio::test]
async fn a_node_refuses_an_unprotected_bus_uses_url_credentials_and_never_prints_them() {
    let pg = fleet_tests::PgCluster::start();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    let db = fleet.db.clone().unwrap();
    let open = fleet_tests::NatsServer::start_open_with(&["-js", "--user", "node", "--pass", "s3cret-pw"]);
    let check = |args: &[String]| {
        let out = std::process::Command::new(broker_bin())
            .arg("--home")
            .arg(fleet.home())
            .args(["--database-url", &db])
            .args(args)
            .arg("check-config")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let with_creds = format!("nats://node:s3cret-pw@127.0.0.1:{}", open.port);
    // No TLS and no identity; an identity but no TLS: refused, with what to do.
    let (ok, _, err) = check(&["--nats".into(), format!("nats://127.0.0.1:{}", open.port)]);
    assert!(!ok && err.contains("neither TLS nor a client identity") && err.contains("node-cert"), "{err}");
    let (ok, out, err) = check(&["--nats".into(), with_creds.clone()]);
    assert!(!ok && err.contains("no TLS"), "{err}");
    assert!(!out.contains("s3cret-pw") && !err.contains("s3cret-pw"), "{out}{err}");
    // Declared insecure: accepted, and the password is not printed.
    let insecure = ["--nats".to_owned(), with_creds.clone(), "--insecure-nats-no-auth".into(), "true".into()];
    let (ok, out, err) = check(&insecure);
    assert!(ok, "{err}");
    assert!(out.contains("node:***@127.0.0.1") && !out.contains("s3cret-pw"), "{out}");

    // The credentials in the URL are used: the node joins a server that requires them (before,
    // async-nats dropped them: "authorization violation").
    let args: Vec<&str> = insecure.iter().map(String::as_str).collect();
    let node = BrokerProc::start(&fleet, &args);
    node.wait_metric("fleet_cluster_connected", 1.0, Duration::from_secs(5)).await;
    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    let log = node.log();
    assert!(log.contains("insecure_nats_no_auth"), "no warning at start:\n{log}");
    assert!(!log.contains("s3cret-pw"), "the password is in the log:\n{log}");
    // NATS's token form (`nats://<token>@host`) is used too, and never printed.
    let tokened = fleet_tests::NatsServer::start_open_with(&["-js", "--auth", "t0ken-s3cret"]);
    let url = format!("nats://t0ken-s3cret@127.0.0.1:{}", tokened.port);
    let (ok, out, err) =
        check(&["--nats".into(), url.clone(), "--insecure-nats-no-auth".into(), "true".into()]);
    assert!(ok && !out.contains("t0ken-s3cret") && out.contains("nats://***@127.0.0.1"), "{out}{err}");
    let with_token = BrokerProc::start(&fleet, &["--nats", &url, "--insecure-nats-no-auth", "true"]);
    with_token.wait_metric("fleet_cluster_connected", 1.0, Duration::from_secs(5)).await;
    assert!(!with_token.log().contains("t0ken-s3cret"), "the token is in the log");
    // A wrong password is refused by the server, and said so.
    let wrong = format!("nats://node:wrong@127.0.0.1:{}", open.port);
    let out = std::process::Command::new(broker_bin())
        .arg("--home")
        .arg(fleet.home())
        .args([
            "--database-url",
            &db,
            "--nats",
            &wrong,
            "--insecure-nats-no-auth",
            "true",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.to_lowercase().contains("authorization"), "{err}");
    assert!(!err.contains("wrong@"), "{err}");
}

/// A CSR for a device's key that reaches the issuer on the device's topic is certified only if
/// the broker that relayed it stamped it with a certificate in force of that device (the
/// `fleetgate-origin` line, docs/spec/rotation.md): after `rotate X`, a CSR for the attacker's
/// key relayed on X's topic without the stamp, or stamped with another device's certificate, is
/// refused (`unbound`), not certified.
#[tokio::test]
async fn the_issuer_certifies_only_csrs_bound_to_the_askers_certificate() {
    let cluster = Cluster::builder().devices(2).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let db = fleet.db.clone().unwrap();
    let (x, y) = (fleet.id(0), fleet.id(1));
    let identity = fleet.dir.path().join("issuer");
    fleet.station().await.issuer_cert("issuer-1", &identity).await.unwrap();
    let bins = fleet_tests::workspace_bin_dir(&["fleet-provision"]);
    let provision = |args: &[&str]| {
        let mut c = std::process::Command::new(bins.join("fleet-provision"));
        c.arg("--home").arg(fleet.home()).args(["--database-url", &db]).args(args);
        c
    };
    let log = fleet.dir.path().join("issuer.log");
    let mut issuer = provision(&[
        "serve",
        "--identity",
        identity.to_str().unwrap(),
        "--port",
        &node.port(),
        "--tick",
        "1s",
    ])
    .env("RUST_LOG", "info")
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("issuer connected") {
        assert!(t.elapsed() < Duration::from_secs(10), "issuer did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus::wait_subscription(nats, "fleet.t.devices.*.certs.csr", true).await;
    // X is due: an operator asked it to rotate.
    assert!(provision(&["rotate", &x]).output().unwrap().status.success());
    let mut svc = Raw::device(node.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut svc, &format!("devices/{x}/certs/+"), 1).await;
    bus::wait_subscription(nats, &format!("fleet.t.devices.{x}.certs.*"), true).await;

    let attacker = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, x.as_str());
    let csr = params.serialize_request(&attacker).unwrap().der().to_vec();
    let stamped = |serial: &str| {
        let mut p = format!("fleetgate-origin {serial}\n").into_bytes();
        p.extend_from_slice(&csr);
        p
    };
    let peer = bus::client(nats, "n3").await;
    let subject = format!("fleet.t.devices.{x}.certs.csr");
    let origin = bus::relayed_from(&format!("device 01 {x}"));
    for payload in [csr.clone(), stamped(&serial_of(fleet, 1).await)] {
        peer.publish_with_headers(subject.clone(), origin.clone(), payload.into()).await.unwrap();
        peer.flush().await.unwrap();
        let (topic, body) = issuer_answer(&mut svc).await;
        assert_eq!(topic, format!("devices/{x}/certs/rejected"), "{}", String::from_utf8_lossy(&body));
        assert!(body.starts_with(b"unbound:"), "{}", String::from_utf8_lossy(&body));
    }
    let _ = y;
    // Nothing was issued for X.
    let st = fleet.station().await;
    assert_eq!(st.show(&fleet_provision::DeviceId::parse(&x).unwrap()).await.unwrap().certificates.len(), 1);
    let _ = issuer.kill();
    let _ = issuer.wait();
}

/// The issuer's next answer (`certs/issued` or `certs/rejected`) that `svc` sees.
async fn issuer_answer(svc: &mut Raw) -> (String, Vec<u8>) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        match next_publish(svc, Duration::from_secs(5)).await {
            Some(p) if p.topic.ends_with("/certs/rejected") || p.topic.ends_with("/certs/issued") => {
                return (p.topic, p.payload.to_vec())
            }
            _ => {}
        }
    }
    panic!("the issuer did not answer");
}

/// A node may present an nkey instead of a certificate (`nats_nkey`: a file with its seed):
/// it joins a server that lists the public key, and without the seed it is refused.
#[tokio::test]
async fn a_node_joins_with_its_nkey_and_not_without() {
    let pg = fleet_tests::PgCluster::start();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    let user = nkeys::KeyPair::new_user();
    let conf = fleet.dir.path().join("nkey.conf");
    std::fs::write(&conf, format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key()))
        .unwrap();
    let seed = fleet.dir.path().join("node.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let nats = fleet_tests::NatsServer::start_open_with(&["-c", conf.to_str().unwrap()]);
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let node = BrokerProc::start(
        &fleet,
        &["--nats", &url, "--nats-nkey", seed.to_str().unwrap(), "--insecure-nats-no-auth", "true"],
    );
    node.wait_metric("fleet_cluster_connected", 1.0, Duration::from_secs(5)).await;
    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    // Without the seed the server refuses the node, and the node says so.
    let out = std::process::Command::new(broker_bin())
        .arg("--home")
        .arg(fleet.home())
        .args([
            "--database-url",
            fleet.db.as_deref().unwrap(),
            "--nats",
            &url,
            "--insecure-nats-no-auth",
            "true",
        ])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.to_lowercase().contains("authorization"), "{err}");
}

/// The NATS queue of `$share/<group>/<filter>` (docs/spec/nats-subjects.md: the level encoding
/// of `<group>/<filter>` as one token).
fn queue_of(group: &str, filter: &str) -> String {
    let mut out = String::new();
    for b in format!("{group}/{filter}").bytes() {
        match b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            true => out.push(char::from(b)),
            false => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A hand-off names its group's queue and a topic: a node's identity forging one whose topic
/// the group's filter does not match (another device's telemetry, which that device did
/// publish) reaches no member: a device in its own group never reads another device's data
/// through it. The same device's own topic under the filter does (control).
#[tokio::test]
async fn a_hand_off_outside_its_group_s_filter_reaches_no_member() {
    let cluster = Cluster::builder().devices(2).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let (id, other) = (fleet.id(0), fleet.id(1));
    let mut member = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&member.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let filter = format!("devices/{id}/#");
    subscribe(&mut member, &format!("$share/g/{filter}"), 1).await;
    let queue = queue_of("g", &filter);
    bus::wait_subscription(nats, &format!("fleet.g.{queue}.>"), true).await;

    let peer = bus::client(nats, "n3").await;
    let forged = format!("fleet.g.{queue}.devices.{other}.telemetry");
    peer.publish_with_headers(forged, bus::relayed_from(&format!("device 01 {other}")), "theirs".into())
        .await
        .unwrap();
    peer.flush().await.unwrap();
    node.wait_metric("fleet_cluster_refused_total{reason=\"bad_subject\"}", 1.0, Duration::from_secs(3))
        .await;
    assert!(
        next_publish(&mut member, Duration::from_millis(300)).await.is_none(),
        "another device's telemetry reached a member through its group"
    );

    // Control: the member's own topic, under the group's filter, is handed to it.
    let own = format!("fleet.g.{queue}.devices.{id}.telemetry");
    peer.publish_with_headers(own, bus::relayed_from(&format!("device 01 {id}")), "mine".into())
        .await
        .unwrap();
    peer.flush().await.unwrap();
    let p = next_publish(&mut member, PATIENCE).await.expect("the group's own hand-off did not arrive");
    assert_eq!(p.topic, format!("devices/{id}/telemetry"));
}

/// A group name is the client's to choose, and it becomes part of NATS subjects: a device
/// joining a group with a very long name neither takes its node off the bus (the NATS server
/// closes a connection that sends it a control line over its limit) nor stops the node's
/// other subscribers from getting their messages. The group counts with its filter against
/// `max_topic_length` (refused: 0x80); under a limit raised too far for NATS's subjects, the
/// node keeps the group to itself rather than send the server a line it refuses.
#[tokio::test]
async fn a_very_long_group_name_takes_no_node_off_the_bus() {
    // With the default max_topic_length (a cluster member refuses to start above 640, where
    // its subjects could outgrow the control line: `config::tests`).
    let cluster = Cluster::builder().devices(2).nodes(2).start().await;
    let (fleet, nats) = (&cluster.fleet, &cluster.nats);
    let (node, other) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (id, id2) = (fleet.id(0), fleet.id(1));
    // A service on the attacked node reads device 2's telemetry, published on the other node.
    let mut svc = Raw::device(node.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut svc, &format!("devices/{id2}/telemetry"), 1).await;
    bus::wait_subscription(nats, &format!("fleet.t.devices.{id2}.telemetry"), true).await;

    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let share = |group_len: usize| rumqttc::mqttbytes::v4::SubscribeFilter {
        path: format!("$share/{}/devices/{id}/telemetry", ".".repeat(group_len)),
        qos: rumqttc::mqttbytes::QoS::AtLeastOnce,
    };
    use rumqttc::mqttbytes::v4::SubscribeReasonCode as Code;
    // (Each in a packet of its own: 4 KiB is the largest the broker takes.)
    for (pkid, group_len, code) in
        [(1, 3000, Code::Failure), (2, 200, Code::Success(rumqttc::mqttbytes::QoS::AtLeastOnce))]
    {
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new_many([share(group_len)]);
        sub.pkid = pkid;
        dev.send(Packet::Subscribe(sub)).await.unwrap();
        let Some(Packet::SubAck(ack)) = dev.recv(PATIENCE).await else { panic!("no SUBACK") };
        assert_eq!(ack.return_codes, [code], "a group of {group_len} bytes");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(node.metric("fleet_cluster_connected").await, 1.0, "the node lost the bus");
    let mut pubr = Raw::device(other.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&pubr.mqtt_connect(&id2, 30).await), Some(ConnectReturnCode::Success));
    let mut p = rumqttc::mqttbytes::v4::Publish::new(
        format!("devices/{id2}/telemetry"),
        rumqttc::mqttbytes::QoS::AtMostOnce,
        "still here",
    );
    p.pkid = 0;
    for _ in 0..3 {
        pubr.send(Packet::Publish(p.clone())).await.unwrap();
        if next_publish(&mut svc, Duration::from_secs(2)).await.is_some() {
            return;
        }
    }
    panic!("the attacked node's subscriber gets nothing from the other node");
}

/// The NATS server's count of subscriptions (all connections).
fn nats_subscriptions(nats: &fleet_tests::NatsServer) -> u64 {
    let body: String = nats.monitor("/subsz").chars().filter(|c| !c.is_whitespace()).collect();
    let at = body.find("\"num_subscriptions\":").expect("subsz") + "\"num_subscriptions\":".len();
    body[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

/// A device joining and leaving a shared group in a loop (on a topic no one publishes) leaves
/// the node no subscriptions behind: the NATS server's count comes back to where it was once
/// the lingering ends, however many times the device did it.
#[tokio::test]
async fn a_member_joining_and_leaving_in_a_loop_piles_up_no_subscriptions() {
    let cluster = Cluster::builder().devices(1).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let id = fleet.id(0);
    let mut dev = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut dev, &format!("devices/{id}/commands/#"), 1).await;
    bus::wait_subscription(nats, &format!("fleet.t.devices.{id}.commands.>"), true).await;
    let before = nats_subscriptions(nats);
    const LOOPS: u16 = 100;
    for i in 0..LOOPS {
        let group = format!("g{}", i % 3);
        let filter = format!("$share/{group}/devices/{id}/quiet");
        subscribe(&mut dev, &filter, 2 * i + 2).await;
        let mut u = rumqttc::mqttbytes::v4::Unsubscribe::new(filter);
        u.pkid = 2 * i + 3;
        dev.send(Packet::Unsubscribe(u)).await.unwrap();
        assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::UnsubAck(_))), "no UNSUBACK");
    }
    let t = Instant::now();
    loop {
        let now = nats_subscriptions(nats);
        if now <= before {
            break;
        }
        assert!(t.elapsed() < PATIENCE, "{now} NATS subscriptions, {before} before {LOOPS} joins and leaves");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.wait_metric_at_most("fleet_cluster_share_subscriptions", 0.0, Duration::from_secs(5)).await;
}
