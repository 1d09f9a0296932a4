//! MQTT 5 on fleet-broker (docs/spec/mqtt5.md): the CONNACK's properties, reason codes for
//! refusals and closes, session expiry, topic aliases, Receive Maximum; 3.1.1 and 5 clients on
//! one broker; mosquitto_pub/sub -V 5 and paho-mqtt as peers nobody here wrote.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, Packet,
    PubAck, PubAckReason, Publish, PublishProperties, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The arguments that make `mosquitto_pub` or `mosquitto_sub` speak MQTT `version` to `broker`
/// with the identity in `dir` as `client_id`.
fn mosquitto_args(version: &str, broker: &BrokerProc, dir: &Path, client_id: &str) -> Vec<String> {
    let file = |name: &str| s(&dir.join(name)).to_owned();
    let mut args: Vec<String> =
        ["-V", version, "-h", "localhost", "-p", &broker.port()].map(String::from).into();
    args.extend(["--cafile".into(), file("broker-trust.pem"), "--cert".into(), file("cert.pem")]);
    args.extend(["--key".into(), file("key.pem"), "-i".into(), client_id.into()]);
    args
}

/// A v5 client over a raw TLS session: every byte it sends is what the test says.
struct Raw5 {
    raw: Raw,
    buf: BytesMut,
}

impl Raw5 {
    async fn device(broker: &BrokerProc, dir: &Path) -> Raw5 {
        Raw5 { raw: Raw::device(broker.mqtt, dir).await.unwrap(), buf: BytesMut::new() }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).unwrap();
        self.raw.tls.write_all(&out).await.unwrap();
        self.raw.tls.flush().await.unwrap();
    }

    /// The next packet; `None` when the broker closed the connection (or nothing came).
    async fn recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if !self.buf.is_empty() {
                match Packet::read(&mut self.buf, None) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("undecodable packet from the broker: {e}"),
                }
            }
            match tokio::time::timeout_at(deadline, self.raw.tls.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// CONNECT v5 with `props`; the CONNACK.
    async fn connect(&mut self, client_id: &str, clean_start: bool, props: ConnectProperties) -> ConnAck {
        let c = Connect { keep_alive: 30, client_id: client_id.into(), clean_start, properties: Some(props) };
        self.send(Packet::Connect(c, None, None)).await;
        match self.recv(PATIENCE).await {
            Some(Packet::ConnAck(a)) => a,
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, pkid: u16, payload: &'static str, alias: Option<u16>) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload, None);
        p.pkid = pkid;
        p.properties = alias.map(|a| PublishProperties { topic_alias: Some(a), ..Default::default() });
        self.send(Packet::Publish(p)).await;
    }

    /// The PUBACK of `pkid` (other packets before it are skipped).
    async fn puback(&mut self, pkid: u16) -> PubAckReason {
        loop {
            match self.recv(PATIENCE).await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return a.reason,
                Some(_) => {}
                None => panic!("no PUBACK for {pkid}: the broker closed the session"),
            }
        }
    }

    async fn subscribe(&mut self, pkid: u16, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let filters = filters.iter().map(|f| Filter::new(*f, QoS::AtLeastOnce)).collect();
        self.send(Packet::Subscribe(Subscribe { pkid, filters, properties: None })).await;
        loop {
            match self.recv(PATIENCE).await {
                Some(Packet::SubAck(a)) if a.pkid == pkid => return a.return_codes,
                Some(_) => {}
                None => panic!("no SUBACK: the broker closed the session"),
            }
        }
    }

    /// The broker's DISCONNECT (packets before it are skipped), or `None` if it closed without one.
    async fn disconnect_reason(&mut self, within: Duration) -> Option<DisconnectReasonCode> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Some(Packet::Disconnect(d)) => return Some(d.reason_code),
                Some(_) => {}
                None => return None,
            }
        }
    }
}

fn props() -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

#[tokio::test]
async fn a_v5_connack_says_what_the_broker_offers_and_assigns_the_device_id() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    let ack = c.connect("", true, props()).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(
        p.assigned_client_identifier.as_deref(),
        Some(fleet.id(0).as_str()),
        "the empty client id gets the device id"
    );
    assert_eq!(p.max_qos, Some(1), "no QoS 2");
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1), "a single node shares");
    assert_eq!(p.subscription_identifiers_available, Some(1));
    assert!(p.topic_alias_max.is_some_and(|m| m > 0));
    assert_eq!(p.max_packet_size, Some(4096), "the configured max_packet_size");
    assert!(p.receive_max.is_some_and(|m| m > 0));
    assert_eq!(p.session_expiry_interval, None, "nothing asked, nothing to cap");
    drop(c);
    // A session that asks to be kept for ever gets the configured cap, and is told so.
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    let ack = c
        .connect(&fleet.id(0), true, ConnectProperties { session_expiry_interval: Some(u32::MAX), ..props() })
        .await;
    assert_eq!(ack.properties.and_then(|p| p.session_expiry_interval), Some(86_400), "session_expiry_secs");
}

#[tokio::test]
async fn v5_refusals_and_denials_carry_reason_codes_and_the_session_lives_on() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (me, other) = (fleet.id(0), fleet.id(1));

    // Another device's client id: CONNACK 0x85, with a reason string only when asked for.
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    let ack = c.connect(&other, true, props()).await;
    assert_eq!(ack.code, ConnectReturnCode::ClientIdentifierNotValid);
    assert_eq!(ack.properties.and_then(|p| p.reason_string).as_deref(), Some("client_id_mismatch"));
    let mut quiet = Raw5::device(&broker, &fleet.devices[0]).await;
    let ack =
        quiet.connect(&other, true, ConnectProperties { request_problem_info: Some(0), ..props() }).await;
    assert_eq!(ack.code, ConnectReturnCode::ClientIdentifierNotValid);
    assert!(ack.properties.is_none_or(|p| p.reason_string.is_none()), "no reason string unasked");

    // Admitted: a QoS 1 PUBLISH outside its subtree gets PUBACK 0x87 and the session goes on.
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(c.connect(&me, true, props()).await.code, ConnectReturnCode::Success);
    c.publish(&format!("devices/{other}/telemetry"), 1, "forged", None).await;
    assert_eq!(c.puback(1).await, PubAckReason::NotAuthorized);
    c.publish(&format!("devices/{me}/commands/reboot"), 2, "self-command", None).await;
    assert_eq!(c.puback(2).await, PubAckReason::NotAuthorized);
    c.publish(&format!("devices/{me}/telemetry"), 3, "21.5", None).await;
    assert_eq!(c.puback(3).await, PubAckReason::Success);
    // SUBACK: another device's commands 0x87, also through a shared subscription.
    let codes = c
        .subscribe(
            4,
            &[
                &format!("devices/{other}/commands/#"),
                "$share/g/devices/+/telemetry",
                &format!("devices/{me}/commands/#"),
            ],
        )
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    let rows = fleet.telemetry_rows(&me).await;
    assert_eq!(
        rows,
        [(format!("devices/{me}/telemetry"), b"21.5".to_vec())],
        "only its own message is stored"
    );
    assert!(fleet.telemetry_rows(&other).await.is_empty(), "nothing was stored for the forged topic");
}

