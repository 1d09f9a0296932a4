//! Just enough X.509 (RFC 5280) DER to verify a broker certificate, without allocation.
//!
//! Every read is bounds-checked; anything unexpected is `Malformed`, never a panic. Only the
//! fields the verifier needs are extracted; unknown *critical* extensions make the certificate
//! unusable, as RFC 5280 §4.2 requires.

/// Why a certificate could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum X509Error {
    /// Not valid DER / not the expected structure.
    Malformed(&'static str),
    /// An extension marked critical that this verifier does not understand.
    UnknownCriticalExtension,
}

/// One DER element.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u8,
    pub(crate) value: &'a [u8],
    /// The whole element, header included.
    pub(crate) raw: &'a [u8],
}

/// Reads one element; returns it and the rest.
pub(crate) fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), X509Error> {
    let tag = *input.first().ok_or(X509Error::Malformed("truncated"))?;
    if tag & 0x1f == 0x1f {
        return Err(X509Error::Malformed("high tag number"));
    }
    let first = *input.get(1).ok_or(X509Error::Malformed("truncated length"))?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 {
            return Err(X509Error::Malformed("unsupported length"));
        }
        let bytes = input.get(2..2 + n).ok_or(X509Error::Malformed("truncated length"))?;
        if bytes[0] == 0 {
            return Err(X509Error::Malformed("non-minimal length"));
        }
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), 2 + n)
    };
    let end = header.checked_add(len).ok_or(X509Error::Malformed("length overflow"))?;
    let raw = input.get(..end).ok_or(X509Error::Malformed("truncated value"))?;
    Ok((Tlv { tag, value: &raw[header..], raw }, &input[end..]))
}

fn expect<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<(Tlv<'a>, &'a [u8]), X509Error> {
    let (t, rest) = read_tlv(input)?;
    if t.tag == tag {
        Ok((t, rest))
    } else {
        Err(X509Error::Malformed(what))
    }
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;

/// OIDs (DER content bytes).
pub(crate) mod oid {
    pub(crate) const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    pub(crate) const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    pub(crate) const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub(crate) const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    pub(crate) const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
    pub(crate) const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
    pub(crate) const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    pub(crate) const SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
    pub(crate) const AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
    pub(crate) const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
}

/// The parts of a certificate the verifier looks at, borrowed from its DER.
#[derive(Debug, Clone, Copy)]
pub struct Certificate<'a> {
    /// The signed bytes (tbsCertificate, whole element).
    pub tbs: &'a [u8],
    /// serialNumber, the INTEGER's content bytes as encoded (big-endian, sign byte kept).
    pub serial: &'a [u8],
    /// Signature algorithm OID.
    pub signature_algorithm: &'a [u8],
    /// Signature value (BIT STRING content without the unused-bits byte).
    pub signature: &'a [u8],
    /// Issuer name, whole element (compared byte for byte with the CA's subject).
    pub issuer: &'a [u8],
    /// Subject name, whole element.
    pub subject: &'a [u8],
    /// Validity start, unix seconds.
    pub not_before: i64,
    /// Validity end, unix seconds.
    pub not_after: i64,
    /// Public key algorithm OID.
    pub key_algorithm: &'a [u8],
    /// Named curve OID, if any.
    pub key_curve: Option<&'a [u8]>,
    /// Public key bits (SEC1 point for EC keys).
    pub public_key: &'a [u8],
    /// basicConstraints cA.
    pub is_ca: bool,
    /// An extendedKeyUsage extension is present.
    pub has_eku: bool,
    /// It includes serverAuth.
    pub eku_server_auth: bool,
    /// subjectAltName GeneralNames content, if present.
    pub san: Option<&'a [u8]>,
}

