//! The device SDK's TLS (embedded-tls with fleet-device's provider and strict verifier) and MQTT
//! codec against the real fleet-broker (rustls): mutual TLS 1.3 on P-256, CONNECT, QoS 1 PUBLISH
//! acknowledged after it is stored, and a device from another PKI refusing the broker.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use embedded_io::Write;
use embedded_io_adapters::std::FromStd;
use embedded_io_adapters::tokio_1::FromTokio;
use embedded_tls::blocking::{TlsConfig, TlsConnection, TlsContext};
use embedded_tls::Aes128GcmSha256;
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::codec::{decode, Packet, Publish, QoS};
use fleet_device::tls::{DeviceProvider, DeviceSigner, RamSigner, Rejection};
use fleet_tests::fault::FaultInjector;

struct Outcome {
    handshake: Result<(), String>,
    rejection: Option<Rejection>,
    connack: Option<u8>,
    puback: Option<u16>,
}

/// One device session, blocking, exactly as firmware would run it (buffers sized for devices).
fn run_device(addr: SocketAddr, bundle: &[u8], topic_suffix: &str) -> Outcome {
    let creds = Credentials::decode(bundle).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rbuf = [0u8; 16_640];
    let mut wbuf = [0u8; 4096];
    let config = TlsConfig::new().with_server_name(creds.broker_host);
    let mut tls: TlsConnection<'_, _, Aes128GcmSha256> =
        TlsConnection::new(FromStd::new(tcp), &mut rbuf, &mut wbuf);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signer = RamSigner::from_sec1_der(creds.key_der).unwrap();
    let mut provider = DeviceProvider::new(creds, signer, rand::rngs::OsRng, Some(now));
    let handshake = tls
        .open(TlsContext::new(&config, &mut provider))
        .map_err(|e| format!("{e:?}"))
        .and_then(|()| provider.authenticated().map_err(|r| format!("not authenticated: {r:?}")));
    let mut out = Outcome { handshake, rejection: provider.rejection(), connack: None, puback: None };
    if out.handshake.is_err() {
        return out;
    }
    let mut buf = [0u8; 512];
    let mut inbox = [0u8; 2048];
    let mut filled = 0usize;
    let mut next_packet = |tls: &mut TlsConnection<'_, _, Aes128GcmSha256>| -> Option<(u8, Option<u16>)> {
        loop {
            if filled > 0 {
                match decode(&inbox[..filled], inbox.len()) {
                    Ok((p, used)) => {
                        let r = match p {
                            Packet::ConnAck { code, .. } => (2u8, Some(u16::from(code))),
                            Packet::PubAck { pkid } => (4, Some(pkid)),
                            _ => (0, None),
                        };
                        inbox.copy_within(used..filled, 0);
                        filled -= used;
                        return Some(r);
                    }
                    Err(fleet_device::mqtt::DecodeError::Incomplete { .. }) => {}
                    Err(_) => return None,
                }
            }
            match tls.read(&mut inbox[filled..]) {
                Ok(0) | Err(_) => return None,
                Ok(n) => filled += n,
            }
        }
    };
    let n = Packet::Connect { client_id: creds.device_id, keep_alive: 30, clean_session: true }
        .encode(&mut buf)
        .unwrap();
    tls.write_all(&buf[..n]).unwrap();
    tls.flush().unwrap();
    out.connack = next_packet(&mut tls).filter(|(t, _)| *t == 2).and_then(|(_, c)| c).map(|c| c as u8);
    if out.connack != Some(0) {
        return out;
    }
    let topic = format!("devices/{}/{topic_suffix}", creds.device_id);
    let p = Publish {
        topic: &topic,
        payload: b"{\"temp_c\":21.5}",
        qos: QoS::AtLeastOnce,
        retain: false,
        dup: false,
        pkid: Some(42),
    };
    let n = Packet::Publish(p).encode(&mut buf).unwrap();
    tls.write_all(&buf[..n]).unwrap();
    tls.flush().unwrap();
    out.puback = next_packet(&mut tls).filter(|(t, _)| *t == 4).and_then(|(_, id)| id);
    let n = Packet::Disconnect.encode(&mut buf).unwrap();
    let _ = tls.write_all(&buf[..n]);
    let _ = tls.flush();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_connects_with_mutual_tls_and_publishes_qos1() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let addr = broker.mqtt;
    let out = tokio::task::spawn_blocking(move || run_device(addr, &bundle, "telemetry")).await.unwrap();
    assert_eq!(out.handshake, Ok(()), "rejection: {:?}", out.rejection);
    assert_eq!(out.connack, Some(0));
    assert_eq!(out.puback, Some(42));
    let rows = fleet.telemetry_rows(&fleet.id(0)).await;
    assert_eq!(rows, vec![(format!("devices/{}/telemetry", fleet.id(0)), b"{\"temp_c\":21.5}".to_vec())]);
    assert_eq!(broker.metric("fleet_handshakes_total{outcome=\"accepted\"").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_refuses_a_broker_from_another_pki() {
    let fleet = Fleet::new(1, None).await;
    let other = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    // Flashed with a bundle from a different PKI: its pinned server CA did not sign this broker.
    let bundle = std::fs::read(other.devices[0].join("credentials.bin")).unwrap();
    let addr = broker.mqtt;
    let out = tokio::task::spawn_blocking(move || run_device(addr, &bundle, "telemetry")).await.unwrap();
    assert!(out.handshake.is_err());
    assert_eq!(out.rejection, Some(Rejection::WrongIssuer));
    assert!(fleet.telemetry_rows(&fleet.id(0)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_is_refused_after_revocation() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    fleet.revoke(0).await;
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let addr = broker.mqtt;
    let out = tokio::task::spawn_blocking(move || run_device(addr, &bundle, "telemetry")).await.unwrap();
    // Refused at the handshake (fresh CRL) or with CONNACK 5 (registry): never admitted.
    assert!(out.handshake.is_err() || out.connack == Some(5), "revoked device admitted");
    assert_eq!(out.puback, None);
    broker.wait_refused(Refusal::Revoked, 1.0, Duration::from_secs(3)).await;
}

use fleet_device::client::{rx_buffer_for, ClientError, Device, Incoming, UNCAPPED_RECORD};
use fleet_device::mqtt::{Millis, SessionConfig};
use std::sync::mpsc;

fn millis() -> Millis {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    Millis(START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64)
}

fn tcp(addr: SocketAddr) -> FromStd<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    FromStd::new(s)
}

/// Polls until `want` returns true for an event; fails on a transport error.
fn poll_until<T: embedded_io::Read + embedded_io::Write>(
    d: &mut Device<'_, 8, 256>,
    conn: &mut T,
    mut want: impl FnMut(&Incoming) -> bool,
) -> Incoming {
    let t = std::time::Instant::now();
    loop {
        assert!(t.elapsed() < PATIENCE, "timed out waiting for an event");
        if let Some(ev) = d.poll(conn, millis()).expect("poll") {
            if want(&ev) {
                return ev;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_device_gets_commands_and_drains_its_outbox_after_a_broker_restart() {
    let fleet = Fleet::new(1, None).await;
    let mut broker = BrokerProc::start(&fleet, &[]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let (to_test, from_device) = mpsc::channel::<&'static str>();
    let (to_device, from_test) = mpsc::channel::<SocketAddr>();
    let first = broker.mqtt;
    let device = std::thread::spawn(move || {
        let creds = Credentials::decode(&bundle).unwrap();
        let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let mut conn = d.connect(tcp(first), &mut rx, &mut tx, rand::rngs::OsRng, None, millis()).unwrap();
        d.publish("status", b"online", fleet_device::mqtt::QoS::AtMostOnce).unwrap();
        d.publish_telemetry(&(1u32, 21.5f32)).unwrap();
        d.publish_telemetry(&(2u32, 21.6f32)).unwrap();
        let mut delivered = 0;
        poll_until(&mut d, &mut conn, |e| {
            delivered += u32::from(*e == Incoming::Delivered);
            delivered == 2
        });
        to_test.send("subscribed").unwrap();
        // A command larger than the SDK's inbox: reported and acknowledged on the same
        // connection (no reconnect loop), then the next command arrives normally.
        let big = poll_until(&mut d, &mut conn, |e| {
            matches!(e, Incoming::Command { .. } | Incoming::CommandTooLarge { .. })
        });
        assert_eq!(big, Incoming::CommandTooLarge { name_len: 8, payload_len: 3500 });
        let cmd = poll_until(&mut d, &mut conn, |e| matches!(e, Incoming::Command { .. }));
        assert_eq!(
            cmd,
            Incoming::Command {
                name: "blink".try_into().unwrap(),
                payload: heapless::Vec::from_slice(b"3").unwrap()
            }
        );
        to_test.send("command").unwrap();
        // The broker dies: the next poll fails; telemetry keeps queuing while down.
        let t = std::time::Instant::now();
        while d.poll(&mut conn, millis()).is_ok() {
            assert!(t.elapsed() < PATIENCE, "broker death not noticed");
        }
        drop(conn);
        d.disconnected(millis(), 12345);
        for i in 3..6u32 {
            d.publish_telemetry(&(i, 22.0f32)).unwrap();
        }
        assert_eq!(d.session().queued(), 3);
        let second = from_test.recv().unwrap();
        let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
        let mut conn = d.connect(tcp(second), &mut rx, &mut tx, rand::rngs::OsRng, None, millis()).unwrap();
        let mut delivered = 0;
        poll_until(&mut d, &mut conn, |e| {
            delivered += u32::from(*e == Incoming::Delivered);
            delivered == 3
        });
        assert_eq!(d.session().queued(), 0, "outbox drained after reconnect");
    });
    let wait = |rx: &mpsc::Receiver<&'static str>| {
        rx.recv_timeout(Duration::from_secs(20)).expect("device thread stalled")
    };
    assert_eq!(wait(&from_device), "subscribed");
    // A backend service sends a command.
    let (svc, mut ev) =
        rumqttc::AsyncClient::new(rumqttc_options(&fleet.service, "backend", broker.mqtt), 10);
    rumqttc_connected(&mut ev).await.unwrap();
    let poller = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    // QoS 0: a queued (QoS 1) command this large is refused at publish time (too_large,
    // docs/spec/commands.md); a live one is routed as it is, and the SDK must survive it.
    svc.publish(
        format!("devices/{}/commands/firmware", fleet.id(0)),
        rumqttc::QoS::AtMostOnce,
        false,
        vec![0xA5; 3500],
    )
    .await
    .unwrap();
    svc.publish(
        format!("devices/{}/commands/blink", fleet.id(0)),
        rumqttc::QoS::AtLeastOnce,
        false,
        b"3".to_vec(),
    )
    .await
    .unwrap();
    let from_device = tokio::task::spawn_blocking(move || {
        assert_eq!(wait(&from_device), "command");
        from_device
    })
    .await
    .unwrap();
    poller.abort();
    // kill -9 and a new broker process on the same registry.
    broker.kill9();
    let restarted = BrokerProc::start(&fleet, &[]);
    to_device.send(restarted.mqtt).unwrap();
    tokio::task::spawn_blocking(move || device.join()).await.unwrap().expect("device thread");
    drop(from_device);
    let rows = fleet.telemetry_rows(&fleet.id(0)).await;
    // The QoS 0 message was sent first and stored too.
    assert_eq!(rows[0], (format!("devices/{}/status", fleet.id(0)), b"online".to_vec()));
    let payloads: Vec<(u32, f32)> = rows[1..].iter().map(|(_, p)| postcard::from_bytes(p).unwrap()).collect();
    let seqs: Vec<u32> = payloads.iter().map(|p| p.0).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "every telemetry value stored once, in order");
}

/// `mosquitto_sub` on `mosquitto` as the fleet's backend service, printing one telemetry
/// message; returned once its subscription is in place (`-d` prints the SUBACK).
fn watch(mosquitto: &Mosquitto, fleet: &Fleet) -> Watcher {
    let sub = fleet_tests::require_program("mosquitto_sub", "mosquitto-clients");
    let svc = &fleet.service;
    // Line-buffered: `-d` lines go through stdio, block-buffered into a pipe otherwise.
    let watcher = std::process::Command::new("stdbuf")
        .arg("-oL")
        .arg(sub)
        .args(["-h", "localhost", "-p", &mosquitto.addr.port().to_string(), "--cafile"])
        .arg(svc.join("broker-trust.pem"))
        .arg("--cert")
        .arg(svc.join("cert.pem"))
        .arg("--key")
        .arg(svc.join("key.pem"))
        .args(["-t", "devices/+/telemetry", "-C", "1", "-v", "-W", "60", "-d"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = watcher;
    let watcher = Watcher { lines: lines_of(child.stdout.take().unwrap()), child };
    wait_line(&watcher.lines, "SUBACK", |l| l.contains("received SUBACK"));
    watcher
}

/// A `mosquitto_sub` waiting for one message.
struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    /// The message line it prints (`topic payload`), once it exits after it.
    fn message(mut self) -> String {
        let seen = wait_line(&self.lines, "a message", |l| l.starts_with("devices/"));
        assert!(self.child.wait().unwrap().success(), "mosquitto_sub failed: {seen:?}");
        seen.last().unwrap().clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_interoperates_with_mosquitto() {
    let fleet = Fleet::new(1, None).await;
    let mosquitto = Mosquitto::start(&fleet);
    let watcher = watch(&mosquitto, &fleet);
    let addr = mosquitto.addr;
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    tokio::task::spawn_blocking(move || {
        let creds = Credentials::decode(&bundle).unwrap();
        let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
        // Mosquitto does not cap its records: the full 16 KiB + 256 receive buffer.
        d.set_broker_record_limit(UNCAPPED_RECORD);
        let (mut rx, mut tx) = (vec![0u8; rx_buffer_for(UNCAPPED_RECORD)], vec![0u8; 4096]);
        let mut conn = d.connect(tcp(addr), &mut rx, &mut tx, rand::rngs::OsRng, None, millis()).unwrap();
        d.publish("telemetry", b"hello-mosquitto", fleet_device::mqtt::QoS::AtLeastOnce).unwrap();
        poll_until(&mut d, &mut conn, |e| *e == Incoming::Delivered);
    })
    .await
    .unwrap();
    let got = tokio::task::block_in_place(|| watcher.message());
    drop(mosquitto);
    assert_eq!(got, format!("devices/{}/telemetry hello-mosquitto", fleet.id(0)));
}

/// The broker caps its TLS records (`max_tls_record_size`, 4096 by default), so a device reads
/// with a 4,352-byte receive buffer (`rx_buffer_for(4096)`) even when a command is larger than
/// that: the 9,000-byte command
/// arrives in 4 KiB records, is skipped as too large for the inbox, and the session goes on.
/// Control: the same device against a broker sending 16 KiB records loses its connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_with_a_4352_byte_receive_buffer_gets_large_commands_through_capped_records() {
    const RX: usize = fleet_device::client::rx_buffer_for(fleet_device::client::FLEET_BROKER_RECORD);
    let fleet = Fleet::new(1, None).await;
    for (record, fits) in [("4096", true), ("16389", false)] {
        let broker =
            BrokerProc::start(&fleet, &["--max-packet-size", "12000", "--max-tls-record-size", record]);
        let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
        let (to_test, from_device) = mpsc::channel::<&'static str>();
        let addr = broker.mqtt;
        let device = std::thread::spawn(move || {
            let creds = Credentials::decode(&bundle).unwrap();
            let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
            let (mut rx, mut tx) = (vec![0u8; RX], vec![0u8; 4096]);
            let mut conn = d.connect(tcp(addr), &mut rx, &mut tx, rand::rngs::OsRng, None, millis()).unwrap();
            d.publish_telemetry(&1u32).unwrap();
            poll_until(&mut d, &mut conn, |e| *e == Incoming::Delivered);
            to_test.send("subscribed").unwrap();
            let t = std::time::Instant::now();
            loop {
                assert!(t.elapsed() < PATIENCE, "no command and no error");
                match d.poll(&mut conn, millis()) {
                    Ok(Some(Incoming::CommandTooLarge { payload_len, .. })) => {
                        assert_eq!(payload_len, 9000);
                        break "skipped";
                    }
                    Ok(_) => {}
                    Err(_) => break "connection lost",
                }
            }
        });
        tokio::task::spawn_blocking({
            let from_device = from_device;
            move || assert_eq!(from_device.recv_timeout(Duration::from_secs(20)).unwrap(), "subscribed")
        })
        .await
        .unwrap();
        let (svc, mut ev) =
            rumqttc::AsyncClient::new(rumqttc_options(&fleet.service, "backend", broker.mqtt), 10);
        rumqttc_connected(&mut ev).await.unwrap();
        let poller = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        let topic = format!("devices/{}/commands/firmware", fleet.id(0));
        // QoS 0: routed live (a QoS 1 command this large is refused by the queue).
        svc.publish(topic, rumqttc::QoS::AtMostOnce, false, vec![0x5A; 9000]).await.unwrap();
        let outcome =
            tokio::task::spawn_blocking(move || device.join()).await.unwrap().expect("device thread");
        poller.abort();
        if fits {
            assert_eq!(outcome, "skipped", "records of {record} bytes did not fit a {RX}-byte buffer");
        } else {
            assert_eq!(outcome, "connection lost", "control: a 16 KiB record fit a {RX}-byte buffer?");
        }
    }
}

/// A key generated by the SDK and its PKCS#10 request, built without an allocator, pass the
/// station's CSR check (P-256, signature, profile) with the device id as CN, `openssl req
/// -verify` with the SAN URI, and the station issues a certificate for exactly that key: the
/// private key never left the device (issue 13).
#[tokio::test]
async fn a_csr_built_on_the_device_is_accepted_by_the_station_and_openssl() {
    let id = "dev-0c5a0c5a0c5a";
    let key = fleet_device::csr::generate_key(&mut rand::rngs::OsRng);
    let mut buf = [0u8; 512];
    let n = fleet_device::csr::build(id, &key, &mut buf).unwrap();
    let der = &buf[..n];

    let checked = fleet_provision::pki::check_csr(der).expect("the station's CSR check");
    assert_eq!(checked.common_name.as_deref(), Some(id));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("req.der");
    std::fs::write(&path, der).unwrap();
    let openssl = fleet_tests::require_program("openssl", "openssl");
    let out = std::process::Command::new(openssl)
        .args(["req", "-inform", "DER", "-noout", "-verify", "-text", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("verify OK"), "{text}");
    assert!(text.contains(&format!("URI:urn:fleetgate:device:{id}")), "{text}");

    let fleet = Fleet::new(1, None).await;
    let issued = fleet.station().await.sign_csr(der, None).await.expect("sign-csr");
    let summary = fleet_provision::pki::summarize(&issued.der).unwrap();
    let (_, spki) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(
        &summary.spki_der,
    )
    .unwrap();
    assert_eq!(&spki.subject_public_key.data[..], key.verifying_key().to_encoded_point(false).as_bytes());
}

/// What the device asks of its mock secure element.
enum SeCommand {
    PublicKey,
    Sign([u8; 32]),
}

/// A mock secure element: the key lives in another thread (the "chip"), the device sends it a
/// command and waits for the answer, the way an I2C driver talks to an ATECC608 or an SE050.
/// The device side holds no key at all.
struct MockSe {
    to_chip: mpsc::Sender<SeCommand>,
    from_chip: mpsc::Receiver<Option<Vec<u8>>>,
    signatures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl MockSe {
    /// A chip personalised with `key_der` (SEC1) at the factory; `None` is a chip that fails.
    fn new(key_der: Option<Vec<u8>>) -> Self {
        let (to_chip, commands) = mpsc::channel::<SeCommand>();
        let (answers, from_chip) = mpsc::channel();
        let signatures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = signatures.clone();
        std::thread::spawn(move || {
            let mut key = key_der.and_then(|k| RamSigner::from_sec1_der(&k));
            for cmd in commands {
                let answer = match (&mut key, cmd) {
                    (Some(k), SeCommand::PublicKey) => k.public_key().map(|p| p.to_vec()),
                    (Some(k), SeCommand::Sign(digest)) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        k.sign_digest(&digest).map(|s| s.to_vec())
                    }
                    (None, _) => None,
                };
                if answers.send(answer).is_err() {
                    break;
                }
            }
        });
        Self { to_chip, from_chip, signatures }
    }

    fn ask(&self, cmd: SeCommand) -> Option<Vec<u8>> {
        self.to_chip.send(cmd).ok()?;
        self.from_chip.recv_timeout(Duration::from_secs(5)).ok().flatten()
    }
}

impl DeviceSigner for MockSe {
    fn public_key(&mut self) -> Option<[u8; 65]> {
        self.ask(SeCommand::PublicKey)?.try_into().ok()
    }

    fn sign_digest(&mut self, digest: &[u8; 32]) -> Option<[u8; 64]> {
        self.ask(SeCommand::Sign(*digest))?.try_into().ok()
    }
}

/// One session with the key in the mock secure element: connect, publish, wait for the PUBACK.
fn session_with_se(
    addr: SocketAddr,
    bundle: &[u8],
    se: &mut MockSe,
    record: usize,
) -> Result<(), ClientError> {
    let creds = Credentials::decode(bundle).unwrap();
    let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
    d.set_broker_record_limit(record);
    d.check_signer(&mut *se)?;
    let (mut rx, mut tx) = (vec![0u8; rx_buffer_for(record)], vec![0u8; 2048]);
    let mut conn =
        d.connect_with(tcp(addr), &mut rx, &mut tx, rand::rngs::OsRng, &mut *se, None, millis())?;
    d.publish("telemetry", b"signed-by-the-se", fleet_device::mqtt::QoS::AtLeastOnce).unwrap();
    poll_until(&mut d, &mut conn, |e| *e == Incoming::Delivered);
    Ok(())
}

/// The device key in a secure element (a `DeviceSigner` that is not the SDK's RAM key): the
/// handshake signs through it, against fleet-broker and against Mosquitto; exactly one
/// signature per handshake; the message is stored.
#[tokio::test(flavor = "multi_thread")]
async fn sdk_signs_through_a_secure_element_against_fleet_broker_and_mosquitto() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let mosquitto = Mosquitto::start(&fleet);
    let watcher = watch(&mosquitto, &fleet);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let key = Credentials::decode(&bundle).unwrap().key_der.to_vec();
    let (fleet_addr, mosq_addr) = (broker.mqtt, mosquitto.addr);
    let signatures = tokio::task::spawn_blocking(move || {
        let mut se = MockSe::new(Some(key));
        session_with_se(fleet_addr, &bundle, &mut se, fleet_device::client::FLEET_BROKER_RECORD).unwrap();
        let after_fleet = se.signatures.load(std::sync::atomic::Ordering::SeqCst);
        session_with_se(mosq_addr, &bundle, &mut se, UNCAPPED_RECORD).unwrap();
        (after_fleet, se.signatures.load(std::sync::atomic::Ordering::SeqCst))
    })
    .await
    .unwrap();
    assert_eq!(signatures, (1, 2), "one CertificateVerify signature per handshake, made by the SE");
    let rows = fleet.telemetry_rows(&fleet.id(0)).await;
    assert_eq!(rows, vec![(format!("devices/{}/telemetry", fleet.id(0)), b"signed-by-the-se".to_vec())]);
    let got = tokio::task::block_in_place(|| watcher.message());
    assert_eq!(got, format!("devices/{}/telemetry signed-by-the-se", fleet.id(0)));
}

/// A secure element holding another device's key is caught before the handshake by
/// `check_signer`; forced through anyway, the broker refuses the CertificateVerify. A chip that
/// fails to sign ends the handshake with an error, not a hang or a panic.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_failing_secure_element_is_refused_cleanly() {
    let fleet = Fleet::new(2, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let other = std::fs::read(fleet.devices[1].join("credentials.bin")).unwrap();
    let other_key = Credentials::decode(&other).unwrap().key_der.to_vec();
    let addr = broker.mqtt;
    let (checked, forced, failing) = tokio::task::spawn_blocking(move || {
        let mut wrong = MockSe::new(Some(other_key));
        let checked = session_with_se(addr, &bundle, &mut wrong, 4096);
        let creds = Credentials::decode(&bundle).unwrap();
        let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
        let (mut rx, mut tx) = (vec![0u8; 5 * 1024], vec![0u8; 2048]);
        let forced: Result<(), ClientError> = d
            .connect_with(tcp(addr), &mut rx, &mut tx, rand::rngs::OsRng, &mut wrong, None, millis())
            .and_then(|mut conn| {
                // TLS 1.3: the client's Finished goes out before the server judges it; the
                // refusal arrives as an alert or a close on the first read.
                let t = std::time::Instant::now();
                loop {
                    d.poll(&mut conn, millis())?;
                    assert!(t.elapsed() < Duration::from_secs(10), "admitted with the wrong key");
                }
            });
        let mut failing = MockSe::new(None);
        let t = std::time::Instant::now();
        let failing = d
            .connect_with(tcp(addr), &mut rx, &mut tx, rand::rngs::OsRng, &mut failing, None, millis())
            .map(|_| ());
        assert!(t.elapsed() < LATENCY_BOUND, "a failing chip stalled the handshake");
        (checked, forced, failing)
    })
    .await
    .unwrap();
    assert!(matches!(checked, Err(ClientError::Key)), "{checked:?}");
    assert!(forced.is_err(), "the broker admitted a device signing with another key");
    assert!(matches!(failing, Err(ClientError::Key)), "{failing:?}");
    assert!(fleet.telemetry_rows(&fleet.id(0)).await.is_empty());
    // Both the wrong key and the failing chip's stand-in signature: a bad CertificateVerify.
    broker.wait_refused(Refusal::BadSignature, 2.0, Duration::from_secs(3)).await;
}

/// A receive buffer smaller than the broker's records need is refused by `connect` with the
/// size it needs, before a single byte is sent (not mid-handshake): 4,000 bytes against
/// fleet-broker's default 4 KiB records, 5 KiB against a broker without a cap. 4,352 bytes
/// (`rx_buffer_for(4096)`) is enough for the real broker.
#[tokio::test(flavor = "multi_thread")]
async fn a_too_small_receive_buffer_is_refused_before_the_handshake() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = listener.local_addr().unwrap();
    let addr = broker.mqtt;
    let (small, uncapped, exact) = tokio::task::spawn_blocking(move || {
        let creds = Credentials::decode(&bundle).unwrap();
        let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
        let (mut rx, mut tx) = (vec![0u8; 4000], vec![0u8; 2048]);
        let small = d.connect(tcp(silent), &mut rx, &mut tx, rand::rngs::OsRng, None, millis()).map(|_| ());
        let mut rx5 = vec![0u8; 5 * 1024];
        d.set_broker_record_limit(UNCAPPED_RECORD);
        let uncapped =
            d.connect(tcp(silent), &mut rx5, &mut tx, rand::rngs::OsRng, None, millis()).map(|_| ());
        d.set_broker_record_limit(fleet_device::client::FLEET_BROKER_RECORD);
        let mut rx_exact = vec![0u8; rx_buffer_for(4096)];
        let mut conn =
            d.connect(tcp(addr), &mut rx_exact, &mut tx, rand::rngs::OsRng, None, millis()).unwrap();
        d.publish_telemetry(&7u32).unwrap();
        poll_until(&mut d, &mut conn, |e| *e == Incoming::Delivered);
        (small, uncapped, rx_exact.len())
    })
    .await
    .unwrap();
    assert!(
        matches!(small, Err(ClientError::BufferTooSmall { which: "rx", needed: 4352, given: 4000 })),
        "{small:?}"
    );
    assert!(
        matches!(uncapped, Err(ClientError::BufferTooSmall { which: "rx", needed: 16_640, given: 5120 })),
        "{uncapped:?}"
    );
    assert_eq!(exact, 4352);
    // Both refused connections closed without a byte: no ClientHello went out.
    listener.set_nonblocking(false).unwrap();
    for _ in 0..2 {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut got).unwrap();
        assert!(got.is_empty(), "{} bytes sent before the buffer check", got.len());
    }
}

/// The async API (`connect_async`, `poll_async`) on an executor, against the real broker: a
/// 4,352-byte receive buffer, telemetry stored, idle reads that time out without losing the
/// session across more than one keep-alive interval, a command delivered, a clean DISCONNECT.
#[tokio::test(flavor = "multi_thread")]
async fn sdk_async_api_connects_publishes_stays_up_while_idle_and_gets_a_command() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let creds = Credentials::decode(&bundle).unwrap();
    let cfg = SessionConfig { keep_alive_secs: 1, ..SessionConfig::default() };
    let mut d: Device<'_, 8, 256> = Device::new(creds, cfg);
    let tcp = tokio::net::TcpStream::connect(broker.mqtt).await.unwrap();
    // Reads time out after 200 ms idle, as an embassy firmware's do with `with_timeout`.
    let transport = FaultInjector::new(FromTokio::new(tcp)).read_timeout(Duration::from_millis(200));
    let (mut rx, mut tx) = (vec![0u8; rx_buffer_for(4096)], vec![0u8; 2048]);
    let mut conn =
        d.connect_async(transport, &mut rx, &mut tx, rand::rngs::OsRng, None, millis()).await.unwrap();
    d.publish_telemetry(&(1u32, 20.5f32)).unwrap();
    let mut events = Vec::new();
    let t = std::time::Instant::now();
    // 3 s idle after the telemetry: three keep-alive intervals. The broker drops a session
    // silent for 1.5 keep-alives, so staying up proves the SDK's PINGREQs went out.
    while t.elapsed() < Duration::from_secs(3) {
        if let Some(ev) = d.poll_async(&mut conn, millis()).await.expect("session lost while idle") {
            events.push(ev);
        }
    }
    assert!(events.contains(&Incoming::Connected), "{events:?}");
    assert!(events.contains(&Incoming::Delivered), "{events:?}");
    let (svc, mut ev) =
        rumqttc::AsyncClient::new(rumqttc_options(&fleet.service, "backend", broker.mqtt), 10);
    rumqttc_connected(&mut ev).await.unwrap();
    let poller = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    svc.publish(
        format!("devices/{}/commands/reboot", fleet.id(0)),
        rumqttc::QoS::AtLeastOnce,
        false,
        b"now".to_vec(),
    )
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let command = loop {
        assert!(t.elapsed() < PATIENCE, "no command");
        if let Some(ev @ Incoming::Command { .. }) = d.poll_async(&mut conn, millis()).await.unwrap() {
            break ev;
        }
    };
    poller.abort();
    assert_eq!(
        command,
        Incoming::Command {
            name: "reboot".try_into().unwrap(),
            payload: heapless::Vec::from_slice(b"now").unwrap()
        }
    );
    d.disconnect_async(&mut conn).await.unwrap();
    assert_eq!(fleet.telemetry_rows(&fleet.id(0)).await.len(), 1);
}

/// One async session over a link that stalls 600 ms inside every TLS record while the device's
/// idle read timeout is 200 ms: telemetry delivered, then a command. `Err` names what broke.
async fn session_over_a_stuttering_link(
    fleet: &Fleet,
    broker: &BrokerProc,
    boundary: bool,
) -> Result<(), String> {
    let bundle = std::fs::read(fleet.devices[0].join("credentials.bin")).unwrap();
    let creds = Credentials::decode(&bundle).unwrap();
    let mut d: Device<'_, 8, 256> = Device::new(creds, SessionConfig::default());
    let tcp = tokio::net::TcpStream::connect(broker.mqtt).await.unwrap();
    // Every record from the broker stalls 600 ms after its header and 3 bytes of its body, once
    // switched on (after the handshake, which goes through undisturbed).
    let link = FaultInjector::new(FromTokio::new(tcp))
        .read_timeout(Duration::from_millis(200))
        .stall_inside_records(8, Duration::from_millis(600))
        .paused();
    let stutter = link.switch();
    let (mut rx, mut tx) = (vec![0u8; rx_buffer_for(4096)], vec![0u8; 2048]);
    let transport = fleet_device::transport::RecordBoundary::new(link, if boundary { 50 } else { 0 });
    let mut conn = d
        .connect_async(transport, &mut rx, &mut tx, rand::rngs::OsRng, None, millis())
        .await
        .map_err(|e| format!("handshake: {e:?}"))?;
    // From here on every record from the broker stalls inside.
    stutter.on();
    d.publish_telemetry(&9u32).unwrap();
    let (svc, mut ev) =
        rumqttc::AsyncClient::new(rumqttc_options(&fleet.service, "backend", broker.mqtt), 10);
    rumqttc_connected(&mut ev).await.unwrap();
    let poller = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let t = std::time::Instant::now();
    let mut delivered = false;
    let result = loop {
        if t.elapsed() > Duration::from_secs(20) {
            break Err("no command in 20 s".to_owned());
        }
        match d.poll_async(&mut conn, millis()).await {
            Ok(Some(Incoming::Delivered)) if !delivered => {
                delivered = true;
                svc.publish(
                    format!("devices/{}/commands/blink", fleet.id(0)),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    b"2".to_vec(),
                )
                .await
                .unwrap();
            }
            Ok(Some(Incoming::Command { .. })) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(format!("session lost: {e:?}")),
        }
    };
    poller.abort();
    // The link did stall inside records (else this proves nothing).
    result.and_then(|()| match stutter.stalled() {
        0 => Err("no record stalled".to_owned()),
        _ => Ok(()),
    })
}

/// A link that pauses inside TLS records longer than the device's idle read timeout: with the
/// SDK's `RecordBoundary` the timeouts fall only between records and the session carries on;
/// without it (stall limit 0, the control) a timeout cuts a record and the session is lost.
/// This test failed first: the async QEMU firmware lost sessions this way on a loaded host.
#[tokio::test(flavor = "multi_thread")]
async fn read_timeouts_never_cut_a_tls_record() {
    let fleet = Fleet::new(1, None).await;
    let broker = BrokerProc::start(&fleet, &[]);
    let with = session_over_a_stuttering_link(&fleet, &broker, true).await;
    assert_eq!(with, Ok(()), "with RecordBoundary");
    let without = session_over_a_stuttering_link(&fleet, &broker, false).await;
    assert!(without.as_ref().is_err_and(|e| e.starts_with("session lost")), "control: {without:?}");
}
