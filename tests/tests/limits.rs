//! What one device (or one stolen certificate) may not do to the broker or to itself: command
//! itself, plant retained messages that outlive its revocation, hold unbounded subscriptions,
//! retained messages or topics, flood the log with ACL refusals, or stall the broker by not
//! reading. Each cap is a config key with a metric (`fleet_limits_total{limit}` or
//! `fleet_kicks_total{reason}`) and a logged reason.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, Publish, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;

/// Writes a broker config file with `toml` in the fleet's directory; returns `--config PATH`.
fn config(fleet: &Fleet, toml: &str) -> PathBuf {
    let p = fleet.dir.path().join(format!("broker-{}.toml", rand_suffix()));
    std::fs::write(&p, toml).unwrap();
    p
}

async fn connected(broker: &BrokerProc, fleet: &Fleet, i: usize) -> Raw {
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[i]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&fleet.id(i), 30).await), Some(ConnectReturnCode::Success));
    raw
}

async fn service(broker: &BrokerProc, fleet: &Fleet) -> Raw {
    let mut raw = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    raw
}

fn publish(topic: String, qos: QoS, retain: bool, payload: &[u8], pkid: u16) -> Packet {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.retain = retain;
    p.pkid = pkid;
    Packet::Publish(p)
}

fn subscribe(pkid: u16, filters: impl IntoIterator<Item = String>) -> Packet {
    let mut s = Subscribe::new_many(filters.into_iter().map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce)));
    s.pkid = pkid;
    Packet::Subscribe(s)
}

/// Retained messages a fresh subscription to `filter` receives (topics).
async fn retained_for(raw: &mut Raw, filter: &str, pkid: u16) -> Vec<String> {
    raw.send(subscribe(pkid, [filter.to_owned()])).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::SubAck(_))));
    let mut topics = Vec::new();
    while let Some(Packet::Publish(p)) = raw.recv(Duration::from_secs(1)).await {
        assert!(p.retain);
        topics.push(p.topic);
    }
    topics.sort();
    topics
}