/// Parses a DER certificate.
pub fn parse(der: &[u8]) -> Result<Certificate<'_>, X509Error> {
    let (cert, rest) = expect(der, SEQUENCE, "certificate")?;
    if !rest.is_empty() {
        return Err(X509Error::Malformed("trailing bytes"));
    }
    let (tbs, r) = expect(cert.value, SEQUENCE, "tbsCertificate")?;
    let (alg, r) = expect(r, SEQUENCE, "signatureAlgorithm")?;
    let (sig, r) = expect(r, BIT_STRING, "signature")?;
    if !r.is_empty() {
        return Err(X509Error::Malformed("certificate fields"));
    }
    let (sig_oid, _) = expect(alg.value, OID, "algorithm OID")?;
    let signature = match sig.value.split_first() {
        Some((0, s)) => s,
        _ => return Err(X509Error::Malformed("signature bit string")),
    };

    // tbsCertificate: [0] version, serial, signature, issuer, validity, subject, spki, ..., [3] ext
    let mut r = tbs.value;
    let (first, rest) = read_tlv(r)?;
    if first.tag == 0xa0 {
        r = rest;
    }
    let (serial, r) = expect(r, 0x02, "serial")?;
    let (_sig_alg, r) = expect(r, SEQUENCE, "tbs signature")?;
    let (issuer, r) = expect(r, SEQUENCE, "issuer")?;
    let (validity, r) = expect(r, SEQUENCE, "validity")?;
    let (subject, r) = expect(r, SEQUENCE, "subject")?;
    let (spki, mut r) = expect(r, SEQUENCE, "subjectPublicKeyInfo")?;
    let (nb, vr) = read_tlv(validity.value)?;
    let (na, _) = read_tlv(vr)?;
    let (key_alg, kr) = expect(spki.value, SEQUENCE, "key algorithm")?;
    let (key_bits, _) = expect(kr, BIT_STRING, "public key")?;
    let (key_oid, cr) = expect(key_alg.value, OID, "key algorithm OID")?;
    // Parameters: absent, or one element that must be readable (an OID names the curve).
    let key_curve = match cr {
        [] => None,
        _ => Some(read_tlv(cr)?.0).filter(|t| t.tag == OID).map(|t| t.value),
    };
    let public_key = match key_bits.value.split_first() {
        Some((0, k)) => k,
        _ => return Err(X509Error::Malformed("public key bit string")),
    };

    let mut out = Certificate {
        tbs: tbs.raw,
        serial: serial.value,
        signature_algorithm: sig_oid.value,
        signature,
        issuer: issuer.raw,
        subject: subject.raw,
        not_before: parse_time(nb)?,
        not_after: parse_time(na)?,
        key_algorithm: key_oid.value,
        key_curve,
        public_key,
        is_ca: false,
        has_eku: false,
        eku_server_auth: false,
        san: None,
    };
    // Then only issuerUniqueID [1], subjectUniqueID [2] (both unused here) and extensions [3].
    while !r.is_empty() {
        let (t, rest) = read_tlv(r)?;
        r = rest;
        match t.tag {
            0x81 | 0x82 => {}
            0xa3 => {
                let (exts, _) = expect(t.value, SEQUENCE, "extensions")?;
                parse_extensions(exts.value, &mut out)?;
            }
            _ => return Err(X509Error::Malformed("tbsCertificate field")),
        }
    }
    Ok(out)
}

