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
use embedded_tls::blocking::{TlsConfig, TlsConnection, TlsContext};
use embedded_tls::Aes128GcmSha256;
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::codec::{decode, Packet, Publish, QoS};
use fleet_device::tls::{DeviceProvider, Rejection};

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
    let mut provider = DeviceProvider::new(creds, rand::rngs::OsRng, Some(now));
    let handshake = tls.open(TlsContext::new(&config, &mut provider)).map_err(|e| format!("{e:?}"));
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
    broker
        .wait_metric(
            "fleet_handshakes_total{outcome=\"refused\",reason=\"revoked\"}",
            1.0,
            Duration::from_secs(3),
        )
        .await;
}
