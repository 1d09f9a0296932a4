//! The admin API over mTLS, driven with curl (a client nobody here wrote): an operator sees the
//! fleet and revokes a connected device (cut within a second, logged with the operator's name);
//! devices, services, revoked operators and other CAs are kept out; every answer, errors too,
//! matches the OpenAPI document.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::*;
use common::*;
use fleet_broker::outcome::{CloseReason, Refusal};
use fleet_tests::require_program;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use serde_json::{json, Value};

fn admin_broker(fleet: &Fleet) -> BrokerProc {
    BrokerProc::start(fleet, &["--admin-listen", "127.0.0.1:0", "--revocation-poll-ms", "100"])
}

#[tokio::test]
async fn an_operator_sees_the_fleet_and_revokes_a_connected_device_which_is_cut_at_once() {
    let fleet = Fleet::new(3, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = admin_broker(&fleet);
    let api = Client::new(&broker, &fleet, Some(&alice));
    let target = fleet.id(0);

    let mut device = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(matches!(device.mqtt_connect(&target, 30).await, Some(Packet::ConnAck(_))));
    broker.wait_metric("fleet_sessions_live", 1.0, Duration::from_secs(5)).await;

    // The overview.
    let (code, s) = api.get("/api/v1/summary?expiring_within_days=30&minutes=5");
    assert_eq!(code, 200, "{s}");
    conforms("Summary", &s);
    assert_eq!((s["devices"]["active"].as_i64(), s["sessions_live"].as_i64()), (Some(3), Some(1)), "{s}");
    assert_eq!(s["admitted"], 1, "{s}");
    assert_eq!(s["issuance_log"]["ok"], true, "{s}");
    assert_eq!(s["crl"]["expired"], false, "{s}");
    // The console's header names the organisation (the device CA's O), not the listen address.
    assert!(s["organisation"].as_str().unwrap().starts_with("TestFleet"), "{s}");
    assert_eq!(
        (s["crl_health"]["ok"].as_bool(), s["crl_health"]["missing"].as_i64()),
        (Some(true), Some(0)),
        "{s}"
    );
    // Every refusal reason comes with its one-line explanation.
    for r in Refusal::ALL {
        assert_eq!(s["refusal_reasons"][r.label()], r.explain(), "{s}");
    }

    // Pages, filters.
    let (code, p1) = api.get("/api/v1/devices?limit=2");
    assert_eq!(code, 200);
    conforms("DevicePage", &p1);
    let ids: Vec<&str> =
        p1["devices"].as_array().unwrap().iter().map(|d| d["device"].as_str().unwrap()).collect();
    assert_eq!(ids, [fleet.id(0), fleet.id(1)]);
    assert_eq!(p1["devices"][0]["online"], true);
    // Last seen, message rate, open commands: now and a rate when online; none when offline.
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let seen = p1["devices"][0]["last_seen_ms"].as_i64().unwrap();
    assert!((now_ms - seen).abs() < 10_000, "{p1}");
    assert!(p1["devices"][0]["messages_per_minute"].as_f64().is_some(), "{p1}");
    assert_eq!(p1["devices"][0]["open_commands"], 0, "{p1}");
    assert_eq!(p1["devices"][1]["online"], false, "{p1}");
    assert!(
        p1["devices"][1]["last_seen_ms"].is_null() && p1["devices"][1]["messages_per_minute"].is_null(),
        "{p1}"
    );
    let next = p1["next"].as_str().unwrap();
    let (_, p2) = api.get(&format!("/api/v1/devices?limit=2&after={next}"));
    conforms("DevicePage", &p2);
    assert_eq!(p2["devices"].as_array().unwrap().len(), 1);
    assert!(p2["next"].is_null());
    let (_, by_prefix) = api.get(&format!("/api/v1/devices?prefix={}", &fleet.id(2)[..10]));
    assert!(by_prefix["devices"].as_array().unwrap().iter().any(|d| d["device"] == fleet.id(2)));
    let (_, services) = api.get("/api/v1/devices?role=service");
    assert_eq!(services["devices"][0]["device"], "backend");

    // The device's page shows its live session.
    let (code, d) = api.get(&format!("/api/v1/devices/{target}"));
    assert_eq!(code, 200);
    conforms("Device", &d);
    assert_eq!(d["session"]["serial"], d["certificates"][0]["serial"]);
    assert_eq!(d["events"][0]["kind"], "admitted");

    // The live feed, from before the revocation.
    let curl = require_program("curl", "curl");
    let mut feed = Command::new(&curl)
        .args(["-s", "-N", "--max-time", "60", "--cacert"])
        .arg(fleet.service.join("broker-trust.pem"))
        .arg("--cert")
        .arg(alice.join("cert.pem"))
        .arg("--key")
        .arg(alice.join("key.pem"))
        .arg(format!("https://{}/api/v1/events", broker.admin.unwrap()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(feed.stdout.take().unwrap());
    let events = std::cell::RefCell::new(Vec::<Value>::new());
    let wait_event = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        let t = Instant::now();
        loop {
            if events.borrow().iter().any(pred) {
                return;
            }
            let left = PATIENCE
                .checked_sub(t.elapsed())
                .unwrap_or_else(|| panic!("the event feed never showed {what}: {:?}", events.borrow()));
            match lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(data) = l.strip_prefix("data: ") {
                        events.borrow_mut().push(serde_json::from_str(data).unwrap());
                    }
                }
                Err(_) => panic!("the event feed never showed {what}: {:?}", events.borrow()),
            }
        }
    };
    // The feed is live once it replays the admission backlog.
    wait_event("the admission", &|e| e["kind"] == "admitted" && e["device"] == target.as_str());

    // Revoke it: the session is cut at once (timed from the answer, i.e. from the commit).
    let (code, r) =
        api.call("POST", &format!("/api/v1/devices/{target}/revoke"), Some(br#"{"reason":"keyCompromise"}"#));
    let t = Instant::now();
    assert_eq!(code, 200, "{r}");
    conforms("Revoked", &r);
    assert_eq!((r["session_cut"].as_bool(), r["by"].as_str()), (Some(true), Some("operator:alice")));
    assert!(device.closed_within(PATIENCE).await, "the revoked session was never cut");
    assert!(t.elapsed() < LATENCY_BOUND, "the cut took {:?} after the commit", t.elapsed());
    broker.wait_metric(&kicks(CloseReason::Revoked), 1.0, PATIENCE).await;
    let mut again = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    match again.mqtt_connect(&target, 30).await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("a revoked device got {other:?}"),
    }

    // The feed saw the admission backlog and the cut; the device page says so.
    wait_event("the cut", &|e| e["kind"] == "closed" && e["reason"] == "revoked");
    wait_event("the refusal", &|e| e["kind"] == "refused" && e["reason"] == "revoked");
    let _ = feed.kill();
    let _ = feed.wait();
    let events = events.into_inner();
    for e in &events {
        conforms("Event", e);
    }
    let (_, d) = api.get(&format!("/api/v1/devices/{target}"));
    conforms("Device", &d);
    assert_eq!((d["status"].as_str(), d["session"].is_null()), (Some("revoked"), true), "{d}");
    assert_eq!(d["certificates"][0]["revocation_reason"], "keyCompromise");
    assert_eq!(d["last_refusals"][0], "revoked");
    // Offline now: seen when its session was cut, no rate.
    assert!(
        d["last_seen_ms"].as_i64().unwrap() >= now_ms - 10_000 && d["messages_per_minute"].is_null(),
        "{d}"
    );

    // The revocation is in the registry, and no issuer runs here to sign it into the CRL: the
    // CRL's health says it lacks it, until the station signs a new one.
    let (_, s) = api.get("/api/v1/summary");
    conforms("Summary", &s);
    assert_eq!(s["crl_health"]["ok"], false, "{s}");
    assert_eq!(s["crl_health"]["missing"], 1, "{s}");
    assert_eq!(s["crl_health"]["first_missing"][0]["device"], target.as_str(), "{s}");
    assert!(s["crl_health"]["message"].as_str().unwrap().contains("lacks 1 revocation"), "{s}");
    fleet.station().await.write_crl(&fleet.home().join("crl.pem")).await.unwrap();
    let t = Instant::now();
    loop {
        let (_, s) = api.get("/api/v1/summary");
        if s["crl_health"]["ok"] == true {
            assert_eq!(s["crl_health"]["missing"], 0, "{s}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the new CRL did not make it healthy: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The issuance log names the operator, and still verifies.
    let station = fleet.station().await;
    assert!(station.verify_log().await.unwrap().disagreements.is_empty());
    let registry = fleet_registry::Registry::open(
        &fleet_registry::Home::new(fleet.home()).default_database_url(),
        false,
    )
    .await
    .unwrap();
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM issuance_log WHERE event = 'revoke-device' AND device_id = $1",
    )
    .bind(&target)
    .fetch_one(registry.pool())
    .await
    .unwrap();
    assert_eq!(serde_json::from_str::<Value>(&detail).unwrap()["by"], "operator:alice");

    // Bad input: a JSON error with a 4xx, never a 500.
    let revoke = |id: &str| format!("/api/v1/devices/{id}/revoke");
    let big = vec![b'x'; 10_000];
    for (method, path, body, want) in [
        ("POST", revoke(&target), Some(&br#"{"reason":"keyCompromise"}"#[..]), 409),
        ("POST", revoke("no-such-device"), Some(&br#"{"reason":"keyCompromise"}"#[..]), 404),
        ("POST", revoke(&fleet.id(1)), Some(&b"{}"[..]), 422),
        ("POST", revoke(&fleet.id(1)), Some(&br#"{"reason":"because"}"#[..]), 422),
        ("POST", revoke(&fleet.id(1)), Some(&b"not json"[..]), 400),
        ("POST", revoke(&fleet.id(1)), Some(&big[..]), 413),
        ("POST", revoke("backend"), Some(&br#"{"reason":"keyCompromise"}"#[..]), 400),
        ("GET", "/api/v1/devices/Not_An_Id".into(), None, 400),
        ("GET", "/api/v1/devices?limit=0".into(), None, 400),
        ("GET", "/api/v1/devices?status=sleeping".into(), None, 400),
        ("GET", "/api/v1/summary?minutes=9999".into(), None, 400),
        ("GET", "/api/v1/nothing-here".into(), None, 404),
    ] {
        let (code, e) = api.call(method, &path, body);
        assert_eq!(code, want, "{method} {path}: {e}");
        conforms("Error", &e);
    }
    let (_, d1) = api.get(&format!("/api/v1/devices/{}", fleet.id(1)));
    assert_eq!(d1["status"], "active", "a refused call changed nothing");

    // The document itself is served.
    let (code, doc) = api.get("/api/v1/openapi.json");
    assert_eq!((code, doc), (200, serde_json::from_str::<Value>(OPENAPI).unwrap()));
}

#[test]
fn the_schema_check_rejects_answers_that_break_the_document() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}"), "components": doc["components"] });
    let event =
        json!({"at_ms": 1, "kind": "admitted", "reason": "ok", "device": "d", "serial": "01", "peer": "p"});
    assert!(jsonschema::is_valid(&schema("Event"), &event));
    for broken in [
        json!({"at_ms": 1, "kind": "admitted", "reason": "ok", "device": "d", "serial": "01"}),
        json!({"at_ms": "1", "kind": "admitted", "reason": "ok", "device": "d", "serial": "01", "peer": "p"}),
        json!({"at_ms": 1, "kind": "joined", "reason": "ok", "device": "d", "serial": "01", "peer": "p"}),
        json!({"at_ms": 1, "kind": "admitted", "reason": "ok", "device": "d", "serial": "01", "peer": "p", "x": 1}),
    ] {
        assert!(!jsonschema::is_valid(&schema("Event"), &broken), "{broken}");
    }
    assert!(!jsonschema::is_valid(&schema("Error"), &json!({"error": "text"})));
}

#[tokio::test]
async fn devices_services_revoked_operators_and_other_cas_are_kept_out() {
    let fleet = Fleet::new(2, None).await;
    let alice = operator(&fleet, "alice").await;
    let mallory = operator(&fleet, "mallory").await;
    let broker = admin_broker(&fleet);
    let target = fleet.id(1);

    for who in [&fleet.devices[0], &fleet.service] {
        let c = Client::new(&broker, &fleet, Some(who));
        for path in ["/", "/api/v1/summary", "/api/v1/events", "/api/v1/openapi.json"] {
            let (code, e) = c.get(path);
            let said: String = e.to_string().chars().take(200).collect();
            assert_eq!(code, 403, "{} {path}: {said}", who.display());
            conforms("Error", &e);
        }
        let (code, _) = c.call(
            "POST",
            &format!("/api/v1/devices/{target}/revoke"),
            Some(br#"{"reason":"keyCompromise"}"#),
        );
        assert_eq!(code, 403);
    }
    // No certificate, or one from another fleet's CA: no TLS session at all. curl's exit code
    // must be the TLS refusal itself (not a timeout, a refused TCP connect or any failure), and
    // the broker must have counted the refusal for its reason.
    let other = Fleet::new(1, None).await;
    let stranger = operator(&other, "alice").await;
    let curl = require_program("curl", "curl");
    let cases = [
        (None, Refusal::NoCertificate, "alert certificate required"),
        (Some(stranger.as_path()), Refusal::UnknownCa, "alert unknown ca"),
    ];
    for (who, reason, alert) in cases {
        let before = broker.metric(&refused(reason)).await;
        let mut c = Command::new(&curl);
        c.args(["-sS", "--max-time", "10", "--cacert"]).arg(fleet.service.join("broker-trust.pem"));
        if let Some(d) = who {
            c.arg("--cert").arg(d.join("cert.pem")).arg("--key").arg(d.join("key.pem"));
        }
        let out = c.arg(format!("https://{}/api/v1/summary", broker.admin.unwrap())).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // TLS 1.3: the server's alert reaches curl on its first read (56, CURLE_RECV_ERROR), or
        // during the handshake (35, CURLE_SSL_CONNECT_ERROR); either way it names the alert.
        assert!(
            matches!(out.status.code(), Some(35 | 56)) && err.contains(alert),
            "{who:?}: not a TLS refusal ({alert}): {:?} {err}",
            out.status.code()
        );
        broker.wait_metric(&refused(reason), before + 1.0, Duration::from_secs(5)).await;
    }
    let (_, d) = Client::new(&broker, &fleet, Some(&alice)).get(&format!("/api/v1/devices/{target}"));
    assert_eq!(d["status"], "active", "nobody above could revoke");

    // A revoked operator is out on its next connection, from the moment the revocation feed
    // saw it (admission is MQTT's: the cached verdict holds until then, within its poll).
    let m = Client::new(&broker, &fleet, Some(&mallory));
    assert_eq!(m.get("/api/v1/summary").0, 200);
    let id = fleet_provision::DeviceId::parse("mallory").unwrap();
    fleet
        .station()
        .await
        .revoke_device(&id, fleet_provision::RevocationReason::PrivilegeWithdrawn)
        .await
        .unwrap();
    broker.wait_metric("fleet_revocations_seen_total", 1.0, Duration::from_secs(2)).await;
    let (code, e) = m.get("/api/v1/summary");
    assert_eq!(code, 403, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("revoked"), "{e}");

    // An operator's certificate does not speak MQTT.
    let mut raw = Raw::device(broker.mqtt, &alice).await.unwrap();
    match raw.mqtt_connect("alice", 30).await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("an operator on MQTT got {other:?}"),
    }
    broker.wait_refused(Refusal::WrongRole, 1.0, Duration::from_secs(2)).await;
}

#[test]
fn operator_p12_is_read_by_openssl_and_nss() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fleet = rt.block_on(Fleet::new(1, None));
    let dir = rt.block_on(operator(&fleet, "carol"));
    let openssl = require_program("openssl", "openssl");
    let out = Command::new(openssl)
        .args(["pkcs12", "-nokeys", "-passin", "pass:correct horse battery", "-in"])
        .arg(dir.join("operator.p12"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("CN = carol") && text.contains("OU = operator"), "{text}");
    assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 3, "leaf, device CA, root: {text}");
    let out = Command::new(require_program("openssl", "openssl"))
        .args(["pkcs12", "-nocerts", "-nodes", "-passin", "pass:wrong password", "-in"])
        .arg(dir.join("operator.p12"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong password opened it");

    let certutil = require_program("certutil", "libnss3-tools");
    let pk12util = require_program("pk12util", "libnss3-tools");
    let nss = fleet.dir.path().join("nss");
    std::fs::create_dir_all(&nss).unwrap();
    let db = format!("sql:{}", nss.display());
    assert!(Command::new(&certutil).args(["-N", "-d", &db, "--empty-password"]).status().unwrap().success());
    let st = Command::new(pk12util)
        .args(["-i"])
        .arg(dir.join("operator.p12"))
        .args(["-d", &db, "-W", "correct horse battery"])
        .output()
        .unwrap();
    assert!(st.status.success(), "pk12util: {}", String::from_utf8_lossy(&st.stderr));
    let keys = Command::new(certutil).args(["-K", "-d", &db]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&keys.stdout).contains("carol"),
        "{}",
        String::from_utf8_lossy(&keys.stdout)
    );
}

#[tokio::test]
async fn a_flood_of_silent_connections_from_one_address_does_not_lock_operators_out() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = admin_broker(&fleet);
    let admin = broker.admin.unwrap();
    // 200 connections from 127.0.0.2 that never start TLS (each would hold a handshake slot
    // for the whole handshake deadline).
    let mut flood = Vec::new();
    for _ in 0..200 {
        match tcp_from([127, 0, 0, 2], admin).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("flood connect: {e}"),
        }
    }
    // The broker has taken the flood in once it refused the part over the source's share.
    broker.wait_metric(&denied("handshake_share"), 1.0, PATIENCE).await;
    let t = Instant::now();
    let (code, s) = Client::new(&broker, &fleet, Some(&alice)).get("/api/v1/summary");
    assert_eq!(code, 200, "{s}");
    assert!(t.elapsed() < LATENCY_BOUND, "the operator waited {:?} behind the flood", t.elapsed());
    drop(flood);
}

/// `fleet_admin_denied_total` series of a denial.
fn denied(reason: &str) -> String {
    format!("fleet_admin_denied_total{{reason=\"{reason}\"}}")
}

async fn status_of(fleet: &Fleet, device: &str) -> String {
    let st = fleet.station().await;
    sqlx::query_scalar("SELECT status FROM devices WHERE device_id = $1")
        .bind(device)
        .fetch_one(st.registry().pool())
        .await
        .unwrap()
}

/// Cross-site request forgery with curl: an operator's client holds the certificate, the
/// attacker chooses the request. Only JSON with the request header and no foreign origin
/// changes anything; each of these forgeries would revoke the device on a server that parses
/// any body as JSON.
#[tokio::test]
async fn a_state_changing_request_needs_json_the_request_header_and_the_same_origin() {
    let fleet = Fleet::new(2, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = admin_broker(&fleet);
    let api = Client::new(&broker, &fleet, Some(&alice));
    let target = fleet.id(0);
    let path = format!("/api/v1/devices/{target}/revoke");
    let body = br#"{"reason":"keyCompromise"}"#;
    let origin = format!("origin: https://{}", broker.admin.unwrap());
    for (headers, reason) in [
        // A form with enctype=text/plain, from another site.
        (vec!["content-type: text/plain", "origin: http://127.0.0.1:9"], "cross_origin"),
        // The same, with no Origin (an old browser, a privacy extension).
        (vec!["content-type: text/plain", "x-fleetgate-request: 1"], "content_type"),
        // fetch(..., {mode: "no-cors"}) with a form-urlencoded raw JSON body.
        (vec!["content-type: application/x-www-form-urlencoded", "x-fleetgate-request: 1"], "content_type"),
        // JSON but no request header (a browser cannot add one cross-site without a preflight).
        (vec!["content-type: application/json"], "request_header"),
        // Everything, but from another origin.
        (
            vec!["content-type: application/json", "x-fleetgate-request: 1", "origin: https://evil.example"],
            "cross_origin",
        ),
        (
            vec!["content-type: application/json", "x-fleetgate-request: 1", "sec-fetch-site: same-site"],
            "cross_origin",
        ),
    ] {
        let (code, e) = api.call_with("POST", &path, &headers, Some(body));
        assert_eq!(code, 403, "{headers:?}: {e}");
        conforms("Error", &e);
        assert_eq!(status_of(&fleet, &target).await, "active", "{headers:?} revoked the device");
        assert!(broker.metric(&denied(reason)).await >= 1.0, "{headers:?}: no {reason} denial counted");
    }
    // The console's own request (same origin, JSON, the header) and a plain API client's.
    let same = [
        "content-type: application/json",
        "x-fleetgate-request: 1",
        origin.as_str(),
        "sec-fetch-site: same-origin",
    ];
    let (code, r) = api.call_with("POST", &path, &same, Some(body));
    assert_eq!(code, 200, "{r}");
    let (code, r) = api.call("POST", &format!("/api/v1/devices/{}/revoke", fleet.id(1)), Some(body));
    assert_eq!(code, 200, "{r}");
}

/// An operator revoked at the station while its browser holds a kept-alive connection: the
/// connection is cut within a second, as an MQTT session is.
#[tokio::test]
async fn a_revoked_operators_kept_alive_connection_is_cut_at_once() {
    let fleet = Fleet::new(1, None).await;
    let mallory = operator(&fleet, "mallory").await;
    let broker = admin_broker(&fleet);
    let mut conn = Https::connect(&broker, &fleet, &mallory, [127, 0, 0, 1]).await.unwrap();
    let (code, body) = conn.get("/api/v1/summary").await.expect("an answer");
    assert_eq!(code, 200, "{body}");
    // At the station, as an administrator would.
    let out = Command::new(fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision"))
        .arg("--home")
        .arg(fleet.home())
        .args(["revoke", "mallory", "--reason", "privilegeWithdrawn"])
        .env_remove("FLEET_DATABASE_URL")
        .env_remove("FLEET_HOME")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = Instant::now(); // the station has committed the revocation
    if !conn.closed_within(LATENCY_BOUND).await {
        let next = conn.get(&format!("/api/v1/devices/{}", fleet.id(0))).await;
        panic!(
            "the revoked operator's connection is open after {:?}; its next request got {next:?}",
            t.elapsed()
        );
    }
    // On a new connection: one 403, then the connection is closed.
    let mut again = Https::connect(&broker, &fleet, &mallory, [127, 0, 0, 1]).await.unwrap();
    let answer = again.get("/api/v1/summary").await;
    assert_eq!(answer.as_ref().map(|a| a.0), Some(403), "{answer:?}");
    assert!(again.closed_within(PATIENCE).await);
}

/// Silent sockets from two addresses (each within the per-source cap) must not take every
/// handshake slot: an operator from a third address still gets in at once.
#[tokio::test]
async fn floods_from_two_addresses_do_not_lock_an_operator_out() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = admin_broker(&fleet);
    let admin = broker.admin.unwrap();
    let mut flood = Vec::new();
    for src in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        for _ in 0..40 {
            flood.push(tcp_from(src, admin).await.unwrap());
        }
    }
    // The flood holds its share of the handshake slots (the rest refused) before the operator comes.
    broker.wait_metric(&denied("handshake_share"), 1.0, PATIENCE).await;
    let t = Instant::now();
    let (code, s) = Client::new(&broker, &fleet, Some(&alice)).get("/api/v1/summary");
    assert_eq!(code, 200, "{s}");
    assert!(t.elapsed() < LATENCY_BOUND, "the operator waited {:?} behind the flood", t.elapsed());
    drop(flood);
}

/// A device certificate (valid, admitted by the MQTT rules) gets one 403 on the admin listener
/// and its connection is closed: it cannot hold admin connections open (each would be a
/// descriptor of the broker's).
#[tokio::test]
async fn a_device_certificate_cannot_hold_admin_connections() {
    let fleet = Fleet::new(1, None).await;
    let broker = admin_broker(&fleet);
    let mut held = Vec::new();
    for _ in 0..24 {
        held.push(Https::connect(&broker, &fleet, &fleet.devices[0], [127, 0, 0, 1]).await.unwrap());
    }
    for (i, c) in held.iter_mut().enumerate() {
        assert!(c.closed_within(PATIENCE).await, "connection {i} of a device is still open");
        assert!(c.unread().starts_with("HTTP/1.1 403"), "connection {i}: {:?}", c.unread());
    }
    assert!(broker.metric(&denied("not_operator")).await >= 24.0);
    broker.wait_refused(Refusal::WrongRole, 24.0, Duration::from_secs(2)).await;
}

/// An operator's connection that sends no request (or goes quiet after one) is closed after the
/// header timeout; more connections than the per-identity cap are refused after TLS.
#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout_and_capped_per_identity() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker = BrokerProc::start(
        &fleet,
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-header-timeout-secs",
            "1",
            "--admin-max-connections-per-identity",
            "3",
        ],
    );
    let t = Instant::now();
    let mut silent = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
    assert!(silent.closed_within(PATIENCE).await, "a silent connection stayed open");
    assert!(t.elapsed() >= Duration::from_millis(800), "closed before the timeout: {:?}", t.elapsed());
    let mut quiet = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
    assert_eq!(quiet.get("/api/v1/summary").await.map(|a| a.0), Some(200));
    assert!(quiet.closed_within(PATIENCE).await, "an idle kept-alive connection stayed open");

    // Three connections that hold their places however slow the machine (a silent one would
    // lose its place to the 1 s header timeout before a loaded machine opens the fourth): each
    // an open event stream.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
        assert_eq!(c.get("/api/v1/events").await.map(|a| a.0), Some(200));
        open.push(c);
    }
    let mut fourth = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
    assert_eq!(fourth.answer(PATIENCE).await.map(|a| a.0), Some(429));
    assert!(fourth.closed_within(PATIENCE).await);
    assert!(broker.metric(&denied("identity_limit")).await >= 1.0);
    // The three held places come back when their connections end: then the operator gets in
    // again.
    drop(open);
    let mut again = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
    assert_eq!(again.get("/api/v1/summary").await.map(|a| a.0), Some(200));
}

/// One gate: an expired CRL under the default fail-closed policy refuses an operator on the
/// admin listener as it refuses a device on MQTT, counted in the same metric.
#[tokio::test]
async fn an_expired_crl_refuses_an_operator_on_the_admin_listener_as_a_device_on_mqtt() {
    use fleet_provision::pki::{self, LoadedCa};
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let home = fleet.home();
    let ca = LoadedCa::from_pem(
        &std::fs::read_to_string(home.join("device-ca.pem")).unwrap(),
        &std::fs::read_to_string(home.join("private/device-ca.key")).unwrap(),
    )
    .unwrap();
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    let expired = pki::sign_crl(&ca, 99, &[], past, time::Duration::days(1)).unwrap();
    std::fs::write(home.join("crl.pem"), expired.pem().unwrap()).unwrap();
    let broker = admin_broker(&fleet);
    assert_eq!(broker.metric("fleet_crl_expired").await, 1.0);

    if let Ok(mut device) = Raw::device(broker.mqtt, &fleet.devices[0]).await {
        assert_eq!(
            connack_code(&device.mqtt_connect(&fleet.id(0), 30).await),
            Some(ConnectReturnCode::ServiceUnavailable)
        );
    }
    broker.wait_refused(Refusal::CrlExpired, 1.0, Duration::from_secs(3)).await;
    let (code, e) = Client::new(&broker, &fleet, Some(&alice)).get("/api/v1/summary");
    assert_eq!(code, 503, "an operator was let in under an expired CRL: {e}");
    conforms("Error", &e);
    broker.wait_refused(Refusal::CrlExpired, 2.0, Duration::from_secs(3)).await;
}

/// Event streams live as long as their client keeps them: an operator holds at most
/// `admin_max_event_streams_per_operator`, all operators `admin_max_event_streams`; more get 429.
#[tokio::test]
async fn event_streams_are_capped_per_operator_and_in_all() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let bob = operator(&fleet, "bob").await;
    let broker = BrokerProc::start(
        &fleet,
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-max-event-streams-per-operator",
            "2",
            "--admin-max-event-streams",
            "3",
        ],
    );
    let mut streams = Vec::new();
    for who in [&alice, &alice, &alice, &bob, &bob] {
        let mut c = Https::connect(&broker, &fleet, who, [127, 0, 0, 1]).await.unwrap();
        let status = c.get("/api/v1/events").await.map(|a| a.0);
        streams.push((c, status));
    }
    let got: Vec<_> = streams.iter().map(|(_, s)| *s).collect();
    // alice: 2 streams, the third refused; bob: one more (3 in all), then refused.
    assert_eq!(got, [Some(200), Some(200), Some(429), Some(200), Some(429)]);
    assert!(broker.metric("fleet_admin_denied_total{reason=\"event_streams\"}").await >= 2.0);
    // A stream that ends gives its place back.
    drop(streams.remove(0));
    let t = Instant::now();
    loop {
        let mut c = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
        if c.get("/api/v1/events").await.map(|a| a.0) == Some(200) {
            break;
        }
        assert!(t.elapsed() < PATIENCE, "a closed stream kept its place");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection that moves no byte either way for `admin_idle_timeout_secs` is closed, even in
/// the middle of an answer (an event stream nobody reads or that has nothing to say), where the
/// header timeout does not run.
#[tokio::test]
async fn a_connection_that_moves_nothing_is_closed_after_the_idle_timeout() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let broker =
        BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0", "--admin-idle-timeout-secs", "1"]);
    let mut stream = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 1]).await.unwrap();
    assert_eq!(stream.get("/api/v1/events").await.map(|a| a.0), Some(200));
    let t = Instant::now();
    assert!(stream.closed_within(PATIENCE).await, "an idle event stream stayed open");
    assert!(t.elapsed() >= Duration::from_millis(500), "closed before the timeout: {:?}", t.elapsed());
}