#[tokio::test]
async fn a_device_cannot_command_itself_and_revocation_clears_its_retained_messages() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let (a, b) = (fleet.id(0), fleet.id(1));
    // A thief with device a's certificate plants a retained command for the real device.
    let mut thief = connected(&broker, &fleet, 0).await;
    thief
        .send(publish(format!("devices/{a}/commands/unlock"), QoS::AtLeastOnce, true, b"1", 5))
        .await
        .unwrap();
    assert!(thief.closed_within(PATIENCE).await, "a device published its own command");
    assert_eq!(broker.metric("fleet_acl_denied_total{action=\"publish\"}").await, 1.0);
    // Retained state is still allowed, for both devices; a service's command is never retained
    // (the flag is stripped, docs/spec/commands.md).
    let mut dev = connected(&broker, &fleet, 0).await;
    dev.send(publish(format!("devices/{a}/state"), QoS::AtLeastOnce, true, b"on", 6)).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    let mut other = connected(&broker, &fleet, 1).await;
    other.send(publish(format!("devices/{b}/state"), QoS::AtLeastOnce, true, b"on", 7)).await.unwrap();
    assert!(matches!(other.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    let mut svc = service(&broker, &fleet).await;
    svc.send(publish(format!("devices/{a}/commands/blink"), QoS::AtLeastOnce, true, b"2", 8)).await.unwrap();
    assert!(matches!(svc.recv(PATIENCE).await, Some(Packet::PubAck(_))));
    let mut watcher = service(&broker, &fleet).await;
    assert_eq!(
        retained_for(&mut watcher, "devices/+/#", 1).await,
        [format!("devices/{a}/state"), format!("devices/{b}/state")]
    );
    // Revoked: everything retained under devices/a/ is gone; b's stays.
    fleet.revoke(0).await;
    broker.wait_metric(&kicks(CloseReason::Revoked), 1.0, Duration::from_secs(2)).await;
    let mut late = service(&broker, &fleet).await;
    assert_eq!(retained_for(&mut late, "devices/+/#", 1).await, [format!("devices/{b}/state")]);
}

#[tokio::test]
async fn subscriptions_are_capped_per_session_and_twenty_thousand_cost_nothing() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let id = fleet.id(0);
    let mut raw = connected(&broker, &fleet, 0).await;
    // 20,000 distinct filters in 200 SUBSCRIBEs: 64 granted (the default cap), the rest 0x80.
    let t = Instant::now();
    let mut granted = 0;
    for k in 0..200u16 {
        raw.send(subscribe(k + 1, (0..100).map(|i| format!("devices/{id}/s/{k}/{i}")))).await.unwrap();
        match raw.recv(Duration::from_secs(5)).await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.return_codes.len(), 100);
                granted +=
                    a.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Success(_))).count();
            }
            other => panic!("SUBSCRIBE {k}: {other:?}"),
        }
    }
    assert_eq!(granted, 64);
    assert!(t.elapsed() < PATIENCE, "20,000 subscriptions took {:?}", t.elapsed());
    assert_eq!(broker.metric("fleet_limits_total{limit=\"subscriptions\"}").await, 20_000.0 - 64.0);
    // Re-subscribing a held filter is no new subscription; unsubscribing frees a slot.
    raw.send(subscribe(300, [format!("devices/{id}/s/0/0")])).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await,
        Some(Packet::SubAck(a)) if matches!(a.return_codes[..], [SubscribeReasonCode::Success(_)])));
    let mut u = rumqttc::mqttbytes::v4::Unsubscribe::new(format!("devices/{id}/s/0/0"));
    u.pkid = 301;
    raw.send(Packet::Unsubscribe(u)).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::UnsubAck(_))));
    raw.send(subscribe(302, [format!("devices/{id}/new")])).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await,
        Some(Packet::SubAck(a)) if matches!(a.return_codes[..], [SubscribeReasonCode::Success(_)])));
    // Still a working session.
    raw.send(Packet::PingReq).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::PingResp)));
    assert!(broker.log().contains("limit reached"), "no logged reason");
}

#[tokio::test]
async fn retained_messages_are_capped_per_device_and_in_total_bytes() {
    let fleet = Fleet::new(2, None).await;
    let cfg = config(&fleet, "max_retained_per_device = 2\nmax_retained_bytes = 2000\n");
    let broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let (a, b) = (fleet.id(0), fleet.id(1));
    let mut raw = connected(&broker, &fleet, 0).await;
    for (k, t) in ["s1", "s2", "s1"].iter().enumerate() {
        raw.send(publish(format!("devices/{a}/{t}"), QoS::AtLeastOnce, true, b"x", k as u16 + 1))
            .await
            .unwrap();
        assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::PubAck(_))), "{t}");
    }
    raw.send(publish(format!("devices/{a}/s3"), QoS::AtLeastOnce, true, b"x", 9)).await.unwrap();
    assert!(raw.closed_within(PATIENCE).await, "a third retained topic was kept");
    broker.wait_metric(&kicks(CloseReason::RetainedPerDevice), 1.0, Duration::from_secs(2)).await;
    let mut raw = connected(&broker, &fleet, 1).await;
    raw.send(publish(format!("devices/{b}/big"), QoS::AtLeastOnce, true, &[7u8; 1990], 1)).await.unwrap();
    assert!(raw.closed_within(PATIENCE).await, "retained bytes over the total were kept");
    broker.wait_metric(&kicks(CloseReason::RetainedBytes), 1.0, Duration::from_secs(2)).await;
    // The refused message was neither retained nor stored.
    let mut watcher = service(&broker, &fleet).await;
    assert_eq!(
        retained_for(&mut watcher, "devices/+/#", 1).await,
        [format!("devices/{a}/s1"), format!("devices/{a}/s2")]
    );
    assert!(fleet.telemetry_rows(&b).await.is_empty());
}

