//! fleet-broker end to end: real clients (rumqttc, mosquitto_pub/sub, a raw TLS client) against
//! the real binary on loopback port 0.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use fleet_provision::pki::{self, LoadedCa};
use fleet_provision::{DeviceId, Role, SerialNumber};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use time::OffsetDateTime;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn rumqttc_publishes_qos0_and_qos1_and_rows_are_stored() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let (client, mut ev) =
        rumqttc::AsyncClient::new(rumqttc_options(&fleet.devices[0], &id, broker.mqtt), 10);
    rumqttc_connected(&mut ev).await.unwrap();
    let topic = format!("devices/{id}/telemetry");
    client.publish(&topic, rumqttc::QoS::AtMostOnce, false, b"qos0".to_vec()).await.unwrap();
    client.publish(&topic, rumqttc::QoS::AtLeastOnce, false, b"qos1".to_vec()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), ev.poll()).await.unwrap().unwrap();
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e {
            break;
        }
        assert!(Instant::now() < deadline, "no PUBACK");
    }
    // PUBACK means committed: the QoS 1 row is there now.
    let rows = fleet.telemetry_rows(&id).await;
    assert!(rows.contains(&(topic.clone(), b"qos1".to_vec())), "{rows:?}");
    // QoS 0 is stored too (asynchronously).
    broker.wait_metric("fleet_messages_stored_total", 2.0, Duration::from_secs(5)).await;
    assert!(fleet.telemetry_rows(&id).await.contains(&(topic, b"qos0".to_vec())));
    assert_eq!(broker.metric("fleet_handshakes_total{outcome=\"accepted\"").await, 1.0);
}

#[tokio::test]
async fn mosquitto_clients_publish_and_a_service_subscribes() {
    let pubbin = fleet_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let subbin = fleet_tests::require_program("mosquitto_sub", "mosquitto-clients");
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (d, svc) = (&fleet.devices[0], &fleet.service);
    let id = fleet.id(0);
    // Line-buffered: `-d` lines go through stdio, block-buffered into a pipe otherwise.
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(subbin)
        .args(["-h", "localhost", "-p", &broker.port(), "--cafile", s(&svc.join("broker-trust.pem"))])
        .args(["--cert", s(&svc.join("cert.pem")), "--key", s(&svc.join("key.pem")), "-i", "backend"])
        .args(["-t", "devices/+/telemetry", "-C", "1", "-v", "-W", "60", "-d"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Publish once the subscription is in place (`-d` prints the SUBACK).
    let lines = lines_of(sub.stdout.take().unwrap());
    wait_line(&lines, "SUBACK", |l| l.contains("received SUBACK"));
    let out = Command::new(pubbin)
        .args(["-h", "localhost", "-p", &broker.port(), "--cafile", s(&d.join("broker-trust.pem"))])
        .args(["--cert", s(&d.join("cert.pem")), "--key", s(&d.join("key.pem")), "-i", &id])
        .args(["-t", &format!("devices/{id}/telemetry"), "-m", "{\"temp\":21.5}", "-q", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    let want = format!("devices/{id}/telemetry {{\"temp\":21.5}}");
    wait_line(&lines, "the message", |l| l == want);
    assert!(sub.wait().unwrap().success(), "mosquitto_sub failed");
    assert_eq!(fleet.telemetry_rows(&id).await.len(), 1);
}

/// Issues a certificate from the fleet's device CA with a custom profile (for refusal tests).
fn forge(fleet: &Fleet, id: &str, tweak: impl FnOnce(&mut rcgen::CertificateParams), dir: &Path) {
    let home = fleet.home();
    let ca_pem = std::fs::read_to_string(home.join("device-ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(home.join("private/device-ca.key")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, id);
    p.subject_alt_names = vec![rcgen::SanType::URI(format!("urn:fleetgate:device:{id}").try_into().unwrap())];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    tweak(&mut p);
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::copy(fleet.devices[0].join("broker-trust.pem"), dir.join("broker-trust.pem")).unwrap();
}

/// Connects with `dir`'s identity and expects a refusal counted under `reason`.
async fn expect_refused(broker: &BrokerProc, dir: &Path, client_id: &str, reason: Refusal) {
    let metric = refused(reason);
    let before = broker.metric(&metric).await;
    let accepted_before = broker.metric("fleet_handshakes_total{outcome=\"accepted\"").await;
    if let Ok(mut raw) = Raw::device(broker.mqtt, dir).await {
        // TLS 1.3: a refused client certificate surfaces on the first read.
        let reply = raw.mqtt_connect(client_id, 30).await;
        let code = connack_code(&reply);
        assert!(code.is_none() || code != Some(ConnectReturnCode::Success), "{reason}: admitted ({reply:?})");
    }
    broker.wait_metric(&metric, before + 1.0, Duration::from_secs(5)).await;
    let accepted = broker.metric("fleet_handshakes_total{outcome=\"accepted\"").await;
    assert_eq!(accepted, accepted_before, "{reason}: something was admitted");
}

#[tokio::test]
async fn refusal_matrix() {
    let fleet = Fleet::new(3, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let base = fleet.dir.path().join("forged");
    let now = OffsetDateTime::now_utc();

    // No client certificate at all.
    let cfg = client_config(&fleet.devices[0].join("broker-trust.pem"), None);
    let before = broker.metric(&refused(Refusal::NoCertificate)).await;
    if let Ok(mut raw) = Raw::connect(broker.mqtt, cfg).await {
        assert!(connack_code(&raw.mqtt_connect("x", 30).await).is_none());
    }
    broker.wait_refused(Refusal::NoCertificate, before + 1.0, Duration::from_secs(5)).await;

    // Expired and not yet valid.
    let d = base.join("expired");
    forge(
        &fleet,
        "dev-expired",
        |p| {
            p.not_before = now - time::Duration::days(30);
            p.not_after = now - time::Duration::days(1);
        },
        &d,
    );
    expect_refused(&broker, &d, "dev-expired", Refusal::Expired).await;
    let d = base.join("future");
    forge(
        &fleet,
        "dev-future",
        |p| {
            p.not_before = now + time::Duration::days(30);
            p.not_after = now + time::Duration::days(60);
        },
        &d,
    );
    expect_refused(&broker, &d, "dev-future", Refusal::NotYetValid).await;

    // Unknown CA: a device of another fleet.
    // It trusts this broker, so the refusal is the broker's.
    let other = Fleet::new(1, None).await;
    let d = base.join("foreign");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(other.devices[0].join(f), d.join(f)).unwrap();
    }
    std::fs::copy(fleet.devices[0].join("broker-trust.pem"), d.join("broker-trust.pem")).unwrap();
    expect_refused(&broker, &d, &other.id(0), Refusal::UnknownCa).await;

    // A CA certificate used as a client.
    let d = base.join("ca");
    forge(&fleet, "dev-ca", |p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained), &d);
    expect_refused(&broker, &d, "dev-ca", Refusal::CaAsClient).await;

    // A server certificate used as a client: the real broker certificate (server CA, not trusted
    // for clients) and a serverAuth-only certificate from the device CA.
    let d = base.join("server");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(fleet.home().join("broker-tls/cert.pem"), d.join("cert.pem")).unwrap();
    std::fs::copy(fleet.home().join("broker-tls/key.pem"), d.join("key.pem")).unwrap();
    std::fs::copy(fleet.devices[0].join("broker-trust.pem"), d.join("broker-trust.pem")).unwrap();
    expect_refused(&broker, &d, "localhost", Refusal::WrongPurpose).await;
    let d = base.join("serverauth");
    forge(&fleet, "dev-sa", |p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth], &d);
    expect_refused(&broker, &d, "dev-sa", Refusal::WrongPurpose).await;
    // No extendedKeyUsage at all (webpki alone accepts it): refused the same way.
    let d = base.join("no-eku");
    forge(&fleet, "dev-noeku", |p| p.extended_key_usages = vec![], &d);
    expect_refused(&broker, &d, "dev-noeku", Refusal::WrongPurpose).await;

    // Signed by the device CA but never recorded in the registry.
    let d = base.join("unregistered");
    forge(&fleet, "dev-ghost", |_| {}, &d);
    expect_refused(&broker, &d, "dev-ghost", Refusal::UnknownDevice).await;

    // Revoked in the registry (the broker also reloads the fresh CRL; either path refuses).
    fleet.revoke(1).await;
    expect_refused(&broker, &fleet.devices[1], &fleet.id(1), Refusal::Revoked).await;

    // Every refusal was logged with its reason.
    let log = broker.log();
    for r in [
        Refusal::NoCertificate,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::UnknownCa,
        Refusal::CaAsClient,
        Refusal::WrongPurpose,
        Refusal::UnknownDevice,
        Refusal::Revoked,
    ] {
        assert!(log.contains(r.label()), "reason {r:?} not logged:\n{log}");
    }
}

#[tokio::test]
async fn client_id_binding() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    // Spoofing another device's id: CONNACK "identifier rejected".
    let (_c, mut ev) =
        rumqttc::AsyncClient::new(rumqttc_options(&fleet.devices[0], &fleet.id(1), broker.mqtt), 10);
    match rumqttc_connected(&mut ev).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadClientId)
        }
        other => panic!("spoofed client id admitted: {other:?}"),
    }
    broker.wait_refused(Refusal::ClientIdMismatch, 1.0, Duration::from_secs(5)).await;
    // An empty client id is assigned the certificate's id.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect("", 30).await), Some(ConnectReturnCode::Success));
    let topic = format!("devices/{}/telemetry", fleet.id(0));
    let mut p = Publish::new(&topic, QoS::AtLeastOnce, b"anon".to_vec());
    p.pkid = 7;
    raw.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::PubAck(a)) if a.pkid == 7));
    assert_eq!(fleet.telemetry_rows(&fleet.id(0)).await, vec![(topic, b"anon".to_vec())]);
    // A second connection of the same device replaces the first.
    let mut second = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&second.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    assert!(raw.closed_within(PATIENCE).await, "the replaced session must be closed");
    assert!(broker.log().contains("replaces the live session"));
    assert_eq!(broker.metric("fleet_sessions_live").await, 1.0);
    broker.wait_metric(&kicks(CloseReason::Takeover), 1.0, Duration::from_secs(2)).await;
    assert_eq!(broker.metric(&kicks(CloseReason::Revoked)).await, 0.0, "a takeover is not a revocation");
}

