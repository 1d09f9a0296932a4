//! Firmware delivery and campaigns, broker side (issue 30, docs/spec/ota.md), with the real
//! broker and station and a hand-written MQTT device client (the wire format as the spec states
//! it, independent of the broker's code): a device gets its offer (also when it was asleep when
//! the campaign started), fetches the whole image by offset and resumes after a reconnect, and
//! the bytes are the release's; a device without a job, or naming another release, gets status
//! 1; requests beyond the window are answered busy and the rest paced; a device's `ota/chunk` and
//! a service's `commands/ota/offer` are refused; status reports move the job and are republished;
//! a campaign whose first wave fails stops before the second; waves offer in order.
#![allow(clippy::unwrap_used)] // test code

mod common;

use fleet_tests::ota_flash::test_image;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::admin;
use common::*;
use fleet_registry::JobState;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use sha2::{Digest, Sha512};

const BOARD: &str = "mps2-an386";
/// Not a multiple of any chunk length: the last chunk is short.
const IMAGE_LEN: usize = 9_999;

fn provision(fleet: &Fleet, args: &[&str]) -> Output {
    let bin = fleet_tests::workspace_bin_dir(&["fleet-provision", "fleet-broker"]).join("fleet-provision");
    let mut c = Command::new(bin);
    c.env_remove("FLEET_HOME").env_remove("FLEET_DATABASE_URL").stdin(Stdio::null());
    c.arg("--home").arg(fleet.home());
    if let Some(db) = &fleet.db {
        c.args(["--database-url", db]);
    }
    fleet_tests::run(c.args(args))
}

