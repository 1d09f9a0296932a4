//! Certificate profiles: the CA hierarchy, device/service/server leaves, CSR checks and CRLs.
//!
//! The profile is specified in `docs/spec/certificate-profile.md`. Three authorities: a root CA
//! (path length 1) signs a device issuing CA and a server CA (path length 0 each). The device CA
//! signs device and service client certificates and the CRL; the server CA signs broker
//! certificates only, so a device that pins the server CA can never be fooled by a certificate
//! made with a device key or by the device CA. All keys are P-256 ECDSA.

use std::net::IpAddr;

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    RevokedCertParams, SanType, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::prelude::{parse_x509_certificate, FromDer, ParsedExtension, X509CertificationRequest};

use crate::error::{Error, Result};
use crate::ids::{DeviceId, RevocationReason, Role, SerialNumber};

/// Lifetimes of what the station issues.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// Root CA.
    pub root: Duration,
    /// Device issuing CA and server CA.
    pub intermediate: Duration,
    /// Device and service certificates.
    pub client: Duration,
    /// Broker certificates.
    pub server: Duration,
    /// CRL nextUpdate - thisUpdate.
    pub crl: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            root: Duration::days(20 * 365),
            intermediate: Duration::days(10 * 365),
            client: Duration::days(5 * 365),
            server: Duration::days(397),
            crl: Duration::days(7),
        }
    }
}

/// Allowance for clocks behind the station's.
const BACKDATE: Duration = Duration::minutes(5);

/// A fresh P-256 key pair.
#[derive(Debug)]
pub struct DeviceKey {
    /// For signing with rcgen / serialising as PKCS#8.
    pub key_pair: KeyPair,
    /// SEC1 `ECPrivateKey` DER, the form the device SDK and embedded-tls take.
    pub sec1_der: Vec<u8>,
}

impl DeviceKey {
    /// Generates a key (ring) and derives its SEC1 form (p256).
    pub fn generate() -> Result<Self> {
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let sk =
            <p256::SecretKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_der(key_pair.serialized_der())
                .map_err(|e| Error::InvalidInput(format!("generated key does not parse: {e}")))?;
        Ok(Self { sec1_der: sec1_with_curve(&sk), key_pair })
    }

    /// SEC1 PEM (`BEGIN EC PRIVATE KEY`).
    pub fn sec1_pem(&self) -> String {
        pem_encode("EC PRIVATE KEY", &self.sec1_der)
    }
}

/// RFC 5915 `ECPrivateKey` with the named curve included (OpenSSL needs it in a standalone
/// key file; `p256`'s own encoder leaves it out):
/// `SEQUENCE { 1, OCTET STRING d, [0] prime256v1, [1] BIT STRING 04||X||Y }`, 121 bytes.
fn sec1_with_curve(sk: &p256::SecretKey) -> Vec<u8> {
    let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
    let mut der = Vec::with_capacity(121);
    der.extend_from_slice(&[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]);
    der.extend_from_slice(&sk.to_bytes());
    der.extend_from_slice(&[0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
    der.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
    der.extend_from_slice(point.as_bytes());
    der
}

/// PEM-encodes DER under a label.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII.
        let _ = writeln!(out, "{}", String::from_utf8_lossy(chunk));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn dn(org: &str, cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, org);
    d.push(DnType::CommonName, cn);
    d
}

fn base_params(org: &str, cn: &str, now: OffsetDateTime, life: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(org, cn);
    p.not_before = now - BACKDATE;
    p.not_after = now + life;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(SerialNumber::random().as_bytes()));
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.use_authority_key_identifier_extension = true;
    p
}