#[tokio::test]
async fn acl_confines_devices_and_routes_commands() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (a, b) = (fleet.id(0), fleet.id(1));
    let mut dev = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&a, 30).await), Some(ConnectReturnCode::Success));
    // Subscribing to another device's topics fails; its own commands succeed.
    let mut sub = Subscribe::new(format!("devices/{b}/commands/#"), QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.add(format!("devices/{a}/commands/#"), QoS::AtLeastOnce);
    sub.add("devices/+/telemetry".into(), QoS::AtMostOnce);
    dev.send(Packet::Subscribe(sub)).await.unwrap();
    match dev.recv(Duration::from_secs(5)).await {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // A service publishes a command; only the addressed device receives it.
    let (svc, mut sev) =
        rumqttc::AsyncClient::new(rumqttc_options(&fleet.service, "backend", broker.mqtt), 10);
    rumqttc_connected(&mut sev).await.unwrap();
    let poller = tokio::spawn(async move { while sev.poll().await.is_ok() {} });
    svc.publish(format!("devices/{a}/commands/reboot"), rumqttc::QoS::AtLeastOnce, false, b"now".to_vec())
        .await
        .unwrap();
    match dev.recv(Duration::from_secs(5)).await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic, format!("devices/{a}/commands/reboot"));
            assert_eq!(&p.payload[..], b"now");
        }
        other => panic!("command not delivered: {other:?}"),
    }
    // Publishing into another device's topic at QoS 1: no PUBACK, disconnected, nothing stored.
    let mut p = Publish::new(format!("devices/{b}/telemetry"), QoS::AtLeastOnce, b"forged".to_vec());
    p.pkid = 9;
    dev.send(Packet::Publish(p)).await.unwrap();
    assert!(dev.recv(Duration::from_secs(3)).await.is_none(), "ACL violation must not be acknowledged");
    assert!(fleet.telemetry_rows(&b).await.is_empty());
    assert_eq!(broker.metric("fleet_acl_denied_total{action=\"publish\"}").await, 1.0);
    assert_eq!(broker.metric("fleet_acl_denied_total{action=\"subscribe\"}").await, 2.0);
    poller.abort();
}

#[tokio::test]
async fn handshake_connect_keepalive_and_size_limits() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(
        &fleet,
        &["--handshake-timeout", "0.5", "--connect-timeout", "0.5", "--max-packet-size", "1024"],
    );
    // A socket that never handshakes is closed after the deadline.
    let mut idle = tokio::net::TcpStream::connect(broker.mqtt).await.unwrap();
    let mut b = [0u8; 1];
    let r =
        tokio::time::timeout(Duration::from_secs(3), tokio::io::AsyncReadExt::read(&mut idle, &mut b)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "idle socket not closed: {r:?}");
    broker.wait_refused(Refusal::HandshakeTimeout, 1.0, Duration::from_secs(3)).await;
    // TLS but no CONNECT.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(raw.closed_within(PATIENCE).await);
    broker.wait_refused(Refusal::ConnectTimeout, 1.0, Duration::from_secs(3)).await;
    // Keep-alive of 1 s: silent for 1.5 s → closed.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(0), 1).await), Some(ConnectReturnCode::Success));
    let t = Instant::now();
    assert!(raw.closed_within(PATIENCE).await);
    assert!(t.elapsed() >= Duration::from_millis(1400), "closed too early: {:?}", t.elapsed());
    // An oversized packet closes the session; nothing stored.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    let mut p = Publish::new(format!("devices/{}/telemetry", fleet.id(0)), QoS::AtLeastOnce, vec![0u8; 4000]);
    p.pkid = 1;
    raw.send(Packet::Publish(p)).await.unwrap();
    assert!(raw.recv(Duration::from_secs(3)).await.is_none());
    assert!(fleet.telemetry_rows(&fleet.id(0)).await.is_empty());
    broker.wait_metric(&protocol_errors(CloseReason::PacketTooLarge), 1.0, Duration::from_secs(3)).await;
    // Garbage instead of MQTT.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    raw.send_raw(&[0xff; 64]).await.unwrap();
    assert!(raw.closed_within(PATIENCE).await);
}