#[tokio::test]
async fn a_revoked_v5_session_is_told_administrative_action_and_a_takeover_is_told_so() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let mut a = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(a.connect(&fleet.id(0), true, props()).await.code, ConnectReturnCode::Success);
    // A second connection of the same device takes the session over: the first hears 0x8E.
    let mut b = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(b.connect(&fleet.id(0), true, props()).await.code, ConnectReturnCode::Success);
    assert_eq!(a.disconnect_reason(PATIENCE).await, Some(DisconnectReasonCode::SessionTakenOver));
    // Revoked while connected: DISCONNECT 0x98 (administrative action), then the connection ends.
    fleet.revoke(0).await;
    assert_eq!(b.disconnect_reason(PATIENCE).await, Some(DisconnectReasonCode::AdministrativeAction));
    assert!(b.raw.closed_within(PATIENCE).await);
    // And a 3.1.1 client, which has no DISCONNECT from a server, is simply cut (unchanged).
    let mut v4 = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert!(matches!(
        v4.mqtt_connect(&fleet.id(1), 30).await,
        Some(rumqttc::mqttbytes::v4::Packet::ConnAck(_))
    ));
    fleet.revoke(1).await;
    assert!(v4.closed_within(PATIENCE).await);
}

#[tokio::test]
async fn topic_aliases_expand_to_the_full_topic_and_an_unknown_alias_ends_the_session() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let topic = format!("devices/{id}/telemetry");
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(c.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    c.publish(&topic, 1, "first", Some(1)).await;
    c.publish("", 2, "second", Some(1)).await;
    assert_eq!(c.puback(1).await, PubAckReason::Success);
    assert_eq!(c.puback(2).await, PubAckReason::Success);
    let rows = fleet.telemetry_rows(&id).await;
    assert_eq!(rows, [(topic.clone(), b"first".to_vec()), (topic, b"second".to_vec())]);
    c.publish("", 3, "third", Some(2)).await;
    assert_eq!(c.disconnect_reason(PATIENCE).await, Some(DisconnectReasonCode::TopicAliasInvalid));
    broker.wait_metric("fleet_protocol_errors_total{reason=\"topic_alias_invalid\"}", 1.0, PATIENCE).await;
}

#[tokio::test]
async fn session_expiry_keeps_what_a_v5_session_asked_for_and_a_disconnect_can_end_it() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);

    // Expiry 600 s and a subscription to its commands, then gone.
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    let keep = ConnectProperties { session_expiry_interval: Some(600), ..props() };
    assert!(!c.connect(&id, false, keep.clone()).await.session_present);
    c.subscribe(1, &[&format!("devices/{id}/commands/#")]).await;
    drop(c);
    broker.wait_metric("fleet_sessions_parked", 1.0, PATIENCE).await;

    // A command while it is away (stored by the broker, acknowledged to the service).
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert!(matches!(
        svc.mqtt_connect("backend", 30).await,
        Some(rumqttc::mqttbytes::v4::Packet::ConnAck(_))
    ));
    let mut cmd = rumqttc::mqttbytes::v4::Publish::new(
        format!("devices/{id}/commands/blink"),
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        "3",
    );
    cmd.pkid = 1;
    svc.send(rumqttc::mqttbytes::v4::Packet::Publish(cmd)).await.unwrap();
    assert!(matches!(svc.recv(PATIENCE).await, Some(rumqttc::mqttbytes::v4::Packet::PubAck(_))));

    // Back: the session is present and still subscribed, so the command arrives unasked.
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert!(c.connect(&id, false, keep.clone()).await.session_present, "the kept session resumes");
    let mut got = None;
    while let Some(p) = c.recv(PATIENCE).await {
        if let Packet::Publish(p) = p {
            got = Some((p.topic, p.payload));
            break;
        }
    }
    let topic = Bytes::from(format!("devices/{id}/commands/blink"));
    assert_eq!(got, Some((topic, Bytes::from_static(b"3"))));

    // A DISCONNECT with Session Expiry 0 ends it: the next connection starts without it.
    let mut d = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
    d.properties = Some(rumqttc::v5::mqttbytes::v5::DisconnectProperties {
        session_expiry_interval: Some(0),
        reason_string: None,
        user_properties: Vec::new(),
        server_reference: None,
    });
    c.send(Packet::Disconnect(d)).await;
    assert!(c.raw.closed_within(PATIENCE).await);
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert!(!c.connect(&id, false, props()).await.session_present, "ended by its DISCONNECT");

    // Expiry 0 (the v5 default): nothing is kept.
    drop(c);
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert!(!c.connect(&id, false, props()).await.session_present, "expiry 0 keeps nothing");
}