fn ca_params(org: &str, cn: &str, now: OffsetDateTime, life: Duration, path_len: u8) -> CertificateParams {
    let mut p = base_params(org, cn, now, life);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// A CA certificate and its key, as generated by `init`.
#[derive(Debug)]
pub struct GeneratedCa {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// PKCS#8 private key PEM.
    pub key_pem: String,
}

/// The three authorities made by `init`.
#[derive(Debug)]
pub struct Hierarchy {
    /// Root CA (keep its key offline).
    pub root: GeneratedCa,
    /// Signs device and service certificates and the CRL.
    pub device_ca: GeneratedCa,
    /// Signs broker certificates only.
    pub server_ca: GeneratedCa,
}

/// Creates root, device issuing and server CAs for `org`.
pub fn create_hierarchy(org: &str, life: &Lifetimes, now: OffsetDateTime) -> Result<Hierarchy> {
    if org.trim().is_empty() {
        return Err(Error::InvalidInput("--org must not be empty".into()));
    }
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let root_params = ca_params(org, &format!("{org} Root CA"), now, life.root, 1);
    let root_cert = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::from_params(&root_params, &root_key);
    let sub = |cn: String| -> Result<GeneratedCa> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(org, &cn, now, life.intermediate, 0).signed_by(&key, &root_issuer)?;
        Ok(GeneratedCa { cert_pem: cert.pem(), cert_der: cert.der().to_vec(), key_pem: key.serialize_pem() })
    };
    let device_ca = sub(format!("{org} Device Issuing CA"))?;
    let server_ca = sub(format!("{org} Server CA"))?;
    Ok(Hierarchy {
        root: GeneratedCa {
            cert_pem: root_cert.pem(),
            cert_der: root_cert.der().to_vec(),
            key_pem: root_key.serialize_pem(),
        },
        device_ca,
        server_ca,
    })
}

/// A loaded CA able to sign: its certificate and key.
#[derive(Debug)]
pub struct LoadedCa {
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// Certificate PEM.
    pub cert_pem: String,
    /// Organisation name from the subject.
    pub org: String,
    issuer: Issuer<'static, KeyPair>,
}

impl LoadedCa {
    /// Loads a CA from its certificate PEM and PKCS#8 key PEM; checks they belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> std::result::Result<Self, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("private key unreadable: {e}"))?;
        let der = pem_decode(cert_pem, "CERTIFICATE").ok_or("certificate PEM unreadable")?;
        let (_, x509) = parse_x509_certificate(&der).map_err(|e| format!("certificate unreadable: {e}"))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err("private key does not match the certificate".into());
        }
        let org = x509
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .map_err(|e| format!("not usable as an issuer: {e}"))?;
        Ok(Self { cert_der: der, cert_pem: cert_pem.to_owned(), org, issuer })
    }
}

/// Decodes the first PEM block with `label`.
pub fn pem_decode(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    base64_decode(&text[start..stop])
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// An issued leaf certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Serial number.
    pub serial: SerialNumber,
    /// DER.
    pub der: Vec<u8>,
    /// PEM.
    pub pem: String,
    /// Validity start (unix seconds).
    pub not_before: i64,
    /// Validity end (unix seconds).
    pub not_after: i64,
}