/// Connects a device and returns the time its session is cut after `revoke` runs.
async fn time_revocation_cut(fleet: &Fleet, broker: &BrokerProc, i: usize) -> Duration {
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[i]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(i), 30).await), Some(ConnectReturnCode::Success));
    fleet.revoke(i).await;
    let t = Instant::now(); // the registry has committed the revocation
    assert!(raw.closed_within(PATIENCE).await, "revoked session was not cut");
    t.elapsed()
}

/// The second admission of a device needs no registry query (the cache fed by the revocation
/// feed), and a revocation still refuses it as soon as the watcher reports it.
#[tokio::test]
async fn repeat_admissions_come_from_the_cache_and_revocation_still_refuses() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (hits, misses) =
        ("fleet_admission_cache_total{result=\"hit\"}", "fleet_admission_cache_total{result=\"miss\"}");
    let admit = || async {
        let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
        assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
        raw.send(Packet::Disconnect).await.unwrap();
    };
    // The cache answers once the revocation watcher's first poll succeeded (until then every
    // admission asks the registry): admit until the first hit, without guessing when that is.
    let t = Instant::now();
    while broker.metric(hits).await < 1.0 {
        assert!(t.elapsed() < PATIENCE, "no admission came from the cache");
        admit().await;
    }
    let missed = broker.metric(misses).await;
    assert!(missed >= 1.0, "the first admission asked nobody");
    admit().await;
    admit().await;
    assert_eq!(broker.metric(misses).await, missed, "a cached device went to the registry again");
    assert_eq!(broker.metric(hits).await, 3.0);
    fleet.revoke(0).await;
    broker.wait_metric("fleet_revocations_seen_total", 1.0, Duration::from_secs(2)).await;
    expect_refused_after_revoke(&broker, &fleet, 0).await;
}

#[tokio::test]
async fn revoke_while_connected_cuts_the_session_sqlite() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let took = time_revocation_cut(&fleet, &broker, 0).await;
    assert!(took < LATENCY_BOUND, "cut took {took:?}");
    broker.wait_metric(&kicks(CloseReason::Revoked), 1.0, Duration::from_secs(2)).await;
    // And it can never connect again.
    expect_refused_after_revoke(&broker, &fleet, 0).await;
    // The other device is untouched.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(1), 30).await), Some(ConnectReturnCode::Success));
}

async fn expect_refused_after_revoke(broker: &BrokerProc, fleet: &Fleet, i: usize) {
    if let Ok(mut raw) = Raw::device(broker.mqtt, &fleet.devices[i]).await {
        assert_ne!(connack_code(&raw.mqtt_connect(&fleet.id(i), 30).await), Some(ConnectReturnCode::Success));
    }
    broker.wait_refused(Refusal::Revoked, 1.0, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn revoke_cuts_sessions_on_every_node_postgres() {
    let pg = fleet_tests::PgCluster::start();
    let fleet = Fleet::new(2, Some(pg.create_database("fleet"))).await;
    let node1 = BrokerProc::start(&fleet, &[]);
    let node2 = BrokerProc::start(&fleet, &[]);
    let t1 = time_revocation_cut(&fleet, &node1, 0).await;
    let t2 = time_revocation_cut(&fleet, &node2, 1).await;
    assert!(t1 < LATENCY_BOUND && t2 < LATENCY_BOUND, "cuts took {t1:?} and {t2:?}");
    expect_refused_after_revoke(&node2, &fleet, 0).await;
    expect_refused_after_revoke(&node1, &fleet, 1).await;
}

/// The broker under the least-privilege PostgreSQL role from `fleet-provision db-roles`: it
/// admits, stores (PUBACK after the insert) and cuts revoked sessions, and the role cannot
/// un-revoke a certificate or touch the issuance log.
#[tokio::test]
async fn broker_works_under_the_least_privilege_postgres_role() {
    let pg = fleet_tests::PgCluster::start();
    let owner_url = pg.create_database("fleet");
    let mut fleet = Fleet::new(2, Some(owner_url.clone())).await;
    // What `fleet-provision db-roles --broker-role fleet_broker` runs.
    fleet.station().await.registry().apply_broker_role("fleet_broker").await.unwrap();
    let broker_url = owner_url.replacen("postgres://postgres@", "postgres://fleet_broker@", 1);
    assert_ne!(broker_url, owner_url);
    fleet.db = Some(broker_url.clone());
    let broker = BrokerProc::start(&fleet, &[]);
    fleet.db = Some(owner_url);

    let mut raw = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(1), 30).await), Some(ConnectReturnCode::Success));
    let mut p =
        Publish::new(format!("devices/{}/telemetry", fleet.id(1)), QoS::AtLeastOnce, b"least".to_vec());
    p.pkid = 9;
    raw.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::PubAck(a)) if a.pkid == 9));
    assert_eq!(fleet.telemetry_rows(&fleet.id(1)).await.len(), 1);
    let took = time_revocation_cut(&fleet, &broker, 0).await;
    assert!(took < LATENCY_BOUND, "cut took {took:?} under the broker role");
    expect_refused_after_revoke(&broker, &fleet, 0).await;

    sqlx::any::install_default_drivers();
    let as_broker = sqlx::AnyPool::connect(&broker_url).await.unwrap();
    for sql in [
        "UPDATE certificates SET status = 'active'",
        "UPDATE devices SET status = 'active'",
        "DELETE FROM certificates",
        "INSERT INTO issuance_log (seq, at, event, device_id, serial, detail, prev_hash, hash) VALUES (999, 0, 'x', '', '', '', '', '')",
        "SELECT * FROM issuance_log",
        "UPDATE crl_state SET crl_number = 0",
        "DELETE FROM telemetry",
    ] {
        let err = sqlx::query(sql).execute(&as_broker).await.expect_err(sql);
        assert!(err.to_string().contains("permission denied"), "{sql}: {err}");
    }
}

