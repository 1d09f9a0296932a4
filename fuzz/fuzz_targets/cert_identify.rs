//! The broker reads the device identity (SAN URI, serial, role) from the client certificate
//! rustls accepted: any bytes must give an identity or a refusal reason, never a panic, and the
//! same answer as an independent reading of the same bytes.
//!
//! The broker's extraction is built on x509-parser, so x509-parser alone would judge it against
//! itself: the identity is recomputed here from the SDK's own DER reader (device
//! `tls/x509.rs`: serial, notAfter, cA, SAN URIs), with x509-parser only saying whether the
//! certificate and its basicConstraints/SAN extensions parse. Compared when both readers parse
//! the certificate and x509-parser leaves no bytes over.
//!
//! Deliberate differences (not asserted): a duplicated basicConstraints (RFC 5280 forbids it,
//! rustls/webpki refuses it before the broker looks) reads as "not a CA" to the broker and as its
//! last occurrence to the SDK; a constructed SAN URI (not DER) is an identity to the broker
//! (x509-parser reads its content) and no URI to the SDK: only a CA could issue either, and the
//! broker admits only certificates its device CA signed; inputs only one reader parses (see
//! `x509_parse`).
#![no_main]
use fleet_broker::fuzzing::{identify, IdentityError};
use fleet_device::tls::x509;
use fleet_registry::{
    DeviceId, Role, CLAIM_URI_PREFIX, DEVICE_URI_PREFIX, ISSUER_URI_PREFIX, OPERATOR_URI_PREFIX,
    SERVICE_URI_PREFIX,
};
use libfuzzer_sys::fuzz_target;
use x509_parser::asn1_rs::Any;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{Oid, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_SUBJECT_ALT_NAME};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Does x509-parser find `oid` at most once and parse it?
fn parses(cert: &X509Certificate<'_>, oid: &Oid<'_>) -> bool {
    match cert.get_extension_unique(oid) {
        Ok(None) => true,
        Ok(Some(e)) => {
            !e.parsed_extension().unsupported()
                && !matches!(
                    e.parsed_extension(),
                    ParsedExtension::ParseError { .. } | ParsedExtension::Unparsed
                )
        }
        Err(_) => false,
    }
}

/// (role, id, serial without leading zeros, notAfter) or the refusal, from the SDK's reading.
type Reading = Result<(Role, DeviceId, Vec<u8>, i64), IdentityError>;

fn expected(cert: &x509::Certificate<'_>, san_parses: bool) -> Reading {
    if cert.is_ca {
        return Err(IdentityError::CaAsClient);
    }
    let start = cert.serial.iter().position(|b| *b != 0).ok_or(IdentityError::Unparseable)?;
    let serial = &cert.serial[start..];
    if serial.len() > 20 || !san_parses {
        return Err(IdentityError::Unparseable);
    }
    let prefixes = [
        (DEVICE_URI_PREFIX, Role::Device),
        (SERVICE_URI_PREFIX, Role::Service),
        (ISSUER_URI_PREFIX, Role::Issuer),
        (CLAIM_URI_PREFIX, Role::Claim),
        (OPERATOR_URI_PREFIX, Role::Operator),
    ];
    let mut found = None;
    for uri in x509::uris(cert.san.unwrap_or_default()) {
        // Not UTF-8: never a fleetgate URI (x509-parser makes it `GeneralName::Invalid`).
        let Ok(uri) = std::str::from_utf8(uri) else { continue };
        let Some((role, rest)) =
            prefixes.iter().find_map(|(p, r)| uri.strip_prefix(p).map(|rest| (*r, rest)))
        else {
            continue;
        };
        if found.is_some() {
            return Err(IdentityError::NoIdentity);
        }
        found = Some((role, DeviceId::parse(rest).map_err(|_| IdentityError::NoIdentity)?));
    }
    let (role, id) = found.ok_or(IdentityError::NoIdentity)?;
    Ok((role, id, serial.to_vec(), cert.not_after))
}

/// Does the certificate's SAN hold a constructed URI (not DER: an IA5String is primitive)?
/// x509-parser, so the broker, reads its content as the URI; the SDK skips the entry.
fn constructed_uri(cert: &X509Certificate<'_>) -> bool {
    let Ok(Some(ext)) = cert.get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME) else { return false };
    let Ok((_, seq)) = Any::from_der(ext.value) else { return false };
    let mut r = seq.data;
    while let Ok((rest, name)) = Any::from_der(r) {
        if name.header.is_constructed() && name.tag().0 == 6 {
            return true;
        }
        r = rest;
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let broker = identify(data);
    if let Err(e) = &broker {
        let _ = e.refusal().label();
    }
    let (Ok(ours), Ok(([], theirs))) = (x509::parse(data), X509Certificate::from_der(data)) else { return };
    if !parses(&theirs, &OID_X509_EXT_BASIC_CONSTRAINTS) || constructed_uri(&theirs) {
        return;
    }
    let broker: Reading = broker.map(|i| (i.role, i.id, i.serial.as_bytes().to_vec(), i.not_after));
    let sdk = expected(&ours, parses(&theirs, &OID_X509_EXT_SUBJECT_ALT_NAME));
    assert_eq!(broker, sdk, "the broker's identity against the SDK reader's");
});
