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
        let path = dir.join(format!("fleetgate-test-{}.json", std::process::id()));
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

    let browser_home = fleet.dir.path().join("browser");
    nss(&browser_home, &alice, &fleet.home().join("root-ca.pem"), password);
    let _policy = Policy::auto_select(&origin, "alice");
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
    // The overview: counts from the registry and the live session.
    client.goto(&format!("{origin}/")).await.unwrap();
    text_becomes(&client, "#count-active", "3").await;
    text_becomes(&client, "#sessions-live", "1").await;
    text_becomes(&client, "#who", "operator alice").await;
    text_becomes(&client, "#feed-state", "connected").await;
    std::fs::write(screenshots().join("overview.png"), client.screenshot().await.unwrap()).unwrap();

    // Device search, then the device's page.
    wait(&client, "nav a[href='#/devices']").await.click().await.unwrap();
    wait(&client, "#search input[name=prefix]").await.send_keys(&target).await.unwrap();
    wait(&client, "#search button").await.click().await.unwrap();
    wait(&client, &format!("#devices a[href='#/device/{target}']")).await.click().await.unwrap();
    text_becomes(&client, "#session", "online since").await;
    text_becomes(&client, "#device-status", "active").await;

    // Revoke through the page, behind its confirmation.
    wait(&client, "#revoke").await.click().await.unwrap();
    let reason = client.execute("return document.querySelector('#confirm').open", vec![]).await.unwrap();
    assert_eq!(reason, json!(true), "the confirmation is showing");
    let t = Instant::now();
    wait(&client, "#confirm-revoke").await.click().await.unwrap();
    assert!(device.closed_within(Duration::from_secs(2)).await, "the device's session was not cut");
    let cut_after = t.elapsed();
    text_becomes(&client, "#device-status", "revoked").await;
    text_becomes(&client, "#session", "offline").await;
    let feed = format!("#feed div[data-kind=closed][data-device='{target}']");
    assert!(wait(&client, &feed).await.text().await.unwrap().contains("revoked"));
    broker.wait_metric(&kicks(CloseReason::Revoked), 1.0, Duration::from_secs(2)).await;
    assert!(cut_after < Duration::from_millis(1500), "cut {cut_after:?} after the click");
    std::fs::write(screenshots().join("device-revoked.png"), client.screenshot().await.unwrap()).unwrap();

    // Readable on a phone: no sideways scrolling at 390 px.
    client.set_window_size(390, 844).await.unwrap();
    client.goto(&format!("{origin}/#/")).await.unwrap();
    text_becomes(&client, "#count-active", "2").await;
    let fits = client
        .execute("return document.documentElement.scrollWidth <= window.innerWidth + 1", vec![])
        .await
        .unwrap();
    std::fs::write(screenshots().join("overview-phone.png"), client.screenshot().await.unwrap()).unwrap();
    assert_eq!(fits, json!(true), "the overview scrolls sideways on a phone");
    client.close().await.unwrap();
}