#[tokio::test]
async fn crl_reload_policy_and_forged_crl() {
    let fleet = Fleet::new(2, None).await;
    let crl = fleet.home().join("crl.pem");
    let broker = BrokerProc::start(&fleet, &["--crl", s(&crl)]);
    assert_eq!(broker.metric("fleet_crl_expired").await, 0.0);
    // A CRL signed by another CA is refused; the good one stays in force.
    let other = Fleet::new(1, None).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct mtime
    std::fs::copy(other.home().join("crl.pem"), &crl).unwrap();
    broker.wait_metric("fleet_crl_reloads_total{outcome=\"rejected\"}", 1.0, Duration::from_secs(5)).await;
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    drop(raw);
    // A corrupt file (truncated mid-write, or garbage) is refused the same way.
    let pem = std::fs::read_to_string(other.home().join("crl.pem")).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&crl, &pem.as_bytes()[..pem.len() / 2]).unwrap();
    broker.wait_metric("fleet_crl_reloads_total{outcome=\"rejected\"}", 2.0, Duration::from_secs(5)).await;
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    drop(raw);
    // An expired CRL (signed correctly): alert, and new connections refused (fail-closed).
    let home = fleet.home();
    let ca = LoadedCa::from_pem(
        &std::fs::read_to_string(home.join("device-ca.pem")).unwrap(),
        &std::fs::read_to_string(home.join("private/device-ca.key")).unwrap(),
    )
    .unwrap();
    let past = OffsetDateTime::now_utc() - time::Duration::days(10);
    let expired = pki::sign_crl(&ca, 99, &[], past, time::Duration::days(1)).unwrap();
    std::fs::write(&crl, expired.pem().unwrap()).unwrap();
    broker.wait_metric("fleet_crl_expired", 1.0, Duration::from_secs(5)).await;
    if let Ok(mut raw) = Raw::device(broker.mqtt, &fleet.devices[1]).await {
        assert_eq!(
            connack_code(&raw.mqtt_connect(&fleet.id(1), 30).await),
            Some(ConnectReturnCode::ServiceUnavailable)
        );
    }
    broker.wait_refused(Refusal::CrlExpired, 1.0, Duration::from_secs(3)).await;
    // Fail-open admits with the alert raised.
    let open = BrokerProc::start(&fleet, &["--crl", s(&crl), "--crl-policy", "fail-open"]);
    assert_eq!(open.metric("fleet_crl_expired").await, 1.0);
    let mut raw = Raw::device(open.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(1), 30).await), Some(ConnectReturnCode::Success));
}

/// An old CRL, validly signed but with a lower cRLNumber (replayed to un-revoke a device on a
/// broker that relies on the CRL), is refused with a metric and a log line; so is deleting it.
#[tokio::test]
async fn a_replayed_older_crl_is_refused() {
    let fleet = Fleet::new(2, None).await;
    let crl = fleet.home().join("crl.pem");
    let old = std::fs::read(&crl).unwrap();
    fleet.revoke(0).await; // writes a newer CRL listing device 0
    let broker = BrokerProc::start(&fleet, &[]);
    let loaded = broker.metric("fleet_crl_number").await;
    assert!(loaded >= 2.0, "CRL number {loaded}");
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct mtime
    std::fs::write(&crl, &old).unwrap();
    broker.wait_metric("fleet_crl_reloads_total{outcome=\"replayed\"}", 1.0, Duration::from_secs(5)).await;
    assert_eq!(broker.metric("fleet_crl_number").await, loaded, "the replayed CRL was loaded");
    assert!(broker.log().contains("lower than the loaded CRL"), "no log line");
    // Removing the CRL file does not drop the CRL in force either.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::remove_file(&crl).unwrap();
    broker.wait_metric("fleet_crl_reloads_total{outcome=\"rejected\"}", 1.0, Duration::from_secs(5)).await;
    assert_eq!(broker.metric("fleet_crl_number").await, loaded);
    // A newer CRL is taken as usual.
    fleet.revoke(1).await;
    broker.wait_metric("fleet_crl_number", loaded + 1.0, Duration::from_secs(5)).await;
}

/// A device certificate for `id` expiring at `expires` in `dir`, registered as `mint` would have.
async fn forge_registered(fleet: &Fleet, id: &str, expires: OffsetDateTime, dir: &Path) {
    forge(fleet, id, |p| p.not_after = expires, dir);
    let pem = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let der = pki::pem_decode(&pem, "CERTIFICATE").unwrap();
    let cert = fleet_registry::NewCert {
        device_id: DeviceId::parse(id).unwrap(),
        role: Role::Device,
        serial: pki::summarize(&der).unwrap().serial,
        not_before: 0,
        not_after: expires.unix_timestamp(),
        key_source: "station",
        cert_der: der,
    };
    let st = fleet.station().await;
    st.registry()
        .record_certificates(&[cert], true, OffsetDateTime::now_utc().unix_timestamp())
        .await
        .unwrap();
}

/// Live sessions are counted by how soon their certificates expire: a device minted with the
/// default five-year certificate and one with ten days left land in their buckets.
#[tokio::test]
async fn live_sessions_are_counted_by_certificate_expiry() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let d = fleet.dir.path().join("ten-days");
    let expires = OffsetDateTime::now_utc() + time::Duration::days(10);
    forge_registered(&fleet, "dev-tendays", expires, &d).await;
    let mut soon = Raw::device(broker.mqtt, &d).await.unwrap();
    assert_eq!(connack_code(&soon.mqtt_connect("dev-tendays", 30).await), Some(ConnectReturnCode::Success));
    let mut long = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&long.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    broker.wait_metric("fleet_sessions_cert_expiry{within=\"30d\"}", 1.0, Duration::from_secs(8)).await;
    broker.wait_metric("fleet_sessions_cert_expiry{within=\"more\"}", 1.0, Duration::from_secs(8)).await;
    assert_eq!(broker.metric("fleet_sessions_cert_expiry{within=\"7d\"}").await, 0.0);
}

/// `server-cert --renew` replaces the broker's key and certificate in place; the broker reloads
/// them: a live session goes on, a new connection gets the new certificate.
#[tokio::test]
async fn a_renewed_server_certificate_is_taken_without_dropping_sessions() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let mut live = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&live.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    let before = broker.metric("fleet_crl_reloads_total{outcome=\"loaded\"}").await;
    let tls_dir = fleet.home().join("broker-tls");
    let old_key = std::fs::read(tls_dir.join("key.pem")).unwrap();
    // Past the file watcher's mtime granularity.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = std::process::Command::new(
        fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision"),
    )
    .arg("--home")
    .arg(fleet.home())
    .args(["server-cert", "--renew", "--days", "30"])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(tls_dir.join("key.pem")).unwrap(), old_key, "same key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tls_dir.join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the renewed key is readable by others: {mode:o}");
    }
    broker
        .wait_metric("fleet_crl_reloads_total{outcome=\"loaded\"}", before + 1.0, Duration::from_secs(5))
        .await;
    broker.wait_metric("fleet_cert_expiry_days{cert=\"server\"}", 29.0, Duration::from_secs(3)).await;
    assert!(broker.metric("fleet_cert_expiry_days{cert=\"server\"}").await <= 30.0);
    // The live session was not touched.
    live.send(Packet::PingReq).await.unwrap();
    assert!(matches!(live.recv(PATIENCE).await, Some(Packet::PingResp)));
    // A new connection sees the new certificate.
    let fresh = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    let served = fresh.tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let pem = std::fs::read_to_string(tls_dir.join("cert.pem")).unwrap();
    assert_eq!(served, pki::pem_decode(&pem, "CERTIFICATE").unwrap(), "the old certificate is still served");
}