fn ok(fleet: &Fleet, args: &[&str]) -> String {
    let out = provision(fleet, args);
    assert!(out.status.success(), "fleet-provision {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A signed, published release: its image, manifest and tag.
struct Release {
    image: Vec<u8>,
    manifest: Vec<u8>,
    tag: [u8; 8],
}

impl Release {
    fn tag_hex(&self) -> String {
        hex::encode(self.tag)
    }
}

/// Signs `version` of a fresh image and publishes it into the home's blob directory.
fn release(fleet: &Fleet, version: &str, seed: u64) -> Release {
    let image = test_image(IMAGE_LEN, seed);
    let path = fleet.dir.path().join(format!("app-{version}.bin"));
    std::fs::write(&path, &image).unwrap();
    ok(fleet, &["release", "--image", path.to_str().unwrap(), "--version", version, "--board", BOARD]);
    let out = ok(fleet, &["ota", "publish", "--release", &format!("{BOARD}/{version}")]);
    assert!(out.contains("published"), "{out}");
    let manifest =
        std::fs::read(fleet.home().join(format!("releases/{BOARD}-{version}/manifest.bin"))).unwrap();
    let digest: [u8; 64] = Sha512::digest(&image).into();
    Release { image, manifest, tag: digest[..8].try_into().unwrap() }
}

/// A station with its firmware key, release 1.2.0 published, and a broker polling campaigns
/// every 100 ms (`extra`: more broker flags).
async fn setup(devices: usize, extra: &[&str]) -> (Fleet, Release, BrokerProc) {
    let fleet = Fleet::new(devices, None).await;
    ok(&fleet, &["firmware-key"]);
    let rel = release(&fleet, "1.2.0", 7);
    let mut args = vec!["--ota-poll-ms", "100"];
    args.extend_from_slice(extra);
    let broker = BrokerProc::start(&fleet, &args);
    (fleet, rel, broker)
}

/// Starts a campaign; its id.
fn start(fleet: &Fleet, devices: &str, waves: &str, abort: &str) -> String {
    let out = ok(
        fleet,
        &[
            "ota",
            "start",
            "--release",
            &format!("{BOARD}/1.2.0"),
            "--devices",
            devices,
            "--waves",
            waves,
            "--abort-if-failed",
            abort,
        ],
    );
    let id =
        out.split_whitespace().find(|w| w.starts_with("ota-")).unwrap_or_else(|| panic!("no id in {out}"));
    id.to_owned()
}

/// `ota status --campaign <id> --json`: the campaign with its jobs.
fn status(fleet: &Fleet, id: &str) -> Value {
    let v: Value = serde_json::from_str(&ok(fleet, &["ota", "status", "--campaign", id, "--json"])).unwrap();
    v[0].clone()
}

/// Device `dev`'s job state in campaign `c`.
fn job_state(c: &Value, dev: &str) -> String {
    let jobs = c["jobs"].as_array().unwrap();
    let j = jobs.iter().find(|j| j["device_id"] == dev).unwrap_or_else(|| panic!("no job of {dev}: {c}"));
    j["state"].as_str().unwrap().to_owned()
}

/// Waits until `done` holds for campaign `id`.
async fn until(fleet: &Fleet, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let c = status(fleet, id);
        if done(&c) {
            return c;
        }
        assert!(t.elapsed() < PATIENCE, "campaign {id}: no {what} within {PATIENCE:?}: {c:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Device `i` connected (clean session), subscribed to its commands and its chunks.
async fn device(broker: &BrokerProc, fleet: &Fleet, i: usize) -> Raw {
    let mut d = Raw::device(broker.mqtt, &fleet.devices[i]).await.unwrap();
    assert_eq!(connack_code(&d.mqtt_connect(&fleet.id(i), 30).await), Some(ConnectReturnCode::Success));
    // Chunks first: the commands' SUBSCRIBE starts their delivery, and the offer may come
    // before a later SUBACK.
    subscribe(&mut d, &format!("devices/{}/ota/chunk", fleet.id(i)), 1).await;
    subscribe(&mut d, &format!("devices/{}/commands/#", fleet.id(i)), 2).await;
    d
}

/// Waits for the offer and acknowledges it; its payload.
async fn offer(d: &mut Raw, id: &str) -> Vec<u8> {
    let t = Instant::now();
    loop {
        let left = PATIENCE.checked_sub(t.elapsed()).unwrap_or_else(|| panic!("{id}: no offer"));
        let p = next_publish(d, left).await.unwrap_or_else(|| panic!("{id}: no offer"));
        if p.qos == QoS::AtLeastOnce {
            d.send(Packet::PubAck(PubAck::new(p.pkid))).await.unwrap();
        }
        if p.topic == format!("devices/{id}/commands/ota/offer") {
            return p.payload.to_vec();
        }
    }
}

/// No offer reaches `d` within `within`.
async fn no_offer(d: &mut Raw, within: Duration) {
    if let Some(p) = next_publish(d, within).await {
        assert!(!p.topic.contains("/ota/"), "unexpected {}: {:?}", p.topic, p.payload);
    }
}

fn request(tag: &[u8; 8], offset: u32, len: u16) -> Vec<u8> {
    [tag.as_slice(), &offset.to_le_bytes(), &len.to_le_bytes()].concat()
}

async fn ask(d: &mut Raw, id: &str, tag: &[u8; 8], offset: u32, len: u16) {
    let p = Publish::new(format!("devices/{id}/ota/get"), QoS::AtMostOnce, request(tag, offset, len));
    d.send(Packet::Publish(p)).await.unwrap();
}

/// A chunk as the spec lays it out: (tag, offset, status, data).
fn parse_chunk(b: &[u8]) -> ([u8; 8], u32, u8, Vec<u8>) {
    assert!(b.len() >= 13, "chunk of {} bytes", b.len());
    (b[..8].try_into().unwrap(), u32::from_le_bytes(b[8..12].try_into().unwrap()), b[12], b[13..].to_vec())
}

/// The next chunk `d` receives.
async fn chunk(d: &mut Raw, id: &str) -> ([u8; 8], u32, u8, Vec<u8>) {
    loop {
        let p = next_publish(d, PATIENCE).await.unwrap_or_else(|| panic!("{id}: no chunk"));
        if p.qos == QoS::AtLeastOnce {
            d.send(Packet::PubAck(PubAck::new(p.pkid))).await.unwrap();
        }
        if p.topic == format!("devices/{id}/ota/chunk") {
            return parse_chunk(&p.payload);
        }
    }
}

/// Fetches `[from, to)` of the release one request at a time, `len` bytes each.
async fn fetch(d: &mut Raw, id: &str, tag: &[u8; 8], from: usize, to: usize, len: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        ask(d, id, tag, at as u32, len).await;
        let (t, off, st, data) = chunk(d, id).await;
        assert_eq!((t, off as usize, st), (*tag, at, 0), "{id}: chunk at {at}");
        assert!(!data.is_empty() && data.len() <= usize::from(len));
        at += data.len();
        out.extend_from_slice(&data);
    }
    out
}

/// A device's status report, as the spec writes it.
async fn report(d: &mut Raw, id: &str, rel: &Release, state: &str, extra: &str) {
    let body = format!(r#"{{"release":"{}","version":"1.2.0","state":"{state}"{extra}}}"#, rel.tag_hex());
    let mut p = Publish::new(format!("devices/{id}/ota/status"), QoS::AtLeastOnce, body.into_bytes());
    p.pkid = 77;
    d.send(Packet::Publish(p)).await.unwrap();
}

/// A service subscribed to the jobs' status.
async fn watcher(broker: &BrokerProc, fleet: &Fleet, filter: &str) -> Raw {
    let mut s = Raw::device(broker.mqtt, &fleet.service).await.unwrap();
    assert_eq!(connack_code(&s.mqtt_connect("backend", 30).await), Some(ConnectReturnCode::Success));
    subscribe(&mut s, filter, 1).await;
    s
}

/// Reads `status/devices/<id>/ota` messages until one says `state`.
async fn announced(s: &mut Raw, id: &str, state: &str) -> Value {
    let t = Instant::now();
    loop {
        let left = PATIENCE.checked_sub(t.elapsed()).unwrap_or_else(|| panic!("{id}: no {state} announced"));
        let p = next_publish(s, left).await.unwrap_or_else(|| panic!("{id}: no {state} announced"));
        if p.qos == QoS::AtLeastOnce {
            s.send(Packet::PubAck(PubAck::new(p.pkid))).await.unwrap();
        }
        if p.topic != format!("status/devices/{id}/ota") {
            continue;
        }
        let v: Value = serde_json::from_slice(&p.payload).unwrap();
        if v["state"] == state {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_fetches_its_release_by_offset_resumes_and_reports_and_others_get_nothing() {
    let (fleet, rel, broker) = setup(3, &[]).await;
    let other = release(&fleet, "1.3.0", 99);
    let (d0, d1, d2) = (fleet.id(0), fleet.id(1), fleet.id(2));
    let mut watch = watcher(&broker, &fleet, "status/devices/+/ota").await;
    // Device 0 is awake when the campaign starts, device 1 asleep; device 2 is not in it.
    let mut dev0 = device(&broker, &fleet, 0).await;
    let id = start(&fleet, &format!("{d0},{d1}"), "100%", "100%");
    assert_eq!(offer(&mut dev0, &d0).await, rel.manifest, "the offer is the release's manifest.bin");
    until(&fleet, &id, "offered", |c| job_state(c, &d0) == "offered").await;
    announced(&mut watch, &d0, "offered").await;

    // The first half in 1,000-byte chunks, then the connection drops (a power cut).
    let half = 5_000;
    let mut got = fetch(&mut dev0, &d0, &rel.tag, 0, half, 1000).await;
    report(&mut dev0, &d0, &rel, "downloading", r#","offset":5000,"size":9999"#).await;
    let v = announced(&mut watch, &d0, "downloading").await;
    assert_eq!((v["offset"].as_i64(), v["release"].as_str()), (Some(5000), Some(rel.tag_hex().as_str())));
    drop(dev0);
    // Resumed from its offset on a new connection, no new offer needed; a request longer than
    // the broker's chunk gets `ota_max_chunk` (1,024) bytes at most.
    let mut dev0 = device(&broker, &fleet, 0).await;
    got.extend(fetch(&mut dev0, &d0, &rel.tag, half, IMAGE_LEN, 4000).await);
    assert_eq!(got, rel.image, "the fetched bytes are the release's image");
    ask(&mut dev0, &d0, &rel.tag, IMAGE_LEN as u32, 100).await;
    assert_eq!(chunk(&mut dev0, &d0).await.2, 2, "an offset at the end: status 2");
    // Another release's tag (published, in the blob directory), from a device with a job.
    ask(&mut dev0, &d0, &other.tag, 0, 100).await;
    let (t, off, st, data) = chunk(&mut dev0, &d0).await;
    assert_eq!((t, off, st, data.len()), (other.tag, 0, 1, 0), "another release: status 1, no data");

    // A device without a job, asking for the release by its right tag: status 1.
    let mut dev2 = device(&broker, &fleet, 2).await;
    ask(&mut dev2, &d2, &rel.tag, 0, 100).await;
    assert_eq!(chunk(&mut dev2, &d2).await.2, 1, "no job: status 1");
    assert!(broker.metric(r#"fleet_ota_refused_total{reason="not_offered"}"#).await >= 2.0);

    // The device's reports move its job to the end; each change is republished.
    for state in ["verified", "rebooted", "confirmed"] {
        report(&mut dev0, &d0, &rel, state, "").await;
        announced(&mut watch, &d0, state).await;
    }
    let c = until(&fleet, &id, "confirmed", |c| job_state(c, &d0) == "confirmed").await;
    // A report naming another release moves nothing; nor does one after the final state.
    report(&mut dev0, &d0, &other, "failed", r#","reason":"flash""#).await;
    report(&mut dev0, &d0, &rel, "downloading", r#","offset":0"#).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(job_state(&status(&fleet, &id), &d0), "confirmed", "{c:#}");
    // A settled job serves nothing more (a session trusts its lookup of the job for 1 s).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ask(&mut dev0, &d0, &rel.tag, 0, 100).await;
    assert_eq!(chunk(&mut dev0, &d0).await.2, 1, "a confirmed job: status 1");

    // Device 1 was asleep: its offer waits in the queue and arrives when it wakes.
    assert_eq!(job_state(&status(&fleet, &id), &d1), "queued");
    let mut dev1 = device(&broker, &fleet, 1).await;
    assert_eq!(offer(&mut dev1, &d1).await, rel.manifest);
    until(&fleet, &id, "device 1 offered", |c| job_state(c, &d1) == "offered").await;
    assert_eq!(fetch(&mut dev1, &d1, &rel.tag, 0, 1024, 1024).await, rel.image[..1024]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_asks_the_instant_its_offer_arrives_finds_its_job_open() {
    // A connected device gets its offer as soon as the offer is committed to the command queue,
    // and asks for its first chunk at once: its job must be open by then. The job used to be
    // marked `queued` only after the offer's commit; while the registry was slow to take that
    // write, the device's first request got status 1 (`not_offered`), it failed its job, and a
    // campaign of 20 simulated devices aborted (seen on a loaded CI machine). Here the registry
    // is slow on purpose: the test holds the jobs' rows locked (PostgreSQL, FOR UPDATE) while
    // the broker starts and the devices connect, then lets go.
    const N: usize = 3;
    let pg = fleet_tests::PgCluster::start();
    let url = pg.create_database("fleet");
    let fleet = Fleet::new(N, Some(url.clone())).await;
    ok(&fleet, &["firmware-key"]);
    let rel = release(&fleet, "1.2.0", 7);
    let id = start(&fleet, "all", "100%", "100%");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let mut lock = pool.begin().await.unwrap();
    let rows = sqlx::query("SELECT device_id FROM ota_jobs WHERE campaign = $1 FOR UPDATE")
        .bind(&id)
        .fetch_all(&mut *lock)
        .await
        .unwrap();
    assert_eq!(rows.len(), N);
    let broker = BrokerProc::start(&fleet, &["--ota-poll-ms", "100"]);
    let mut devs = Vec::new();
    for i in 0..N {
        devs.push(device(&broker, &fleet, i).await);
    }
    let asked = futures_util::future::join_all(devs.iter_mut().enumerate().map(|(i, d)| {
        let (dev, tag) = (fleet.id(i), rel.tag);
        async move {
            offer(d, &dev).await;
            let at = Instant::now();
            // Busy (3) is an answer to ask again (devices asking at once while the image is
            // first read); not offered (1) would end the job.
            loop {
                ask(d, &dev, &tag, 0, 512).await;
                let (_, offset, st, data) = chunk(d, &dev).await;
                if st != 3 || at.elapsed() > PATIENCE {
                    break (dev, at, offset, st, data.len());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }));
    let unlock = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let released = Instant::now();
        lock.commit().await.unwrap();
        released
    };
    let (answers, released) = tokio::join!(asked, unlock);
    for (dev, at, offset, st, len) in answers {
        assert_eq!((offset, st, len), (0, 0, 512), "{dev}: the first chunk (1: not offered)");
        assert!(at >= released, "{dev} was offered while its job could not be recorded");
    }
    let c = until(&fleet, &id, "no failed job", |c| {
        c["jobs"].as_array().unwrap().iter().all(|j| j["state"] != "pending")
    })
    .await;
    assert!(c["jobs"].as_array().unwrap().iter().all(|j| j["state"] != "failed"), "{c:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_claimed_once_and_a_claim_left_without_its_offer_is_offered_again() {
    // The campaign runner claims a job (`queued`, no command yet) before it puts the offer into
    // the queue: two nodes never both offer it, and a node that stops in between leaves a claim
    // the runner takes back after CLAIM_TIMEOUT_MS.
    let fleet = Fleet::new(1, None).await;
    ok(&fleet, &["firmware-key"]);
    release(&fleet, "1.2.0", 7);
    let d0 = fleet.id(0);
    let id = start(&fleet, &d0, "100%", "100%");
    let station = fleet.station().await;
    let reg = station.registry();
    let now = 1_000_000;
    let stall = i64::MAX / 4;
    assert!(reg.open_ota_job(&d0).await.unwrap().is_none(), "a pending job is not open");
    assert!(reg.claim_ota_job(&id, &d0, now).await.unwrap());
    assert!(!reg.claim_ota_job(&id, &d0, now).await.unwrap(), "claimed twice");
    let (job, _, _) = reg.open_ota_job(&d0).await.unwrap().expect("a claimed job is open");
    assert_eq!((job.state, job.command_id), (JobState::Queued, None));
    // The offer could not be queued: pending again, and claimed again at a later step.
    assert!(reg.unclaim_ota_job(&id, &d0, now).await.unwrap());
    assert!(reg.open_ota_job(&d0).await.unwrap().is_none());
    assert!(reg.claim_ota_job(&id, &d0, now).await.unwrap());
    // Not yet timed out: kept; then taken back.
    reg.settle_ota_jobs(now + fleet_registry::ota::CLAIM_TIMEOUT_MS - 1, stall).await.unwrap();
    assert!(!reg.claim_ota_job(&id, &d0, now).await.unwrap());
    reg.settle_ota_jobs(now + fleet_registry::ota::CLAIM_TIMEOUT_MS + 1, stall).await.unwrap();
    assert!(reg.claim_ota_job(&id, &d0, now).await.unwrap(), "a stale claim is offered again");
    // Its offer queued: the command is recorded once, and the claim is not taken back.
    assert!(reg.ota_job_offer_queued(&id, &d0, 41).await.unwrap());
    assert!(!reg.ota_job_offer_queued(&id, &d0, 42).await.unwrap());
    assert!(!reg.unclaim_ota_job(&id, &d0, now).await.unwrap());
    reg.settle_ota_jobs(now + 10 * fleet_registry::ota::CLAIM_TIMEOUT_MS, stall).await.unwrap();
    let (job, _, _) = reg.open_ota_job(&d0).await.unwrap().unwrap();
    assert_eq!((job.state, job.command_id), (JobState::Queued, Some(41)));
}

/// Two nodes on one bus, n2's blob directory empty (the returned one), release 1.2.0 published
/// into n1's, its SHA-512, and JetStream as a holder of node n3's NATS identity sees it.
async fn two_nodes(
) -> (tempfile::TempDir, fleet_tests::fixture::Cluster, Release, String, async_nats::jetstream::Context) {
    let empty = tempfile::tempdir().unwrap();
    let cluster = fleet_tests::fixture::Cluster::builder()
        .devices(1)
        .nodes(2)
        .node_args(&["--ota-poll-ms", "100"])
        .node_args_of("n2", &["--ota-blob-dir", empty.path().to_str().unwrap()])
        .start()
        .await;
    ok(&cluster.fleet, &["firmware-key"]);
    let rel = release(&cluster.fleet, "1.2.0", 7);
    let sha512 = hex::encode(Sha512::digest(&rel.image));
    let forger = async_nats::jetstream::new(common::bus::client(&cluster.nats, "n3").await);
    (empty, cluster, rel, sha512, forger)
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_cluster_a_node_serves_an_image_another_shared_and_forged_bytes_are_replaced() {
    // n1 has the release in its blob directory (`ota publish` on the station's home); n2's is
    // empty. Before the campaign, a holder of a node's NATS identity puts other bytes of the
    // same length under the release's name into the object store, and the stream reader tries
    // to write there too. The device on n2 still gets the release byte for byte: n1 replaces
    // the forged object, n2 refuses what does not match the SHA-512 (the device is told "busy"
    // and asks again meanwhile) and keeps the checked image in its own directory.
    let (empty, cluster, rel, sha512, forger) = two_nodes().await;
    let fleet = &cluster.fleet;

    let store = forger
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "FLEET_OTA".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let forged: Vec<u8> = rel.image.iter().map(|b| b ^ 0x5a).collect();
    store.put(sha512.as_str(), &mut forged.as_slice()).await.unwrap();
    let reader = common::bus::client(&cluster.nats, fleet_tests::READER).await;
    let reader_store = async_nats::jetstream::new(reader).get_object_store("FLEET_OTA").await;
    assert!(reader_store.is_err(), "the stream reader reached the firmware bucket");

    let d0 = fleet.id(0);
    let n2 = &cluster.nodes[1];
    let mut dev = device(n2, fleet, 0).await;
    let id = start(fleet, &d0, "100%", "100%");
    assert_eq!(offer(&mut dev, &d0).await, rel.manifest);
    // Chunk by chunk, asking again after a "busy" (status 3) while the image is not there.
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < rel.image.len() {
        ask(&mut dev, &d0, &rel.tag, got.len() as u32, 1024).await;
        let (tag, offset, st, data) = chunk(&mut dev, &d0).await;
        assert_eq!((tag, offset as usize), (rel.tag, got.len()));
        match st {
            0 => got.extend_from_slice(&data),
            3 => {
                assert!(t.elapsed() < PATIENCE, "the image never became available on n2");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("status {other} at {offset}\n{}", n2.log()),
        }
    }
    assert!(got == rel.image, "n2 served other bytes than the release");
    assert_eq!(std::fs::read(empty.path().join(&sha512)).unwrap(), rel.image, "n2 kept the checked image");
    let mut shared = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut store.get(sha512.as_str()).await.unwrap(), &mut shared)
        .await
        .unwrap();
    assert!(shared == rel.image, "the forged object was not replaced");
    report(&mut dev, &d0, &rel, "confirmed", "").await;
    let c = until(fleet, &id, "completed", |c| c["state"] == "completed").await;
    assert_eq!(job_state(&c, &d0), "confirmed");
}

/// base64 with the URL-safe alphabet and padding: how the object store names an object's
/// metadata subject (`$O.<bucket>.M.<name>`).
fn object_subject(bucket: &str, name: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in name.as_bytes().chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("$O.{bucket}.M.{out}")
}

/// A node identity's forged object in `FLEET_OTA` under the release's name, as metadata only:
/// `forgery` (given the name) is merged into a well-formed object info of the release's size.
/// The device on n2 (whose blob directory is empty) gets its offer and the release byte for
/// byte: n1 replaces the object, n2 gives up on it.
async fn forged_object_in_the_bucket_stops_nothing(forgery: fn(&str) -> Value) {
    let (_empty, cluster, rel, sha512, forger) = two_nodes().await;
    let fleet = &cluster.fleet;

    let store = forger
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "FLEET_OTA".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut meta = serde_json::json!({
        "name": sha512, "bucket": "FLEET_OTA", "nuid": "FORGEDNUID0000000000000",
        "size": rel.image.len(), "chunks": 1, "mtime": "2024-01-01T00:00:00Z",
    });
    meta.as_object_mut().unwrap().extend(forgery(&sha512).as_object().unwrap().clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    forger
        .publish_with_headers(object_subject("FLEET_OTA", &sha512), headers, meta.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let info = store.info(sha512.as_str()).await.unwrap();
    assert_eq!(info.size, rel.image.len(), "the forged object's info: {info:?}");

    let d0 = fleet.id(0);
    let n2 = &cluster.nodes[1];
    let mut dev = device(n2, fleet, 0).await;
    let id = start(fleet, &d0, "100%", "100%");
    assert_eq!(offer(&mut dev, &d0).await, rel.manifest);
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < rel.image.len() {
        ask(&mut dev, &d0, &rel.tag, got.len() as u32, 1024).await;
        let (tag, offset, st, data) = chunk(&mut dev, &d0).await;
        assert_eq!((tag, offset as usize), (rel.tag, got.len()));
        match st {
            0 => got.extend_from_slice(&data),
            3 => {
                assert!(t.elapsed() < PATIENCE, "the image never became available on n2\n{}", n2.log());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("status {other} at {offset}\n{}", n2.log()),
        }
    }
    assert!(got == rel.image, "n2 served other bytes than the release");
    report(&mut dev, &d0, &rel, "confirmed", "").await;
    let c = until(fleet, &id, "completed", |c| c["state"] == "completed").await;
    assert_eq!(job_state(&c, &d0), "confirmed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_link_in_the_firmware_bucket_neither_hangs_a_node_nor_stops_the_campaign() {
    // The object store follows a link object to its target, and a link to itself for ever
    // (async-nats `ObjectStore::get`: one request and one boxed future per turn). The nodes
    // fetched the object unbounded in time: the runner (sharing the image before it offers)
    // and a device's session waited for ever; no offer went out.
    forged_object_in_the_bucket_stops_nothing(
        |name| serde_json::json!({ "options": { "link": { "bucket": "FLEET_OTA", "name": name } } }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_object_whose_chunks_never_come_neither_hangs_a_node_nor_stops_the_campaign() {
    // An object info saying one chunk under a nuid that has none: the ordered consumer waits
    // for it for ever, and so did the node reading it.
    forged_object_in_the_bucket_stops_nothing(|_| serde_json::json!({})).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_forged_into_the_bucket_after_the_image_was_shared_are_put_back() {
    // A node shared each image once per process: a holder of a node's NATS identity who
    // waited for that and then put other bytes under the release's name kept the image from
    // every node without it until the nodes restarted (the devices there were told busy until
    // their jobs stalled, counted toward the campaign's abort threshold). A node that has the
    // image checks the bucket's copy again every 10 s while the campaign runs.
    let (_empty, cluster, rel, sha512, forger) = two_nodes().await;
    let fleet = &cluster.fleet;
    let d0 = fleet.id(0);
    // The device sleeps: its offer waits in the queue while n1 shares the image.
    let id = start(fleet, &d0, "100%", "100%");
    let t = Instant::now();
    let store = loop {
        if let Ok(store) = forger.get_object_store("FLEET_OTA").await {
            let mut shared = Vec::new();
            if let Ok(mut o) = store.get(sha512.as_str()).await {
                if tokio::io::AsyncReadExt::read_to_end(&mut o, &mut shared).await.is_ok()
                    && shared == rel.image
                {
                    break store;
                }
            }
        }
        assert!(t.elapsed() < PATIENCE, "n1 never shared the image");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let forged: Vec<u8> = rel.image.iter().map(|b| b ^ 0x5a).collect();
    store.put(sha512.as_str(), &mut forged.as_slice()).await.unwrap();

    let n2 = &cluster.nodes[1];
    let mut dev = device(n2, fleet, 0).await;
    assert_eq!(offer(&mut dev, &d0).await, rel.manifest);
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < rel.image.len() {
        ask(&mut dev, &d0, &rel.tag, got.len() as u32, 1024).await;
        let (_, offset, st, data) = chunk(&mut dev, &d0).await;
        match st {
            0 => got.extend_from_slice(&data),
            3 => {
                assert!(t.elapsed() < PATIENCE, "the forged object was never put back\n{}", n2.log());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("status {other} at {offset}\n{}", n2.log()),
        }
    }
    assert!(got == rel.image, "n2 served other bytes than the release");
    report(&mut dev, &d0, &rel, "confirmed", "").await;
    until(fleet, &id, "completed", |c| c["state"] == "completed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_makes_a_download_wait_not_fail() {
    // The chunk server reads the device's open job from the registry (again each second). While
    // the registry cannot be reached, a request used to be answered status 1 (`not_offered`),
    // which ends the device's job for good; it is answered 3 (busy) and the download goes on
    // once the registry is back.
    let pg = fleet_tests::PgCluster::start_tcp();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    ok(&fleet, &["firmware-key"]);
    let rel = release(&fleet, "1.2.0", 7);
    let broker = BrokerProc::start(&fleet, &["--ota-poll-ms", "100", "--registry-timeout", "1"]);
    let d0 = fleet.id(0);
    let mut dev = device(&broker, &fleet, 0).await;
    let id = start(&fleet, &d0, "100%", "100%");
    offer(&mut dev, &d0).await;
    assert_eq!(fetch(&mut dev, &d0, &rel.tag, 0, 1024, 1024).await, rel.image[..1024]);
    pg.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the chunk server's trust
    ask(&mut dev, &d0, &rel.tag, 1024, 1024).await;
    let (_, offset, st, _) = chunk(&mut dev, &d0).await;
    assert_eq!((offset, st), (1024, 3), "a request while the registry is down");
    pg.restart();
    let t = Instant::now();
    let rest = loop {
        ask(&mut dev, &d0, &rel.tag, 1024, 1024).await;
        match chunk(&mut dev, &d0).await {
            (_, 1024, 0, data) => break data,
            (_, _, 3, _) if t.elapsed() < PATIENCE => tokio::time::sleep(Duration::from_millis(250)).await,
            other => panic!("after the outage: {other:?}"),
        }
    };
    assert_eq!(rest, rel.image[1024..2048]);
    let c = until(&fleet, &id, "the job settled", |c| job_state(c, &d0) != "queued").await;
    assert_eq!(job_state(&c, &d0), "offered", "{c:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_registry_is_down_a_flood_of_requests_reads_it_a_few_times_only() {
    // A request answered busy because the registry could not be read left the session's
    // lookup unrecorded: the next request read the registry again, so a device (any device
    // with a job) asking as fast as its session lets it put a registry read per request on
    // the pool that every admission waits for, for as long as the registry is in trouble.
    // A failed read is trusted like a miss (200 ms): the flood is answered busy from it.
    let pg = fleet_tests::PgCluster::start_tcp();
    let fleet = Fleet::new(1, Some(pg.create_database("fleet"))).await;
    ok(&fleet, &["firmware-key"]);
    let rel = release(&fleet, "1.2.0", 7);
    let broker = BrokerProc::start(&fleet, &["--ota-poll-ms", "100", "--registry-timeout", "1"]);
    let d0 = fleet.id(0);
    let mut dev = device(&broker, &fleet, 0).await;
    start(&fleet, &d0, "100%", "100%");
    offer(&mut dev, &d0).await;
    assert_eq!(fetch(&mut dev, &d0, &rel.tag, 0, 1024, 1024).await, rel.image[..1024]);
    pg.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the chunk server's trust
    const FLOOD: u32 = 30;
    for _ in 0..FLOOD {
        ask(&mut dev, &d0, &rel.tag, 1024, 1024).await;
    }
    for _ in 0..FLOOD {
        let (_, offset, st, _) = chunk(&mut dev, &d0).await;
        assert_eq!((offset, st), (1024, 3), "a request while the registry is down");
    }
    let reads = broker.log().matches("cannot read the device's update job").count();
    assert!((1..=3).contains(&reads), "{FLOOD} requests read the registry {reads} times");
    pg.restart();
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_four_outstanding_are_busy_and_the_rest_are_paced() {
    // 2,048 bytes per second: two 1,024-byte chunks at once, then one every half second.
    let (fleet, rel, broker) = setup(1, &["--ota-bytes-per-sec", "2048"]).await;
    let d0 = fleet.id(0);
    let mut dev0 = device(&broker, &fleet, 0).await;
    start(&fleet, &d0, "100%", "100%");
    offer(&mut dev0, &d0).await;
    let t = Instant::now();
    for i in 0..9u32 {
        ask(&mut dev0, &d0, &rel.tag, i * 1024, 1024).await;
    }
    let (mut data, mut busy, mut last_data) = (Vec::new(), 0, Duration::ZERO);
    while data.len() + busy < 9 {
        let (_, off, st, bytes) = chunk(&mut dev0, &d0).await;
        match st {
            0 => {
                assert_eq!(bytes, rel.image[off as usize..off as usize + bytes.len()]);
                data.push(off);
                last_data = t.elapsed();
            }
            3 => busy += 1,
            other => panic!("status {other}"),
        }
    }
    // 2 at once, 4 waiting, the other 3 refused as busy.
    assert_eq!((data.len(), busy), (6, 3), "data at {data:?}");
    assert!(last_data >= Duration::from_millis(1500), "paced: the last chunk after {last_data:?}");
    assert!(broker.metric(r#"fleet_ota_refused_total{reason="busy"}"#).await >= 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn nobody_but_the_broker_publishes_chunks_or_offers() {
    let (fleet, rel, broker) = setup(2, &[]).await;
    let (d0, d1) = (fleet.id(0), fleet.id(1));
    let mut spy = watcher(&broker, &fleet, "devices/+/ota/chunk").await;
    let mut dev0 = device(&broker, &fleet, 0).await;
    let denied = r#"fleet_acl_denied_total{action="publish"}"#;
    let before = broker.metric(denied).await;
    // Device 1 forges a well-formed chunk of the release on its own chunk topic (a device
    // answering itself, or a relay for another): refused, the session cut (3.1.1), nothing routed.
    let mut dev1 = device(&broker, &fleet, 1).await;
    let forged = [rel.tag.as_slice(), &0u32.to_le_bytes(), &[0], &rel.image[..64]].concat();
    let mut p = Publish::new(format!("devices/{d1}/ota/chunk"), QoS::AtLeastOnce, forged.clone());
    p.pkid = 5;
    dev1.send(Packet::Publish(p)).await.unwrap();
    assert!(dev1.closed_within(PATIENCE).await, "a device's chunk must be refused");
    broker.wait_metric(denied, before + 1.0, PATIENCE).await;
    // A service forges a well-formed offer (the real signed manifest) through the queue.
    let sender = fleet.service_identity("backend-2").await;
    let mut svc = Raw::device(broker.mqtt, &sender).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend-2", 30).await), Some(ConnectReturnCode::Success));
    let mut p =
        Publish::new(format!("devices/{d0}/commands/ota/offer"), QoS::AtLeastOnce, rel.manifest.clone());
    p.pkid = 6;
    svc.send(Packet::Publish(p)).await.unwrap();
    assert!(svc.closed_within(PATIENCE).await, "a service's offer must be refused");
    broker.wait_metric(denied, before + 2.0, PATIENCE).await;
    no_offer(&mut dev0, Duration::from_millis(700)).await;
    let queued = ok(&fleet, &["commands", &d0, "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&queued).unwrap(), Value::Array(vec![]), "nothing queued");
    // Nothing reached a subscriber of the chunk topics.
    if let Some(p) = next_publish(&mut spy, Duration::from_millis(300)).await {
        panic!("a forged chunk was routed: {} {:?}", p.topic, p.payload);
    }
    // Other commands from the service still go through (the refusal is the offer's, not all).
    let mut svc = Raw::device(broker.mqtt, &sender).await.unwrap();
    assert_eq!(connack_code(&svc.mqtt_connect("backend-2", 30).await), Some(ConnectReturnCode::Success));
    let mut p = Publish::new(format!("devices/{d0}/commands/blink"), QoS::AtLeastOnce, b"1".to_vec());
    p.pkid = 7;
    svc.send(Packet::Publish(p)).await.unwrap();
    assert!(matches!(svc.recv(PATIENCE).await, Some(Packet::PubAck(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_whose_first_wave_fails_stops_before_the_second() {
    let (fleet, rel, broker) = setup(10, &["--admin-listen", "127.0.0.1:0"]).await;
    let id = start(&fleet, "prefix:dev-", "10%,100%", "2%");
    let c = until(&fleet, &id, "first wave queued", |c| c["counts"]["queued"] == 1).await;
    assert_eq!(c["counts"]["pending"], 9, "{c:#}");
    let first = (0..10).find(|i| job_state(&c, &fleet.id(*i)) == "queued").unwrap();
    let id0 = fleet.id(first);
    let mut dev = device(&broker, &fleet, first).await;
    assert_eq!(offer(&mut dev, &id0).await, rel.manifest);
    report(&mut dev, &id0, &rel, "failed", r#","reason":"bad_signature""#).await;
    let c = until(&fleet, &id, "aborted", |c| c["state"] == "aborted").await;
    assert_eq!(c["counts"]["cancelled"], 9, "the second wave never starts: {c:#}");
    assert_eq!(c["counts"]["failed"], 1);
    assert!(c["reason"].as_str().unwrap().contains("1 of 1"), "{c:#}");
    let job = c["jobs"].as_array().unwrap().iter().find(|j| j["device_id"] == id0.as_str()).unwrap().clone();
    assert_eq!(job["reason"], "bad_signature");
    // No offer was queued for any device of the second wave.
    for i in (0..10).filter(|i| *i != first) {
        let queued = ok(&fleet, &["commands", &fleet.id(i), "--json"]);
        assert_eq!(serde_json::from_str::<Value>(&queued).unwrap(), Value::Array(vec![]), "{}", fleet.id(i));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(&fleet, &id)["state"], "aborted");
    assert_eq!(broker.metric(r#"fleet_ota_campaigns_total{event="aborted"}"#).await, 1.0);
    let text = ok(&fleet, &["ota", "status"]);
    assert!(text.contains(&id) && text.contains("aborted"), "{text}");

    // The admin API shows the campaign and its jobs, as its OpenAPI document says.
    let api = admin::Client::new(&broker, &fleet, Some(&admin::operator(&fleet, "alice").await));
    let (code, list) = api.get("/api/v1/ota/campaigns");
    assert_eq!(code, 200, "{list}");
    admin::conforms("CampaignList", &list);
    assert_eq!(
        (list["campaigns"][0]["id"].as_str(), list["campaigns"][0]["state"].as_str()),
        (Some(id.as_str()), Some("aborted"))
    );
    assert_eq!(list["campaigns"][0]["counts"]["cancelled"], 9);
    let (code, one) = api.get(&format!("/api/v1/ota/campaigns/{id}"));
    assert_eq!(code, 200, "{one}");
    admin::conforms("CampaignDetail", &one);
    let failed: Vec<&Value> =
        one["jobs"].as_array().unwrap().iter().filter(|j| j["state"] == "failed").collect();
    assert_eq!(
        (failed.len(), failed[0]["device"].as_str(), failed[0]["reason"].as_str()),
        (1, Some(id0.as_str()), Some("bad_signature"))
    );
    for (path, want) in
        [("/api/v1/ota/campaigns/ota-0000000000000000", 404), ("/api/v1/ota/campaigns/x", 400)]
    {
        let (code, e) = api.get(path);
        assert_eq!(code, want, "{path}: {e}");
        admin::conforms("Error", &e);
    }
    // A device's certificate is not an operator's.
    let (code, _) = admin::Client::new(&broker, &fleet, Some(&fleet.devices[0])).get("/api/v1/ota/campaigns");
    assert_eq!(code, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn waves_of_one_ten_and_a_hundred_percent_offer_in_order() {
    let (fleet, rel, broker) = setup(50, &[]).await;
    let id = start(&fleet, "all", "1%,10%,100%", "2%");
    let count = |c: &Value, s: &str| c["counts"][s].as_u64().unwrap_or(0);
    let in_wave = |c: &Value, w: i64| -> Vec<String> {
        let jobs = c["jobs"].as_array().unwrap();
        jobs.iter().filter(|j| j["wave"] == w).map(|j| j["device_id"].as_str().unwrap().to_owned()).collect()
    };
    let c = until(&fleet, &id, "wave 1 queued", |c| count(c, "queued") == 1).await;
    let (w0, w1, w2) = (in_wave(&c, 0), in_wave(&c, 1), in_wave(&c, 2));
    assert_eq!((w0.len(), w1.len(), w2.len()), (1, 4, 45), "{c:#}");
    assert_eq!(count(&c, "pending"), 49, "only the first wave is offered: {c:#}");
    // Each wave: its devices get the offer and confirm; only then is the next offered.
    for (n, wave) in [&w0, &w1].into_iter().enumerate() {
        for dev in wave {
            let i = (0..50).find(|i| fleet.id(*i) == *dev).unwrap();
            let mut d = device(&broker, &fleet, i).await;
            assert_eq!(offer(&mut d, dev).await, rel.manifest);
            let c = status(&fleet, &id);
            let later: usize = (n + 1..3).map(|w| in_wave(&c, w as i64).len()).sum();
            assert_eq!(count(&c, "pending") as usize, later, "a later wave started early: {c:#}");
            for s in ["downloading", "verified", "rebooted", "confirmed"] {
                report(&mut d, dev, &rel, s, "").await;
            }
            until(&fleet, &id, "confirmed", |c| job_state(c, dev) == "confirmed").await;
        }
    }
    // The last wave's 45 devices, none connected, have their offers queued for when they wake.
    let c = until(&fleet, &id, "wave 3 queued", |c| count(c, "queued") == 45).await;
    assert_eq!(count(&c, "pending"), 0);
    assert_eq!(c["wave"], 2);
    for dev in &w2[..3] {
        let queued: Value = serde_json::from_str(&ok(&fleet, &["commands", dev, "--json"])).unwrap();
        assert_eq!(queued[0]["name"], "ota/offer", "{dev}: {queued:#}");
        assert_eq!(queued[0]["sender"], format!("ota:{id}"));
    }
    assert_eq!(broker.metric(r#"fleet_ota_campaigns_total{event="wave_started"}"#).await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_runs_under_the_brokers_least_privilege_postgres_role() {
    let pg = fleet_tests::PgCluster::start();
    let owner_url = pg.create_database("fleet");
    let mut fleet = Fleet::new(2, Some(owner_url.clone())).await;
    // What `fleet-provision db-roles --broker-role fleet_broker` runs.
    fleet.station().await.registry().apply_broker_role("fleet_broker").await.unwrap();
    ok(&fleet, &["firmware-key"]);
    let rel = release(&fleet, "1.2.0", 7);
    let broker_url = owner_url.replacen("postgres://postgres@", "postgres://fleet_broker@", 1);
    assert_ne!(broker_url, owner_url);
    fleet.db = Some(broker_url.clone());
    let broker = BrokerProc::start(&fleet, &["--ota-poll-ms", "100"]);
    fleet.db = Some(owner_url);
    let d0 = fleet.id(0);
    let mut dev0 = device(&broker, &fleet, 0).await;
    let id = start(&fleet, &d0, "100%", "0%");
    assert_eq!(offer(&mut dev0, &d0).await, rel.manifest);
    assert_eq!(fetch(&mut dev0, &d0, &rel.tag, 0, 2048, 1024).await, rel.image[..2048]);
    report(&mut dev0, &d0, &rel, "confirmed", "").await;
    let c = until(&fleet, &id, "completed", |c| c["state"] == "completed").await;
    assert_eq!(job_state(&c, &d0), "confirmed");
    // The broker's role moves jobs and campaigns; it cannot make, delete or re-target them.
    sqlx::any::install_default_drivers();
    let as_broker = sqlx::AnyPool::connect(&broker_url).await.unwrap();
    for sql in [
        "INSERT INTO ota_campaigns (id, board, version, sha512, devices, waves, abort_bp, offer_ttl, state, wave, created_at, updated_at) VALUES ('x', 'b', '1.0.0', '', 'all', '100', 0, 1, 'running', -1, 0, 0)",
        "DELETE FROM ota_jobs",
        "DELETE FROM ota_campaigns",
        "UPDATE releases SET sha512 = ''",
        "UPDATE ota_campaigns SET sha512 = '', board = 'other'",
        "UPDATE ota_jobs SET device_id = 'someone-else'",
    ] {
        let err = sqlx::query(sql).execute(&as_broker).await.expect_err(sql);
        assert!(err.to_string().contains("permission denied"), "{sql}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn campaigns_and_jobs_changed_outside_the_station_fail_verify_log() {
    let fleet = Fleet::new(3, None).await;
    ok(&fleet, &["firmware-key"]);
    release(&fleet, "1.2.0", 7);
    let (d0, d1, d2) = (fleet.id(0), fleet.id(1), fleet.id(2));
    let id = start(&fleet, &format!("{d0},{d1}"), "50%,100%", "2%");
    let out = ok(&fleet, &["verify-log"]);
    assert!(!out.contains("differs") && !out.contains("no ota"), "{out}");
    let log: Vec<(String, String)> = sqlx::query_as(
        "SELECT event, device_id FROM issuance_log WHERE event IN ('ota-campaign', 'ota-job') ORDER BY seq",
    )
    .fetch_all(fleet.station().await.registry().pool())
    .await
    .unwrap();
    assert_eq!(
        log,
        [("ota-campaign".into(), id.clone()), ("ota-job".into(), d0.clone()), ("ota-job".into(), d1.clone())]
    );
    // With the database's owner role: a device slipped into the campaign, another moved to the
    // first wave, the campaign pointed at other bytes.
    let st = fleet.station().await;
    let pool = st.registry().pool();
    let sql = [
        format!("INSERT INTO ota_jobs (campaign, device_id, wave, state, progress, size, created_at, updated_at) VALUES ('{id}', '{d2}', 0, 'pending', 0, 1, 0, 0)"),
        format!("UPDATE ota_jobs SET wave = 0 WHERE device_id = '{d1}'"),
        format!("UPDATE ota_campaigns SET sha512 = '{}'", "0".repeat(128)),
    ];
    for s in &sql {
        sqlx::query(s).execute(pool).await.unwrap();
    }
    let out = provision(&fleet, &["verify-log"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    for want in [
        format!("the job of {d2} in campaign {id} has no ota-job entry"),
        format!("the job of {d1} in campaign {id} is in wave 0; the log says 1"),
        format!("campaign {id} differs from what the log recorded"),
    ] {
        assert!(text.contains(&want), "{want}: {text}");
    }
}

/// End to end with nothing stood in: the station signs and publishes a release and starts a
/// campaign in waves of 1 %, 10 % and 100 %; fleet-broker offers it, serves the chunks and moves
/// the jobs; 1,000 simulated devices (`fleet-sim run --ota-key`: the SDK's `fleet_device::ota`
/// and embassy-boot's checks over flash in memory) download, verify, swap and confirm, each wave
/// only after the ones before it confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_simulated_devices_update_in_waves_through_the_broker_and_station() {
    const N: usize = 1000;
    let fleet = Fleet::new(N, None).await;
    ok(&fleet, &["firmware-key"]);
    let image = test_image(40 * 1024 + 13, 21);
    let path = fleet.dir.path().join("app.bin");
    std::fs::write(&path, &image).unwrap();
    ok(&fleet, &["release", "--image", path.to_str().unwrap(), "--version", "1.1.0", "--board", "fleet-sim"]);
    ok(&fleet, &["ota", "publish", "--release", "fleet-sim/1.1.0"]);
    let broker = BrokerProc::start(&fleet, &["--ota-poll-ms", "100"]);
    let out = ok(
        &fleet,
        &[
            "ota",
            "start",
            "--release",
            "fleet-sim/1.1.0",
            "--devices",
            "all",
            "--waves",
            "1%,10%,100%",
            "--abort-if-failed",
            "2%",
        ],
    );
    let id = out.split_whitespace().find(|w| w.starts_with("ota-")).unwrap().to_owned();
    let bin = fleet_tests::workspace_bin_dir(&["fleet-sim"]).join("fleet-sim");
    let sim = tokio::task::spawn_blocking({
        let (port, key, devices) =
            (broker.port(), fleet.home().join("firmware.pub"), fleet.dir.path().join("devices"));
        move || {
            Command::new(bin)
                .args([
                    "run",
                    "--port",
                    &port,
                    "--duration",
                    "400",
                    "--rate",
                    "0.2",
                    "--exit-when-updated",
                    "--ota-key",
                ])
                .arg(key)
                .arg("--devices")
                .arg(devices)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    });
    let count = |c: &Value, s: &str| c["counts"][s].as_u64().unwrap_or(0);
    // A wave waits for the ones before it: while a job of an earlier wave is not confirmed, no
    // job of a later wave has left `pending`.
    let t = Instant::now();
    let c = loop {
        let c = status(&fleet, &id);
        let jobs = c["jobs"].as_array().unwrap().clone();
        let failed: Vec<&Value> =
            jobs.iter().filter(|j| j["state"] == "failed" || j["state"] == "rolled_back").take(10).collect();
        let warnings = || {
            let log = broker.log();
            let w: Vec<&str> =
                log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).take(50).collect();
            w.join("\n")
        };
        assert!(
            failed.is_empty(),
            "jobs failed (campaign {}, {}): {failed:#?}\n{}",
            c["state"],
            c["reason"],
            warnings()
        );
        let open = jobs.iter().filter(|j| j["state"] != "confirmed").filter_map(|j| j["wave"].as_i64()).min();
        if let Some(w) = open {
            let early =
                jobs.iter().filter(|j| j["wave"].as_i64() > Some(w) && j["state"] != "pending").count();
            assert_eq!(early, 0, "a wave after {w} started before wave {w} confirmed: {c:#}\n{}", warnings());
        }
        if count(&c, "confirmed") == N as u64 {
            break c;
        }
        // Generous for a loaded CI machine: the run ends as soon as all are confirmed.
        if t.elapsed() >= Duration::from_secs(380) {
            let stuck: Vec<String> = c["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| j["state"] != "confirmed")
                .take(10)
                .map(|j| {
                    let dev = j["device_id"].as_str().unwrap_or_default();
                    format!("{j}\ncommands: {}", ok(&fleet, &["commands", dev, "--json"]))
                })
                .collect();
            panic!("not all confirmed: {}\n{}", stuck.join("\n"), broker.log());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("{N} devices confirmed in {:.1} s", t.elapsed().as_secs_f64());
    let in_wave = |w: i64| c["jobs"].as_array().unwrap().iter().filter(|j| j["wave"] == w).count();
    assert_eq!((in_wave(0), in_wave(1), in_wave(2)), (10, 90, 900));
    let out = sim.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fleet-sim: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("fleet-sim: {N} firmware updates confirmed; {N} on 1.1.0")), "{text}");
    // Every byte of every device's image came from the broker (a re-asked chunk counts twice).
    assert!(broker.metric("fleet_ota_chunk_bytes_total").await >= (N * image.len()) as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_well_formed_reports_moves_the_job_a_few_times_only() {
    // A device with a valid certificate and an offered job repeats `downloading` for its own
    // release as fast as it can, with offsets that go backwards and past the image: each used
    // to be a registry write and a QoS 1 announcement to every service.
    let (fleet, rel, broker) = setup(1, &[]).await;
    let d0 = fleet.id(0);
    let mut watch = watcher(&broker, &fleet, "status/devices/+/ota").await;
    let mut dev0 = device(&broker, &fleet, 0).await;
    let id = start(&fleet, &d0, "100%", "100%");
    offer(&mut dev0, &d0).await;
    until(&fleet, &id, "offered", |c| job_state(c, &d0) == "offered").await;
    announced(&mut watch, &d0, "offered").await;
    let before = broker.metric(r#"fleet_ota_jobs_total{state="downloading"}"#).await;
    for i in 0..200u64 {
        let offset = [i * 50, 1 << 40, 0][(i % 3) as usize];
        report(&mut dev0, &d0, &rel, "downloading", &format!(r#","offset":{offset}"#)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let moved = broker.metric(r#"fleet_ota_jobs_total{state="downloading"}"#).await - before;
    assert!((1.0..=11.0).contains(&moved), "{moved} downloading announcements");
    assert!(broker.metric(r#"fleet_ota_refused_total{reason="report_rate"}"#).await >= 150.0);
    let c = status(&fleet, &id);
    let job = c["jobs"].as_array().unwrap().iter().find(|j| j["device_id"] == d0.as_str()).unwrap().clone();
    assert_eq!(job["state"], "downloading", "{c:#}");
    assert!(job["progress"].as_i64().unwrap() <= IMAGE_LEN as i64, "{c:#}");
}
