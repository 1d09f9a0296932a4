//! The device SDK against a hostile broker impersonator ([`fleet_tests::rogue_tls`]): a server
//! that omits the Certificate, omits the CertificateVerify, signs it with another key or sends it
//! before the Certificate must be refused, and not one application byte (no MQTT CONNECT) may
//! reach it. A correct server built the same way is accepted (the control: the rogue server's
//! TLS is right, so a refusal is about the missing step, not a broken handshake).
#![allow(clippy::unwrap_used)] // test code

use std::net::TcpStream;
use std::time::{Duration, Instant};

use embedded_io_adapters::std::FromStd;
use fleet_device::client::{ClientError, Device, Incoming};
use fleet_device::credentials::Credentials;
use fleet_device::mqtt::session::{Millis, SessionConfig};
use fleet_device::tls::Rejection;
use fleet_tests::fixture::Fleet;
use fleet_tests::rogue_tls::{Mode, Report, RogueServer};
use p256::pkcs8::DecodePrivateKey;

struct Pki {
    _fleet: Fleet,
    bundle: Vec<u8>,
    broker_cert: Vec<u8>,
    broker_key: p256::ecdsa::SigningKey,
}

/// A fleet of one device; the rogue servers present its broker certificate and key.
fn provision() -> Pki {
    let fleet = Fleet::new_blocking(1, None);
    let bundle = fleet.bundle(0);
    let cert_pem = std::fs::read_to_string(fleet.home().join("broker-tls/cert.pem")).unwrap();
    let broker_cert = fleet_tests::rogue_tls::first_certificate_der(&cert_pem);
    let key_pem = std::fs::read_to_string(fleet.home().join("broker-tls/key.pem")).unwrap();
    let broker_key = p256::ecdsa::SigningKey::from_pkcs8_pem(&key_pem).unwrap();
    Pki { _fleet: fleet, bundle, broker_cert, broker_key }
}

fn millis(start: Instant) -> Millis {
    Millis(u64::try_from(start.elapsed().as_millis()).unwrap())
}

/// Runs the SDK's `Device::connect` against a rogue server in `mode`; on success polls until the
/// session reports `Connected`. Returns the SDK's result and what the server saw.
fn attempt(pki: &Pki, mode: Mode) -> (Result<(), ClientError>, Report) {
    let server = RogueServer::start(mode, pki.broker_cert.clone(), pki.broker_key.clone());
    let creds = Credentials::decode(&pki.bundle).unwrap();
    let mut device: Device<'_, 4, 128> = Device::new(creds, SessionConfig::default());
    let tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let (mut rx, mut tx) = (vec![0u8; 16_640], vec![0u8; 4096]);
    let start = Instant::now();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let result = device
        .connect(
            FromStd::new(tcp),
            &mut rx,
            &mut tx,
            rand::rngs::OsRng,
            Some(i64::try_from(now).unwrap()),
            millis(start),
        )
        .and_then(|mut conn| loop {
            match device.poll(&mut conn, millis(start))? {
                Some(Incoming::Connected) => return Ok(()),
                _ if start.elapsed() > Duration::from_secs(5) => return Err(ClientError::Transport),
                _ => {}
            }
        });
    (result, server.finish())
}

fn assert_refused(mode: Mode, expected: Rejection) {
    let pki = provision();
    let (result, report) = attempt(&pki, mode);
    match result {
        Err(ClientError::Tls { rejection, .. }) => {
            assert_eq!(rejection, Some(expected), "{mode:?}: refused for the wrong reason")
        }
        other => panic!(
            "{mode:?}: the SDK accepted a broker that did not authenticate: {other:?}, server saw {report:?}"
        ),
    }
    assert_eq!(
        report.app_bytes, 0,
        "{mode:?}: the device sent application data to an unauthenticated server"
    );
    assert_ne!(report.client_sent_certificate, Some(true), "{mode:?}: the device showed its certificate");
    assert!(report.error.is_none(), "{mode:?}: rogue server failed on its own: {:?}", report.error);
}

#[test]
fn a_correct_server_built_like_the_rogue_ones_is_accepted() {
    let pki = provision();
    let (result, report) = attempt(&pki, Mode::Correct);
    assert!(result.is_ok(), "control refused: {result:?}, server saw {report:?}");
    assert!(report.client_finished);
    assert_eq!(report.client_sent_certificate, Some(true));
    assert!(report.app_bytes > 0, "CONNECT reached the server");
}

#[test]
fn a_server_without_certificate_or_certificate_verify_is_refused() {
    assert_refused(Mode::NoCertificate, Rejection::NoCertificate);
}

#[test]
fn the_real_certificate_without_certificate_verify_is_refused() {
    assert_refused(Mode::CertificateWithoutVerify, Rejection::NoCertificateVerify);
}

#[test]
fn a_certificate_verify_by_another_key_is_refused() {
    assert_refused(Mode::VerifyByOtherKey, Rejection::BadHandshakeSignature);
}

#[test]
fn a_certificate_verify_before_the_certificate_is_refused() {
    assert_refused(Mode::VerifyBeforeCertificate, Rejection::CertificateVerifyBeforeCertificate);
}

#[test]
fn a_second_certificate_after_the_proof_is_refused() {
    assert_refused(Mode::SecondCertificate, Rejection::UnexpectedCertificate);
}