/// A live session ends when its certificate's notAfter passes (reason `cert_expired`).
#[tokio::test]
async fn a_session_is_cut_when_its_certificate_expires() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let d = fleet.dir.path().join("short-lived");
    // Long enough that a loaded machine still connects before notAfter.
    let expires = OffsetDateTime::now_utc() + time::Duration::seconds(6);
    forge_registered(&fleet, "dev-short", expires, &d).await;
    let mut raw = Raw::device(broker.mqtt, &d).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect("dev-short", 0).await), Some(ConnectReturnCode::Success));
    assert!(raw.closed_within(PATIENCE).await, "session outlived its certificate");
    assert!(OffsetDateTime::now_utc() >= expires, "cut before notAfter");
    broker.wait_metric(&kicks(CloseReason::CertExpired), 1.0, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn check_config_and_bad_configuration() {
    let fleet = Fleet::new(1, None).await;
    let bin = &broker_bin();
    let out = Command::new(bin).arg("--home").arg(fleet.home()).arg("check-config").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("configuration OK") && text.contains("device-ca.pem"),
        "{text}"
    );
    let bad = fleet.dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:1\"\nmax_packet_size = 1\n").unwrap();
    let out = Command::new(bin)
        .arg("--home")
        .arg(fleet.home())
        .arg("--config")
        .arg(&bad)
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("max_packet_size"), "{err}");
    std::fs::write(&bad, "nonsense_key = 3\n").unwrap();
    let out = Command::new(bin).arg("--config").arg(&bad).arg("check-config").output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nonsense_key"));
    let out = Command::new(bin)
        .arg("--home")
        .arg(fleet.dir.path().join("missing"))
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing"), "{err}");
    // A chain file as client CA would trust everything the root signs: refused at start.
    let out = Command::new(bin)
        .arg("--home")
        .arg(fleet.home())
        .arg("--client-ca")
        .arg(fleet.home().join("device-ca-chain.pem"))
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("must hold only the device issuing CA"), "{err}");
}

/// A setting's value in force, as `check-config` prints it: the flag over `FLEET_<KEY>` over
/// the file over the default (README, "Configuration"), each layer shown by the one below it.
#[tokio::test]
async fn configuration_precedence_is_flag_then_env_then_file_then_default() {
    let fleet = Fleet::new(1, None).await;
    let file = fleet.dir.path().join("precedence.toml");
    std::fs::write(&file, "max_packet_size = 5000\n").unwrap();
    let in_force = |config: bool, env: Option<&str>, flag: Option<&str>| -> String {
        let mut c = Command::new(broker_bin());
        c.arg("--home").arg(fleet.home());
        if config {
            c.arg("--config").arg(&file);
        }
        if let Some(v) = flag {
            c.args(["--max-packet-size", v]);
        }
        c.arg("check-config").env_remove("FLEET_HOME").env_remove("FLEET_DATABASE_URL");
        match env {
            Some(v) => c.env("FLEET_MAX_PACKET_SIZE", v),
            None => c.env_remove("FLEET_MAX_PACKET_SIZE"),
        };
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        let line =
            text.lines().find(|l| l.starts_with("max_packet_size = ")).unwrap_or_else(|| panic!("{text}"));
        line.trim_start_matches("max_packet_size = ").to_owned()
    };
    assert_eq!(in_force(false, None, None), "4096", "the default");
    assert_eq!(in_force(true, None, None), "5000", "the file over the default");
    assert_eq!(in_force(true, Some("6000"), None), "6000", "the environment over the file");
    assert_eq!(in_force(true, Some("6000"), Some("7000")), "7000", "the flag over the environment");
    assert_eq!(in_force(true, None, Some("7000")), "7000", "the flag over the file");
    assert_eq!(in_force(false, Some("6000"), None), "6000", "the environment over the default");
}

/// A QoS 1 PUBLISH whose commit is still running when SIGTERM arrives is finished: committed,
/// acknowledged, and only then the session closed and the broker stopped. The registry's write
/// lock is held by the test, so the commit cannot complete before the signal.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_inflight_and_exits() {
    let fleet = Fleet::new(1, None).await;
    // Committed to the registry before the PUBACK, so that the test can hold a commit open
    // (the same writer and shutdown serve the telemetry log).
    let mut broker = BrokerProc::start(&fleet, &["--store", "registry"]);
    let id = fleet.id(0);
    // Hold SQLite's write lock: the broker's commit waits (busy_timeout 10 s) until we let go.
    let (mut raw, mut lock) = device_0_with_the_registry_locked(&fleet, &broker).await;
    let mut p = Publish::new(format!("devices/{id}/telemetry/t"), QoS::AtLeastOnce, b"in flight".to_vec());
    p.pkid = 7;
    raw.send(Packet::Publish(p)).await.unwrap();
    broker.wait_metric("fleet_messages_received_total", 1.0, Duration::from_secs(10)).await;
    assert!(
        raw.recv(Duration::from_millis(300)).await.is_none(),
        "acknowledged while the registry was locked: nothing was in flight"
    );
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    while !broker.log().contains("shutting down") {
        assert!(t.elapsed() < Duration::from_secs(5), "no shutdown logged:\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
    drop(lock);
    match raw.recv(Duration::from_secs(10)).await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 7),
        other => panic!("no PUBACK for the in-flight PUBLISH after SIGTERM: {other:?}\n{}", broker.log()),
    }
    assert!(raw.closed_within(PATIENCE).await, "session not closed on SIGTERM");
    let t = Instant::now();
    loop {
        if let Some(status) = broker.child.try_wait().unwrap() {
            assert!(status.success(), "broker exit status {status:?}");
            break;
        }
        assert!(t.elapsed() < PATIENCE, "broker did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(broker.log().contains("broker stopped"));
    let rows = fleet.telemetry_rows(&id).await;
    assert_eq!(rows, [(format!("devices/{id}/telemetry/t"), b"in flight".to_vec())]);
    let _ = (DeviceId::parse("x"), Role::Device, SerialNumber::random());
}

/// Device 0 connected to `broker`, and SQLite's write lock held (the connection, in `BEGIN
/// IMMEDIATE`) until the test commits or drops it.
async fn device_0_with_the_registry_locked(
    fleet: &Fleet,
    broker: &BrokerProc,
) -> (Raw, sqlx::pool::PoolConnection<sqlx::Any>) {
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    let st = fleet.station().await;
    let mut lock = st.registry().pool().acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *lock).await.unwrap();
    (raw, lock)
}

/// Holds SQLite's write lock (the returned connection, in `BEGIN IMMEDIATE`), then has device 0
/// publish `m1..=m<n>` on `topic` at QoS 1, each acknowledged before the next: with the telemetry
/// log a PUBACK does not wait for the registry.
async fn publish_with_the_registry_locked(
    fleet: &Fleet,
    broker: &BrokerProc,
    topic: &str,
    n: u16,
) -> sqlx::pool::PoolConnection<sqlx::Any> {
    let (mut raw, lock) = device_0_with_the_registry_locked(fleet, broker).await;
    for n in 1..=n {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, format!("m{n}").into_bytes());
        p.pkid = n;
        raw.send(Packet::Publish(p)).await.unwrap();
        match raw.recv(PATIENCE).await {
            Some(Packet::PubAck(a)) => assert_eq!(a.pkid, n),
            other => panic!("no PUBACK while the registry is locked: {other:?}\n{}", broker.log()),
        }
    }
    lock
}

