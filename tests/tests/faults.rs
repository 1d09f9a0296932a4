//! Faults: the registry database going away mid-run, and the broker killed with SIGKILL under
//! QoS 1 load. What was acknowledged must be stored; what could not be stored must not be
//! acknowledged; the broker must say why it refuses and recover by itself.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;

fn publish(topic: &str, pkid: u16, payload: &str) -> Packet {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
    p.pkid = pkid;
    Packet::Publish(p)
}

#[tokio::test]
async fn registry_outage_refuses_new_sessions_withholds_pubacks_and_recovers() {
    // Over TCP: a stopped server refuses connections, which the pool retries until the
    // registry timeout (a Unix socket would fail at once).
    let pg = fleet_tests::PgCluster::start_tcp();
    let fleet = Fleet::new(2, Some(pg.create_database("fleet"))).await;
    // Messages stored in the registry before their PUBACK (with the telemetry log, the default,
    // an outage does not hold PUBACKs: the next test).
    let broker = BrokerProc::start(&fleet, &["--registry-timeout", "2", "--store", "registry"]);
    let (id0, id1) = (fleet.id(0), fleet.id(1));
    let topic = format!("devices/{id0}/telemetry");

    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&id0, 30).await), Some(ConnectReturnCode::Success));
    raw.send(publish(&topic, 1, "before")).await.unwrap();
    assert_eq!(raw.recv(PATIENCE).await, Some(Packet::PubAck(PubAck::new(1))));

    // The database stops (immediate shutdown, as in a crash).
    pg.stop();

    // A message that cannot be stored is never acknowledged: the session is closed instead, and
    // the device will send it again on its next session.
    raw.send(publish(&topic, 2, "during")).await.unwrap();
    let t = Instant::now();
    let reply = raw.recv(PATIENCE).await;
    assert_eq!(reply, None, "expected the session to close without PUBACK, got {reply:?}");
    // The registry timeout (2 s), not a hang: generous for a loaded machine, far below PATIENCE.
    let bound = Duration::from_secs(2) + LATENCY_BOUND;
    assert!(t.elapsed() < bound, "took {:?} to give up on the store", t.elapsed());
    assert!(broker.metric("fleet_store_errors_total").await >= 1.0);

    // New sessions are refused with a clear reason: CONNACK 3 (server unavailable), a metric and
    // a log line naming the registry.
    let t = Instant::now();
    let mut other = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert_eq!(
        connack_code(&other.mqtt_connect(&id1, 30).await),
        Some(ConnectReturnCode::ServiceUnavailable)
    );
    assert!(t.elapsed() < bound, "refusal took {:?} (registry timeout 2 s)", t.elapsed());
    broker.wait_refused(Refusal::RegistryUnavailable, 1.0, Duration::from_secs(2)).await;
    assert!(broker.log().contains("registry unavailable"), "log:\n{}", broker.log());

    // The database returns; the broker recovers without a restart.
    pg.restart();
    let t = Instant::now();
    let mut raw = loop {
        let mut r = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
        match connack_code(&r.mqtt_connect(&id0, 30).await) {
            Some(ConnectReturnCode::Success) => break r,
            other => {
                assert!(t.elapsed() < PATIENCE, "not admitted after recovery: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    raw.send(publish(&topic, 3, "during")).await.unwrap(); // the device's retransmission
    raw.send(publish(&topic, 4, "after")).await.unwrap();
    assert_eq!(raw.recv(PATIENCE).await, Some(Packet::PubAck(PubAck::new(3))));
    assert_eq!(raw.recv(PATIENCE).await, Some(Packet::PubAck(PubAck::new(4))));
    let rows: Vec<String> =
        fleet.telemetry_rows(&id0).await.into_iter().map(|r| String::from_utf8(r.1).unwrap()).collect();
    assert_eq!(rows, ["before", "during", "after"], "stored rows");

    // Revocation watching resumed too: a revocation now still cuts a live session.
    fleet.revoke(0).await;
    assert!(raw.closed_within(PATIENCE).await, "revocation after the outage did not cut");
}

/// `kill -<signal> <pid>`.
fn signal(signal: &str, pid: i32) {
    let ok =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(ok.success(), "kill -{signal} {pid}");
}

#[tokio::test]
async fn a_registry_connection_that_never_answers_does_not_stop_admissions_for_good() {
    let pg = fleet_tests::PgCluster::start_tcp();
    let url = pg.create_database("fleet");
    let fleet = Fleet::new(2, Some(url.clone())).await;
    let broker = BrokerProc::start(&fleet, &["--registry-timeout", "2"]);
    let (id0, id1) = (fleet.id(0), fleet.id(1));
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&id0, 30).await), Some(ConnectReturnCode::Success));

    // The admission reader's connection goes dark after its query left (a backend that hangs,
    // a failover that strands the old link); every other connection, and every new one,
    // works. Emulated: the query waits on a lock, its backend is stopped, the lock released.
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&url).await.unwrap();
    let mut lock = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let (mqtt, dir1, who) = (broker.mqtt, fleet.devices[1].clone(), id1.clone());
    let first = tokio::spawn(async move {
        let mut r = Raw::device(mqtt, &dir1).await.unwrap();
        connack_code(&r.mqtt_connect(&who, 30).await)
    });
    let t = Instant::now();
    let pid: i32 = loop {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%c.serial IN%' AND wait_event_type = 'Lock'",
        )
        .fetch_optional(&admin)
        .await
        .unwrap();
        match waiting {
            Some(pid) => break pid,
            None => {
                assert!(t.elapsed() < PATIENCE, "the admission read never reached the database");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    signal("STOP", pid);
    lock.rollback().await.unwrap();

    // The read that hangs refuses its admission within the registry timeout.
    assert_eq!(first.await.unwrap(), Some(ConnectReturnCode::ServiceUnavailable));
    // Then the reader reads on another connection: the device gets in.
    let t = Instant::now();
    let admitted = loop {
        let mut r = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
        match connack_code(&r.mqtt_connect(&id1, 30).await) {
            Some(ConnectReturnCode::Success) => break true,
            _ if t.elapsed() > PATIENCE => break false,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    signal("CONT", pid);
    assert!(admitted, "every admission refused while one registry connection hangs");
}

#[tokio::test]
async fn with_the_log_a_registry_outage_holds_no_puback_until_the_backlog_limit_and_every_row_lands_once() {
    let pg = fleet_tests::PgCluster::start_tcp();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    // Room for a few dozen records, not for 200.
    let broker = BrokerProc::start(&fleet, &["--registry-timeout", "2", "--store-log-max-bytes", "3000"]);
    let id = fleet.id(0);
    let topic = format!("devices/{id}/telemetry");
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    raw.send(publish(&topic, 1, "before")).await.unwrap();
    assert_eq!(raw.recv(PATIENCE).await, Some(Packet::PubAck(PubAck::new(1))));
    fleet.wait_telemetry_rows(&id, 1, PATIENCE).await;

    pg.stop();
    // Acknowledged while the database is down: the log holds them.
    let mut acked = Vec::new();
    let mut refused_at = None;
    for n in 2..200u16 {
        raw.send(publish(&topic, n, &format!("during-{n}"))).await.unwrap();
        match raw.recv(PATIENCE).await {
            Some(Packet::PubAck(a)) if a.pkid == n => acked.push(format!("during-{n}")),
            None => {
                refused_at = Some(n);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(acked.len() >= 5, "the log took only {} messages during the outage", acked.len());
    // Over the backlog limit: not acknowledged, the session closed, a clear log line.
    assert!(refused_at.is_some(), "the backlog limit never stopped acknowledgements");
    assert!(broker.metric("fleet_store_errors_total").await >= 1.0);
    assert!(broker.metric("fleet_store_log_backlog_records").await >= acked.len() as f64);
    assert!(broker.log().contains("store_log_max_bytes"), "log:\n{}", broker.log());

    pg.restart();
    let mut expect = vec!["before".to_owned()];
    expect.extend(acked);
    fleet.wait_telemetry_rows(&id, expect.len(), PATIENCE).await;
    broker.wait_metric_at_most("fleet_store_log_backlog_records", 0.0, PATIENCE).await;
    let rows: Vec<String> =
        fleet.telemetry_rows(&id).await.into_iter().map(|r| String::from_utf8(r.1).unwrap()).collect();
    assert_eq!(rows, expect, "every acknowledged message once, in order, and nothing refused");
    assert!(broker.metric("fleet_store_feed_errors_total").await >= 1.0);
    // The outage said once (and again only after 30 s), and its end said.
    let log = broker.log();
    assert_eq!(log.matches("copy into the registry failed").count(), 1, "log:\n{log}");
    assert!(log.contains("copy into the registry resumed"), "log:\n{log}");

    // Within the limit again: acknowledged.
    let mut raw = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&raw.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
    raw.send(publish(&topic, 500, "after")).await.unwrap();
    assert_eq!(raw.recv(PATIENCE).await, Some(Packet::PubAck(PubAck::new(500))));
}

#[tokio::test]
async fn kill9_under_qos1_load_from_50_devices_loses_no_acknowledged_message() {
    const DEVICES: usize = 50;
    let fleet = Fleet::new(DEVICES, None).await;
    let mut broker = BrokerProc::start(&fleet, &[]);
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for i in 0..DEVICES {
        let id = fleet.id(i);
        let mut raw = Raw::device(broker.mqtt, &fleet.devices[i]).await.unwrap();
        assert_eq!(connack_code(&raw.mqtt_connect(&id, 30).await), Some(ConnectReturnCode::Success));
        let topic = format!("devices/{id}/telemetry");
        let (mut rx, mut tx) = tokio::io::split(raw.tls);
        writers.push(tokio::spawn(async move {
            let mut n: u16 = 0;
            loop {
                n = n.wrapping_add(1).max(1);
                let mut out = bytes::BytesMut::new();
                publish(&topic, n, &format!("m{n}")).write(&mut out, 1 << 20).unwrap();
                if tokio::io::AsyncWriteExt::write_all(&mut tx, &out).await.is_err() {
                    return;
                }
                if n.is_multiple_of(20) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
        readers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut buf = bytes::BytesMut::new();
            loop {
                while let Ok(p) = Packet::read(&mut buf, 1 << 20) {
                    if let Packet::PubAck(a) = p {
                        acked.push(a.pkid);
                    }
                }
                match tokio::io::AsyncReadExt::read_buf(&mut rx, &mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return (id, acked),
                }
            }
        }));
    }
    // Let thousands of messages through, then kill -9 mid-stream (the telemetry log's copy
    // into the registry running too).
    broker.wait_metric("fleet_messages_stored_total", 10_000.0, Duration::from_secs(60)).await;
    broker.kill9();
    let mut acks = Vec::new();
    for r in readers {
        acks.push(tokio::time::timeout(Duration::from_secs(10), r).await.unwrap().unwrap());
    }
    for w in writers {
        w.abort();
    }
    // What was acknowledged but not yet copied is in the log: the next start copies it.
    let _broker = BrokerProc::start(&fleet, &[]);
    let mut total_acked = 0;
    let mut lost = Vec::new();
    for (id, acked) in acks {
        assert!(acked.len() < 65_000, "pkids wrapped; the check would be ambiguous");
        total_acked += acked.len();
        let rows = fleet.telemetry_rows(&id).await;
        let stored: HashSet<Vec<u8>> = rows.iter().map(|r| r.1.clone()).collect();
        assert_eq!(stored.len(), rows.len(), "{id}: a message stored twice");
        lost.extend(
            acked.iter().filter(|n| !stored.contains(format!("m{n}").as_bytes())).map(|n| (id.clone(), *n)),
        );
    }
    assert!(total_acked >= 5_000, "too few acks to mean anything: {total_acked}");
    assert!(
        lost.is_empty(),
        "{} of {total_acked} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
