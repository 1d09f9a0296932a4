//! The operator console in a real browser: headless Chromium driven over WebDriver
//! (chromedriver + fantoccini), with the operator's PKCS#12 in an NSS database and the
//! AutoSelectCertificateForUrls policy choosing it, as a managed desktop would. The test opens
//! the overview, finds a connected simulated device, revokes it through the page and sees the
//! session end in the page, in the device's own connection and in the broker's metrics.
//! Screenshots go to `target/console-screenshots/` (the README's one is `docs/console.png`).
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use fleet_broker::outcome::CloseReason;
use fleet_tests::require_program;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::json;

/// Chromium reads managed policies from here (Debian's package).
const POLICY_DIR: &str = "/etc/chromium/policies/managed";

/// A policy file, removed when dropped.
struct Policy(PathBuf);

impl Policy {
    fn auto_select(origin: &str, operator: &str) -> Policy {
        let dir = Path::new(POLICY_DIR);
        if let Err(e) = std::fs::create_dir_all(dir) {
            panic!("cannot create {POLICY_DIR} ({e}): the browser test writes a Chromium policy there; run as root (CI does)");
        }
        let rule = json!({ "pattern": origin, "filter": { "SUBJECT": { "CN": operator } } }).to_string();
        // One file per browser: tests of this binary run at once, each with its own origin.
        let path = dir.join(format!("fleetgate-test-{}-{}.json", std::process::id(), rand_suffix()));
        std::fs::write(&path, json!({ "AutoSelectCertificateForUrls": [rule] }).to_string())
            .unwrap_or_else(|e| panic!("cannot write {} ({e}): run as root (CI does)", path.display()));
        Policy(path)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// chromedriver, stopped when dropped.
struct Driver(Child, u16);

impl Driver {
    fn start(home: &Path) -> Driver {
        let bin = require_program("chromedriver", "chromium-driver");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(bin)
            .arg(format!("--port={port}"))
            // Chromium on Linux reads client certificates from $HOME/.pki/nssdb.
            .env("HOME", home)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let t = Instant::now();
        loop {
            let line = lines.next().and_then(Result::ok).unwrap_or_default();
            if line.contains("started successfully") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "chromedriver did not start: {line}");
        }
        std::thread::spawn(move || lines.for_each(drop));
        Driver(child, port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(program: &Path, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An NSS database in `home/.pki/nssdb` with the operator's PKCS#12 and the fleet root trusted
/// for TLS servers.
fn nss(home: &Path, operator: &Path, root: &Path, password: &str) {
    let certutil = require_program("certutil", "libnss3-tools");
    let pk12util = require_program("pk12util", "libnss3-tools");
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db = format!("sql:{}", db.display());
    run(&certutil, &["-N", "-d", &db, "--empty-password"]);
    let p12 = operator.join("operator.p12");
    run(&pk12util, &["-i", p12.to_str().unwrap(), "-d", &db, "-W", password]);
    run(&certutil, &["-A", "-d", &db, "-n", "fleet-root", "-t", "C,,", "-i", root.to_str().unwrap()]);
}

async fn wait(client: &Client, css: &str) -> Element {
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} in the page: {e}"))
}

/// Waits until the text of `css` contains `want`.
async fn text_becomes(client: &Client, css: &str, want: &str) {
    let t = Instant::now();
    loop {
        let got = match client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if got.contains(want) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{css}: {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Headless Chromium holding the operator's certificate for `origin` (chromedriver and the
/// policy go when dropped).
struct Browser {
    client: Client,
    _driver: Driver,
    _policy: Policy,
    /// One browser at a time: Chromium's policy file is machine-wide, and two or three
    /// Chromiums at once on a loaded 2-core machine time out their renderers (seen in the
    /// full run). Dropped last.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// Whose turn it is to run a browser.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Browser {
    async fn start(fleet: &Fleet, operator: &Path, name: &str, password: &str, origin: &str) -> Browser {
        let turn = TURN.lock().await;
        let browser_home = fleet.dir.path().join(format!("browser-{}", rand_suffix()));
        nss(&browser_home, operator, &fleet.home().join("root-ca.pem"), password);
        let policy = Policy::auto_select(origin, name);
        let driver = Driver::start(&browser_home);
        let caps = json!({
            "goog:chromeOptions": {
                "binary": require_program("chromium", "chromium"),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                    format!("--user-data-dir={}", browser_home.join("profile").display()),
                ]
            }
        });
        // fantoccini's HTTP client (plain HTTP to chromedriver) builds a rustls config: one provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await
            .expect("a WebDriver session with chromedriver");
        Browser { client, _driver: driver, _policy: policy, _turn: turn }
    }
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_operator_revokes_a_connected_device_from_the_console_in_chromium() {
    require_program("chromium", "chromium");
    let fleet = Fleet::new(3, None).await;
    let password = "correct horse battery";
    let alice = fleet.dir.path().join("alice");
    fleet.station().await.operator_cert("alice", &alice, password).await.unwrap();
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0"]);
    let origin = format!("https://{}", broker.admin.unwrap());
    let target = fleet.id(1);
    let mut device = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    assert!(matches!(device.mqtt_connect(&target, 30).await, Some(Packet::ConnAck(_))));

    let browser = Browser::start(&fleet, &alice, "alice", password, &origin).await;
    let client = &browser.client;
    // The overview: counts from the registry and the live session.
    client.goto(&format!("{origin}/")).await.unwrap();
    text_becomes(client, "#count-active", "3").await;
    text_becomes(client, "#sessions-live", "1").await;
    text_becomes(client, "#who", "operator alice").await;
    text_becomes(client, "#feed-state", "connected").await;
    std::fs::write(screenshots().join("overview.png"), client.screenshot().await.unwrap()).unwrap();

    // Device search, then the device's page.
    wait(client, "nav a[href='#/devices']").await.click().await.unwrap();
    wait(client, "#search input[name=prefix]").await.send_keys(&target).await.unwrap();
    wait(client, "#search button").await.click().await.unwrap();
    // The unfiltered list (rendered first) also links the target: wait for the search's answer
    // (the header row and one device), or the click may land on a replaced element.
    let t = Instant::now();
    while client.execute("return document.querySelectorAll('#devices tr').length", vec![]).await.unwrap()
        != json!(2)
    {
        assert!(t.elapsed() < Duration::from_secs(10), "the search did not narrow the list to one device");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait(client, &format!("#devices a[href='#/device/{target}']")).await.click().await.unwrap();
    text_becomes(client, "#session", "online since").await;
    text_becomes(client, "#device-status", "active").await;

    // Revoke through the page, behind its confirmation.
    wait(client, "#revoke").await.click().await.unwrap();
    let reason = client.execute("return document.querySelector('#confirm').open", vec![]).await.unwrap();
    assert_eq!(reason, json!(true), "the confirmation is showing");
    let t = Instant::now();
    wait(client, "#confirm-revoke").await.click().await.unwrap();
    assert!(device.closed_within(PATIENCE).await, "the device's session was not cut");
    let cut_after = t.elapsed();
    text_becomes(client, "#device-status", "revoked").await;
    text_becomes(client, "#session", "offline").await;
    let feed = format!("#feed div[data-kind=closed][data-device='{target}']");
    assert!(wait(client, &feed).await.text().await.unwrap().contains("revoked"));
    broker.wait_metric(&kicks(CloseReason::Revoked), 1.0, Duration::from_secs(2)).await;
    assert!(cut_after < LATENCY_BOUND, "cut {cut_after:?} after the click");
    std::fs::write(screenshots().join("device-revoked.png"), client.screenshot().await.unwrap()).unwrap();

    // Readable on a phone: no sideways scrolling at 390 px.
    client.set_window_size(390, 844).await.unwrap();
    client.goto(&format!("{origin}/#/")).await.unwrap();
    text_becomes(client, "#count-active", "2").await;
    let fits = client
        .execute("return document.documentElement.scrollWidth <= window.innerWidth + 1", vec![])
        .await
        .unwrap();
    std::fs::write(screenshots().join("overview-phone.png"), client.screenshot().await.unwrap()).unwrap();
    assert_eq!(fits, json!(true), "the overview scrolls sideways on a phone");
    browser.client.clone().close().await.unwrap();
}

/// An operator's browser, with its certificate, opens a page of another origin (served here
/// from another localhost port). The page tries both forgeries that need no CORS preflight: an
/// auto-submitting `enctype=text/plain` form whose body is JSON, and a `no-cors` fetch with a
/// form-urlencoded JSON body. Neither revokes; the console's own button still does.
#[tokio::test]
async fn a_page_on_another_origin_cannot_revoke_through_the_operators_browser() {
    require_program("chromium", "chromium");
    let fleet = Fleet::new(3, None).await;
    let password = "correct horse battery";
    let alice = fleet.dir.path().join("alice");
    fleet.station().await.operator_cert("alice", &alice, password).await.unwrap();
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0"]);
    let origin = format!("https://{}", broker.admin.unwrap());
    let revoke = |i: usize| format!("{origin}/api/v1/devices/{}/revoke", fleet.id(i));
    let form = format!(
        r#"<!doctype html><form id="f" method="POST" action="{}" enctype="text/plain"><input type="hidden" name='{{"reason":"keyCompromise","x":"' value='"}}'></form><script>document.getElementById("f").submit()</script>"#,
        revoke(0)
    );
    let fetch = format!(
        r#"<!doctype html><script>fetch("{}", {{method: "POST", mode: "no-cors", credentials: "include", headers: {{"content-type": "application/x-www-form-urlencoded"}}, body: '{{"reason":"keyCompromise"}}'}}).then(() => document.title = "sent", (e) => document.title = "failed " + e)</script>"#,
        revoke(1)
    );
    let evil = serve_pages(vec![("/form", form), ("/fetch", fetch)]).await;
    let browser = Browser::start(&fleet, &alice, "alice", password, &origin).await;
    let client = &browser.client;

    let mut denials = 0.0;
    for (page, victim) in [("/form", 0), ("/fetch", 1)] {
        client.goto(&format!("http://{evil}{page}")).await.unwrap();
        denials += 1.0;
        let t = Instant::now();
        loop {
            assert_eq!(
                status_of(&fleet, &fleet.id(victim)).await,
                "active",
                "the page {page} revoked a device"
            );
            if broker.metric("fleet_admin_denied_total{reason=\"cross_origin\"}").await >= denials {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the page {page} sent no request that was refused"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status_of(&fleet, &fleet.id(victim)).await, "active", "the page {page} revoked a device");
    }

    // The console's own revoke button still works.
    let target = fleet.id(2);
    client.goto(&format!("{origin}/#/device/{target}")).await.unwrap();
    text_becomes(client, "#device-status", "active").await;
    wait(client, "#revoke").await.click().await.unwrap();
    wait(client, "#confirm-revoke").await.click().await.unwrap();
    text_becomes(client, "#device-status", "revoked").await;
    assert_eq!(status_of(&fleet, &target).await, "revoked");
    browser.client.clone().close().await.unwrap();
}

/// Markup in values the API returns shows as text: no element is made of it and no handler
/// runs, neither the `onerror` of an image nor the `ontoggle` of an open `<details>` nor an SVG
/// animation's `onbegin`, each of which would mark the page and revoke another device in the
/// operator's name. The values come from where a console cannot trust them: registry rows
/// (written with SQL here, as a compromised station could) and another node's answer over the
/// cluster bus (a peer on NATS answers `fleet.admin.q` with a session and events of markup).
#[tokio::test]
async fn markup_in_api_values_shows_as_text_and_runs_nothing_in_chromium() {
    use futures_util::StreamExt;
    require_program("chromium", "chromium");
    // The node starts once the operator and the peer answering for it are in place.
    let cluster = Cluster::builder().devices(3).nodes(0).start().await;
    let (fleet, nats) = (&cluster.fleet, &cluster.nats);
    let password = "correct horse battery";
    let alice = fleet.dir.path().join("alice");
    fleet.station().await.operator_cert("alice", &alice, password).await.unwrap();
    let victim = fleet.id(2);
    let act = |marker: &str| {
        format!(
            "document.documentElement.dataset.pwned='{marker}';fetch('/api/v1/devices/{victim}/revoke',{{method:'POST',headers:{{'content-type':'application/json','x-fleetgate-request':'1'}},body:JSON.stringify({{reason:'keyCompromise'}})}})"
        )
    };
    let img = format!(r#"<img src=x onerror="{}">"#, act("img"));
    let details = format!(r#"<details open ontoggle="{}">"#, act("details"));
    let svg = format!(r#"<svg><animate onbegin="{}" attributeName=x dur=1s>"#, act("svg"));
    let st = fleet.station().await;
    for (i, (key_source, reason)) in [(&img, &details), (&svg, &img)].into_iter().enumerate() {
        sqlx::query("UPDATE certificates SET key_source = $1, revocation_reason = $2 WHERE device_id = $3")
            .bind(key_source)
            .bind(reason)
            .bind(fleet.id(i))
            .execute(st.registry().pool())
            .await
            .unwrap();
    }
    // A node of the bus (a compromised one: only nodes may answer) answers every question, with
    // markup in every string and in the session's counters (a node's answer is JSON, its values
    // any JSON).
    let peer = bus::client(nats, "n3").await;
    let mut questions = peer.subscribe("fleet.admin.q").await.unwrap();
    let (img_a, details_a, svg_a) = (img.clone(), details.clone(), svg.clone());
    let liar = tokio::spawn({
        let peer = peer.clone();
        async move {
            while let Some(m) = questions.next().await {
                let (Some(to), Ok(q)) = (m.reply, serde_json::from_slice::<serde_json::Value>(&m.payload))
                else {
                    continue;
                };
                let devices = q["devices"].clone();
                let first = devices[0].clone();
                let answer = json!({
                    "node": img_a, "sessions_live": 1, "counts": [["refused", details_a, 1]],
                    "online": devices,
                    "sessions": [{
                        "node": svg_a, "peer": details_a, "since_ms": 0, "serial": img_a,
                        "not_after": 0, "received": img_a, "sent": svg_a,
                    }],
                    "events": [{
                        "at_ms": 1, "kind": "refused", "reason": img_a, "device": first,
                        "serial": details_a, "peer": svg_a,
                    }],
                });
                let _ = peer.publish_with_headers(to, bus::from_node(), answer.to_string().into()).await;
            }
        }
    });
    let broker = cluster.node("n1", &["--admin-listen", "127.0.0.1:0"]);
    let origin = format!("https://{}", broker.admin.unwrap());
    let browser = Browser::start(fleet, &alice, "alice", password, &origin).await;
    let client = &browser.client;
    for i in 0..2 {
        client.goto(&format!("{origin}/#/device/{}", fleet.id(i))).await.unwrap();
        text_becomes(client, "#device-status", "active").await;
        text_becomes(client, "#session", "online since").await;
        // Handlers would have run by now (an image error, a toggle, an animation start).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let marker =
            client.execute("return document.documentElement.dataset.pwned || null", vec![]).await.unwrap();
        assert_eq!(marker, json!(null), "a handler from an API value ran");
        assert_eq!(status_of(fleet, &victim).await, "active", "script from an API value revoked a device");
        let made = client
            .execute("return document.querySelectorAll('#view img, #view details, #view svg').length", vec![])
            .await
            .unwrap();
        assert_eq!(made, json!(0), "elements were made of API values");
        let shown = wait(client, "#device").await.text().await.unwrap();
        let want = if i == 0 { "<details open ontoggle=" } else { "<svg><animate onbegin=" };
        assert!(shown.contains("<img src=x onerror=") && shown.contains(want), "{shown}");
    }
    // The overview shows another node's refusal reasons too.
    client.goto(&format!("{origin}/#/")).await.unwrap();
    text_becomes(client, "#refusals", "<details open ontoggle=").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let marker =
        client.execute("return document.documentElement.dataset.pwned || null", vec![]).await.unwrap();
    assert_eq!(marker, json!(null), "a handler from an API value ran");
    assert_eq!(status_of(fleet, &victim).await, "active", "script from an API value revoked a device");
    browser.client.clone().close().await.unwrap();
    liar.abort();
}

/// What an operator needs at a glance, each seen in the page: the organisation in the header
/// (text, even with markup in it), CRL health red while the registry holds a revocation the CRL
/// lacks and green once a new CRL is signed, each refusal reason with its explanation, and each
/// device's state, last seen, message rate and commands, "offline" included.
#[tokio::test]
async fn the_console_names_the_organisation_and_explains_what_it_shows_in_chromium() {
    require_program("chromium", "chromium");
    let fleet = Fleet::new(3, None).await;
    let password = "correct horse battery";
    let alice = fleet.dir.path().join("alice");
    fleet.station().await.operator_cert("alice", &alice, password).await.unwrap();
    let org = "Acme <b>Water</b> Works";
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0", "--org-name", org]);
    let origin = format!("https://{}", broker.admin.unwrap());
    let (online, revoked, offline) = (fleet.id(0), fleet.id(1), fleet.id(2));
    let mut device = Raw::device(broker.mqtt, &fleet.devices[0]).await.unwrap();
    assert!(matches!(device.mqtt_connect(&online, 30).await, Some(Packet::ConnAck(_))));
    // A command waits for the offline device (sent as the backend service).
    let sim = fleet_tests::workspace_bin_dir(&["fleet-sim"]).join("fleet-sim");
    let out = Command::new(sim)
        .args(["command", "--port", &broker.port(), "--device", &offline, "--name", "blink", "--identity"])
        .arg(&fleet.service)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Revoked in the registry only (the admin API's way; no issuer runs here to sign a CRL),
    // then refused when it tries.
    let st = fleet.station().await;
    let id = fleet_provision::DeviceId::parse(&revoked).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    st.registry().revoke_device(&id, fleet_provision::RevocationReason::KeyCompromise, now).await.unwrap();
    let mut refused = Raw::device(broker.mqtt, &fleet.devices[1]).await.unwrap();
    let answer = refused.mqtt_connect(&revoked, 30).await;
    assert!(
        matches!(answer, Some(Packet::ConnAck(ref a)) if a.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success),
        "{answer:?}"
    );

    let browser = Browser::start(&fleet, &alice, "alice", password, &origin).await;
    let client = &browser.client;
    client.goto(&format!("{origin}/")).await.unwrap();
    // The header: the organisation, as text (no element made of its markup).
    text_becomes(client, "#org", org).await;
    let made = client.execute("return document.querySelectorAll('header b').length", vec![]).await.unwrap();
    assert_eq!(made, json!(0), "the organisation's markup became elements");
    text_becomes(client, "#overview h2", &format!("Fleet of {org}")).await;
    // CRL health: red, naming the revocation it lacks.
    text_becomes(client, "#crl-health", "lacks 1 revocation").await;
    text_becomes(client, "#crl-health", &revoked).await;
    assert_eq!(class_and_text(client, "#crl-health").await.0, "bad");
    // The refusal, with what it means.
    let revoked_why = fleet_broker::outcome::Refusal::Revoked.explain();
    text_becomes(client, "#refusals", "revoked").await;
    text_becomes(client, "#refusals", revoked_why).await;
    // Every reason is explained in the glossary.
    let glossary = client
        .execute("return document.querySelectorAll('#reasons dd[data-reason]').length", vec![])
        .await
        .unwrap();
    assert_eq!(glossary, json!(fleet_broker::outcome::Refusal::ALL.len()));
    std::fs::write(screenshots().join("overview-crl-missing.png"), client.screenshot().await.unwrap())
        .unwrap();

    // A new CRL: green.
    st.write_crl(&fleet.home().join("crl.pem")).await.unwrap();
    let t = Instant::now();
    loop {
        client.goto(&format!("{origin}/#/?{}", t.elapsed().as_millis())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (class, text) = class_and_text(client, "#crl-health").await;
        if class == "ok" {
            assert!(text.contains("lists all 1 revocation"), "{text}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "CRL health stayed red after a new CRL: {text}");
    }

    // The device list: online with a rate and "now"; offline said in words, its command open.
    client.goto(&format!("{origin}/#/devices")).await.unwrap();
    let cell = |id: &str, col: &str| format!("#devices tr:has(a[href='#/device/{id}']) td[data-col={col}]");
    text_becomes(client, &cell(&online, "online"), "online").await;
    text_becomes(client, &cell(&online, "last-seen"), "now").await;
    text_becomes(client, &cell(&online, "rate"), "/min").await;
    text_becomes(client, &cell(&offline, "online"), "offline").await;
    text_becomes(client, &cell(&offline, "last-seen"), "not since the broker started").await;
    text_becomes(client, &cell(&offline, "rate"), "–").await;
    text_becomes(client, &cell(&offline, "commands"), "1").await;
    std::fs::write(screenshots().join("devices.png"), client.screenshot().await.unwrap()).unwrap();
    // The offline device's page: its command; the revoked one's: its refusal explained.
    client.goto(&format!("{origin}/#/device/{offline}")).await.unwrap();
    text_becomes(client, "#commands", "blink").await;
    text_becomes(client, "#commands", "queued").await;
    text_becomes(client, "#session", "offline").await;
    client.goto(&format!("{origin}/#/device/{revoked}")).await.unwrap();
    text_becomes(client, "#last-refusals", revoked_why).await;
    // The online device, after its session ends: last seen a moment ago.
    drop(device);
    client.goto(&format!("{origin}/#/device/{online}")).await.unwrap();
    let t = Instant::now();
    loop {
        client.goto(&format!("{origin}/#/device/{online}?{}", t.elapsed().as_millis())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = class_and_text(client, "#last-seen").await.1;
        if seen.contains("ago") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "last seen: {seen}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    browser.client.clone().close().await.unwrap();
}

/// The class and text of `css`, read at once (the page re-renders while it is read).
async fn class_and_text(client: &Client, css: &str) -> (String, String) {
    let script =
        "const e = document.querySelector(arguments[0]); return e ? [e.className, e.textContent] : ['', ''];";
    let v = client.execute(script, vec![json!(css)]).await.unwrap();
    (v[0].as_str().unwrap_or_default().to_owned(), v[1].as_str().unwrap_or_default().to_owned())
}

async fn status_of(fleet: &Fleet, device: &str) -> String {
    let st = fleet.station().await;
    sqlx::query_scalar("SELECT status FROM devices WHERE device_id = $1")
        .bind(device)
        .fetch_one(st.registry().pool())
        .await
        .unwrap()
}

/// A plain-HTTP server on another localhost port (another origin) serving `pages` by path.
async fn serve_pages(pages: Vec<(&'static str, String)>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 2048];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let path = text.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match pages.iter().find(|(p, _)| *p == path) {
                    Some((_, b)) => ("200 OK", b.clone()),
                    None => ("404 Not Found", String::new()),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The Updates page (issue 30): campaigns and their jobs from the admin API, with markup in the
/// values someone with database access could write (the selector, the abort reason, a job's
/// reason) shown as text, no handler run, no element made of them.
#[tokio::test]
async fn the_updates_page_shows_campaigns_and_jobs_as_text_in_chromium() {
    require_program("chromium", "chromium");
    let fleet = Fleet::new(2, None).await;
    let password = "correct horse battery";
    let alice = fleet.dir.path().join("alice");
    fleet.station().await.operator_cert("alice", &alice, password).await.unwrap();
    let provision = fleet_tests::workspace_bin_dir(&["fleet-provision"]).join("fleet-provision");
    let home = fleet.home().display().to_string();
    let image = fleet.dir.path().join("app.bin");
    std::fs::write(&image, vec![7u8; 3000]).unwrap();
    run(&provision, &["--home", &home, "firmware-key"]);
    let img = image.display().to_string();
    run(
        &provision,
        &["--home", &home, "release", "--image", &img, "--version", "1.2.0", "--board", "mps2-an386"],
    );
    run(&provision, &["--home", &home, "ota", "publish", "--release", "mps2-an386/1.2.0"]);
    let devices = format!("{},{}", fleet.id(0), fleet.id(1));
    let args = [
        "--home",
        &home,
        "ota",
        "start",
        "--release",
        "mps2-an386/1.2.0",
        "--devices",
        &devices,
        "--waves",
        "100%",
    ];
    run(&provision, &args);
    let victim = fleet.id(1);
    let act = format!(
        "document.documentElement.dataset.pwned='x';fetch('/api/v1/devices/{victim}/revoke',{{method:'POST',headers:{{'content-type':'application/json','x-fleetgate-request':'1'}},body:JSON.stringify({{reason:'keyCompromise'}})}})"
    );
    let img_tag = format!(r#"<img src=x onerror="{act}">"#);
    let details = format!(r#"<details open ontoggle="{act}">"#);
    let st = fleet.station().await;
    let id: String =
        sqlx::query_scalar("SELECT id FROM ota_campaigns").fetch_one(st.registry().pool()).await.unwrap();
    // The runner overwrites `reason` when it aborts; the version stays (and is in the reason).
    sqlx::query("UPDATE ota_campaigns SET devices = $1, version = $2")
        .bind(&img_tag)
        .bind(&details)
        .execute(st.registry().pool())
        .await
        .unwrap();
    sqlx::query("UPDATE ota_jobs SET state = 'failed', reason = $1 WHERE device_id = $2")
        .bind(&img_tag)
        .bind(fleet.id(0))
        .execute(st.registry().pool())
        .await
        .unwrap();
    // The runner aborts the campaign (a failed job past its 2%, or a release it cannot find).
    let broker = BrokerProc::start(&fleet, &["--admin-listen", "127.0.0.1:0", "--ota-poll-ms", "100"]);
    let origin = format!("https://{}", broker.admin.unwrap());
    let browser = Browser::start(&fleet, &alice, "alice", password, &origin).await;
    let client = &browser.client;
    client.goto(&format!("{origin}/")).await.unwrap();
    wait(client, "nav a[href='#/updates']").await.click().await.unwrap();
    text_becomes(client, "#campaigns", &id).await;
    text_becomes(client, "#campaigns td[data-col=state]", "aborted").await;
    wait(client, &format!("#campaigns a[href='#/update/{id}']")).await.click().await.unwrap();
    text_becomes(client, "#campaign-state", "aborted").await;
    text_becomes(client, "#jobs", "failed (<img src=x onerror=").await;
    std::fs::write(screenshots().join("updates.png"), client.screenshot().await.unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let marker =
        client.execute("return document.documentElement.dataset.pwned || null", vec![]).await.unwrap();
    assert_eq!(marker, json!(null), "a handler from an API value ran");
    assert_eq!(status_of(&fleet, &victim).await, "active", "script from an API value revoked a device");
    let made = client
        .execute("return document.querySelectorAll('#view img, #view details').length", vec![])
        .await
        .unwrap();
    assert_eq!(made, json!(0), "elements were made of API values");
    let shown = wait(client, "#campaign").await.text().await.unwrap();
    assert!(shown.contains("<img src=x onerror=") && shown.contains("<details open ontoggle="), "{shown}");
    browser.client.clone().close().await.unwrap();
}