/// With the telemetry log (the default) a PUBACK does not wait for the registry: messages are
/// acknowledged while the test holds SQLite's write lock. A SIGTERM then still leaves every one of
/// them in the table: the broker copies its log before it exits.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_while_the_registry_is_locked_and_copied_before_a_sigterm_exit() {
    let fleet = Fleet::new(1, None).await;
    let mut broker = BrokerProc::start(&fleet, &[]);
    let (id, topic) = (fleet.id(0), format!("devices/{}/telemetry/t", fleet.id(0)));
    let mut lock = publish_with_the_registry_locked(&fleet, &broker, &topic, 50).await;
    assert!(broker.metric("fleet_store_log_backlog_records").await >= 50.0);
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    while !broker.log().contains("shutting down") {
        assert!(t.elapsed() < Duration::from_secs(5), "no shutdown logged:\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sessions are closed and the store writer is done: only the copy is left.
    let t = Instant::now();
    while !broker.log().contains("copying the rest of the telemetry log") {
        assert!(t.elapsed() < PATIENCE, "no final copy logged:\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
    drop(lock);
    let t = Instant::now();
    while broker.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < PATIENCE, "broker did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Read with the broker gone: nothing copies any more.
    let rows = fleet.telemetry_rows(&id).await;
    let want: Vec<_> = (1..=50).map(|n| (topic.clone(), format!("m{n}").into_bytes())).collect();
    assert_eq!(rows, want);
}

/// Acknowledged messages a crashed broker left in its telemetry log are copied by the next
/// start even when it is told `store = registry`: nothing stays behind in a directory no one
/// reads any more.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_switched_to_store_registry_first_copies_what_its_log_holds() {
    let fleet = Fleet::new(1, None).await;
    let mut broker = BrokerProc::start(&fleet, &[]);
    let (id, topic) = (fleet.id(0), format!("devices/{}/telemetry/t", fleet.id(0)));
    let mut lock = publish_with_the_registry_locked(&fleet, &broker, &topic, 20).await;
    broker.kill9();
    sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
    drop(lock);
    let _broker = BrokerProc::start(&fleet, &["--store", "registry"]);
    let rows = fleet.telemetry_rows(&id).await;
    let want: Vec<_> = (1..=20).map(|n| (topic.clone(), format!("m{n}").into_bytes())).collect();
    assert_eq!(rows, want);
}

#[tokio::test]
async fn connection_cap_refuses_extra_connections() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &["--max-connections", "2"]);
    let _a = tokio::net::TcpStream::connect(broker.mqtt).await.unwrap();
    let _b = tokio::net::TcpStream::connect(broker.mqtt).await.unwrap();
    broker.wait_metric("fleet_connections_open", 2.0, Duration::from_secs(3)).await;
    let mut c = tokio::net::TcpStream::connect(broker.mqtt).await.unwrap();
    let mut byte = [0u8; 1];
    let r =
        tokio::time::timeout(Duration::from_secs(3), tokio::io::AsyncReadExt::read(&mut c, &mut byte)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "third connection not closed: {r:?}");
    assert_eq!(broker.metric(&rejected(Refusal::MaxConnections)).await, 1.0);
    // /healthz answers while at the cap (it is a separate listener).
    let mut h = tokio::net::TcpStream::connect(broker.metrics).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut h,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut h, &mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n"), "{body}");
}

#[tokio::test]
async fn retained_state_is_delivered_to_later_subscribers() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let mut dev = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    let mut p = Publish::new(format!("devices/{id}/state"), QoS::AtLeastOnce, b"online".to_vec());
    p.retain = true;
    p.pkid = 1;
    dev.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    let mut svc = Raw::connect(
        broker.mqtt,
        client_config(
            &fleet.service.join("broker-trust.pem"),
            Some((&fleet.service.join("cert.pem"), &fleet.service.join("key.pem"))),
        ),
    )
    .await
    .unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    let mut sub = Subscribe::new("devices/+/state", QoS::AtLeastOnce);
    sub.pkid = 1;
    svc.send(Packet::Subscribe(sub)).await.unwrap();
    assert!(matches!(svc.recv(PATIENCE).await, Some(Packet::SubAck(_))));
    match svc.recv(Duration::from_secs(5)).await {
        Some(Packet::Publish(p)) => {
            assert!(p.retain, "retained flag set for a stored state");
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                (format!("devices/{id}/state").as_str(), &b"online"[..])
            );
        }
        other => panic!("retained state not delivered: {other:?}"),
    }
}

#[tokio::test]
async fn crl_alone_refuses_a_revoked_certificate_and_reload_keeps_live_sessions() {
    // The air-gapped path: the registry still says active, only the CRL file lists the serial.
    let fleet = Fleet::new(2, None).await;
    let home = fleet.home();
    let crl = fleet.dir.path().join("airgap-crl.pem");
    std::fs::copy(home.join("crl.pem"), &crl).unwrap();
    let broker = BrokerProc::start(&fleet, &["--crl", s(&crl)]);
    // Device 1 holds a live session across the reload.
    let mut live = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(connack_code(&live.mqtt_connect(&fleet.id(1), 30).await), Some(ConnectReturnCode::Success));
    let ca = LoadedCa::from_pem(
        &std::fs::read_to_string(home.join("device-ca.pem")).unwrap(),
        &std::fs::read_to_string(home.join("private/device-ca.key")).unwrap(),
    )
    .unwrap();
    let cert_pem = std::fs::read_to_string(fleet.devices[0].join("cert.pem")).unwrap();
    let serial = pki::summarize(&pki::pem_decode(&cert_pem, "CERTIFICATE").unwrap()).unwrap().serial;
    let entry = fleet_registry::RevokedEntry {
        serial,
        revoked_at: OffsetDateTime::now_utc().unix_timestamp(),
        reason: fleet_provision::RevocationReason::KeyCompromise,
    };
    let signed =
        pki::sign_crl(&ca, 1000, &[entry], OffsetDateTime::now_utc(), time::Duration::days(7)).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&crl, signed.pem().unwrap()).unwrap();
    broker.wait_metric("fleet_crl_reloads_total{outcome=\"loaded\"}", 1.0, Duration::from_secs(5)).await;
    expect_refused(&broker, &fleet.devices[0], &fleet.id(0), Refusal::Revoked).await;
    // The reload did not touch the live session.
    live.send(Packet::PingReq).await.unwrap();
    assert!(matches!(live.recv(PATIENCE).await, Some(Packet::PingResp)));
}