#[tokio::test]
async fn mosquitto_v5_and_v311_clients_share_one_broker() {
    let pubbin = fleet_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let subbin = fleet_tests::require_program("mosquitto_sub", "mosquitto-clients");
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let svc = &fleet.service;
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(subbin)
        .args(mosquitto_args("5", &broker, svc, "backend"))
        .args(["-t", "devices/+/telemetry", "-C", "2", "-v", "-W", "60", "-d"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(sub.stdout.take().unwrap());
    wait_line(&lines, "SUBACK", |l| l.contains("received SUBACK"));
    for (i, version) in [(0, "5"), (1, "311")] {
        let (d, id) = (&fleet.devices[i], fleet.id(i));
        let mut cmd = Command::new(&pubbin);
        cmd.args(mosquitto_args(version, &broker, d, &id)).args([
            "-t",
            &format!("devices/{id}/telemetry"),
            "-m",
            &format!("from v{version}"),
            "-q",
            "1",
        ]);
        if version == "5" {
            // A v5 publisher may alias its topic.
            cmd.args(["-D", "publish", "topic-alias", "1"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub -V {version} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_line(&lines, "the message", |l| l == format!("devices/{id}/telemetry from v{version}"));
    }
    assert!(sub.wait().unwrap().success(), "mosquitto_sub -V 5 failed");
    // A v5 publisher outside its subtree: mosquitto_pub reports the PUBACK's reason.
    let (d, id) = (&fleet.devices[0], fleet.id(0));
    let out = Command::new(&pubbin)
        .args(mosquitto_args("5", &broker, d, &id))
        .args(["-t", &format!("devices/{}/telemetry", fleet.id(1)), "-m", "forged", "-q", "1"])
        .output()
        .unwrap();
    // It warns (and exits 0, as it does for any refused PUBLISH).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Publish 1 failed: Not authorized"), "a forged topic must be refused: {stderr}");
}

#[tokio::test]
async fn paho_mqtt_v5_sees_reason_codes() {
    let python = fleet_tests::require_program("python3", "python3");
    let probe = Command::new(&python).args(["-c", "import paho.mqtt"]).output().unwrap();
    assert!(
        probe.status.success(),
        "paho-mqtt (PyPI) is required by this test: run `python3 -m pip install 'paho-mqtt>=2,<3'` (./scripts/test installs it)"
    );
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let d = &fleet.devices[0];
    let script = r#"
import sys, ssl, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, ca, cert, key, me, other = sys.argv[1:7]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=me, protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
done = threading.Event()
acks = {}
def on_connect(client, userdata, flags, reason_code, properties):
    print("connack", reason_code.value, flush=True)
    client.publish("devices/%s/telemetry" % other, "forged", qos=1)
    client.publish("devices/%s/telemetry" % me, "21.5", qos=1)
def on_publish(client, userdata, mid, reason_code, properties):
    acks[mid] = reason_code.value
    if len(acks) == 2:
        print("pubacks", " ".join(str(acks[m]) for m in sorted(acks)), flush=True)
        done.set()
c.on_connect = on_connect
c.on_publish = on_publish
c.connect("localhost", int(port))
c.loop_start()
ok = done.wait(20)
c.disconnect()
c.loop_stop()
sys.exit(0 if ok else 1)
"#;
    let out = Command::new(&python)
        .args([
            "-c",
            script,
            &broker.port(),
            s(&d.join("broker-trust.pem")),
            s(&d.join("cert.pem")),
            s(&d.join("key.pem")),
        ])
        .args([fleet.id(0), fleet.id(1)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "paho failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("connack 0"), "{stdout}");
    // 135 = 0x87 not authorised for the forged topic; 0 for its own.
    assert!(stdout.contains("pubacks 135 0"), "{stdout}");
}

/// The next PUBLISH (other packets skipped).
async fn next_publish5(c: &mut Raw5) -> Publish {
    loop {
        match c.recv(PATIENCE).await {
            Some(Packet::Publish(p)) => return p,
            Some(_) => {}
            None => panic!("no PUBLISH: the broker closed the session or sent nothing"),
        }
    }
}

#[tokio::test]
async fn v5_properties_reach_v5_subscribers_and_the_store_and_expired_messages_are_not_delivered() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (d0, d1) = (fleet.id(0), fleet.id(1));
    let mut svc = v5_backend(&broker, &fleet).await;
    svc.subscribe(1, &["devices/+/telemetry"]).await;

    // A v5 device's properties reach a v5 subscriber as sent, with what remains of the expiry.
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&d0, true, props()).await.code, ConnectReturnCode::Success);
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        content_type: Some("application/json".into()),
        user_properties: vec![("schema".into(), "t1".into()), ("unit".into(), "°C".into())],
        ..Default::default()
    };
    let mut p = Publish::new(format!("devices/{d0}/telemetry"), QoS::AtLeastOnce, "{\"t\":21.5}", None);
    p.pkid = 1;
    p.properties = Some(sent.clone());
    dev.send(Packet::Publish(p)).await;
    assert_eq!(dev.puback(1).await, PubAckReason::Success);
    let got = next_publish5(&mut svc).await.properties.expect("the properties");
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.user_properties, sent.user_properties, "in order, repeated keys kept");
    assert!(got.message_expiry_interval.is_some_and(|s| (590..=600).contains(&s)), "{got:?}");

    // Stored with the message, for backends that read the table.
    let st = fleet.station().await;
    fleet.wait_log_copied(st.registry()).await;
    let stored = st.registry().telemetry_of(&fleet_provision::DeviceId::parse(&d0).unwrap()).await.unwrap();
    let json = stored[0].properties.as_deref().expect("stored properties");
    assert!(json.contains("\"content_type\":\"application/json\"") && json.contains("schema"), "{json}");

    // A 3.1.1 subscriber gets the message without them (device 1, from the service).
    let mut old = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert!(matches!(old.mqtt_connect(&d1, 30).await, Some(rumqttc::mqttbytes::v4::Packet::ConnAck(_))));
    old.send(rumqttc::mqttbytes::v4::Packet::Subscribe(rumqttc::mqttbytes::v4::Subscribe::new(
        format!("devices/{d1}/commands/#"),
        rumqttc::mqttbytes::QoS::AtMostOnce,
    )))
    .await
    .unwrap();
    assert!(matches!(old.recv(PATIENCE).await, Some(rumqttc::mqttbytes::v4::Packet::SubAck(_))));
    let mut cmd = Publish::new(format!("devices/{d1}/commands/blink"), QoS::AtMostOnce, "3", None);
    cmd.properties =
        Some(PublishProperties { user_properties: vec![("k".into(), "v".into())], ..Default::default() });
    svc.send(Packet::Publish(cmd)).await;
    match old.recv(PATIENCE).await {
        Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) => assert_eq!(&p.payload[..], b"3"),
        other => panic!("expected the command, got {other:?}"),
    }

    // A retained message that expired is not delivered to a later subscriber; one that did not is.
    let mut gone = Publish::new(format!("devices/{d0}/state"), QoS::AtLeastOnce, "stale", None);
    (gone.pkid, gone.retain) = (2, true);
    gone.properties = Some(PublishProperties { message_expiry_interval: Some(1), ..Default::default() });
    dev.send(Packet::Publish(gone)).await;
    assert_eq!(dev.puback(2).await, PubAckReason::Success);
    let mut kept = Publish::new(format!("devices/{d0}/config"), QoS::AtLeastOnce, "fresh", None);
    (kept.pkid, kept.retain) = (3, true);
    dev.send(Packet::Publish(kept)).await;
    assert_eq!(dev.puback(3).await, PubAckReason::Success);
    // The expiry is the point of the test: wait it out.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    svc.subscribe(2, &[&format!("devices/{d0}/state"), &format!("devices/{d0}/config")]).await;
    let p = next_publish5(&mut svc).await;
    assert_eq!((&p.topic[..], &p.payload[..]), (format!("devices/{d0}/config").as_bytes(), &b"fresh"[..]));
    assert!(svc.recv(Duration::from_millis(500)).await.is_none(), "the expired retained message came");
}

/// The SDK's feature `mqtt5` against the broker: CONNECT v5, telemetry under a topic alias
/// (every message stored under its full topic), a refused QoS 1 message reported with its reason
/// code, and a live revocation read as DISCONNECT 0x98, after which the device waits its longest
/// back-off instead of hammering the broker.
#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_speaks_mqtt5_aliases_its_telemetry_and_reads_why_it_was_cut() {
    use fleet_device::client::{ClientError, Device, Incoming};
    use fleet_device::credentials::Credentials;
    use fleet_device::mqtt::{Millis, Mqtt5, SessionConfig, SessionError};
    use std::sync::mpsc;

    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let addr = broker.mqtt;
    let (to_test, from_device) = mpsc::channel::<&'static str>();
    let start = std::time::Instant::now();
    let now = move || Millis(start.elapsed().as_millis() as u64);
    let device = std::thread::spawn(move || {
        let creds = Credentials::decode(&bundle).unwrap();
        let cfg = SessionConfig {
            mqtt5: Some(Mqtt5::default()),
            backoff_max_ms: 600_000,
            ..SessionConfig::default()
        };
        let mut d: Device<'_, 8, 256> = Device::new(creds, cfg);
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let mut conn = d
            .connect(
                embedded_io_adapters::std::FromStd::new(tcp),
                &mut rx,
                &mut tx,
                rand::rngs::OsRng,
                None,
                now(),
            )
            .unwrap();
        for i in 0..3u32 {
            d.publish_telemetry(&(i, 21.5f32)).unwrap();
        }
        // Its own commands topic is not its to publish: refused with 0x87, not retried.
        d.publish("commands/forged", b"x", fleet_device::mqtt::QoS::AtLeastOnce).unwrap();
        let (mut delivered, mut refused) = (0, None);
        let t = std::time::Instant::now();
        while delivered < 3 || refused.is_none() {
            assert!(t.elapsed() < PATIENCE, "no PUBACKs");
            match d.poll(&mut conn, now()).expect("poll") {
                Some(Incoming::Delivered) => delivered += 1,
                Some(Incoming::Refused { reason }) => refused = Some(reason),
                _ => {}
            }
        }
        assert_eq!(refused, Some(0x87));
        assert_eq!(d.session().queued(), 0, "the refused message is not retried");
        to_test.send("published").unwrap();
        let t = std::time::Instant::now();
        let err = loop {
            assert!(t.elapsed() < PATIENCE, "the revocation did not reach the device");
            if let Err(e) = d.poll(&mut conn, now()) {
                break e;
            }
        };
        assert!(matches!(err, ClientError::Session(SessionError::Disconnected(0x98))), "{err:?}");
        drop(conn);
        let at = now();
        d.disconnected(at, 7);
        let wait = d.session().reconnect_at().unwrap().0 - at.0;
        assert!(wait >= 300_000, "a revoked device backs off to its longest wait, not {wait} ms");
    });
    let from_device = tokio::task::spawn_blocking(move || {
        assert_eq!(from_device.recv_timeout(PATIENCE).unwrap(), "published");
        from_device
    })
    .await
    .unwrap();
    let id = fleet.id(0);
    let rows = fleet.telemetry_rows(&id).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|(t, _)| *t == format!("devices/{id}/telemetry")), "aliases resolved: {rows:?}");
    fleet.revoke(0).await;
    tokio::task::spawn_blocking(move || device.join()).await.unwrap().expect("device thread");
    drop(from_device);
}