fn parse_extensions<'a>(mut r: &'a [u8], out: &mut Certificate<'a>) -> Result<(), X509Error> {
    while !r.is_empty() {
        let (ext, rest) = expect(r, SEQUENCE, "extension")?;
        r = rest;
        let (id, er) = expect(ext.value, OID, "extension id")?;
        let (mut next, mut er2) = read_tlv(er)?;
        let mut critical = false;
        if next.tag == BOOLEAN {
            critical = der_bool(next)?;
            (next, er2) = read_tlv(er2)?;
        }
        let _ = er2;
        if next.tag != OCTET_STRING {
            return Err(X509Error::Malformed("extension value"));
        }
        let v = next.value;
        match id.value {
            oid::BASIC_CONSTRAINTS => {
                let (seq, _) = expect(v, SEQUENCE, "basicConstraints")?;
                // SEQUENCE { cA BOOLEAN DEFAULT FALSE, pathLenConstraint INTEGER OPTIONAL }
                out.is_ca = match seq.value {
                    [] => false,
                    v => match read_tlv(v)? {
                        (b, _) if b.tag == BOOLEAN => der_bool(b)?,
                        (n, _) if n.tag == 0x02 => false,
                        _ => return Err(X509Error::Malformed("basicConstraints")),
                    },
                };
            }
            oid::EXT_KEY_USAGE => {
                let (seq, _) = expect(v, SEQUENCE, "extKeyUsage")?;
                out.has_eku = true;
                let mut p = seq.value;
                while !p.is_empty() {
                    let (o, rest) = expect(p, OID, "key purpose")?;
                    p = rest;
                    out.eku_server_auth |= o.value == oid::SERVER_AUTH;
                }
            }
            oid::SUBJECT_ALT_NAME => {
                let (seq, _) = expect(v, SEQUENCE, "subjectAltName")?;
                out.san = Some(seq.value);
            }
            oid::KEY_USAGE | oid::SUBJECT_KEY_ID | oid::AUTHORITY_KEY_ID => {}
            _ if critical => return Err(X509Error::UnknownCriticalExtension),
            _ => {}
        }
    }
    Ok(())
}

/// A DER BOOLEAN: one byte, 0x00 or 0xff. BER's "any non-zero byte is true" is refused: a
/// reader that took 0x01 as false would ignore a critical flag or a cA another reader honours.
fn der_bool(t: Tlv<'_>) -> Result<bool, X509Error> {
    match t.value {
        [0x00] => Ok(false),
        [0xff] => Ok(true),
        _ => Err(X509Error::Malformed("boolean")),
    }
}

/// Iterates the dNSName entries of a SAN.
pub fn dns_names<'a>(san: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    general_names(san, 0x82)
}

/// Iterates the uniformResourceIdentifier entries of a SAN.
pub fn uris<'a>(san: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    general_names(san, 0x86)
}

fn general_names(san: &[u8], tag: u8) -> impl Iterator<Item = &[u8]> {
    let mut r = san;
    core::iter::from_fn(move || loop {
        let (t, rest) = read_tlv(r).ok()?;
        r = rest;
        if t.tag == tag {
            return Some(t.value);
        }
    })
}

fn digits(b: &[u8]) -> Result<i64, X509Error> {
    b.iter().try_fold(0i64, |acc, c| {
        if c.is_ascii_digit() {
            Ok(acc * 10 + i64::from(c - b'0'))
        } else {
            Err(X509Error::Malformed("time digits"))
        }
    })
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) to unix seconds.
fn parse_time(t: Tlv<'_>) -> Result<i64, X509Error> {
    let (year, rest) = match (t.tag, t.value.len()) {
        (0x17, 13) => {
            let yy = digits(&t.value[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &t.value[2..])
        }
        (0x18, 15) => (digits(&t.value[..4])?, &t.value[4..]),
        _ => return Err(X509Error::Malformed("time")),
    };
    if rest[10] != b'Z' {
        return Err(X509Error::Malformed("time zone"));
    }
    let (mo, d, h, mi, s) = (
        digits(&rest[0..2])?,
        digits(&rest[2..4])?,
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(X509Error::Malformed("time fields"));
    }
    // Days from civil (H. Hinnant), proleptic Gregorian.
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + h * 3600 + mi * 60 + s)
}