/// Open operator connections are capped per source address after TLS, whoever's certificate
/// they use; another address is not affected.
#[tokio::test]
async fn operator_connections_are_capped_per_source_address() {
    let fleet = Fleet::new(1, None).await;
    let alice = operator(&fleet, "alice").await;
    let bob = operator(&fleet, "bob").await;
    let broker = BrokerProc::start(
        &fleet,
        &["--admin-listen", "127.0.0.1:0", "--admin-max-connections-per-source", "2"],
    );
    let mut open = Vec::new();
    for who in [&alice, &bob] {
        let mut c = Https::connect(&broker, &fleet, who, [127, 0, 0, 2]).await.unwrap();
        assert_eq!(c.get("/api/v1/summary").await.map(|a| a.0), Some(200));
        open.push(c);
    }
    let mut third = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 2]).await.unwrap();
    assert_eq!(third.answer(PATIENCE).await.map(|a| a.0), Some(429));
    assert!(third.closed_within(PATIENCE).await);
    assert!(broker.metric("fleet_admin_denied_total{reason=\"source_limit\"}").await >= 1.0);
    let mut elsewhere = Https::connect(&broker, &fleet, &alice, [127, 0, 0, 3]).await.unwrap();
    assert_eq!(elsewhere.get("/api/v1/summary").await.map(|a| a.0), Some(200));
    for c in &mut open {
        assert_eq!(c.get("/api/v1/summary").await.map(|a| a.0), Some(200));
    }
}