/// As [`publish_with`], retained.
fn retained_with(topic: &str, pkid: u16, payload: &'static str, props: PublishProperties) -> Packet {
    let mut p = publish_with(topic, pkid, payload, props);
    if let Packet::Publish(p) = &mut p {
        p.retain = true;
    }
    p
}

/// The fleet's backend service connected over MQTT 5.
async fn v5_backend(broker: &BrokerProc, fleet: &Fleet) -> Raw5 {
    let mut svc = Raw5::device(broker, &fleet.service).await;
    assert_eq!(svc.connect("backend", true, props()).await.code, ConnectReturnCode::Success);
    svc
}

/// A fleet of one device, a broker started with `args`, and the device connected over MQTT 5.
async fn one_v5_device(args: &[&str]) -> (Fleet, BrokerProc, Raw5, String) {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, args);
    let id = fleet.id(0);
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    (fleet, broker, dev, id)
}

/// A device's QoS 1 message with these properties, `pkid` 1 unless told.
fn publish_with(topic: &str, pkid: u16, payload: &'static str, props: PublishProperties) -> Packet {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload, None);
    p.pkid = pkid;
    p.properties = Some(props);
    Packet::Publish(p)
}

/// `n` user properties of `len` bytes each (key and value together).
fn user_properties(n: usize, len: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (format!("k{i}"), "v".repeat(len.saturating_sub(format!("k{i}").len())))).collect()
}

#[tokio::test]
async fn messages_that_expire_before_they_leave_do_not_take_a_subscribers_window() {
    // Message Expiry 0: expired before any delivery starts. Each such message was counted in
    // the subscriber's in-flight window and never sent (so never acknowledged): 64 of them from
    // one device stopped every later delivery to the backend.
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let d0 = fleet.id(0);
    let topic = format!("devices/{d0}/telemetry");
    let mut svc = v5_backend(&broker, &fleet).await;
    svc.subscribe(1, &["devices/+/telemetry"]).await;
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&d0, true, props()).await.code, ConnectReturnCode::Success);
    let stale = PublishProperties { message_expiry_interval: Some(0), ..Default::default() };
    for pkid in 1..=64 {
        dev.send(publish_with(&topic, pkid, "stale", stale.clone())).await;
        assert_eq!(dev.puback(pkid).await, PubAckReason::Success);
    }
    dev.publish(&topic, 65, "fresh", None).await;
    assert_eq!(dev.puback(65).await, PubAckReason::Success);
    let p = next_publish5(&mut svc).await;
    assert_eq!(&p.payload[..], b"fresh", "only the message that had not expired is delivered");
}

#[tokio::test]
async fn a_response_topic_must_lead_back_to_the_publisher() {
    // A request whose Response Topic is another device's command topic: a backend answering it
    // (MQTT 5 request/response) would command that device in the requester's stead.
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (d0, d1) = (fleet.id(0), fleet.id(1));
    let topic = format!("devices/{d0}/telemetry");
    let mut svc = v5_backend(&broker, &fleet).await;
    svc.subscribe(1, &["devices/+/telemetry"]).await;
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&d0, true, props()).await.code, ConnectReturnCode::Success);
    let ask = |response: String| PublishProperties {
        response_topic: Some(response),
        correlation_data: Some(Bytes::from_static(b"req-1")),
        ..Default::default()
    };
    for (pkid, response) in [
        (1, format!("devices/{d1}/commands/unlock")),
        (2, format!("status/devices/{d1}/commands/unlock")),
        (3, format!("devices/{d0}/responses/#")),
    ] {
        dev.send(publish_with(&topic, pkid, "forged", ask(response))).await;
        assert_eq!(dev.puback(pkid).await, PubAckReason::NotAuthorized, "pkid {pkid}");
    }
    // Its own subtree is where its answers come back: relayed, with the property.
    let own = format!("devices/{d0}/responses/7");
    dev.send(publish_with(&topic, 4, "asks", ask(own.clone()))).await;
    assert_eq!(dev.puback(4).await, PubAckReason::Success);
    let p = next_publish5(&mut svc).await;
    assert_eq!(&p.payload[..], b"asks", "the refused requests were not relayed");
    assert_eq!(p.properties.and_then(|p| p.response_topic), Some(own));
    let rows = fleet.telemetry_rows(&d0).await;
    assert_eq!(rows, [(topic, b"asks".to_vec())], "nor stored");
    broker.wait_metric("fleet_acl_denied_total{action=\"publish\"}", 3.0, PATIENCE).await;

    // A service reads every device's topics, certificate answers and commands included; the
    // broker answers its commands itself, so a command's Response Topic must be under a
    // device's `responses/` (or a status topic): the device would take a status on its
    // certificate answers or commands for one, and its subscribers one on its telemetry for
    // the device's; and it must be the commanded device's own (not another's answers).
    dev.subscribe(9, &[&format!("devices/{d0}/certs/#"), &format!("devices/{d0}/commands/#")]).await;
    svc.subscribe(10, &[&format!("devices/{d0}/#")]).await;
    for (pkid, response) in [
        (11, format!("devices/{d0}/certs/issued")),
        (12, format!("devices/{d0}/certs/rotate")),
        (13, format!("devices/{d0}/commands/reboot")),
        (14, format!("devices/{d0}/telemetry")),
        // Another device's answers: the statuses of d0's command would pass for d1's.
        (15, format!("devices/{d1}/responses/x")),
    ] {
        svc.send(publish_with(&format!("devices/{d0}/commands/reboot"), pkid, "now", ask(response))).await;
        assert_eq!(svc.puback(pkid).await, PubAckReason::NotAuthorized, "pkid {pkid}");
    }
    assert!(
        dev.recv(Duration::from_millis(500)).await.is_none(),
        "nothing reached the device, nothing was stored to reach it"
    );
    broker.wait_metric("fleet_acl_denied_total{action=\"publish\"}", 8.0, PATIENCE).await;
}