/// Issues a device or service client certificate for `public_key`.
pub fn issue_client(
    ca: &LoadedCa,
    id: &DeviceId,
    role: Role,
    public_key: &impl PublicKeyData,
    life: Duration,
    now: OffsetDateTime,
    serial: SerialNumber,
) -> Result<IssuedCert> {
    let mut p = base_params(&ca.org, id.as_str(), now, life);
    if role == Role::Service {
        p.distinguished_name.push(DnType::OrganizationalUnitName, "service");
    }
    p.serial_number = Some(rcgen::SerialNumber::from_slice(serial.as_bytes()));
    p.subject_alt_names =
        vec![SanType::URI(id.uri(role).try_into().map_err(|_| Error::InvalidDeviceId(id.to_string()))?)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    finish(p, public_key, &ca.issuer, serial)
}

/// Issues a broker certificate (EKU serverAuth) for DNS names and IP addresses.
pub fn issue_server(
    ca: &LoadedCa,
    dns: &[String],
    ips: &[IpAddr],
    key: &KeyPair,
    life: Duration,
    now: OffsetDateTime,
) -> Result<IssuedCert> {
    let cn = dns.first().map(String::as_str).unwrap_or("fleetgate broker");
    let mut p = base_params(&ca.org, cn, now, life);
    for d in dns {
        let name =
            d.as_str().try_into().map_err(|_| Error::InvalidInput(format!("invalid DNS name `{d}`")))?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    p.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    if p.subject_alt_names.is_empty() {
        return Err(Error::InvalidInput("a server certificate needs at least one --dns or --ip".into()));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serial = SerialNumber::random();
    finish(p, key, &ca.issuer, serial)
}

fn finish(
    p: CertificateParams,
    public_key: &impl PublicKeyData,
    issuer: &Issuer<'_, KeyPair>,
    serial: SerialNumber,
) -> Result<IssuedCert> {
    let not_before = p.not_before.unix_timestamp();
    let not_after = p.not_after.unix_timestamp();
    let cert = p.signed_by(public_key, issuer)?;
    Ok(IssuedCert { serial, der: cert.der().to_vec(), pem: cert.pem(), not_before, not_after })
}

/// A CSR that passed the device profile: its public key and the id it asks for.
#[derive(Debug)]
pub struct CheckedCsr {
    /// The requested subject CN, if any.
    pub common_name: Option<String>,
    /// The public key to certify.
    pub public_key: rcgen::SubjectPublicKeyInfo,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// Parses a CSR (PEM or DER), verifies its signature and enforces the device profile:
/// P-256 ECDSA key, no CA request, no EKU other than clientAuth.
pub fn check_csr(input: &[u8]) -> Result<CheckedCsr> {
    let der = match std::str::from_utf8(input) {
        Ok(text) if text.contains("-----BEGIN") => pem_decode(text, "CERTIFICATE REQUEST")
            .or_else(|| pem_decode(text, "NEW CERTIFICATE REQUEST"))
            .ok_or_else(|| Error::CsrUnreadable("no CERTIFICATE REQUEST PEM block".into()))?,
        _ => input.to_vec(),
    };
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::CsrUnreadable(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::CsrUnreadable("trailing bytes after the request".into()));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    if alg != OID_EC_PUBLIC_KEY {
        let what = if alg == "1.2.840.113549.1.1.1" {
            "an RSA key".to_owned()
        } else {
            format!("key algorithm {alg}")
        };
        return Err(Error::CsrProfile(format!("{what}; devices must use P-256 ECDSA keys")));
    }
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
    if curve.as_deref() != Some(OID_P256) {
        return Err(Error::CsrProfile(format!(
            "EC curve {}; devices must use P-256 (prime256v1)",
            curve.unwrap_or_else(|| "unspecified".into())
        )));
    }
    csr.verify_signature().map_err(|_| Error::CsrBadSignature)?;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(Error::CsrProfile(
                        "requests CA:TRUE; device certificates are never CAs".into(),
                    ))
                }
                ParsedExtension::ExtendedKeyUsage(eku)
                    if eku.server_auth || eku.any || !eku.other.is_empty() || eku.code_signing =>
                {
                    return Err(Error::CsrProfile(
                        "requests an extended key usage other than clientAuth".into(),
                    ))
                }
                _ => {}
            }
        }
    }
    let common_name =
        info.subject.iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| Error::CsrUnreadable(format!("public key: {e}")))?;
    Ok(CheckedCsr { common_name, public_key })
}

/// One entry of a CRL.
#[derive(Debug, Clone)]
pub struct RevokedEntry {
    /// Serial of the revoked certificate.
    pub serial: SerialNumber,
    /// When (unix seconds).
    pub revoked_at: i64,
    /// Why.
    pub reason: RevocationReason,
}

/// Signs an X.509 v2 CRL with the device CA.
pub fn sign_crl(
    ca: &LoadedCa,
    number: u64,
    entries: &[RevokedEntry],
    now: OffsetDateTime,
    life: Duration,
) -> Result<rcgen::CertificateRevocationList> {
    let revoked_certs = entries
        .iter()
        .map(|e| RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(e.serial.as_bytes()),
            revocation_time: OffsetDateTime::from_unix_timestamp(e.revoked_at).unwrap_or(now),
            reason_code: Some(e.reason.to_rcgen()),
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now - BACKDATE,
        next_update: now + life,
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&ca.issuer)?)
}

/// What the station reads back from a certificate it issued.
#[derive(Debug, Clone)]
pub struct CertSummary {
    /// Serial.
    pub serial: SerialNumber,
    /// The SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
}

/// Reads the serial and public key of a DER certificate.
pub fn summarize(der: &[u8]) -> Result<CertSummary> {
    let (_, x509) = parse_x509_certificate(der)
        .map_err(|e| Error::CorruptRegistry(format!("stored certificate: {e}")))?;
    let serial = SerialNumber::from_bytes(x509.raw_serial())
        .ok_or_else(|| Error::CorruptRegistry("certificate serial is zero".into()))?;
    Ok(CertSummary { serial, spki_der: x509.public_key().raw.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = pem_encode("X", &data);
            assert_eq!(pem_decode(&pem, "X").as_deref(), Some(&data[..]), "len {len}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
    }

    #[test]
    fn device_key_sec1_is_valid() {
        let k = DeviceKey::generate().expect("keygen");
        let sk = p256::SecretKey::from_sec1_der(&k.sec1_der).expect("sec1");
        let pk = sk.public_key();
        let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&pk, false);
        assert_eq!(point.as_bytes(), k.key_pair.public_key_raw());
        assert_eq!(k.sec1_der.len(), 121);
    }
}