/// A broker never migrates the registry (it may run under a role that cannot): against a
/// database the station has not created it refuses to start and says which command fixes it.
#[tokio::test]
async fn a_registry_the_station_never_migrated_is_refused_with_the_fix() {
    let fleet = Fleet::new(1, None).await;
    let empty = fleet.dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let out = Command::new(broker_bin())
        .arg("--home")
        .arg(fleet.home())
        .arg("--database-url")
        .arg(format!("sqlite://{}", empty.display()))
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("schema is not current") && err.contains("fleet-provision list"), "{err}");
}

/// The `issuer` role (issue 13, rotation over MQTT): an issuer identity reads devices' CSRs on
/// `devices/+/certs/csr` and answers on `devices/<id>/certs/...`, and nothing else; a device
/// asks on its own `certs/csr` and reads its own answers.
#[tokio::test]
async fn an_issuer_reads_csrs_and_answers_and_nothing_more() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let issuer_dir = fleet.dir.path().join("issuer");
    fleet.station().await.issuer_cert("issuer-1", &issuer_dir).await.unwrap();
    let id = fleet.id(0);

    let mut issuer = Raw::device(broker.mqtt, &issuer_dir).await.unwrap();
    assert_eq!(connack_code(&issuer.mqtt_connect("issuer-1", 30).await), Some(ConnectReturnCode::Success));
    let mut sub = Subscribe::new("devices/+/certs/csr", QoS::AtLeastOnce);
    sub.filters
        .push(rumqttc::mqttbytes::v4::SubscribeFilter::new("devices/+/telemetry".into(), QoS::AtLeastOnce));
    sub.pkid = 1;
    issuer.send(Packet::Subscribe(sub)).await.unwrap();
    match issuer.recv(Duration::from_secs(3)).await {
        Some(Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce), SubscribeReasonCode::Failure],
            "CSRs yes, telemetry no"
        ),
        other => panic!("no SUBACK: {other:?}"),
    }

    let mut dev = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut dev, &format!("devices/{id}/certs/issued"), 1).await;
    let mut csr = Publish::new(format!("devices/{id}/certs/csr"), QoS::AtLeastOnce, b"csr-der".to_vec());
    csr.pkid = 2;
    dev.send(Packet::Publish(csr)).await.unwrap();
    let got = next_publish(&mut issuer, PATIENCE).await.expect("the issuer got no CSR");
    // The broker stamps the CSR with the certificate the session was admitted with
    // (docs/spec/rotation.md): the issuer sees `fleetgate-origin <serial>\n`, then the bytes.
    let serial = fleet.station().await.show(&DeviceId::parse(&id).unwrap()).await.unwrap().certificates[0]
        .serial
        .to_hex();
    let stamped = [format!("fleetgate-origin {serial}\n").into_bytes(), b"csr-der".to_vec()].concat();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (format!("devices/{id}/certs/csr").as_str(), &stamped[..])
    );

    let mut answer = Publish::new(format!("devices/{id}/certs/issued"), QoS::AtLeastOnce, b"chain".to_vec());
    answer.pkid = 3;
    issuer.send(Packet::Publish(answer)).await.unwrap();
    let got = next_publish(&mut dev, PATIENCE).await.expect("the device got no answer");
    assert_eq!(&got.payload[..], b"chain");
    // An issuer is no service: a command is refused and its session closed.
    let mut cmd = Publish::new(format!("devices/{id}/commands/reboot"), QoS::AtLeastOnce, b"x".to_vec());
    cmd.pkid = 4;
    issuer.send(Packet::Publish(cmd)).await.unwrap();
    assert!(issuer.closed_within(PATIENCE).await, "an issuer published a command");
    assert!(next_publish(&mut dev, Duration::from_millis(300)).await.is_none());
}

/// A CA of its own for the CRL loader's tests: its certificate's DER, its issuer, and its key
/// (to sign CRLs of shapes rcgen does not write).
struct CrlCa {
    der: Vec<u8>,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    key: rcgen::KeyPair,
}

fn crl_test_ca(name: &str) -> CrlCa {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let copy = rcgen::KeyPair::try_from(key.serialize_der().as_slice()).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let issuer = rcgen::CertifiedIssuer::self_signed(p, key).unwrap();
    CrlCa { der: issuer.as_ref().der().to_vec(), issuer, key: copy }
}

/// DER: a SEQUENCE of `content`.
fn der_sequence(content: &[u8]) -> Vec<u8> {
    use x509_parser::asn1_rs::ToDer;
    x509_parser::asn1_rs::Sequence::new(content.to_vec().into()).to_der_vec().unwrap()
}

/// DER: a BIT STRING of `octets`.
fn der_bits(octets: &[u8]) -> Vec<u8> {
    use x509_parser::asn1_rs::ToDer;
    x509_parser::asn1_rs::BitString::new(0, octets).to_der_vec().unwrap()
}

/// The elements of a DER SEQUENCE, each whole.
fn der_elements(seq: &[u8]) -> Vec<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, any) = x509_parser::asn1_rs::Any::from_der(seq).unwrap();
    let mut rest = any.data;
    let mut out = vec![];
    while !rest.is_empty() {
        let (after, _) = x509_parser::asn1_rs::Any::from_der(rest).unwrap();
        out.push(rest[..rest.len() - after.len()].to_vec());
        rest = after;
    }
    out
}

/// A CRL of `serials` as rcgen writes it: the TBSCertList's elements (version, signature,
/// issuer, thisUpdate, nextUpdate, the list, extensions) and the signature algorithm.
fn crl_elements(ca: &CrlCa, serials: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(7),
        crl_number: rcgen::SerialNumber::from_slice(&[5]),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let outer = der_elements(params.signed_by(&ca.issuer).unwrap().der());
    (der_elements(&outer[0]), outer[1].clone())
}

/// A CRL of the TBSCertList `elements`, signed with the CA's key.
fn sign_crl_elements(ca: &CrlCa, elements: &[Vec<u8>], algorithm: &[u8]) -> Vec<u8> {
    use rcgen::SigningKey;
    let tbs = der_sequence(&elements.concat());
    let signature = der_bits(&ca.key.sign(&tbs).unwrap());
    der_sequence(&[tbs, algorithm.to_vec(), signature].concat())
}

