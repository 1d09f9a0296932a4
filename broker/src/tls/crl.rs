//! The CRL: loaded only after its issuer and signature verify against the client CA, then kept
//! as a sorted serial table. (webpki's own CRL check re-verifies the CRL signature on every
//! handshake, hashing the whole list: with 100k revoked serials that cut admissions to a fifth.
//! The client CA has pathlen 0 and issues the CRL, so it is authoritative for every certificate
//! the chain check accepts, and a serial lookup is the same verdict.) A CRL with a lower
//! cRLNumber than the loaded one is a replay and never replaces it.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use x509_parser::asn1_rs::{Any, BitString, Sequence, Tag, ToDer};
use x509_parser::oid_registry::OID_X509_EXT_CRL_NUMBER;
use x509_parser::prelude::{
    AlgorithmIdentifier, FromDer, ParsedExtension, RevokedCertificate, TbsCertList, X509Certificate,
};
use x509_parser::verify::verify_signature;

use super::files::{pem_words, read, TlsError, NOT_A_CERT};

/// Facts about the loaded CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// Unix seconds.
    pub this_update: i64,
    /// Unix seconds; `None` if the CRL has no nextUpdate.
    pub next_update: Option<i64>,
    /// Number of revoked serials listed.
    pub revoked: usize,
    /// cRLNumber, if the CRL carries one.
    pub number: Option<u64>,
}

impl CrlInfo {
    /// Past nextUpdate at `now`?
    pub fn expired(&self, now: i64) -> bool {
        self.next_update.is_some_and(|n| now > n)
    }
}

impl std::fmt::Display for CrlInfo {
    /// `CRL #5, 2 revoked, issued 2026-12-06T06:11:46Z, next update 2026-12-13T06:11:46Z`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CRL")?;
        if let Some(n) = self.number {
            write!(f, " #{n}")?;
        }
        write!(f, ", {} revoked, issued {}", self.revoked, rfc3339(self.this_update))?;
        match self.next_update {
            Some(t) => write!(f, ", next update {}", rfc3339(t)),
            None => f.write_str(", no next update"),
        }
    }
}

/// What a file that does not decode as a CRL is called (x509-parser's own message is its
/// parser's `Debug`).
const NOT_A_CRL: &str = "not an X.509 CRL (the DER does not decode)";

/// Unix seconds as `2026-12-06T06:11:46Z`.
pub(crate) fn rfc3339(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (unix seconds)"),
    }
}

/// A serial number as a fixed-size key: length, then up to 21 content bytes (20 octets of value
/// plus DER's leading zero).
type SerialKey = [u8; 22];

fn serial_key(raw: &[u8]) -> Option<SerialKey> {
    let mut k = [0u8; 22];
    if raw.len() > 21 {
        return None;
    }
    k[0] = raw.len() as u8;
    k[1..=raw.len()].copy_from_slice(raw);
    Some(k)
}

/// The serials a verified CRL lists, sorted for binary search.
#[derive(Debug, Default)]
pub struct RevokedSerials(Vec<SerialKey>);

impl RevokedSerials {
    /// True if `raw_serial` (DER INTEGER content bytes) is listed.
    pub fn contains(&self, raw_serial: &[u8]) -> bool {
        serial_key(raw_serial).is_some_and(|k| self.0.binary_search(&k).is_ok())
    }

    /// Number of serials.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads a CRL (PEM or DER), checks its signature against `ca_der` and returns its serials.
pub(crate) fn load_crl(path: &Path, ca_der: &[u8]) -> Result<(RevokedSerials, CrlInfo), TlsError> {
    let bytes = read(path)?;
    parse_crl(&bytes, ca_der).map_err(|e| match e {
        CrlError::Signature => TlsError::CrlSignature(path.to_path_buf()),
        CrlError::Parse(msg) => TlsError::Parse(path.to_path_buf(), msg),
    })
}

/// Why CRL bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrlError {
    /// Not a readable CRL (or the CA is not a readable certificate).
    Parse(String),
    /// Not issued and signed by the CA.
    Signature,
}

/// `load_crl` on bytes: PEM or DER, issuer and signature checked against `ca_der`.
///
/// The revoked list is read one entry at a time and only its serials are kept: parsed whole,
/// a CRL of a million serials took 700 MB at its peak and left the broker 500 MB larger
/// (x509-parser builds every entry, with a big integer and an extension list, at once).
pub fn parse_crl(bytes: &[u8], ca_der: &[u8]) -> Result<(RevokedSerials, CrlInfo), CrlError> {
    let der = if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
        CertificateRevocationListDer::from_pem_slice(bytes)
            .map_err(|e| CrlError::Parse(format!("CRL: {}", pem_words(&e))))?
    } else {
        CertificateRevocationListDer::from(bytes.to_vec())
    };
    let not_a_crl = || CrlError::Parse(NOT_A_CRL.into());
    let signed = Signed::split(&der).ok_or_else(not_a_crl)?;
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|_| CrlError::Parse(NOT_A_CERT.into()))?;
    // The signature first, over the TBSCertList as signed: of a file the CA did not sign nothing
    // is parsed past the three outer elements (x509-parser builds every name attribute and
    // extension it reads, at 20 to 50 times their encoded size).
    if verify_signature(ca.public_key(), &signed.algorithm, &signed.value, signed.tbs).is_err() {
        return Err(CrlError::Signature);
    }
    let (tbs, list) = TbsParts::split(signed.tbs).ok_or_else(not_a_crl)?;
    // The fields but the list, as x509-parser reads them.
    let fields = tbs.without_list().ok_or_else(not_a_crl)?;
    let (_, tbs) = TbsCertList::from_der(&fields).map_err(|_| not_a_crl())?;
    if tbs.issuer != *ca.subject() {
        return Err(CrlError::Signature);
    }
    // Whatever x509-parser reads as the list must be what the split took out: a list it finds
    // in the rest means the split and x509-parser disagree on this CRL's shape.
    if !tbs.revoked_certificates.is_empty() {
        return Err(not_a_crl());
    }
    let mut serials = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        let (after, entry) = RevokedCertificate::from_der(rest).map_err(|_| not_a_crl())?;
        // A serial over 20 octets is no certificate's the broker admits (identification refuses
        // it), so it is passed over; refusing the whole CRL for it would keep every other
        // revocation the CRL brings out.
        serials.extend(serial_key(entry.raw_serial()));
        rest = after;
    }
    serials.sort_unstable();
    serials.dedup();
    serials.shrink_to_fit();
    // The first cRLNumber extension, as x509-parser's `crl_number` finds it.
    let number = tbs.find_extension(&OID_X509_EXT_CRL_NUMBER).and_then(|e| match e.parsed_extension() {
        ParsedExtension::CRLNumber(n) => u64::try_from(n).ok(),
        _ => None,
    });
    let info = CrlInfo {
        this_update: tbs.this_update.timestamp(),
        next_update: tbs.next_update.map(|t| t.timestamp()),
        revoked: serials.len(),
        number,
    };
    Ok((RevokedSerials(serials), info))
}