#[tokio::test]
async fn topics_over_the_length_or_depth_cap_are_refused() {
    let fleet = Fleet::new(1, None).await;
    let cfg = config(&fleet, "max_topic_length = 64\nmax_topic_levels = 5\n");
    let broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let id = fleet.id(0);
    let mut raw = connected(&broker, &fleet, 0).await;
    raw.send(subscribe(
        1,
        [
            format!("devices/{id}/a/b/c/d"),
            format!("devices/{id}/{}", "x".repeat(64)),
            format!("devices/{id}/a/#"),
        ],
    ))
    .await
    .unwrap();
    match raw.recv(Duration::from_secs(5)).await {
        Some(Packet::SubAck(a)) => assert!(matches!(
            a.return_codes[..],
            [SubscribeReasonCode::Failure, SubscribeReasonCode::Failure, SubscribeReasonCode::Success(_)]
        )),
        other => panic!("{other:?}"),
    }
    raw.send(publish(format!("devices/{id}/a/b/c/d"), QoS::AtMostOnce, false, b"deep", 0)).await.unwrap();
    assert!(raw.closed_within(PATIENCE).await, "a 6-level topic was accepted");
    broker.wait_metric(&kicks(CloseReason::TopicLimit), 1.0, Duration::from_secs(2)).await;
    assert_eq!(broker.metric("fleet_limits_total{limit=\"topic\"}").await, 3.0);
}

#[tokio::test]
async fn acl_refusals_are_counted_each_but_logged_once_per_interval() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let victim = fleet.id(1);
    let mut raw = connected(&broker, &fleet, 0).await;
    for _ in 0..500 {
        raw.send(publish(format!("devices/{victim}/telemetry"), QoS::AtMostOnce, false, b"x", 0))
            .await
            .unwrap();
    }
    raw.send(Packet::PingReq).await.unwrap();
    assert!(matches!(raw.recv(PATIENCE).await, Some(Packet::PingResp)));
    broker.wait_metric("fleet_acl_denied_total{action=\"publish\"}", 500.0, Duration::from_secs(2)).await;
    let lines = broker.log().lines().filter(|l| l.contains("publish refused by ACL")).count();
    assert_eq!(lines, 1, "500 refusals within the interval must log one line");
    assert!(fleet.telemetry_rows(&victim).await.is_empty());
}

/// A device that stops reading while commands pour in: the broker's write to it blocks. A
/// revocation must still cut it at once, and with a short write timeout it is closed by itself.
async fn stuck_reader(fleet: &Fleet, broker: &BrokerProc) -> (Raw, Raw) {
    let id = fleet.id(0);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(broker.mqtt).await.unwrap();
    let mut dev = Raw::device_over(tcp, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&dev.mqtt_connect(&id, 0).await), Some(ConnectReturnCode::Success));
    dev.send(subscribe(1, [format!("devices/{id}/commands/#")])).await.unwrap();
    assert!(matches!(dev.recv(PATIENCE).await, Some(Packet::SubAck(_))));
    // From now on the device reads nothing. 12 MB of commands fill every buffer on the way.
    let mut svc = service(broker, fleet).await;
    let topic = format!("devices/{id}/commands/fill");
    for _ in 0..3000 {
        svc.send(publish(topic.clone(), QoS::AtMostOnce, false, &[0x5a; 4000], 0)).await.unwrap();
    }
    // Stuck: the device's queue overflowed.
    broker.wait_metric("fleet_messages_dropped_total", 1.0, PATIENCE).await;
    (dev, svc)
}

#[tokio::test]
async fn a_stuck_write_never_delays_a_revocation() {
    let fleet = Fleet::new(1, None).await;
    let cfg = config(&fleet, "write_timeout_secs = 60\n");
    let broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let _clients = stuck_reader(&fleet, &broker).await;
    assert!(broker.metric("fleet_messages_dropped_total").await > 0.0, "the device's queue never filled");
    fleet.revoke(0).await;
    let t = Instant::now(); // the registry has committed the revocation
    broker.wait_metric(&kicks(CloseReason::Revoked), 1.0, PATIENCE).await;
    assert!(t.elapsed() < LATENCY_BOUND, "revocation waited {:?} on a stuck write", t.elapsed());
}

