//! The admin API against its registry: revocation under the least-privilege broker role with a
//! separate `admin_database_url`, 503 (never 500, never a hang) while the registry is down, and
//! the live feed's `lagged` event for an operator that reads too slowly.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::{Duration, Instant};

use common::admin::*;
use common::*;
use fleet_broker::outcome::CloseReason;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The broker runs as the `db-roles` broker role, which may not revoke. Without
/// `admin_database_url` an operator's revocation is refused by PostgreSQL and changes nothing;
/// with it (a role that may write), the revocation lands, the session is cut and the log names
/// the operator.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_revokes_through_the_admin_database_url_while_the_broker_runs_least_privileged() {
    let pg = fleet_tests::PgCluster::start();
    let owner_url = pg.create_database("fleet");
    let mut fleet = Fleet::new(2, Some(owner_url.clone())).await;
    let alice = operator(&fleet, "alice").await;
    fleet.station().await.registry().apply_broker_role("fleet_broker").await.unwrap();
    let broker_url = owner_url.replacen("postgres://postgres@", "postgres://fleet_broker@", 1);
    assert_ne!(broker_url, owner_url);
    let admin = ["--admin-listen", "127.0.0.1:0", "--revocation-poll-ms", "100"];
    fleet.db = Some(broker_url.clone());
    let least = BrokerProc::start(&fleet, &admin);
    let with_writer = {
        let mut args = admin.to_vec();
        args.extend(["--admin-database-url", owner_url.as_str()]);
        BrokerProc::start(&fleet, &args)
    };
    fleet.db = Some(owner_url.clone());
    let target = fleet.id(0);
    let path = format!("/api/v1/devices/{target}/revoke");
    let body = br#"{"reason":"keyCompromise"}"#;

    // Control: the broker's own role may not revoke; the answer is an error, nothing changed.
    let (code, e) = Client::new(&least, &fleet, Some(&alice)).call("POST", &path, Some(body));
    assert!(code >= 400 && code != 500, "{code} {e}");
    conforms("Error", &e);
    let st = fleet.station().await;
    let dev = fleet_provision::DeviceId::parse(&target).unwrap();
    assert_eq!(st.registry().device(&dev).await.unwrap().unwrap().status, fleet_registry::Status::Active);
    assert!(least.log().contains("permission denied"), "{}", least.log());

    // Through the node with admin_database_url: revoked, and the live session cut.
    let mut device = Raw::device(with_writer.mqtt, &fleet.devices[0]).await.unwrap();
    assert_eq!(connack_code(&device.mqtt_connect(&target, 30).await), Some(ConnectReturnCode::Success));
    let (code, r) = Client::new(&with_writer, &fleet, Some(&alice)).call("POST", &path, Some(body));
    assert_eq!(code, 200, "{r}");
    conforms("Revoked", &r);
    assert_eq!(r["by"], "operator:alice");
    assert!(device.closed_within(PATIENCE).await, "the session was not cut");
    with_writer.wait_metric(&kicks(CloseReason::Revoked), 1.0, Duration::from_secs(2)).await;
    assert_eq!(st.registry().device(&dev).await.unwrap().unwrap().status, fleet_registry::Status::Revoked);
    // The least-privileged node sees it through the registry feed too.
    least.wait_metric("fleet_revocations_seen_total", 1.0, Duration::from_secs(5)).await;
    let report = st.verify_log().await.unwrap();
    assert!(report.disagreements.is_empty(), "{:?}", report.disagreements);
}

/// With the registry down, every admin endpoint that needs it answers 503
/// `registry_unavailable` (an Error document) within seconds, and recovers with the registry.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_answers_503_while_the_registry_is_down() {
    let pg = fleet_tests::PgCluster::start();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    let alice = operator(&fleet, "alice").await;
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0"]);
    let api = Client::new(&broker, &fleet, Some(&alice));
    let target = fleet.id(0);
    assert_eq!(api.get("/api/v1/devices").0, 200);

    pg.stop();
    for (method, path) in [
        ("GET", "/api/v1/devices".to_owned()),
        ("GET", format!("/api/v1/devices/{target}")),
        ("POST", format!("/api/v1/devices/{target}/revoke")),
    ] {
        let body: &[u8] = br#"{"reason":"keyCompromise"}"#;
        let t = Instant::now();
        let (code, e) = api.call(method, &path, (method == "POST").then_some(body));
        assert_eq!(code, 503, "{method} {path} with the registry down: {e}");
        conforms("Error", &e);
        assert_eq!(e["error"]["code"], "registry_unavailable", "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{method} {path} took {:?}", t.elapsed());
    }

    pg.restart();
    let t = Instant::now();
    loop {
        let (code, d) = api.get(&format!("/api/v1/devices/{target}"));
        if code == 200 {
            assert_eq!(d["status"], "active", "the refused revocation changed nothing");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the admin API did not recover: {code} {d}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An operator's feed that stops reading falls behind the broker's event channel (256): when it
/// reads again it gets a `lagged` event with the number of events it missed, then goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_feed_that_falls_behind_is_told_how_many_events_it_missed() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0"]);
    let admin = broker.admin.unwrap();
    // A feed over a socket with a small receive buffer, read only at the end.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(admin).await.unwrap();
    let cfg = client_config(
        &fleet.service.join("broker-trust.pem"),
        Some((&alice.join("cert.pem"), &alice.join("key.pem"))),
    );
    let mut feed = Raw::over(tcp, cfg).await.unwrap();
    feed.tls
        .write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    feed.tls.flush().await.unwrap();
    let mut head = vec![0u8; 64];
    let n = feed.tls.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..n]));
    // 40,000 refusals (TCP connections closed before TLS: `peer_closed`), from 8 addresses at
    // once, each address one after the other: about 6 MB of events, far more than the channel
    // (256 events) and the socket buffers (4 MiB at most) take.
    let closed = "fleet_handshakes_total{outcome=\"refused\",reason=\"peer_closed\"}";
    let mqtt = broker.mqtt;
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            tokio::spawn(async move {
                for _ in 0..5000 {
                    let mut c = tcp_from([127, 0, 0, 10 + i], mqtt).await.unwrap();
                    c.shutdown().await.unwrap();
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut sink)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    broker.wait_metric(closed, 40_000.0, Duration::from_secs(60)).await;
    // Now read: `event: lagged` with a positive count, then events again.
    let mut text = String::new();
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let lagged = loop {
        let n = match tokio::time::timeout(Duration::from_secs(5), feed.tls.read(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => {
                panic!("no lagged event in {} bytes ({} events)", text.len(), text.matches("event:").count())
            }
        };
        assert!(n > 0, "the feed closed");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(i) = text.find("event: lagged\n") {
            let rest = &text[i..];
            let count = rest.lines().nth(1).and_then(|l| l.strip_prefix("data: "));
            if let (Some(count), true) = (count, rest.contains("event: refused")) {
                break count.trim().parse::<u64>().unwrap();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no lagged event in {} bytes", text.len());
    };
    assert!(lagged > 0 && lagged <= 40_000, "{lagged}");
}
