//! The durable command queue (issue 16, docs/spec/commands.md) with the real broker: a command
//! sent while the device is offline arrives on its next connect exactly once at the application
//! (the SDK, through fleet-sim), and the sender sees queued → delivered → acknowledged; a command
//! whose TTL passes is never delivered and is reported expired; a full queue drops the oldest; a
//! command for an unknown or revoked device, or too large, is refused with a status; a kill -9 of
//! the broker loses no stored command.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;

fn sim() -> PathBuf {
    fleet_tests::workspace_bin_dir(&["fleet-sim", "fleet-broker"]).join("fleet-sim")
}

/// A service session subscribed to every command status.
async fn service(broker: &BrokerProc, fleet: &Fleet) -> Raw {
    let mut s = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(
        connack_code(&s.mqtt_connect("backend", 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    subscribe(&mut s, "status/devices/+/commands/#", 1).await;
    s
}

type Seen = Vec<(String, String, String)>;

/// Records a status message (name, status, reason) and acknowledges it.
async fn record(s: &mut Raw, p: &Publish, out: &mut Seen) {
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    out.push((
        v["name"].as_str().unwrap_or_default().to_owned(),
        v["status"].as_str().unwrap_or_default().to_owned(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    ));
    if p.qos == QoS::AtLeastOnce {
        s.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await.unwrap();
    }
}

/// Sends a QoS 1 command and waits for its PUBACK (the command is stored by then); status
/// messages arriving meanwhile go to `seen`.
async fn send(s: &mut Raw, seen: &mut Seen, topic: &str, payload: &[u8], pkid: u16) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = pkid;
    s.send(Packet::Publish(p)).await.unwrap();
    loop {
        match s.recv(Duration::from_secs(5)).await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => return,
            Some(Packet::Publish(p)) => record(s, &p, seen).await,
            Some(_) => continue,
            None => panic!("no PUBACK for the command on {topic}"),
        }
    }
}

/// Reads status messages until `done` holds for every one seen so far (at most [`PATIENCE`]);
/// returns them.
async fn statuses_until(s: &mut Raw, seen: &mut Seen, what: &str, done: impl Fn(&Seen) -> bool) -> Seen {
    let t = std::time::Instant::now();
    while !done(seen) {
        let left = PATIENCE.checked_sub(t.elapsed()).unwrap_or_default();
        match s.recv(left).await {
            Some(Packet::Publish(p)) => record(s, &p, seen).await,
            Some(_) => {}
            None => panic!("statuses: no {what} in {:?}: {seen:?}", t.elapsed()),
        }
    }
    seen.clone()
}

/// Whether `seen` holds status `status` of command `name`.
fn has(seen: &Seen, name: &str, status: &str) -> bool {
    seen.iter().any(|s| s.0 == name && s.1 == status)
}

fn run_sim(fleet: &Fleet, port: &str, secs: u32) -> String {
    let out = Command::new(sim())
        .args(["run", "--port", port, "--duration", &secs.to_string(), "--rate", "1"])
        .arg("--devices")
        .arg(fleet.dir.path().join("devices"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fleet-sim failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The COMMANDS column of a device's line in fleet-sim's table; the device must have been
/// connected at the end and had telemetry acknowledged, or "0 commands" would prove nothing.
fn commands_seen(out: &str, device: &str) -> u32 {
    let line = out.lines().find(|l| l.starts_with(device)).unwrap_or_else(|| panic!("{device} not in {out}"));
    assert!(line.ends_with("  connected"), "{device} was not connected:\n{out}");
    let cols: Vec<&str> = line.split_whitespace().collect();
    let acked: u64 = cols[2].parse().unwrap();
    assert!(acked >= 1, "{device} had no telemetry acknowledged:\n{out}");
    cols[3].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_sent_while_the_device_sleeps_arrives_once_on_its_next_connect() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let mut svc = service(&broker, &fleet).await;
    let mut seen = Seen::new();
    let dev = fleet.id(0);
    send(&mut svc, &mut seen, &format!("devices/{dev}/commands/blink"), b"3", 10).await;
    send(&mut svc, &mut seen, &format!("devices/{dev}/commands/reboot"), b"now", 11).await;
    let queued = statuses_until(&mut svc, &mut seen, "two queued", |s| {
        s.iter().filter(|s| s.1 == "queued").count() >= 2
    })
    .await;
    assert_eq!(queued.iter().filter(|s| s.1 == "queued").count(), 2, "{queued:?}");
    // The device wakes up: both, in order, once each (fleet-sim acknowledges each on acks/<name>).
    let out = tokio::task::block_in_place(|| run_sim(&fleet, &broker.port(), 3));
    assert_eq!(commands_seen(&out, &dev), 2, "{out}");
    assert_eq!(commands_seen(&out, &fleet.id(1)), 0, "{out}");
    let _ = statuses_until(&mut svc, &mut seen, "both acknowledged", |s| {
        has(s, "blink", "acknowledged") && has(s, "reboot", "acknowledged")
    })
    .await;
    let of = |name: &str| seen.iter().filter(|s| s.0 == name).map(|s| s.1.clone()).collect::<Vec<_>>();
    assert_eq!(of("blink"), vec!["queued", "delivered", "acknowledged"], "{seen:?}");
    assert_eq!(of("reboot"), vec!["queued", "delivered", "acknowledged"], "{seen:?}");
    let acks: Vec<_> =
        fleet.telemetry_rows(&dev).await.into_iter().filter(|r| r.0.contains("/acks/")).collect();
    assert_eq!(
        acks.iter().map(|r| r.0.rsplit('/').next().unwrap().to_owned()).collect::<Vec<_>>(),
        ["blink", "reboot"]
    );
    // Settled: the next wake-up brings nothing again.
    let out = tokio::task::block_in_place(|| run_sim(&fleet, &broker.port(), 2));
    assert_eq!(commands_seen(&out, &dev), 0, "{out}");
    assert!(broker.metric("fleet_commands_total{status=\"acknowledged\"}").await >= 2.0);

    // The station reads the same history from the registry, newest first.
    let listed = station_commands(&fleet, &dev);
    let rows: Vec<(&str, &str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
                c["payload"]["text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [("reboot", "acknowledged", "now"), ("blink", "acknowledged", "3")], "{listed}");
    assert_eq!(station_commands(&fleet, &fleet.id(1)), serde_json::json!([]));
    let unknown = Command::new(fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision"))
        .arg("--home")
        .arg(fleet.home())
        .args(["commands", "dev-000000000000"])
        .env_remove("FLEET_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("dev-000000000000"), "{unknown:?}");
}

/// `fleet-provision commands <id> --json`.
fn station_commands(fleet: &Fleet, device: &str) -> serde_json::Value {
    let out = Command::new(fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision"))
        .arg("--home")
        .arg(fleet.home())
        .args(["commands", device, "--json"])
        .env_remove("FLEET_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_command_is_never_delivered_and_a_full_queue_drops_the_oldest() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &["--max-queued-commands", "3"]);
    let mut svc = service(&broker, &fleet).await;
    let mut seen = Seen::new();
    let dev = fleet.id(0);
    send(&mut svc, &mut seen, &format!("devices/{dev}/commands/soon/ttl=1"), b"x", 1).await;
    for (i, name) in ["c1", "c2", "c3", "c4"].iter().enumerate() {
        send(&mut svc, &mut seen, &format!("devices/{dev}/commands/{name}"), b"y", 2 + i as u16).await;
    }
    let _ = statuses_until(&mut svc, &mut seen, "two dropped", |s| {
        has(s, "c1", "dropped") && (has(s, "soon", "dropped") || has(s, "soon", "expired"))
    })
    .await;
    let is = |name: &str, st: &str| has(&seen, name, st);
    // Queue of 3: "soon" and "c1" dropped as the 4th and 5th arrived ("soon" may expire first).
    assert!(is("c1", "dropped"), "{seen:?}");
    assert!(is("soon", "dropped") || is("soon", "expired"), "{seen:?}");
    assert!(seen.iter().any(|s| s.1 == "dropped" && s.2 == "queue_full"), "{seen:?}");
    let out = tokio::task::block_in_place(|| run_sim(&fleet, &broker.port(), 3));
    assert_eq!(commands_seen(&out, &dev), 3, "{out}");
    let acks: Vec<String> = fleet
        .telemetry_rows(&dev)
        .await
        .into_iter()
        .filter(|r| r.0.contains("/acks/"))
        .map(|r| r.0.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(acks, ["c2", "c3", "c4"]);

    // A TTL that passes while the device is away: expired, never delivered.
    send(&mut svc, &mut seen, &format!("devices/{dev}/commands/late/ttl=1"), b"z", 9).await;
    let _ = statuses_until(&mut svc, &mut seen, "late expired", |s| has(s, "late", "expired")).await;
    let out = tokio::task::block_in_place(|| run_sim(&fleet, &broker.port(), 2));
    assert_eq!(commands_seen(&out, &dev), 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_for_unknown_or_revoked_devices_or_too_large_are_refused_with_a_reason() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &["--max-command-bytes", "100"]);
    let mut svc = service(&broker, &fleet).await;
    let mut seen = Seen::new();
    fleet.revoke(1).await;
    send(&mut svc, &mut seen, "devices/dev-nosuchdevice/commands/x", b"1", 1).await;
    send(&mut svc, &mut seen, &format!("devices/{}/commands/x", fleet.id(1)), b"1", 2).await;
    send(&mut svc, &mut seen, &format!("devices/{}/commands/x", fleet.id(0)), &[7u8; 101], 3).await;
    send(&mut svc, &mut seen, &format!("devices/{}/commands/x/ttl=0", fleet.id(0)), b"1", 4).await;
    let _ = statuses_until(&mut svc, &mut seen, "four refusals", |s| {
        s.iter().filter(|s| s.1 == "refused").count() >= 4
    })
    .await;
    let reasons: Vec<&str> = seen.iter().filter(|s| s.1 == "refused").map(|s| s.2.as_str()).collect();
    assert_eq!(reasons, ["unknown_device", "revoked", "too_large", "bad_ttl"], "{seen:?}");
    // Every refusal names the command it refuses, a bad `ttl=` level included.
    let names: Vec<&str> = seen.iter().filter(|s| s.1 == "refused").map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["x", "x", "x", "x"], "{seen:?}");
    assert!(!seen.iter().any(|s| s.1 == "queued"), "{seen:?}");
    assert_eq!(broker.metric("fleet_commands_total{status=\"refused\"}").await, 4.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_with_queued_commands_loses_none_and_delivers_none_twice() {
    let fleet = Fleet::new(1, None).await;
    let mut broker = BrokerProc::start(&fleet, &[]);
    let port = broker.mqtt.port();
    let mut svc = service(&broker, &fleet).await;
    let mut seen = Seen::new();
    let dev = fleet.id(0);
    for i in 0..5u16 {
        send(&mut svc, &mut seen, &format!("devices/{dev}/commands/n{i}"), b"p", 20 + i).await;
    }
    broker.kill9();
    let broker = BrokerProc::start_on(&fleet, port, &[]);
    let out = tokio::task::block_in_place(|| run_sim(&fleet, &broker.port(), 3));
    assert_eq!(commands_seen(&out, &dev), 5, "{out}");
    let acks: Vec<String> = fleet
        .telemetry_rows(&dev)
        .await
        .into_iter()
        .filter(|r| r.0.contains("/acks/"))
        .map(|r| r.0.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(acks, ["n0", "n1", "n2", "n3", "n4"]);
}

/// A raw CONNECT with the clean-session flag; returns (accepted, session present).
async fn connect_with(c: &mut Raw, client_id: &str, clean: bool) -> (bool, bool) {
    let mut conn = rumqttc::mqttbytes::v4::Connect::new(client_id);
    conn.keep_alive = 30;
    conn.clean_session = clean;
    c.send(Packet::Connect(conn)).await.unwrap();
    match c.recv(Duration::from_secs(5)).await {
        Some(Packet::ConnAck(a)) => {
            (a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success, a.session_present)
        }
        other => panic!("no CONNACK: {other:?}"),
    }
}

/// MQTT 3.1.1 persistent sessions: with clean session = 0 the broker keeps the subscriptions
/// and the QoS 1 messages routed while the client is away; the next clean-session-0 CONNACK says
/// session present and the messages arrive without a new SUBSCRIBE; clean session = 1 discards.
#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_session_keeps_subscriptions_and_messages_while_the_client_is_away() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let dev = fleet.id(0);
    park_backend(&broker, &fleet).await;
    // The device publishes while the service is away.
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(connect_with(&mut d, &dev, true).await.0);
    for i in 0..3u16 {
        let mut p = Publish::new(format!("devices/{dev}/telemetry"), QoS::AtLeastOnce, vec![i as u8]);
        p.pkid = 1 + i;
        d.send(Packet::Publish(p)).await.unwrap();
        assert!(matches!(d.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    }
    // Back with clean session = 0: present, and the three messages without a SUBSCRIBE.
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connect_with(&mut svc, "backend", false).await, (true, true));
    let mut got = Vec::new();
    while let Some(p) = next_publish(&mut svc, Duration::from_secs(2)).await {
        got.push(p.payload.to_vec());
        svc.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await.unwrap();
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(got, vec![vec![0u8], vec![1], vec![2]]);
    // An unacknowledged delivery is sent again with DUP and its packet id in the next session.
    let mut p = Publish::new(format!("devices/{dev}/telemetry"), QoS::AtLeastOnce, vec![9]);
    p.pkid = 9;
    d.send(Packet::Publish(p)).await.unwrap();
    let first = next_publish(&mut svc, PATIENCE).await.expect("live delivery");
    drop(svc); // no PUBACK
    broker.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(3)).await;
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connect_with(&mut svc, "backend", false).await, (true, true));
    let again = next_publish(&mut svc, PATIENCE).await.expect("redelivery");
    assert_eq!((again.pkid, again.dup, &again.payload[..]), (first.pkid, true, &[9u8][..]));
    svc.send(Packet::Disconnect).await.unwrap();
    drop(svc);
    // Clean session = 1 discards what was kept.
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connect_with(&mut svc, "backend", true).await, (true, false));
}

/// A kept session's inbox holds at most `max_queued_messages` (the rest are dropped and counted,
/// never buffered), and a kept session the client does not resume within `session_expiry_secs`
/// is discarded: its subscriptions leave the router and the next CONNACK says no session.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_sessions_inbox_is_capped_and_the_session_expires() {
    let fleet = Fleet::new(1, None).await;
    let cfg = fleet.dir.path().join("parked.toml");
    std::fs::write(&cfg, "max_queued_messages = 5\nsession_expiry_secs = 3\n").unwrap();
    let broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let dev = fleet.id(0);
    park_backend(&broker, &fleet).await;
    // 20 messages while the service is away: 5 kept, 15 dropped.
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(connect_with(&mut d, &dev, true).await.0);
    for i in 0..20u16 {
        let mut p = Publish::new(format!("devices/{dev}/telemetry"), QoS::AtLeastOnce, vec![i as u8]);
        p.pkid = 1 + i;
        d.send(Packet::Publish(p)).await.unwrap();
        assert!(matches!(d.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    }
    assert_eq!(broker.metric("fleet_messages_dropped_total").await, 15.0);
    assert_eq!(broker.metric("fleet_limits_total{limit=\"queued_messages\"}").await, 15.0);
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connect_with(&mut svc, "backend", false).await, (true, true));
    let mut got = 0;
    while let Some(p) = next_publish(&mut svc, Duration::from_secs(2)).await {
        got += 1;
        svc.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await.unwrap();
    }
    assert_eq!(got, 5, "the kept inbox held {got} messages, its cap is 5");
    svc.send(Packet::Disconnect).await.unwrap();
    drop(svc);
    broker.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(5)).await;
    let parked_at = Instant::now();
    // Away longer than session_expiry_secs (3 s, checked every second): discarded.
    broker
        .wait_metric(
            "fleet_parked_sessions_discarded_total{reason=\"expired\"}",
            1.0,
            Duration::from_secs(20),
        )
        .await;
    assert!(parked_at.elapsed() >= Duration::from_secs(2), "expired after {:?}", parked_at.elapsed());
    assert_eq!(broker.metric("fleet_sessions_parked").await, 0.0);
    // Its subscription left the router: nothing is delivered into it any more.
    let dropped = broker.metric("fleet_messages_dropped_total").await;
    let mut p = Publish::new(format!("devices/{dev}/telemetry"), QoS::AtLeastOnce, vec![99]);
    p.pkid = 50;
    d.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(d.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connect_with(&mut svc, "backend", false).await, (true, false), "an expired session resumed");
    assert!(next_publish(&mut svc, Duration::from_millis(500)).await.is_none());
    assert_eq!(broker.metric("fleet_messages_dropped_total").await, dropped);
}

/// Interop: `mosquitto_sub -c` (clean session off) gets the messages published while it was
/// away, as from Mosquitto.
#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_sub_with_a_persistent_session_gets_what_was_published_while_away() {
    let subbin = fleet_tests::require_program("mosquitto_sub", "mosquitto-clients");
    let pubbin = fleet_tests::require_program("mosquitto_pub", "mosquitto-clients");
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (d, svc) = (&fleet.devices[0], &fleet.service);
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let sub = |extra: &[&str]| {
        Command::new(&subbin)
            .args(["-h", "localhost", "-p", &broker.port(), "--cafile", &s(&svc.join("broker-trust.pem"))])
            .args(["--cert", &s(&svc.join("cert.pem")), "--key", &s(&svc.join("key.pem")), "-i", "backend"])
            .args(["-c", "-q", "1", "-t", "devices/+/telemetry", "-v"])
            .args(extra)
            .output()
            .unwrap()
    };
    // Subscribe with a persistent session, then leave.
    let first = tokio::task::block_in_place(|| sub(&["-E"]));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    for i in 0..2 {
        let out = Command::new(&pubbin)
            .args(["-h", "localhost", "-p", &broker.port(), "--cafile", &s(&d.join("broker-trust.pem"))])
            .args(["--cert", &s(&d.join("cert.pem")), "--key", &s(&d.join("key.pem")), "-i", &fleet.id(0)])
            .args([
                "-q",
                "1",
                "-t",
                &format!("devices/{}/telemetry", fleet.id(0)),
                "-m",
                &format!("away-{i}"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let back = tokio::task::block_in_place(|| sub(&["-C", "2", "-W", "10"]));
    let text = String::from_utf8_lossy(&back.stdout);
    assert!(
        text.contains("away-0") && text.contains("away-1"),
        "{text}{}",
        String::from_utf8_lossy(&back.stderr)
    );
}

// ---- persistent sessions of revoked devices; retained commands ----

/// A stolen device certificate parks a session (clean session = 0) subscribed to the device's
/// commands; the operator revokes the device. The kept session, and its subscription in the
/// router, goes within a couple of seconds, not after `session_expiry_secs` (24 h): nothing
/// routed to the device is queued for the revoked certificate any more.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_devices_kept_session_is_discarded_at_once() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let dev = fleet.id(0);
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connect_session(&mut d, &dev, false).await, (true, false));
    subscribe(&mut d, &format!("devices/{dev}/commands/#"), 1).await;
    d.send(Packet::Disconnect).await.unwrap();
    drop(d);
    broker.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(3)).await;

    fleet.revoke(0).await;
    broker.wait_metric("fleet_revocations_seen_total", 1.0, Duration::from_secs(5)).await;
    broker.wait_metric_at_most("fleet_sessions_parked", 0.0, Duration::from_secs(3)).await;
    // Its subscription left the router: a QoS 0 command (routed, not queued) reaches no one.
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert!(connect_session(&mut svc, "backend", true).await.0);
    let before = broker.metric("fleet_messages_delivered_total").await;
    let p = Publish::new(format!("devices/{dev}/commands/unlock"), QoS::AtMostOnce, b"1".to_vec());
    svc.send(Packet::Publish(p)).await.unwrap();
    svc.send(Packet::PingReq).await.unwrap();
    assert!(matches!(svc.recv(PATIENCE).await, Some(Packet::PingResp)));
    assert_eq!(
        broker.metric("fleet_messages_delivered_total").await,
        before,
        "delivered to a revoked session"
    );
}

/// A service publishes a command with the retain flag. It is queued (delivered once, settled by
/// the device's PUBACK) but never retained: after the acknowledgement a new SUBSCRIBE, or a new
/// session, brings nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_published_retained_is_delivered_once_and_never_retained() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let mut svc = service(&broker, &fleet).await;
    let mut seen = Seen::new();
    let dev = fleet.id(0);
    let topic = format!("devices/{dev}/commands/open-valve");
    let mut p = Publish::new(&topic, QoS::AtLeastOnce, b"now".to_vec());
    p.pkid = 7;
    p.retain = true;
    svc.send(Packet::Publish(p)).await.unwrap();
    loop {
        match svc.recv(Duration::from_secs(5)).await {
            Some(Packet::PubAck(a)) if a.pkid == 7 => break,
            Some(Packet::Publish(p)) => record(&mut svc, &p, &mut seen).await,
            Some(_) => continue,
            None => panic!("no PUBACK for the retained command"),
        }
    }
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(connect_session(&mut d, &dev, true).await.0);
    subscribe(&mut d, &format!("devices/{dev}/commands/#"), 1).await;
    let cmd = next_publish(&mut d, PATIENCE).await.expect("the queued command");
    assert_eq!((cmd.topic.as_str(), cmd.retain), (topic.as_str(), false));
    d.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(cmd.pkid))).await.unwrap();
    statuses_until(&mut svc, &mut seen, "acknowledged", |s| has(s, "open-valve", "acknowledged")).await;
    // Nothing else came with the first SUBSCRIBE (a retained copy would have).
    assert!(next_publish(&mut d, Duration::from_millis(500)).await.is_none(), "a second copy");
    // A new SUBSCRIBE, and a new session, bring nothing.
    let mut unsub = rumqttc::mqttbytes::v4::Unsubscribe::new(format!("devices/{dev}/commands/#"));
    unsub.pkid = 2;
    d.send(Packet::Unsubscribe(unsub)).await.unwrap();
    assert!(matches!(d.recv(PATIENCE).await, Some(Packet::UnsubAck(_))));
    subscribe(&mut d, &format!("devices/{dev}/commands/#"), 3).await;
    let again = next_publish(&mut d, Duration::from_secs(1)).await;
    assert!(again.is_none(), "delivered again on SUBSCRIBE: {again:?}");
    drop(d);
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(connect_session(&mut d, &dev, true).await.0);
    subscribe(&mut d, &format!("devices/{dev}/commands/#"), 1).await;
    let again = next_publish(&mut d, Duration::from_secs(1)).await;
    assert!(again.is_none(), "delivered again in a new session: {again:?}");
    assert!(broker.metric("fleet_limits_total{limit=\"command_retained\"}").await >= 1.0);
}

/// In a cluster, a node also learns of revocations from the other nodes (`fleet.r`, what a
/// node announces after seeing one in the registry). Such an announcement (the certificate
/// revoked in the registry behind the feed's back, so this node's own feed reports nothing;
/// the announcement is applied once the registry confirms it) discards the sessions the
/// certificate parked on this node.
#[tokio::test(flavor = "multi_thread")]
async fn another_nodes_revocation_announcement_discards_the_kept_session() {
    let cluster = Cluster::builder().devices(1).start().await;
    let (fleet, nats, node) = (&cluster.fleet, &cluster.nats, &cluster.nodes[0]);
    let dev = fleet.id(0);
    let mut d = Raw::device(node.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connect_session(&mut d, &dev, false).await, (true, false));
    subscribe(&mut d, &format!("devices/{dev}/commands/#"), 1).await;
    d.send(Packet::Disconnect).await.unwrap();
    drop(d);
    node.wait_metric("fleet_sessions_parked", 1.0, Duration::from_secs(3)).await;

    let pem = std::fs::read_to_string(fleet.devices[0].join("cert.pem")).unwrap();
    let der = fleet_provision::pki::pem_decode(&pem, "CERTIFICATE").unwrap();
    let serial = fleet_provision::pki::summarize(&der).unwrap().serial.to_hex();
    // Revoked in the registry without the feed's sequence (what the feed reports) moving.
    let db = sqlx::PgPool::connect(fleet.db.as_deref().unwrap()).await.unwrap();
    sqlx::query("UPDATE certificates SET status = 'revoked' WHERE serial = $1")
        .bind(&serial)
        .execute(&db)
        .await
        .unwrap();
    let peer = bus::client(nats, "n3").await;
    peer.publish_with_headers("fleet.r", bus::from_node(), format!("{dev} {serial}").into()).await.unwrap();
    peer.flush().await.unwrap();
    node.wait_metric("fleet_cluster_revocations_received_total", 1.0, Duration::from_secs(3)).await;
    node.wait_metric_at_most("fleet_sessions_parked", 0.0, Duration::from_secs(3)).await;
    assert_eq!(node.metric("fleet_revocations_seen_total").await, 0.0, "the registry feed reported it");
}

/// The backend service subscribes to every device's telemetry in a persistent session, then
/// leaves: its session is parked.
async fn park_backend(broker: &BrokerProc, fleet: &Fleet) {
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connect_with(&mut svc, "backend", false).await, (true, false));
    subscribe(&mut svc, "devices/+/telemetry", 1).await;
    svc.send(Packet::Disconnect).await.unwrap();
    drop(svc);
    broker.wait_metric("fleet_sessions_parked", 1.0, PATIENCE).await;
}

/// A service that sends many commands without waiting for each PUBACK (issue 29: a service is
/// not held to one command per commit): every one is stored and acknowledged, the PUBACKs come
/// in the order sent, and the device gets the commands in that order, each once.
#[tokio::test(flavor = "multi_thread")]
async fn commands_sent_back_to_back_are_stored_in_order_and_acknowledged_in_order() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &["--max-queued-commands", "1000"]);
    let mut svc = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(
        connack_code(&svc.mqtt_connect("backend", 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    let dev = fleet.id(0);
    const N: u16 = 300;
    let mut burst = bytes::BytesMut::new();
    for i in 1..=N {
        let mut p = Publish::new(format!("devices/{dev}/commands/c{i}"), QoS::AtLeastOnce, i.to_string());
        p.pkid = i;
        Packet::Publish(p).write(&mut burst, 1 << 20).unwrap();
    }
    svc.send_raw(&burst).await.unwrap();
    let mut acks = Vec::new();
    let t = Instant::now();
    while acks.len() < usize::from(N) {
        assert!(t.elapsed() < PATIENCE, "{} of {N} PUBACKs", acks.len());
        if let Some(Packet::PubAck(a)) = svc.recv(Duration::from_secs(5)).await {
            acks.push(a.pkid);
        }
    }
    assert_eq!(acks, (1..=N).collect::<Vec<_>>(), "PUBACKs in the order sent");
    // The device, connected afterwards, gets all of them in order.
    let mut device = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(
        connack_code(&device.mqtt_connect(&dev, 30).await),
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success)
    );
    subscribe(&mut device, &format!("devices/{dev}/commands/#"), 1).await;
    let mut names = Vec::new();
    let t = Instant::now();
    while names.len() < usize::from(N) {
        assert!(t.elapsed() < PATIENCE, "{} of {N} commands delivered", names.len());
        if let Some(p) = next_publish(&mut device, Duration::from_secs(5)).await {
            names.push(p.topic.rsplit('/').next().unwrap().to_owned());
            device.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await.unwrap();
        }
    }
    let want: Vec<String> = (1..=N).map(|i| format!("c{i}")).collect();
    assert_eq!(names, want, "delivered in the order sent, each once");
}

/// A registry row for `id` with `role`, valid for ever (the batch tests need no real
/// certificate).
fn cert(id: &fleet_registry::DeviceId, role: fleet_registry::Role) -> fleet_registry::NewCert {
    fleet_registry::NewCert {
        device_id: id.clone(),
        role,
        serial: fleet_registry::SerialNumber::random(),
        not_before: 0,
        not_after: i64::MAX / 2,
        key_source: "station",
        cert_der: vec![0x30, 0x00],
    }
}

/// The batch tests' new command: `name` for `device` from "svc", payload "p", now 10, a minute
/// to live.
fn enqueue<'a>(device: &'a fleet_registry::DeviceId, name: &'a str) -> fleet_registry::CommandOp<'a> {
    fleet_registry::CommandOp::Enqueue(fleet_registry::NewCommand {
        device_id: device,
        name,
        payload: b"p",
        sender: "svc",
        now: 10,
        ttl_ms: 60_000,
        response_topic: None,
        correlation: None,
    })
}

/// The command writer's batch, against the registry directly: the devices checked (unknown,
/// service, revoked refused), ids in the batch's order, the per-device limit applied with the
/// drops reported on the device's last new command. On SQLite and on PostgreSQL (their inserts
/// name the new ids differently).
async fn a_batch_of_new_commands_on(url: &str) {
    use fleet_registry::{
        CommandOp, CommandOutcome, CommandStatus, DeviceId, NewCert, Registry, RevocationReason, Role,
    };
    let reg = Registry::open(url, true).await.expect("open");
    let certs: Vec<NewCert> =
        [("dev-a", Role::Device), ("dev-b", Role::Device), ("dev-r", Role::Device), ("svc", Role::Service)]
            .iter()
            .map(|(id, role)| cert(&DeviceId::parse(id).expect("id"), *role))
            .collect();
    reg.record_certificates(&certs, true, 1).await.expect("record");
    reg.revoke_device(&DeviceId::parse("dev-r").expect("id"), RevocationReason::KeyCompromise, 2)
        .await
        .expect("revoke");
    let ids: Vec<DeviceId> =
        ["dev-a", "dev-b", "dev-r", "svc", "ghost"].iter().map(|d| DeviceId::parse(d).expect("id")).collect();
    let names: Vec<String> = (0..7).map(|i| format!("c{i}")).collect();
    // dev-a gets 5 (limit 3), interleaved with one for each other target.
    let order = [0, 1, 0, 2, 0, 3, 0, 4, 0];
    let ops: Vec<CommandOp<'_>> =
        order.iter().enumerate().map(|(k, &d)| enqueue(&ids[d], &names[k % names.len()])).collect();
    let out = reg.apply_commands(&ops, 3).await.expect("apply");
    let stored: Vec<i64> = out
        .iter()
        .filter_map(|o| match o {
            CommandOutcome::Enqueued { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(stored.len(), 6, "{out:?}");
    assert!(stored.windows(2).all(|w| w[0] < w[1]), "ids follow the batch's order: {stored:?}");
    assert!(matches!(out[3], CommandOutcome::NotAddressable { revoked: true }), "{:?}", out[3]);
    assert!(matches!(out[5], CommandOutcome::NotAddressable { revoked: false }), "service: {:?}", out[5]);
    assert!(matches!(out[7], CommandOutcome::NotAddressable { revoked: false }), "unknown: {:?}", out[7]);
    let CommandOutcome::Enqueued { dropped, .. } = &out[8] else { panic!("{:?}", out[8]) };
    assert_eq!(dropped.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["c0", "c2"]);
    let a = reg.commands_of(&ids[0], 10).await.expect("read");
    // Every stored id is the row it names.
    for (k, id) in [0usize, 2, 4, 6, 8].iter().zip([stored[0], stored[2], stored[3], stored[4], stored[5]]) {
        let c = a.iter().find(|c| c.id == id).expect("stored id");
        assert_eq!(c.name, names[k % names.len()], "id {id}");
    }
    let open: Vec<&str> =
        a.iter().rev().filter(|c| c.status == CommandStatus::Queued).map(|c| c.name.as_str()).collect();
    assert_eq!(open, ["c4", "c6", "c1"]);
    let b = reg.commands_of(&ids[1], 10).await.expect("read");
    assert_eq!(
        b.iter().map(|c| (c.name.as_str(), c.status)).collect::<Vec<_>>(),
        [("c1", CommandStatus::Queued)]
    );
    assert_eq!(b[0].id, stored[1]);
}

#[tokio::test]
async fn a_batch_of_new_commands_is_checked_stored_in_order_and_held_to_the_limit_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    a_batch_of_new_commands_on(&format!("sqlite://{}", dir.path().join("r.db").display())).await;
}

#[tokio::test]
async fn a_batch_of_new_commands_is_checked_stored_in_order_and_held_to_the_limit_on_postgresql() {
    let pg = fleet_tests::PgCluster::start();
    a_batch_of_new_commands_on(&pg.create_database("batch")).await;
}

/// A batch of 250 new commands (more than one statement's 100 rows) to four active devices
/// and a revoked one: every id names its own command, in the batch's order, across the
/// statements. On SQLite the batch is one call to SQLite's worker with several inserts.
async fn a_batch_across_statements_on(url: &str, with_an_acknowledgement: bool) {
    use fleet_registry::{CommandOp, CommandOutcome, DeviceId, NewCert, Registry, RevocationReason, Role};
    let reg = Registry::open(url, true).await.expect("open");
    let ids: Vec<DeviceId> = (0..5).map(|i| DeviceId::parse(&format!("dev-{i}")).expect("id")).collect();
    let certs: Vec<NewCert> = ids.iter().map(|id| cert(id, Role::Device)).collect();
    reg.record_certificates(&certs, true, 1).await.expect("record");
    reg.revoke_device(&ids[4], RevocationReason::KeyCompromise, 2).await.expect("revoke");
    let names: Vec<String> = (0..250).map(|k| format!("n{k}")).collect();
    let mut ops: Vec<CommandOp<'_>> =
        names.iter().enumerate().map(|(k, name)| enqueue(&ids[k % 5], name)).collect();
    if with_an_acknowledgement {
        // A batch with other changes than new commands: on SQLite the inserts run inside the
        // writer's transaction instead of one call with its own (a no-op acknowledgement).
        ops.push(CommandOp::Acknowledged { id: 0, now: 10 });
    }
    let out = reg.apply_commands(&ops, 1000).await.expect("apply");
    let mut last = 0;
    for (k, o) in out.iter().take(names.len()).enumerate() {
        match (k % 5, o) {
            (4, CommandOutcome::NotAddressable { revoked: true }) => {}
            (d, CommandOutcome::Enqueued { id, dropped }) if d != 4 && dropped.is_empty() => {
                assert!(*id > last, "command {k}: id {id} after {last}");
                last = *id;
            }
            _ => panic!("command {k}: {o:?}"),
        }
    }
    for (d, id) in ids.iter().enumerate().take(4) {
        let mine = reg.commands_of(id, 100).await.expect("read");
        assert_eq!(mine.len(), 50, "{id}");
        for c in mine {
            let k: usize = c.name[1..].parse().expect("name");
            assert_eq!(k % 5, d, "{c:?}");
            assert!(
                matches!(out[k], CommandOutcome::Enqueued { id, .. } if id == c.id),
                "command {k} is stored as id {}, answered {:?}",
                c.id,
                out[k]
            );
        }
    }
}

#[tokio::test]
async fn a_batch_across_statements_keeps_every_id_with_its_command_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    a_batch_across_statements_on(&format!("sqlite://{}", dir.path().join("r.db").display()), false).await;
}

#[tokio::test]
async fn a_batch_across_statements_with_other_changes_keeps_every_id_with_its_command_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    a_batch_across_statements_on(&format!("sqlite://{}", dir.path().join("r.db").display()), true).await;
}

#[tokio::test]
async fn a_batch_across_statements_keeps_every_id_with_its_command_on_postgresql() {
    let pg = fleet_tests::PgCluster::start();
    a_batch_across_statements_on(&pg.create_database("across"), true).await;
}

/// SQLite's one-call batch begins and commits its own transaction. A statement failing in the
/// middle (here a trigger refusing one command) stores none of the batch, and leaves neither
/// the write lock held nor the writer's connection in a transaction: the next batch on the
/// same connection, and a write from another connection, go through.
#[tokio::test]
async fn a_batch_failing_midway_stores_nothing_and_leaves_no_transaction_open() {
    use fleet_registry::{CommandOp, CommandOutcome, DeviceId, Registry, Role};
    let dir = tempfile::tempdir().expect("tempdir");
    let reg =
        Registry::open(&format!("sqlite://{}", dir.path().join("r.db").display()), true).await.expect("open");
    let dev = DeviceId::parse("dev-a").expect("id");
    reg.record_certificates(&[cert(&dev, Role::Device)], true, 1).await.expect("record");
    sqlx::query(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON commands WHEN NEW.name = 'boom' \
         BEGIN SELECT RAISE(ABORT, 'boom refused'); END",
    )
    .execute(reg.pool())
    .await
    .expect("trigger");
    let batch = |names: &'static [&'static str]| -> Vec<CommandOp<'_>> {
        names.iter().map(|name| enqueue(&dev, name)).collect()
    };
    let mut conn = reg.writer_connection().await.expect("writer");
    let failed = reg.apply_commands_on(&mut conn, &batch(&["first", "boom", "last"]), 100).await;
    assert!(failed.is_err(), "the trigger refused the batch: {failed:?}");
    assert!(reg.commands_of(&dev, 10).await.expect("read").is_empty(), "none of the failed batch is stored");
    // Another connection can write at once: the failed batch's write lock is released.
    let other = DeviceId::parse("dev-b").expect("id");
    tokio::time::timeout(
        std::time::Duration::from_secs(2),
        reg.record_certificates(&[cert(&other, Role::Device)], true, 3),
    )
    .await
    .expect("the write lock was left held")
    .expect("record");
    // The same connection commits the next batch by itself (no transaction left open).
    let out = reg.apply_commands_on(&mut conn, &batch(&["after"]), 100).await.expect("next batch");
    assert!(matches!(out[..], [CommandOutcome::Enqueued { .. }]), "{out:?}");
    drop(conn);
    let stored: Vec<String> =
        reg.commands_of(&dev, 10).await.expect("read").into_iter().map(|c| c.name).collect();
    assert_eq!(stored, ["after"], "committed, and seen by another connection");
}