impl core::fmt::Display for X509Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Malformed(what) => write!(f, "malformed certificate ({what})"),
            Self::UnknownCriticalExtension => f.write_str("certificate has an unknown critical extension"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = |tag, s: &str| parse_time(Tlv { tag, value: s.as_bytes(), raw: &[] });
        assert_eq!(t(0x17, "700101000000Z"), Ok(0));
        assert_eq!(t(0x17, "261122213000Z"), Ok(1_795_383_000));
        assert_eq!(t(0x18, "20500101000000Z"), Ok(2_524_608_000));
        assert_eq!(t(0x18, "20000229235959Z"), Ok(951_868_799));
        assert!(t(0x17, "2611222130Z").is_err());
        assert!(t(0x17, "261322213000Z").is_err());
        assert!(t(0x17, "26112221300+Z").is_err());
    }

    /// Found by the x509_parse fuzz target against x509-parser: `cA` encoded 0xbf read as
    /// false here and true there. Only DER's 0x00 and 0xff are booleans, in cA and in the
    /// critical flag alike.
    #[test]
    fn booleans_are_der_or_malformed() {
        let b = |v: &'static [u8]| der_bool(Tlv { tag: BOOLEAN, value: v, raw: &[] });
        assert_eq!((b(&[0xff]), b(&[0x00])), (Ok(true), Ok(false)));
        for bad in [&[0x01][..], &[0xbf], &[], &[0xff, 0xff]] {
            assert_eq!(b(bad), Err(X509Error::Malformed("boolean")), "{bad:?}");
        }
        let mut cert = Certificate {
            tbs: &[],
            serial: &[],
            signature_algorithm: &[],
            signature: &[],
            issuer: &[],
            subject: &[],
            not_before: 0,
            not_after: 0,
            key_algorithm: &[],
            key_curve: None,
            public_key: &[],
            is_ca: false,
            has_eku: false,
            eku_server_auth: false,
            san: None,
        };
        // An unknown extension marked critical with 0x01: refused, not taken as non-critical.
        let ext = [0x30, 0x0b, 0x06, 0x03, 0x2a, 0x03, 0x04, 0x01, 0x01, 0x01, 0x04, 0x01, 0x00];
        assert_eq!(parse_extensions(&ext, &mut cert), Err(X509Error::Malformed("boolean")));
        // basicConstraints with cA encoded 0xbf.
        let bc = [0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x04, 0x05, 0x30, 0x03, 0x01, 0x01, 0xbf];
        assert_eq!(parse_extensions(&bc, &mut cert), Err(X509Error::Malformed("boolean")));
        let bc = [0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x04, 0x05, 0x30, 0x03, 0x01, 0x01, 0xff];
        assert_eq!(parse_extensions(&bc, &mut cert), Ok(()));
        assert!(cert.is_ca);
        // cA as a constructed BOOLEAN (0x21): read as true by x509-parser, refused here.
        let bc = [0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x04, 0x05, 0x30, 0x03, 0x21, 0x01, 0xff];
        assert_eq!(parse_extensions(&bc, &mut cert), Err(X509Error::Malformed("basicConstraints")));
    }

    /// Found by x509_parse against x509-parser: the key's parameters `06 81 00` (a long-form
    /// length of zero, not DER) read as "no curve" here and an empty OID there. Unreadable
    /// parameters now make the certificate malformed.
    #[test]
    fn unreadable_key_parameters_are_malformed() {
        let der = include_bytes!("../../tests/data/x509/curve-length-non-minimal.der");
        assert_eq!(parse(der).map(|c| c.key_curve), Err(X509Error::Malformed("non-minimal length")));
    }

    #[test]
    fn tlv_bounds() {
        assert!(read_tlv(&[]).is_err());
        assert!(read_tlv(&[0x30]).is_err());
        assert!(read_tlv(&[0x30, 0x05, 1, 2]).is_err());
        assert!(read_tlv(&[0x30, 0x80]).is_err());
        assert!(read_tlv(&[0x30, 0x84, 0, 0, 0, 1]).is_err());
        assert!(read_tlv(&[0x30, 0x81, 0x00]).is_err());
        assert!(read_tlv(&[0x1f, 0x01, 0x00]).is_err());
        let (t, rest) = read_tlv(&[0x04, 0x02, 9, 8, 7]).unwrap();
        assert_eq!((t.tag, t.value, rest), (4, &[9u8, 8][..], &[7u8][..]));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 42u64;
        for _ in 0..50_000 {
            let mut buf = [0u8; 48];
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (seed >> 56) as u8;
            }
            buf[0] = 0x30;
            let _ = parse(&buf);
        }
    }
}
