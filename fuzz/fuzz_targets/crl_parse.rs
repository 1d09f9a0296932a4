//! The broker's CRL loader (PEM or DER, issuer and signature against the device CA, serial
//! table), against x509-parser's parse of the whole CRL: the loader reads the revoked list one
//! entry at a time, and must accept what the whole parse accepts, with the same serials and
//! fields, and nothing else. Seeds are CRLs the station signed with the CA in fixtures/.
#![no_main]
use libfuzzer_sys::fuzz_target;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

const CA: &[u8] = include_bytes!("../fixtures/device-ca.der");

fuzz_target!(|data: &[u8]| {
    let loaded = fleet_broker::fuzzing::parse_crl(data, CA);
    if let Ok((serials, info)) = &loaded {
        assert_eq!(serials.len(), info.revoked);
        let _ = serials.contains(data.get(..16).unwrap_or(data));
    }
    // The same bytes as DER, parsed whole (only the DER form: PEM decoding is rustls's).
    let Ok((_, whole)) = CertificateRevocationList::from_der(data) else {
        return;
    };
    let (_, ca) = X509Certificate::from_der(CA).expect("the fixture CA parses");
    let signed = whole.issuer() == ca.subject() && whole.verify_signature(ca.public_key()).is_ok();
    let short = whole.iter_revoked_certificates().all(|r| r.raw_serial().len() <= 21);
    match &loaded {
        Ok((serials, info)) => {
            assert!(signed, "loaded a CRL the whole parse finds unsigned");
            for r in whole.iter_revoked_certificates() {
                assert!(serials.contains(r.raw_serial()), "a listed serial was not read");
            }
            assert!(serials.len() <= whole.iter_revoked_certificates().count());
            assert_eq!(info.this_update, whole.last_update().timestamp());
            assert_eq!(info.next_update, whole.next_update().map(|t| t.timestamp()));
            assert_eq!(info.number, whole.crl_number().and_then(|n| u64::try_from(n).ok()));
        }
        Err(e) => assert!(!(signed && short), "refused a signed CRL the whole parse reads: {e:?}"),
    }
});
