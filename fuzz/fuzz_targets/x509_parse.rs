//! The verifier's X.509 reader and the verifier never panic on any certificate bytes, and what
//! the reader extracts is what x509-parser (an independent judge) reads from the same bytes.
//!
//! Compared when both parse the certificate (x509-parser with nothing left over): the tbs
//! bytes, serial, both signature algorithm OIDs' outer one, signature, issuer and subject
//! (raw), validity, key algorithm, curve and key bits, the basicConstraints cA flag, the EKU's
//! presence and serverAuth, and the SAN's URIs and DNS names. An extension is compared only when
//! x509-parser gives an answer for it: absent, or present once and parsed.
//!
//! Deliberate differences (not asserted):
//! - the SDK refuses more: trailing bytes, lengths over 3 bytes, high tag numbers, BIT STRINGs
//!   with unused bits, times that are not `YYMMDDHHMMSSZ`/`YYYYMMDDHHMMSSZ`, and any unknown
//!   critical extension (RFC 5280 §4.2); x509-parser accepts some of these;
//! - the SDK accepts more: it does not read the version, names or algorithm parameters, nor
//!   the inside of extensions it does not use, so bytes x509-parser refuses there can pass;
//! - a Name with an RDN x509-parser cannot parse: it keeps the RDNs before it and their bytes
//!   as the raw name (header included, rest ignored); the SDK's is the whole element, so only
//!   that prefix is compared;
//! - a SAN URI or dNSName that is not UTF-8 is `GeneralName::Invalid` to x509-parser: compared
//!   as bytes; a constructed one (not DER) is skipped by the SDK, read by x509-parser: the SAN is
//!   then not compared;
//! - an extension x509-parser cannot parse, or finds twice (RFC 5280 forbids duplicates), gets
//!   no verdict from it; the SDK takes the last occurrence. Its certificates are the broker's,
//!   signed by the pinned CA.
#![no_main]
use fleet_device::tls::{x509, ServerVerifier};
use libfuzzer_sys::fuzz_target;
use x509_parser::asn1_rs::{Any, Class, Tag};
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{
    Oid, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// x509-parser's verdict on one extension: `Some(None)` absent, `Some(Some(ext))` present once
/// and parsed, `None` no verdict (unparseable or duplicated).
fn extension<'a, 'b>(cert: &'a X509Certificate<'b>, oid: &Oid<'_>) -> Option<Option<&'a X509Extension<'b>>> {
    match cert.get_extension_unique(oid) {
        Ok(None) => Some(None),
        Ok(Some(e))
            if e.parsed_extension().unsupported()
                || matches!(
                    e.parsed_extension(),
                    ParsedExtension::ParseError { .. } | ParsedExtension::Unparsed
                ) =>
        {
            None
        }
        Ok(Some(e)) => Some(Some(e)),
        Err(_) => None,
    }
}

/// Does this SAN (extension value) hold a constructed dNSName or URI? Not DER (both are
/// IA5Strings): the SDK skips such an entry, x509-parser reads its content as the name.
fn constructed_name(ext_value: &[u8]) -> bool {
    let Ok((_, seq)) = Any::from_der(ext_value) else { return true };
    let mut r = seq.data;
    while !r.is_empty() {
        let Ok((rest, name)) = Any::from_der(r) else { return true };
        if name.header.is_constructed() && matches!(name.tag().0, 2 | 6) {
            return true;
        }
        r = rest;
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let ours = x509::parse(data);
    // As a broker certificate against itself as the pinned CA.
    let _ = ServerVerifier::new(data, "localhost", Some(1_800_000_000)).check_chain(data);

    let (Ok(ours), Ok(([], theirs))) = (ours, X509Certificate::from_der(data)) else { return };
    assert_eq!(ours.tbs, theirs.tbs_certificate.as_ref(), "tbs");
    assert_eq!(ours.serial, theirs.raw_serial(), "serial");
    assert_eq!(
        ours.signature_algorithm,
        theirs.signature_algorithm.algorithm.as_bytes(),
        "signature algorithm"
    );
    assert_eq!(theirs.signature_value.unused_bits, 0, "the SDK reads whole-byte signatures only");
    assert_eq!(ours.signature, &*theirs.signature_value.data, "signature");
    // x509-parser stops reading a Name at its first unparseable RDN and gives the bytes before
    // it as the raw name; the SDK takes the whole element (it compares names byte for byte).
    let name = |ours: &[u8], theirs: &[u8], what| {
        assert!(ours == theirs || (theirs.len() < ours.len() && ours.starts_with(theirs)), "{what}");
    };
    name(ours.issuer, theirs.issuer().as_raw(), "issuer");
    name(ours.subject, theirs.subject().as_raw(), "subject");
    assert_eq!(ours.not_before, theirs.validity().not_before.timestamp(), "notBefore");
    assert_eq!(ours.not_after, theirs.validity().not_after.timestamp(), "notAfter");
    let spki = theirs.public_key();
    assert_eq!(ours.key_algorithm, spki.algorithm.algorithm.as_bytes(), "key algorithm");
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .filter(|p| {
            p.header.class() == Class::Universal && p.header.tag() == Tag::Oid && !p.header.is_constructed()
        })
        .map(|p| p.data);
    assert_eq!(ours.key_curve, curve, "named curve");
    assert_eq!(spki.subject_public_key.unused_bits, 0);
    assert_eq!(ours.public_key, &*spki.subject_public_key.data, "public key");

    if let Some(bc) = extension(&theirs, &OID_X509_EXT_BASIC_CONSTRAINTS) {
        let ca =
            bc.is_some_and(|e| matches!(e.parsed_extension(), ParsedExtension::BasicConstraints(b) if b.ca));
        assert_eq!(ours.is_ca, ca, "basicConstraints cA");
    }
    if let Some(eku) = extension(&theirs, &OID_X509_EXT_EXTENDED_KEY_USAGE) {
        assert_eq!(ours.has_eku, eku.is_some(), "extKeyUsage present");
        let server = eku.is_some_and(
            |e| matches!(e.parsed_extension(), ParsedExtension::ExtendedKeyUsage(k) if k.server_auth),
        );
        assert_eq!(ours.eku_server_auth, server, "extKeyUsage serverAuth");
    }
    if let Some(san) = extension(&theirs, &OID_X509_EXT_SUBJECT_ALT_NAME) {
        let names: &[GeneralName<'_>] = match san.map(X509Extension::parsed_extension) {
            Some(ParsedExtension::SubjectAlternativeName(s)) => &s.general_names,
            _ => &[],
        };
        assert_eq!(ours.san.is_some(), san.is_some(), "SAN present");
        let (mut uris, mut dns) = (Vec::new(), Vec::new());
        for n in names {
            match n {
                GeneralName::URI(u) => uris.push(u.as_bytes()),
                GeneralName::DNSName(d) => dns.push(d.as_bytes()),
                // Not UTF-8: x509-parser keeps the bytes aside; the SDK compares bytes.
                GeneralName::Invalid(t, b) if t.0 == 6 => uris.push(b),
                GeneralName::Invalid(t, b) if t.0 == 2 => dns.push(b),
                _ => {}
            }
        }
        if san.is_some_and(|e| constructed_name(e.value)) {
            return;
        }
        let san = ours.san.unwrap_or_default();
        assert_eq!(x509::uris(san).collect::<Vec<_>>(), uris, "SAN URIs");
        assert_eq!(x509::dns_names(san).collect::<Vec<_>>(), dns, "SAN DNS names");
    }
});
