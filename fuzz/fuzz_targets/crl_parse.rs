//! The broker's CRL loader (PEM or DER, issuer and signature against the device CA, serial
//! table), against x509-parser's parse of the whole CRL: the loader reads the revoked list one
//! entry at a time, and must accept what the whole parse accepts, with the same serials and
//! fields, and nothing else.
//!
//! Two kinds of input:
//! - a CRL file, checked against the device CA in fixtures/ (seeds: CRLs the station signed
//!   with it). Mutations rarely keep the signature, so this mostly drives the refusals.
//! - `TBS:` and the content of a TBSCertList, which the target signs with a CA of its own of the
//!   same name: every shape the fuzzer makes is a CRL that CA signed, the case where the loader
//!   must read every serial x509-parser reads (seeds `tbs-*`: the station's TBSCertLists).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use x509_parser::asn1_rs::{Any, BitString, Sequence, ToDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

const FIXTURE_CA: &[u8] = include_bytes!("../fixtures/device-ca.der");

/// The target's own CA: its certificate's DER and its key.
fn own_ca() -> &'static (Vec<u8>, rcgen::KeyPair) {
    static CA: OnceLock<(Vec<u8>, rcgen::KeyPair)> = OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        // The fixture CA's name, so that the station's TBSCertLists name it as their issuer.
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "Seeds");
        p.distinguished_name.push(rcgen::DnType::CommonName, "Seeds Device Issuing CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let cert = p.self_signed(&key).expect("CA");
        (cert.der().to_vec(), key)
    })
}

/// DER: a SEQUENCE of `content`.
fn der_sequence(content: &[u8]) -> Vec<u8> {
    Sequence::new(content.to_vec().into()).to_der_vec().expect("DER")
}

/// A CRL of the TBSCertList content `tbs`, signed by the target's CA (ECDSA with SHA-256).
fn signed_by_own_ca(tbs: &[u8]) -> Vec<u8> {
    use rcgen::SigningKey;
    const ECDSA_WITH_SHA256: &[u8] = &[0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    let tbs = der_sequence(tbs);
    let signature = own_ca().1.sign(&tbs).expect("sign");
    let signature = BitString::new(0, &signature).to_der_vec().expect("DER");
    der_sequence(&[tbs, ECDSA_WITH_SHA256.to_vec(), signature].concat())
}

fuzz_target!(|data: &[u8]| {
    match data.strip_prefix(b"TBS:") {
        Some(tbs) => check(&signed_by_own_ca(tbs), &own_ca().0),
        None => check(data, FIXTURE_CA),
    }
});

fn check(data: &[u8], ca_der: &[u8]) {
    let loaded = fleet_broker::fuzzing::parse_crl(data, ca_der);
    if let Ok((serials, info)) = &loaded {
        assert_eq!(serials.len(), info.revoked);
        let _ = serials.contains(data.get(..16).unwrap_or(data));
    }
    // The same bytes as DER, parsed whole (only the DER form: PEM decoding is rustls's).
    let Ok((rem, whole)) = CertificateRevocationList::from_der(data) else {
        return;
    };
    // x509-parser ignores bytes after the CRL and after the signature inside the outer
    // SEQUENCE; the loader refuses both (a change no key is needed for), so such input is no
    // reference.
    let exact = rem.is_empty() && {
        let (_, outer) = Any::from_der(data).expect("parsed above");
        let mut rest = outer.data;
        let mut n = 0;
        while let Ok((r, _)) = Any::from_der(rest) {
            rest = r;
            n += 1;
        }
        rest.is_empty() && n == 3
    };
    if !exact {
        assert!(loaded.is_err(), "loaded a CRL with trailing bytes");
        return;
    }
    let (_, ca) = X509Certificate::from_der(ca_der).expect("the CA parses");
    let signed = whole.issuer() == ca.subject() && whole.verify_signature(ca.public_key()).is_ok();
    match &loaded {
        Ok((serials, info)) => {
            assert!(signed, "loaded a CRL the whole parse finds unsigned");
            // Serials over 20 octets (21 with DER's leading zero) are no admitted certificate's.
            for r in whole.iter_revoked_certificates().filter(|r| r.raw_serial().len() <= 21) {
                assert!(serials.contains(r.raw_serial()), "a listed serial was not read");
            }
            assert!(serials.len() <= whole.iter_revoked_certificates().count());
            assert_eq!(info.this_update, whole.last_update().timestamp());
            assert_eq!(info.next_update, whole.next_update().map(|t| t.timestamp()));
            assert_eq!(info.number, whole.crl_number().and_then(|n| u64::try_from(n).ok()));
        }
        Err(e) => assert!(!signed, "refused a signed CRL the whole parse reads: {e:?}"),
    }
}