/// CRLs the device CA signed, of shapes rcgen does not write but x509-parser reads: the loader
/// reads every serial x509-parser reads of the whole CRL, or refuses the CRL; it never loads it
/// with fewer. (Found by the attack review: a list or a nextUpdate of another tag class was
/// loaded as an empty CRL, and so was a CRL with an empty SEQUENCE before its list.)
#[test]
fn a_ca_signed_crl_of_an_odd_shape_is_read_whole_or_refused() {
    use x509_parser::prelude::FromDer;
    let ca = crl_test_ca("crl shapes CA");
    let (tbs, alg) = crl_elements(&ca, &[&[0x11], &[0x22, 0x33]]);
    let whole_or_refused = |name: &str, elements: &[Vec<u8>]| {
        let der = sign_crl_elements(&ca, elements, &alg);
        let whole = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).ok();
        match fleet_broker::fuzzing::parse_crl(&der, &ca.der) {
            Ok((serials, _)) => {
                let whole = whole.unwrap_or_else(|| panic!("{name}: loaded what x509-parser refuses")).1;
                assert_eq!(whole.iter_revoked_certificates().count(), 2, "{name}");
                for r in whole.iter_revoked_certificates() {
                    assert!(
                        serials.contains(r.raw_serial()),
                        "{name}: loaded without {:02x?}",
                        r.raw_serial()
                    );
                }
            }
            Err(e) => assert!(matches!(e, fleet_broker::fuzzing::CrlError::Parse(_)), "{name}: {e:?}"),
        }
    };
    whole_or_refused("as rcgen writes it", &tbs);
    for tag in [0x70, 0xb0, 0xf0] {
        let mut t = tbs.clone();
        t[5][0] = tag;
        whole_or_refused(&format!("the list tagged {tag:#04x}"), &t);
    }
    for tag in [0x57, 0x97, 0xd7] {
        let mut t = tbs.clone();
        t[4][0] = tag;
        whole_or_refused(&format!("nextUpdate tagged {tag:#04x}"), &t);
    }
    let mut t = tbs.clone();
    t.insert(5, vec![0x30, 0x00]);
    whole_or_refused("an empty SEQUENCE before the list", &t);
}

/// A file the CA did not sign costs about its own size, however many names or extensions it
/// packs: the signature is checked before anything past the three outer elements is parsed.
/// (Found by the attack review: parsed first, 17 MB of minimal issuer attributes took 850 MB.)
#[test]
fn an_unsigned_crl_is_refused_before_its_fields_are_parsed() {
    let ca = crl_test_ca("crl memory CA");
    let (tbs, alg) = crl_elements(&ca, &[&[0x11]]);
    let mut t = tbs[..5].to_vec();
    let attribute = [0x31u8, 0x07, 0x30, 0x05, 0x06, 0x01, 0x2a, 0x05, 0x00];
    t[2] = der_sequence(&attribute.repeat(2_000_000));
    let signature = der_bits(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]);
    let der = der_sequence(&[der_sequence(&t.concat()), alg, signature].concat());
    let peak_kib = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = peak_kib();
    assert_eq!(
        fleet_broker::fuzzing::parse_crl(&der, &ca.der).err(),
        Some(fleet_broker::fuzzing::CrlError::Signature)
    );
    // The file is 17 MB; parsed before the signature check it took 850 MB. Other tests of this
    // binary run beside it, so the bound leaves them room.
    let grew_mib = (peak_kib() - before) / 1024;
    assert!(grew_mib < 200, "an unsigned CRL of {} MB took {grew_mib} MiB more", der.len() >> 20);
}

/// The broker reads a CRL's revoked list one entry at a time (a whole parse of a million
/// entries took 700 MB): what it reads is what x509-parser reads of the whole CRL, for lists
/// empty, short and long (a length of two octets), entries with and without extensions, serials
/// with a leading zero; and a CRL of another CA, an altered one and a cut one are refused.
#[test]
fn the_crl_loader_reads_what_x509_parser_reads_of_the_whole_crl() {
    use x509_parser::prelude::FromDer;
    let CrlCa { der: ca_der, issuer: ca, .. } = crl_test_ca("crl test CA");
    let other = crl_test_ca("crl test CA").issuer;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let entry = |serial: &[u8], extensions: bool| rcgen::RevokedCertParams {
        serial_number: rcgen::SerialNumber::from_slice(serial),
        revocation_time: now - time::Duration::hours(1),
        reason_code: extensions.then_some(rcgen::RevocationReason::KeyCompromise),
        invalidity_date: extensions.then_some(now - time::Duration::days(2)),
    };
    let crl = |number: u64, revoked: Vec<rcgen::RevokedCertParams>| rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(7),
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let long: Vec<_> = (0u32..300).map(|i| entry(&[0x40, (i >> 8) as u8, i as u8, 7], i % 2 == 0)).collect();
    let shapes = [
        ("empty", crl(1, vec![])),
        ("one entry, no extensions", crl(2, vec![entry(&[0x01], false)])),
        ("high bit and 20 octets", crl(3, vec![entry(&[0x80, 0x01], true), entry(&[0x7f; 20], true)])),
        ("300 entries", crl(u64::MAX >> 1, long)),
        (
            "a serial over 20 octets beside another",
            crl(4, vec![entry(&[0x11; 22], true), entry(&[0x02], false)]),
        ),
    ];
    for (shape, params) in shapes {
        let der = params.signed_by(&ca).unwrap().der().to_vec();
        let (_, whole) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let pem = params.signed_by(&ca).unwrap().pem().unwrap();
        for bytes in [&der[..], pem.as_bytes()] {
            let (serials, info) = fleet_broker::fuzzing::parse_crl(bytes, &ca_der)
                .unwrap_or_else(|e| panic!("{shape}: refused: {e:?}"));
            // Serials over 20 octets (21 with DER's leading zero) are no admitted certificate's.
            let listed: std::collections::BTreeSet<&[u8]> =
                whole.iter_revoked_certificates().map(|r| r.raw_serial()).filter(|s| s.len() <= 21).collect();
            assert_eq!(serials.len(), listed.len(), "{shape}");
            assert_eq!(info.revoked, listed.len(), "{shape}");
            for s in &listed {
                assert!(serials.contains(s), "{shape}: {s:02x?} not read");
            }
            assert!(!serials.contains(&[0x40, 0x99, 0x99, 0x07]), "{shape}: a serial it does not list");
            assert_eq!(info.this_update, whole.last_update().timestamp(), "{shape}");
            assert_eq!(info.next_update, whole.next_update().map(|t| t.timestamp()), "{shape}");
            assert_eq!(info.number, whole.crl_number().and_then(|n| u64::try_from(n).ok()), "{shape}");
            assert!(info.number.is_some(), "{shape}");
        }
        // Signed by another CA with the same name: not this CA's CRL.
        let forged = params.signed_by(&other).unwrap().der().to_vec();
        assert_eq!(
            fleet_broker::fuzzing::parse_crl(&forged, &ca_der).err(),
            Some(fleet_broker::fuzzing::CrlError::Signature),
            "{shape}: another CA's CRL"
        );
        // The last octet of the signed part changed (inside the last extension's value: the
        // structure holds, the signature does not).
        let mut altered = der.clone();
        let (_, outer) = x509_parser::asn1_rs::Any::from_der(&der).unwrap();
        let (after_tbs, _) = x509_parser::asn1_rs::Any::from_der(outer.data).unwrap();
        let tbs_end = der.len() - after_tbs.len();
        altered[tbs_end - 1] ^= 0x01;
        assert_eq!(
            fleet_broker::fuzzing::parse_crl(&altered, &ca_der).err(),
            Some(fleet_broker::fuzzing::CrlError::Signature),
            "{shape}: an altered CRL"
        );
        // Cut short: not a CRL at all.
        assert!(
            matches!(
                fleet_broker::fuzzing::parse_crl(&der[..der.len() - 5], &ca_der),
                Err(fleet_broker::fuzzing::CrlError::Parse(_))
            ),
            "{shape}: a cut CRL"
        );
    }
}