#[tokio::test]
async fn properties_count_against_the_retained_budget() {
    // A retained message whose bulk is in its user properties was counted as topic + payload:
    // a device could keep far more than `max_retained_bytes` says.
    let (_fleet, broker, mut dev, d0) = one_v5_device(&["--max-retained-bytes", "2048"]).await;
    let light = PublishProperties { user_properties: user_properties(4, 32), ..Default::default() };
    dev.send(retained_with(&format!("devices/{d0}/light"), 1, "x", light)).await;
    assert_eq!(dev.puback(1).await, PubAckReason::Success, "within the budget");
    let heavy = PublishProperties { user_properties: user_properties(30, 100), ..Default::default() };
    dev.send(retained_with(&format!("devices/{d0}/heavy"), 2, "x", heavy)).await;
    assert_eq!(dev.disconnect_reason(PATIENCE).await, Some(DisconnectReasonCode::QuotaExceeded));
    broker.wait_metric("fleet_limits_total{limit=\"retained_bytes\"}", 1.0, PATIENCE).await;
}

#[tokio::test]
async fn properties_count_against_the_publish_byte_rate() {
    // 3 KB of user properties around a 1-byte payload were 1 byte to the byte-rate bucket.
    let (_fleet, broker, mut dev, d0) = one_v5_device(&["--max-publish-bytes-rate", "4096"]).await;
    let bulk = PublishProperties { user_properties: user_properties(30, 100), ..Default::default() };
    for pkid in 1..=2 {
        dev.send(publish_with(&format!("devices/{d0}/telemetry"), pkid, "x", bulk.clone())).await;
        assert_eq!(dev.puback(pkid).await, PubAckReason::Success);
    }
    broker.wait_metric("fleet_limits_total{limit=\"publish_rate\"}", 1.0, PATIENCE).await;
}

#[tokio::test]
async fn a_v311_packet_after_a_v5_connect_is_malformed_not_swallowed() {
    // A 3.1.1 PUBLISH with an empty payload has no property length where v5 wants one: the
    // codec said "more bytes", after taking the packet off the buffer. It vanished: no PUBACK,
    // no close.
    let (_fleet, broker, mut dev, d0) = one_v5_device(&[]).await;
    let mut clear = rumqttc::mqttbytes::v4::Publish::new(
        format!("devices/{d0}/state"),
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        "",
    );
    (clear.pkid, clear.retain) = (1, true);
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Publish(clear).write(&mut out, 4096).unwrap();
    dev.raw.tls.write_all(&out).await.unwrap();
    dev.raw.tls.flush().await.unwrap();
    assert_eq!(dev.disconnect_reason(PATIENCE).await, Some(DisconnectReasonCode::MalformedPacket));
    broker.wait_metric("fleet_protocol_errors_total{reason=\"malformed_packet\"}", 1.0, PATIENCE).await;
}

/// A v5 session of device 0 that sends `bytes` raw; the broker's DISCONNECT reason.
async fn raw_v5_ends(broker: &BrokerProc, fleet: &Fleet, bytes: &[u8]) -> Option<DisconnectReasonCode> {
    let mut c = Raw5::device(broker, &fleet.devices[0]).await;
    assert_eq!(c.connect(&fleet.id(0), true, props()).await.code, ConnectReturnCode::Success);
    c.raw.tls.write_all(bytes).await.unwrap();
    c.raw.tls.flush().await.unwrap();
    c.disconnect_reason(PATIENCE).await
}

#[tokio::test]
async fn hostile_v5_packets_end_the_session_with_their_reason_and_the_broker_lives_on() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    use DisconnectReasonCode as D;
    let cases: [(&str, &[u8], D); 8] = [
        // AUTH without a body (success, no properties): still no enhanced authentication.
        ("empty AUTH", &[0xF0, 0x00], D::ProtocolError),
        ("AUTH continue", &[0xF0, 0x02, 0x18, 0x00], D::ProtocolError),
        ("empty PUBREL", &[0x62, 0x00], D::MalformedPacket),
        ("PUBREL", &[0x62, 0x02, 0x00, 0x01], D::QoSNotSupported),
        // A remaining length of five bytes.
        ("huge remaining length", &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], D::MalformedPacket),
        // A PUBLISH whose property length is a five-byte variable integer.
        (
            "huge property length",
            &[0x30, 0x0B, 0x00, 0x01, b't', 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x00, 0x00],
            D::MalformedPacket,
        ),
        // A PUBLISH whose properties claim more bytes than the packet has.
        (
            "property length past the end",
            &[0x30, 0x06, 0x00, 0x01, b't', 0x40, 0x26, 0x00],
            D::MalformedPacket,
        ),
        // A second CONNECT (v5), which would also reset the session's terms.
        (
            "second CONNECT",
            &[0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1E, 0x00, 0x00, 0x00],
            D::ProtocolError,
        ),
    ];
    for (what, bytes, code) in cases {
        assert_eq!(raw_v5_ends(&broker, &fleet, bytes).await, Some(code), "{what}");
    }
    // And the broker still admits and serves.
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(c.connect(&fleet.id(0), true, props()).await.code, ConnectReturnCode::Success);
    c.publish(&format!("devices/{}/telemetry", fleet.id(0)), 1, "alive", None).await;
    assert_eq!(c.puback(1).await, PubAckReason::Success);
}

#[tokio::test]
async fn a_disconnect_cannot_give_a_session_a_life_its_connect_did_not_ask_for() {
    // Connected with Session Expiry 0 (the default), left with a DISCONNECT asking for 600 s.
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(c.connect(&id, false, props()).await.code, ConnectReturnCode::Success);
    c.subscribe(1, &[&format!("devices/{id}/commands/#")]).await;
    let mut d = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
    d.properties = Some(rumqttc::v5::mqttbytes::v5::DisconnectProperties {
        session_expiry_interval: Some(600),
        reason_string: None,
        user_properties: Vec::new(),
        server_reference: None,
    });
    c.send(Packet::Disconnect(d)).await;
    assert!(c.raw.closed_within(PATIENCE).await);
    let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
    let keep = ConnectProperties { session_expiry_interval: Some(600), ..props() };
    assert!(!c.connect(&id, false, keep).await.session_present, "nothing was kept");
    assert_eq!(broker.metric("fleet_sessions_parked").await, 0.0);
}

#[tokio::test]
async fn deliveries_too_large_for_a_subscriber_do_not_take_its_window() {
    // A topic alias lets a device fill a whole packet with payload: delivered with the full
    // topic, the message is larger than the subscriber takes, and is dropped (as MQTT 5 says).
    // It was still counted in the in-flight window and never acknowledged: 64 of them stopped
    // every later delivery to the backend.
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let d0 = fleet.id(0);
    let long = format!("devices/{d0}/{}", "t".repeat(200));
    let mut svc = v5_backend(&broker, &fleet).await;
    svc.subscribe(1, &[&format!("devices/{d0}/#")]).await;
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&d0, true, props()).await.code, ConnectReturnCode::Success);
    dev.publish(&long, 1, "alias set", Some(1)).await;
    assert_eq!(dev.puback(1).await, PubAckReason::Success);
    let full: &'static str = Box::leak("x".repeat(4080).into_boxed_str());
    for pkid in 2..=65 {
        dev.publish("", pkid, full, Some(1)).await;
        assert_eq!(dev.puback(pkid).await, PubAckReason::Success);
    }
    dev.publish(&format!("devices/{d0}/telemetry"), 66, "fresh", None).await;
    assert_eq!(dev.puback(66).await, PubAckReason::Success);
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next_publish5(&mut svc).await.payload);
    }
    assert_eq!(got, [Bytes::from_static(b"alias set"), Bytes::from_static(b"fresh")]);
}