/// The device's certificate connects again while the broker's write to its first session is
/// stuck: the takeover cuts the old session at once and the new one is admitted.
#[tokio::test]
async fn a_stuck_write_never_delays_a_takeover() {
    let fleet = Fleet::new(1, None).await;
    let cfg = config(&fleet, "write_timeout_secs = 60\n");
    let broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let _clients = stuck_reader(&fleet, &broker).await;
    broker.wait_metric("fleet_messages_dropped_total", 1.0, Duration::from_secs(10)).await;
    let t = Instant::now();
    let mut again = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&again.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    broker.wait_metric(&kicks(CloseReason::Takeover), 1.0, Duration::from_secs(2)).await;
    assert!(t.elapsed() < LATENCY_BOUND, "the takeover waited {:?} on a stuck write", t.elapsed());
    assert_eq!(broker.metric(&kicks(CloseReason::WriteTimeout)).await, 0.0);
}

/// SIGTERM while the broker's write to a session is stuck (write timeout 60 s): the broker
/// stops within seconds, with exit status 0.
#[tokio::test]
async fn a_stuck_write_never_delays_a_sigterm() {
    let fleet = Fleet::new(1, None).await;
    let cfg = config(&fleet, "write_timeout_secs = 60\n");
    let mut broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let _clients = stuck_reader(&fleet, &broker).await;
    broker.wait_metric("fleet_messages_dropped_total", 1.0, Duration::from_secs(10)).await;
    let t = Instant::now();
    let pid = broker.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = loop {
        if let Some(status) = broker.child.try_wait().unwrap() {
            break status;
        }
        assert!(t.elapsed() < PATIENCE, "the broker did not stop: a stuck write held it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "broker exit status {status:?}");
    // Far below the 60 s write timeout it would otherwise wait for.
    assert!(t.elapsed() < 2 * LATENCY_BOUND, "SIGTERM waited {:?} on a stuck write", t.elapsed());
    assert!(broker.log().contains("broker stopped"), "{}", broker.log());
}

#[tokio::test]
async fn a_peer_that_accepts_no_bytes_is_closed_after_the_write_timeout() {
    let fleet = Fleet::new(1, None).await;
    let cfg = config(&fleet, "write_timeout_secs = 1\n");
    let broker = BrokerProc::start(&fleet, &["--config", cfg.to_str().unwrap()]);
    let _clients = stuck_reader(&fleet, &broker).await;
    broker.wait_metric(&kicks(CloseReason::WriteTimeout), 1.0, Duration::from_secs(4)).await;
    assert!(broker.log().contains("write_timeout"));
    assert_eq!(broker.metric("fleet_sessions_live").await, 1.0, "only the service is left");
}

// ---- persistent sessions: caps ----

/// Parks `n` claim sessions (clean session = 0, one nonce each) of the claim in `dir`.
async fn park_claim_sessions(broker: &BrokerProc, dir: &std::path::Path, claim: &str, n: usize) {
    for i in 0..n {
        let mut c = Raw::device(broker.mqtt, dir).await.unwrap();
        let id = format!("claims/{claim}/{i:016}");
        assert_eq!(connect_session(&mut c, &id, false).await, (true, false), "{id}");
        c.send(Packet::Disconnect).await.unwrap();
        assert!(c.closed_within(PATIENCE).await);
    }
}

/// One claim certificate (shared by a whole batch of devices, so a thief's easiest find) once
/// parked as many persistent sessions as it opened, one per nonce, each kept 24 h. Kept sessions
/// are capped per claim (`max_parked_per_claim`, default 16) and in total
/// (`max_parked_sessions`): one over a cap is not kept, and counted.
#[tokio::test(flavor = "multi_thread")]
async fn one_claim_certificate_cannot_park_sessions_without_bound() {
    let fleet = Fleet::new(1, None).await;
    let claim = claim_cert(&fleet, "batch-1").await;
    let broker = BrokerProc::start(&fleet, &[]);
    park_claim_sessions(&broker, &claim, "batch-1", 24).await;
    broker.wait_metric("fleet_limits_total{limit=\"parked_per_claim\"}", 8.0, Duration::from_secs(5)).await;
    assert_eq!(broker.metric("fleet_sessions_parked").await, 16.0);
    // The claim's cap leaves the devices' sessions alone.
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(connect_session(&mut d, &fleet.id(0), false).await.0);
    d.send(Packet::Disconnect).await.unwrap();
    broker.wait_metric("fleet_sessions_parked", 17.0, Duration::from_secs(5)).await;
    drop(broker);

    // The total cap (an environment setting: a broker without it would ignore it).
    let broker = BrokerProc::start_with_env(&fleet, 0, &[], &[("FLEET_MAX_PARKED_SESSIONS", "4")]);
    park_claim_sessions(&broker, &claim, "batch-1", 6).await;
    broker.wait_metric("fleet_limits_total{limit=\"parked_total\"}", 2.0, Duration::from_secs(5)).await;
    assert_eq!(broker.metric("fleet_sessions_parked").await, 4.0);
}

// ---- per-device publish rate ----

/// Publishes QoS 1 as fast as the broker lets it (up to 100 in flight) for `window`; returns
/// the PUBACKs received in that time.
async fn flood(mut c: Raw, topic: String, window: Duration) -> usize {
    let t = Instant::now();
    let (mut pkid, mut in_flight, mut acked) = (0u16, 0usize, 0usize);
    while t.elapsed() < window {
        while in_flight < 100 {
            pkid = pkid % 60_000 + 1;
            let mut p = Publish::new(&topic, QoS::AtLeastOnce, vec![0u8; 16]);
            p.pkid = pkid;
            c.send(Packet::Publish(p)).await.unwrap();
            in_flight += 1;
        }
        if let Some(Packet::PubAck(_)) = c.recv(Duration::from_millis(50)).await {
            acked += 1;
            in_flight -= 1;
        }
    }
    acked
}

/// One device publishes as fast as its link allows; with `max_publish_rate` = 50 messages per
/// second it gets at most one second's burst plus 50 acknowledgements a second (QoS 1: the
/// PUBACK waits until it is within its rate), while another device, within its own rate, is
/// served at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_publishing_far_above_its_rate_is_held_to_it_and_others_are_unaffected() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start_with_env(&fleet, 0, &[], &[("FLEET_MAX_PUBLISH_RATE", "50")]);
    let flooder = connected(&broker, &fleet, 0).await;
    let window = Duration::from_secs(4);
    let topic = format!("devices/{}/telemetry", fleet.id(0));
    let flood = tokio::spawn(flood(flooder, topic, window));
    // The flooder is being held to its rate.
    broker.wait_metric("fleet_limits_total{limit=\"publish_rate\"}", 1.0, PATIENCE).await;
    // The other device: 20 messages, each acknowledged, well within the window.
    let mut other = connected(&broker, &fleet, 1).await;
    let t = Instant::now();
    for i in 0..20u16 {
        let mut p = Publish::new(format!("devices/{}/telemetry", fleet.id(1)), QoS::AtLeastOnce, vec![1]);
        p.pkid = i + 1;
        other.send(Packet::Publish(p)).await.unwrap();
        assert!(matches!(other.recv(PATIENCE).await, Some(Packet::PubAck(_))), "message {i}");
    }
    let other_took = t.elapsed();
    let acked = flood.await.unwrap();
    // 4 s at 50/s after a burst of 50: 250; generous for a loaded machine, far below a flood.
    assert!(acked <= 300, "the flooding device got {acked} PUBACKs in {window:?}");
    assert!(acked >= 100, "the flooding device was starved: {acked} PUBACKs");
    assert!(other_took < LATENCY_BOUND, "the other device waited {other_took:?}");
    assert!(broker.metric("fleet_limits_total{limit=\"publish_rate\"}").await >= 1.0);
    fleet.wait_telemetry_rows(&fleet.id(1), 20, Duration::from_secs(5)).await;
}

/// One claim certificate is on every device of a batch, so a thief's easiest find: it once
/// held as many live sessions as the broker has connection slots (`max_connections`), each a
/// new nonce, locking every device out. Live sessions of one claim are capped
/// (`max_sessions_per_claim`, and a quarter of `max_connections` at most): over it, CONNACK 3
/// (`claim_busy`) until one ends; a session's own reconnect is still let in, and devices are
/// not affected. The second half: with 12 slots and the default claim cap (64), the claim
/// gets 3 (the attack review's setting).
#[tokio::test(flavor = "multi_thread")]
async fn one_claim_certificate_cannot_hold_every_connection_slot() {
    let fleet = Fleet::new(1, None).await;
    let claim = claim_cert(&fleet, "batch-2").await;
    let broker = BrokerProc::start(&fleet, &["--max-connections", "40", "--max-sessions-per-claim", "4"]);
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = Raw::device(broker.mqtt, &claim).await.unwrap();
        let id = format!("claims/batch-2/{i:016}");
        assert_eq!(connack_code(&c.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success), "{id}");
        held.push(c);
    }
    // The fifth nonce is refused, and the refusal counted; so would every later one be.
    for i in 4..10 {
        let mut c = Raw::device(broker.mqtt, &claim).await.unwrap();
        let id = format!("claims/batch-2/{i:016}");
        assert_eq!(
            connack_code(&c.mqtt_connect(&id, 30).await),
            Some(ConnectReturnCode::ServiceUnavailable),
            "{id} was admitted past the cap"
        );
    }
    broker.wait_refused(Refusal::ClaimBusy, 6.0, Duration::from_secs(3)).await;
    // A device still gets in (the claim holds 4 of 40 slots, not all of them).
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&d.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
    // A held session's own reconnect replaces it; when one ends, a new nonce gets its place.
    let mut again = Raw::device(broker.mqtt, &claim).await.unwrap();
    let first = "claims/batch-2/0000000000000000";
    assert_eq!(connack_code(&again.mqtt_connect(first, 30).await), Some(ConnectReturnCode::Success));
    drop(held.pop());
    let t = Instant::now();
    loop {
        let mut c = Raw::device(broker.mqtt, &claim).await.unwrap();
        if connack_code(&c.mqtt_connect("claims/batch-2/0000000000000099", 30).await)
            == Some(ConnectReturnCode::Success)
        {
            break;
        }
        assert!(t.elapsed() < PATIENCE, "the freed place was not given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(broker);

    let broker = BrokerProc::start(&fleet, &["--max-connections", "12"]);
    let mut held = Vec::new();
    for i in 0..3 {
        let mut c = Raw::device(broker.mqtt, &claim).await.unwrap();
        let id = format!("claims/batch-2/{i:016}");
        assert_eq!(connack_code(&c.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success), "{id}");
        held.push(c);
    }
    let mut c = Raw::device(broker.mqtt, &claim).await.unwrap();
    assert_eq!(
        connack_code(&c.mqtt_connect("claims/batch-2/0000000000000003", 30).await),
        Some(ConnectReturnCode::ServiceUnavailable),
        "a claim took more than a quarter of 12 slots"
    );
    let mut d = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&d.mqtt_connect(&fleet.id(0), 30).await), Some(ConnectReturnCode::Success));
}

/// A claim certificate `name` for ids `dev-...` (quota 5), issued at the station; its directory.
async fn claim_cert(fleet: &Fleet, name: &str) -> std::path::PathBuf {
    let opts = fleet_provision::lifecycle::ClaimOptions {
        name: name.into(),
        id_prefix: "dev".into(),
        quota: 5,
        days: 30,
        out: fleet.dir.path().join("claim"),
        broker_host: "localhost".into(),
        broker_port: 8883,
    };
    fleet.station().await.claim_cert(&opts).await.unwrap().dir
}