/// A CRL's three parts: `SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue }`.
struct Signed<'a> {
    /// The TBSCertList as signed, header included.
    tbs: &'a [u8],
    algorithm: AlgorithmIdentifier<'a>,
    value: BitString<'a>,
}

impl<'a> Signed<'a> {
    fn split(der: &'a [u8]) -> Option<Self> {
        let (rest, outer) = Any::from_der(der).ok()?;
        if !rest.is_empty() || outer.tag() != Tag::Sequence {
            return None;
        }
        let (after_tbs, tbs) = Any::from_der(outer.data).ok()?;
        if tbs.tag() != Tag::Sequence {
            return None;
        }
        let tbs = &outer.data[..outer.data.len() - after_tbs.len()];
        let (after_alg, algorithm) = AlgorithmIdentifier::from_der(after_tbs).ok()?;
        let (end, value) = BitString::from_der(after_alg).ok()?;
        end.is_empty().then_some(Self { tbs, algorithm, value })
    }
}

/// A TBSCertList's content split around its `revokedCertificates` list.
struct TbsParts<'a> {
    /// The elements before the list (version, signature, issuer, thisUpdate, nextUpdate).
    before: &'a [u8],
    /// The elements after it (crlExtensions).
    after: &'a [u8],
}

impl<'a> TbsParts<'a> {
    /// The parts, and the list's content (empty when the CRL lists nothing).
    fn split(tbs: &'a [u8]) -> Option<(Self, &'a [u8])> {
        let (_, tbs) = Any::from_der(tbs).ok()?;
        let content = tbs.data;
        // The elements up to and including thisUpdate, then nextUpdate if there is one.
        let mut rest = content;
        loop {
            let (after, any) = Any::from_der(rest).ok()?;
            rest = after;
            if is_time(&any) {
                break;
            }
        }
        if let Ok((after, any)) = Any::from_der(rest) {
            if is_time(&any) {
                rest = after;
            }
        }
        let before = &content[..content.len() - rest.len()];
        match Any::from_der(rest) {
            // x509-parser takes any element of tag number 16 here as the list, whatever its class.
            Ok((after, list)) if list.tag() == Tag::Sequence => Some((Self { before, after }, list.data)),
            _ => Some((Self { before, after: rest }, &[])),
        }
    }

    /// The TBSCertList without its list, re-encoded as a DER SEQUENCE.
    fn without_list(&self) -> Option<Vec<u8>> {
        let content = [self.before, self.after].concat();
        Sequence::new(content.into()).to_der_vec().ok()
    }
}

/// UTCTime or GeneralizedTime, the types of thisUpdate and nextUpdate (by tag number, whatever
/// the class, as x509-parser reads them).
fn is_time(any: &Any<'_>) -> bool {
    any.tag() == Tag::UtcTime || any.tag() == Tag::GeneralizedTime
}

/// True if `offered` would replace `loaded` with a lower-numbered CRL (a replay of an old,
/// validly signed CRL that may predate revocations). Neither a CRL without a number nor no CRL
/// at all (the file deleted) ever replaces a numbered one.
pub(crate) fn crl_replayed(loaded: Option<&CrlInfo>, offered: Option<&CrlInfo>) -> bool {
    match (loaded.and_then(|c| c.number), offered) {
        (Some(have), Some(new)) => new.number.is_none_or(|n| n < have),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_serial_table_matches_exact_der_content() {
        let keys = [&[0x01u8][..], &[0x00, 0x80, 0x01], &[0x7f; 20], &[0x00; 21]];
        let mut v: Vec<_> = keys.iter().filter_map(|k| serial_key(k)).collect();
        v.sort_unstable();
        let t = RevokedSerials(v);
        assert_eq!(t.len(), 4);
        for k in keys {
            assert!(t.contains(k), "{k:02x?}");
        }
        // Same value bytes, different length or position: not the same serial.
        assert!(!t.contains(&[0x80, 0x01]));
        assert!(!t.contains(&[0x01, 0x00]));
        assert!(!t.contains(&[0x7f; 19]));
        // Longer than any valid serial: never listed, never a panic.
        assert!(serial_key(&[0u8; 22]).is_none());
        assert!(!t.contains(&[0u8; 22]));
    }
}