#[tokio::test]
async fn connect_terms_mqtt5_calls_protocol_errors_are_refused() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    for bad in [
        ConnectProperties { receive_maximum: Some(0), ..props() },
        ConnectProperties { max_packet_size: Some(0), ..props() },
        ConnectProperties { authentication_method: Some("SCRAM-SHA-1".into()), ..props() },
    ] {
        let mut c = Raw5::device(&broker, &fleet.devices[0]).await;
        let ack = c.connect(&id, true, bad.clone()).await;
        assert_eq!(ack.code, ConnectReturnCode::ProtocolError, "{bad:?}");
    }
    broker.wait_refused(Refusal::ProtocolError, 3.0, PATIENCE).await;
}

/// SUBSCRIBE with these filters (options set by the caller) and Subscription Identifier `id`.
async fn subscribe_with(
    c: &mut Raw5,
    pkid: u16,
    filters: Vec<Filter>,
    id: Option<usize>,
) -> Vec<SubscribeReasonCode> {
    let properties = id.map(|id| rumqttc::v5::mqttbytes::v5::SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    });
    c.send(Packet::Subscribe(Subscribe { pkid, filters, properties })).await;
    loop {
        match c.recv(PATIENCE).await {
            Some(Packet::SubAck(a)) if a.pkid == pkid => return a.return_codes,
            Some(_) => {}
            None => panic!("no SUBACK"),
        }
    }
}

