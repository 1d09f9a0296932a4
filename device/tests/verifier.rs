//! The broker verifier against every forgery the trust model must stop (DESIGN.md, "Trust
//! model"), with certificates made by rcgen in the shape fleet-provision issues.
#![allow(clippy::unwrap_used)] // test code

use fleet_device::tls::{Rejection, ServerVerifier};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Ca { params, key, der }
}

fn leaf(issuer: &Ca, tweak: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec!["broker.example".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "broker.example");
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    tweak(&mut p);
    p.signed_by(&key, &Issuer::from_params(&issuer.params, &issuer.key)).unwrap().der().to_vec()
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn check(ca: &Ca, leaf: &[u8], host: &str, now: Option<i64>) -> Result<(), Rejection> {
    ServerVerifier::new(&ca.der, host, now).check_chain(leaf)
}

#[test]
fn genuine_broker_certificate_is_accepted() {
    let server_ca = ca("Server CA");
    let cert = leaf(&server_ca, |_| {});
    assert_eq!(check(&server_ca, &cert, "broker.example", Some(now())), Ok(()));
    assert_eq!(check(&server_ca, &cert, "BROKER.example", None), Ok(()), "host names are case-insensitive");
}

#[test]
fn forged_by_a_device_key_is_refused() {
    // The attack DESIGN.md records: a device's own key signs a "broker" certificate whose
    // issuer name is the server CA's.
    let server_ca = ca("Server CA");
    let device_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let impostor = Ca { params: server_ca.params.clone(), key: device_key, der: Vec::new() };
    let forged = leaf(&impostor, |_| {});
    assert_eq!(check(&server_ca, &forged, "broker.example", Some(now())), Err(Rejection::WrongIssuer));
}

#[test]
fn signed_by_the_device_ca_or_an_unknown_ca_is_refused() {
    let server_ca = ca("Server CA");
    let device_ca = ca("Device Issuing CA");
    assert_eq!(
        check(&server_ca, &leaf(&device_ca, |_| {}), "broker.example", None),
        Err(Rejection::WrongIssuer)
    );
    let stranger = ca("Some Other CA");
    assert_eq!(
        check(&server_ca, &leaf(&stranger, |_| {}), "broker.example", None),
        Err(Rejection::WrongIssuer)
    );
}

#[test]
fn wrong_host_is_refused() {
    let server_ca = ca("Server CA");
    let cert = leaf(&server_ca, |_| {});
    assert_eq!(check(&server_ca, &cert, "evil.example", None), Err(Rejection::HostMismatch));
    // A CN that matches is not enough: only the SAN counts.
    let cn_only = leaf(&server_ca, |p| p.subject_alt_names.clear());
    assert_eq!(check(&server_ca, &cn_only, "broker.example", None), Err(Rejection::HostMismatch));
}

#[test]
fn expired_and_not_yet_valid_are_refused_when_a_clock_is_given() {
    let server_ca = ca("Server CA");
    let t = OffsetDateTime::now_utc();
    let expired = leaf(&server_ca, |p| {
        p.not_before = t - Duration::days(30);
        p.not_after = t - Duration::days(1);
    });
    assert_eq!(check(&server_ca, &expired, "broker.example", Some(now())), Err(Rejection::Expired));
    assert_eq!(check(&server_ca, &expired, "broker.example", None), Ok(()), "no clock, no date check");
    let future = leaf(&server_ca, |p| {
        p.not_before = t + Duration::days(1);
        p.not_after = t + Duration::days(30);
    });
    assert_eq!(check(&server_ca, &future, "broker.example", Some(now())), Err(Rejection::NotYetValid));
}

#[test]
fn ca_leaf_and_missing_server_auth_are_refused() {
    let server_ca = ca("Server CA");
    let ca_leaf = leaf(&server_ca, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    assert_eq!(check(&server_ca, &ca_leaf, "broker.example", None), Err(Rejection::CaAsServer));
    let client_only = leaf(&server_ca, |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]);
    assert_eq!(check(&server_ca, &client_only, "broker.example", None), Err(Rejection::NotServerAuth));
    let no_eku = leaf(&server_ca, |p| p.extended_key_usages.clear());
    assert_eq!(check(&server_ca, &no_eku, "broker.example", None), Err(Rejection::NotServerAuth));
}

#[test]
fn corrupted_certificates_are_refused_never_panic() {
    let server_ca = ca("Server CA");
    let cert = leaf(&server_ca, |_| {});
    for i in 0..cert.len() {
        for bit in [0x01u8, 0x80] {
            let mut c = cert.clone();
            c[i] ^= bit;
            assert!(check(&server_ca, &c, "broker.example", Some(now())).is_err(), "flip at {i}");
        }
    }
    for len in 0..cert.len() {
        assert!(check(&server_ca, &cert[..len], "broker.example", None).is_err());
    }
}