#[tokio::test]
async fn subscription_options_no_local_retain_as_published_retain_handling_and_identifiers() {
    use rumqttc::v5::mqttbytes::v5::RetainForwardRule;
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let state = format!("devices/{id}/state");
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    let mut svc = v5_backend(&broker, &fleet).await;

    // No Local: the device does not get its own message back; without it, it does.
    let mut own = Filter::new(state.clone(), QoS::AtMostOnce);
    own.nolocal = true;
    subscribe_with(&mut dev, 1, vec![own], None).await;
    // The service: Retain As Published, Subscription Identifier 7.
    let mut rap = Filter::new("devices/+/state", QoS::AtMostOnce);
    rap.preserve_retain = true;
    subscribe_with(&mut svc, 2, vec![rap], Some(7)).await;
    let mut retained = Publish::new(state.clone(), QoS::AtLeastOnce, "on", None);
    (retained.pkid, retained.retain) = (3, true);
    dev.send(Packet::Publish(retained)).await;
    assert_eq!(dev.puback(3).await, PubAckReason::Success, "and no copy of its own came first");
    let got = next_publish5(&mut svc).await;
    assert!(got.retain, "retain as published");
    assert_eq!(got.properties.map(|p| p.subscription_identifiers), Some(vec![7]));
    assert!(dev.recv(Duration::from_millis(300)).await.is_none(), "No Local: nothing for the publisher");

    // Retain Handling: 2 never sends the retained message; 1 only to a new subscription.
    let mut never = Filter::new(state.clone(), QoS::AtMostOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    subscribe_with(&mut svc, 4, vec![never], None).await;
    assert!(
        svc.recv(Duration::from_millis(300)).await.is_none(),
        "retain handling 2 sent the retained message"
    );
    let mut on_new = Filter::new(format!("devices/{id}/#"), QoS::AtMostOnce);
    on_new.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    subscribe_with(&mut svc, 5, vec![on_new.clone()], None).await;
    assert_eq!(&next_publish5(&mut svc).await.payload[..], b"on", "a new subscription gets it");
    subscribe_with(&mut svc, 6, vec![on_new], None).await;
    assert!(svc.recv(Duration::from_millis(300)).await.is_none(), "the same subscription again does not");
    // A subscription without Retain As Published gets live messages with retain 0.
    let mut plain = Publish::new(state, QoS::AtLeastOnce, "off", None);
    (plain.pkid, plain.retain) = (7, true);
    dev.send(Packet::Publish(plain)).await;
    assert_eq!(dev.puback(7).await, PubAckReason::Success);
    let got = next_publish5(&mut svc).await;
    assert_eq!(&got.payload[..], b"off");
    // Its matching subscriptions: `devices/+/state` (RAP, id 7) and the two without: retain kept
    // because one of them asked, every identifier given.
    assert!(got.retain);
    assert_eq!(got.properties.map(|p| p.subscription_identifiers), Some(vec![7]));
}

#[tokio::test]
async fn a_shared_subscription_spreads_messages_over_its_members_and_a_leaving_member_passes_its_share_on() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let mut members = Vec::new();
    for name in ["backend", "backend-2", "backend-3"] {
        let dir = match name {
            "backend" => fleet.service.clone(),
            other => fleet.service_identity(other).await,
        };
        let mut m = Raw5::device(&broker, &dir).await;
        let ack = m.connect(name, true, props()).await;
        assert_eq!(ack.properties.and_then(|p| p.shared_subscription_available), Some(1));
        let codes = m.subscribe(1, &["$share/ingest/devices/+/telemetry"]).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        members.push(m);
    }
    // A malformed share (no filter), and a filter the member's ACL refuses inside a share.
    let codes = members[0].subscribe(2, &["$share/x", "$share/g/status/#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::TopicFilterInvalid, SubscribeReasonCode::NotAuthorized]);
    let mut dev = Raw5::device(&broker, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    const N: u16 = 30;
    for i in 1..=N {
        dev.publish(&format!("devices/{id}/telemetry"), i, "m", None).await;
        assert_eq!(dev.puback(i).await, PubAckReason::Success);
    }
    // Nobody acknowledges: each member holds its share in flight. The members take turns.
    let telemetry = format!("devices/{id}/telemetry");
    let mut got: Vec<Vec<u16>> = vec![Vec::new(); 3];
    let t = std::time::Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < usize::from(N) {
        assert!(t.elapsed() < PATIENCE, "only {got:?} arrived");
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(Packet::Publish(p)) = m.recv(Duration::from_millis(100)).await {
                if p.topic[..] == *telemetry.as_bytes() {
                    got[i].push(p.pkid);
                }
            }
        }
    }
    let counts: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        usize::from(N),
        "each message to exactly one member: {counts:?}"
    );
    assert!(counts.iter().all(|&c| c == usize::from(N) / 3), "in turn: {counts:?}");
    // The third member leaves without acknowledging: its ten go to the other two.
    let gone = members.pop().unwrap();
    drop(gone);
    let mut again = 0;
    let t = std::time::Instant::now();
    while again < usize::from(N) / 3 {
        assert!(t.elapsed() < PATIENCE, "only {again} of the leaving member's messages came back");
        for m in members.iter_mut() {
            while let Some(Packet::Publish(p)) = m.recv(Duration::from_millis(100)).await {
                if p.topic[..] == *telemetry.as_bytes() {
                    again += 1;
                }
            }
        }
    }
    assert_eq!(again, usize::from(N) / 3);
}

/// A shared subscription across a 3-node cluster: one member on each node, a device publishing on
/// a fourth connection to the first node. Each message goes to exactly one member, on any node;
/// the third member dies mid-stream (its connection dropped, nothing acknowledged), and what it
/// held reaches the other two: nothing lost, nothing doubled but what the dead member held.
#[tokio::test]
async fn a_shared_subscription_spans_the_cluster_and_a_member_that_dies_passes_its_share_on() {
    let cluster = Cluster::builder().nodes(3).start().await;
    let fleet = &cluster.fleet;
    let id = fleet.id(0);
    let mut members = Vec::new();
    for (node, name) in cluster.nodes.iter().zip(["backend", "backend-2", "backend-3"]) {
        let dir = match name {
            "backend" => fleet.service.clone(),
            other => fleet.service_identity(other).await,
        };
        let mut m = Raw5::device(node, &dir).await;
        let ack = m.connect(name, true, props()).await;
        assert_eq!(ack.properties.and_then(|p| p.shared_subscription_available), Some(1), "{name}");
        let codes = m.subscribe(1, &["$share/ingest/devices/+/telemetry"]).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)], "{name}");
        members.push(m);
    }
    // The filter inside is still held to the member's ACL on a cluster member.
    let codes = members[0].subscribe(2, &["$share/g/claims/#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::NotAuthorized]);

    let mut dev = Raw5::device(&cluster.nodes[0], &fleet.devices[0]).await;
    assert_eq!(dev.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    const N: u16 = 150;
    let telemetry = format!("devices/{id}/telemetry");
    let topic = telemetry.clone();
    let publisher = tokio::spawn(async move {
        for i in 1..=N {
            let mut p = Publish::new(&topic, QoS::AtLeastOnce, format!("m{i}"), None);
            p.pkid = i;
            dev.send(Packet::Publish(p)).await;
            assert_eq!(dev.puback(i).await, PubAckReason::Success, "message {i}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        dev
    });
    // Members 1 and 2 acknowledge what they get; member 3 holds everything, and dies once it
    // holds 10.
    let mut got: Vec<Vec<u16>> = vec![Vec::new(); 3];
    let mut dead = false;
    let t = std::time::Instant::now();
    loop {
        let live: std::collections::HashSet<u16> = got[0].iter().chain(&got[1]).copied().collect();
        if live.len() == usize::from(N) {
            break;
        }
        assert!(t.elapsed() < PATIENCE * 3, "{} of {N} reached a live member: {got:?}", live.len());
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(Packet::Publish(p)) = m.recv(Duration::from_millis(20)).await {
                if p.topic[..] != *telemetry.as_bytes() {
                    continue;
                }
                let n: u16 = String::from_utf8_lossy(&p.payload)[1..].parse().unwrap();
                got[i].push(n);
                if i < 2 {
                    let ack = PubAck { pkid: p.pkid, reason: PubAckReason::Success, properties: None };
                    m.send(Packet::PubAck(ack)).await;
                }
            }
        }
        if !dead && got[2].len() >= 10 {
            // Before its death every node took part.
            assert!(got.iter().all(|g| !g.is_empty()), "each node's member got some: {got:?}");
            drop(members.pop());
            dead = true;
        }
    }
    assert!(dead, "the third member never held 10 messages: {got:?}");
    drop(publisher.await.unwrap());
    // Nothing doubled beyond QoS 1: a message reached the live members twice only if the dead
    // member held it (its session ended unacknowledged), and every one it held came back.
    let mut seen = std::collections::HashMap::<u16, usize>::new();
    for n in got[0].iter().chain(&got[1]) {
        *seen.entry(*n).or_default() += 1;
    }
    let twice: Vec<u16> = seen.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    assert!(
        twice.iter().all(|n| got[2].contains(n)),
        "doubled without cause: {twice:?}, dead held {:?}",
        got[2]
    );
    assert!(got[2].iter().all(|n| seen.contains_key(n)), "the dead member's share was lost: {:?}", got[2]);
    assert!(seen.values().all(|c| *c <= 2), "{seen:?}");
}

/// A node that moved (`moved_to`) sends every client that authenticates to the new server: the
/// SDK follows the Server Reference on its next attempt and its telemetry lands there; paho-mqtt
/// reads CONNACK 0x9D and the reference; an outsider's certificate learns nothing.
#[tokio::test]
async fn a_moved_node_sends_its_devices_to_the_new_server_and_the_sdk_follows() {
    use fleet_device::client::{connect_tcp_to, ClientError, Device, Incoming};
    use fleet_device::credentials::Credentials;
    use fleet_device::mqtt::{Millis, Mqtt5, SessionConfig, SessionError};

    let fleet = Fleet::new(1, None).await;
    let new = BrokerProc::start(&fleet, &[]);
    let reference = format!("localhost:{}", new.port());
    let old = BrokerProc::start(&fleet, &["--moved-to", &reference]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let old_port = old.mqtt.port();
    let start = std::time::Instant::now();
    let now = move || Millis(start.elapsed().as_millis() as u64);
    let followed = reference.clone();
    let device = std::thread::spawn(move || {
        let mut creds = Credentials::decode(&bundle).unwrap();
        creds.broker_port = old_port; // the factory bundle names the old node
        let cfg = SessionConfig { mqtt5: Some(Mqtt5::default()), ..SessionConfig::default() };
        let mut d: Device<'_, 8, 256> = Device::new(creds, cfg);
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let mut attempt = |d: &mut Device<'_, 8, 256>| -> Result<(), ClientError> {
            let tcp = connect_tcp_to(d.broker(), Duration::from_millis(100)).unwrap();
            let mut conn = d.connect(tcp, &mut rx, &mut tx, rand::rngs::OsRng, None, now())?;
            d.publish_telemetry(&(1u32, 21.5f32)).unwrap();
            let t = std::time::Instant::now();
            loop {
                assert!(t.elapsed() < PATIENCE, "no PUBACK");
                if let Some(Incoming::Delivered) = d.poll(&mut conn, now())? {
                    return Ok(());
                }
            }
        };
        assert_eq!(d.broker(), ("localhost", old_port));
        let err = attempt(&mut d).unwrap_err();
        assert!(matches!(err, ClientError::Session(SessionError::Moved(0x9D))), "{err:?}");
        assert_eq!(d.session().server_reference(), Some(followed.as_str()));
        d.disconnected(now(), 7);
        assert_eq!(d.broker().1, followed.rsplit_once(':').unwrap().1.parse::<u16>().unwrap());
        attempt(&mut d).expect("the new server admits it");
    });
    tokio::task::spawn_blocking(move || device.join()).await.unwrap().expect("device thread");
    old.wait_refused(Refusal::Moved, 1.0, PATIENCE).await;
    new.wait_metric("fleet_messages_received_total", 1.0, PATIENCE).await;
    assert_eq!(old.metric("fleet_messages_received_total").await, 0.0, "nothing published to the old node");

    // paho-mqtt, a client nobody here wrote, reads the same CONNACK.
    let python = fleet_tests::require_program("python3", "python3");
    let script = r#"
import sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, ca, cert, key, me = sys.argv[1:6]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=me, protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
done = threading.Event()
def on_connect(client, userdata, flags, reason_code, properties):
    print("connack", reason_code.value, getattr(properties, "ServerReference", None), flush=True)
    done.set()
c.on_connect = on_connect
c.connect("localhost", int(port))
c.loop_start()
ok = done.wait(20)
c.loop_stop()
sys.exit(0 if ok else 1)
"#;
    let d = &fleet.devices[0];
    let out = Command::new(&python)
        .args(["-c", script, &old.port(), s(&d.join("broker-trust.pem")), s(&d.join("cert.pem"))])
        .args([s(&d.join("key.pem")), &fleet.id(0)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "paho failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("connack 157 {reference}")), "{stdout}");
    // A 3.1.1 client is told to try later (CONNACK 3), with nothing to follow.
    let mut v4 = Raw::device(old.mqtt, d).await.unwrap();
    let ack = v4.mqtt_connect(&fleet.id(0), 30).await;
    assert_eq!(connack_code(&ack), Some(rumqttc::mqttbytes::v4::ConnectReturnCode::ServiceUnavailable));
}

/// A member that takes messages and never reads or acknowledges them (a stuck or hostile
/// backend in the group) is passed over once its queue is full, in a cluster as on one node: its
/// node hands what the NATS queue gives it to a member on another node instead of dropping it.
/// The live member gets everything but what the stuck one holds (one in flight, its queue).
#[tokio::test]
async fn in_a_cluster_a_member_that_never_reads_is_passed_over_not_a_sink() {
    const QUEUE: usize = 8;
    let cluster =
        Cluster::builder().nodes(2).node_args(&["--max-queued-messages", &QUEUE.to_string()]).start().await;
    let fleet = &cluster.fleet;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let filter = "$share/ingest/devices/+/telemetry";
    let mut live = Raw5::device(n0, &fleet.service).await;
    assert_eq!(live.connect("backend", true, props()).await.code, ConnectReturnCode::Success);
    assert_eq!(live.subscribe(1, &[filter]).await, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let mut stuck = Raw5::device(n1, &fleet.service_identity("backend-2").await).await;
    let one = ConnectProperties { receive_maximum: Some(1), ..props() };
    assert_eq!(stuck.connect("backend-2", true, one).await.code, ConnectReturnCode::Success);
    assert_eq!(stuck.subscribe(1, &[filter]).await, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    for n in [n0, n1] {
        // The telemetry subject and the hand-offs, in the group's queue.
        n.wait_metric("fleet_cluster_share_subscriptions", 2.0, Duration::from_secs(5)).await;
    }

    let id = fleet.id(0);
    let mut dev = Raw5::device(n0, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    const N: u16 = 60;
    let topic = format!("devices/{id}/telemetry");
    for i in 1..=N {
        let mut p = Publish::new(&topic, QoS::AtLeastOnce, format!("m{i}"), None);
        p.pkid = i;
        dev.send(Packet::Publish(p)).await;
        assert_eq!(dev.puback(i).await, PubAckReason::Success, "message {i}");
    }
    let mut got = std::collections::HashSet::new();
    while let Some(p) = live.recv(Duration::from_secs(2)).await {
        if let Packet::Publish(p) = p {
            got.insert(p.payload.clone());
            let ack = PubAck { pkid: p.pkid, reason: PubAckReason::Success, properties: None };
            live.send(Packet::PubAck(ack)).await;
        }
    }
    let held = 1 + QUEUE;
    assert!(
        got.len() + held >= usize::from(N),
        "{} of {N} reached the live member; the stuck one holds at most {held}",
        got.len()
    );
    drop(stuck);
}

/// MQTT 5 request/response for commands: a v5 service sets Response Topic and Correlation Data
/// on a command; the broker's statuses (`queued`, `delivered`, `acknowledged`) and the device's
/// own answer reach that topic with the same correlation data, and the `status/...` topic
/// still gets them for 3.1.1 services.
#[tokio::test]
async fn a_command_s_statuses_and_the_device_s_answer_come_back_to_its_response_topic() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    command_round_trip(&fleet, &broker, &broker).await;
}

/// As above across a cluster: the service on one node, the device on another. The device's node
/// makes the `delivered` and `acknowledged` statuses and relays them to the Response Topic on
/// the service's behalf (origin `reply <service>`, held to the service's subscribe ACL).
#[tokio::test]
async fn in_a_cluster_a_command_s_answers_reach_its_response_topic_from_the_device_s_node() {
    let cluster = Cluster::builder().nodes(2).start().await;
    command_round_trip(&cluster.fleet, &cluster.nodes[0], &cluster.nodes[1]).await;
}

/// The backend (on `svc_node`) sends a v5 command with a Response Topic to the device (on
/// `dev_node`); the statuses and the device's answer come back there with the correlation data.
async fn command_round_trip(fleet: &Fleet, svc_node: &BrokerProc, dev_node: &BrokerProc) {
    let id = fleet.id(0);
    // The answer topic is in the device's subtree: the device may publish there, the service
    // may subscribe to it (a Response Topic must be one its sender may read).
    let answers = format!("devices/{id}/responses/backend");
    let mut svc = v5_backend(svc_node, fleet).await;
    svc.subscribe(1, &[&answers, "status/devices/+/commands/#"]).await;
    let mut dev = Raw5::device(dev_node, &fleet.devices[0]).await;
    assert_eq!(dev.connect(&id, true, props()).await.code, ConnectReturnCode::Success);
    dev.subscribe(1, &[&format!("devices/{id}/commands/#")]).await;

    let ask = PublishProperties {
        response_topic: Some(answers.clone()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        ..Default::default()
    };
    svc.send(publish_with(&format!("devices/{id}/commands/reboot"), 7, "now", ask)).await;
    assert_eq!(svc.puback(7).await, PubAckReason::Success);

    // The device gets the command with the sender's response topic and correlation data, and
    // answers there.
    let cmd = next_publish5(&mut dev).await;
    let props = cmd.properties.clone().expect("properties");
    assert_eq!(props.response_topic.as_deref(), Some(answers.as_str()));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-42"[..]));
    let answer = PublishProperties { correlation_data: props.correlation_data.clone(), ..Default::default() };
    dev.send(publish_with(&answers, 9, "{\"rebooting\":true}", answer)).await;
    assert_eq!(dev.puback(9).await, PubAckReason::Success);
    dev.send(Packet::PubAck(rumqttc::v5::mqttbytes::v5::PubAck {
        pkid: cmd.pkid,
        reason: PubAckReason::Success,
        properties: None,
    }))
    .await;

    // On the response topic: queued, delivered, the device's answer, acknowledged; each with the
    // correlation data. On the status topic: the three statuses.
    let (mut on_answers, mut on_status) = (Vec::new(), Vec::new());
    let t = std::time::Instant::now();
    while on_answers.len() < 4 || on_status.len() < 3 {
        assert!(t.elapsed() < PATIENCE, "answers {on_answers:?}, statuses {on_status:?}");
        let p = next_publish5(&mut svc).await;
        let body = String::from_utf8_lossy(&p.payload).into_owned();
        if p.topic[..] == *answers.as_bytes() {
            let correlation = p.properties.and_then(|p| p.correlation_data);
            assert_eq!(correlation.as_deref(), Some(&b"req-42"[..]), "{body}");
            on_answers.push(body);
        } else {
            on_status.push(body);
        }
    }
    let status_of = |b: &String| {
        serde_json::from_str::<serde_json::Value>(b)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_owned))
    };
    let answered: Vec<Option<String>> = on_answers.iter().map(status_of).collect();
    assert!(
        answered.contains(&Some("queued".into())) && answered.contains(&Some("acknowledged".into())),
        "{on_answers:?}"
    );
    assert!(on_answers.iter().any(|b| b.contains("rebooting")), "the device's answer: {on_answers:?}");
    let statuses: Vec<Option<String>> = on_status.iter().map(status_of).collect();
    assert_eq!(statuses, [Some("queued".into()), Some("delivered".into()), Some("acknowledged".into())]);
}
