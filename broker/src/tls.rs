//! TLS: the rustls server configuration, built from the broker certificate, the client CA and the
//! CRL, and swapped atomically when any of those files change (live sessions keep the
//! configuration they were accepted with).
//!
//! Client certificates are verified by rustls' `WebPkiClientVerifier` (chain to the client CA,
//! validity, not a CA), then must carry an extendedKeyUsage extension that lists clientAuth
//! (webpki accepts a certificate with no EKU at all), then are checked against the CRL when one
//! is loaded. The client-CA file must hold exactly one certificate, the device issuing CA: a
//! chain file there would make the broker trust everything the root ever signed. A CRL is
//! only ever loaded after its signature verifies against the client CA, so a forged or corrupt
//! file can never replace a good one; its serials are then kept in a sorted table. (webpki's own
//! CRL check re-verifies the CRL signature on every handshake, hashing the whole list: with 100k
//! revoked serials that cut admissions to a fifth. The client CA has pathlen 0 and issues the CRL,
//! so it is authoritative for every certificate the chain check accepts, and a serial lookup is
//! the same verdict.) Key exchange keeps secp256r1 (embedded-tls offers only P-256) and records
//! are never fragmented below 16 KiB (embedded-tls cannot reassemble handshake messages).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

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

/// A complete, consistent TLS state.
#[derive(Debug)]
pub struct TlsState {
    /// For accepting connections.
    pub config: Arc<ServerConfig>,
    /// The CRL in force, if any.
    pub crl: Option<CrlInfo>,
    /// Expiry (unix seconds) of the server leaf and the client CA.
    pub server_not_after: i64,
    /// Expiry of the client CA.
    pub client_ca_not_after: i64,
    /// The file fingerprint this state was built from.
    pub fingerprint: Vec<Option<SystemTime>>,
}

/// Why TLS material was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// A file holds no usable PEM/DER.
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    /// The CRL's signature does not verify against the client CA.
    #[error("{0}: CRL signature does not verify against the client CA")]
    CrlSignature(PathBuf),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The files the TLS state is built from.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// Broker chain.
    pub cert: PathBuf,
    /// Broker key.
    pub key: PathBuf,
    /// Client CA.
    pub client_ca: PathBuf,
    /// CRL.
    pub crl: Option<PathBuf>,
}

impl TlsPaths {
    /// Modification times, to notice changes.
    pub fn fingerprint(&self) -> Vec<Option<SystemTime>> {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut v = vec![mtime(&self.cert), mtime(&self.key), mtime(&self.client_ca)];
        v.push(self.crl.as_deref().and_then(mtime));
        v
    }
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.to_path_buf(), e))
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(p)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse(p.to_path_buf(), format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Parse(p.to_path_buf(), "no CERTIFICATE in file".into()));
    }
    Ok(certs)
}

fn not_after(p: &Path, der: &[u8]) -> Result<i64, TlsError> {
    let (_, c) =
        X509Certificate::from_der(der).map_err(|e| TlsError::Parse(p.to_path_buf(), e.to_string()))?;
    Ok(c.validity().not_after.timestamp())
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
pub fn load_crl(path: &Path, ca_der: &[u8]) -> Result<(RevokedSerials, CrlInfo), TlsError> {
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

/// [`load_crl`] on bytes: PEM or DER, issuer and signature checked against `ca_der`.
pub fn parse_crl(bytes: &[u8], ca_der: &[u8]) -> Result<(RevokedSerials, CrlInfo), CrlError> {
    let der = if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
        CertificateRevocationListDer::from_pem_slice(bytes)
            .map_err(|e| CrlError::Parse(format!("bad CRL PEM: {e}")))?
    } else {
        CertificateRevocationListDer::from(bytes.to_vec())
    };
    let (_, crl) =
        CertificateRevocationList::from_der(&der).map_err(|e| CrlError::Parse(format!("bad CRL: {e}")))?;
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| CrlError::Parse(e.to_string()))?;
    if crl.issuer() != ca.subject() || crl.verify_signature(ca.public_key()).is_err() {
        return Err(CrlError::Signature);
    }
    let mut serials = Vec::new();
    for r in crl.iter_revoked_certificates() {
        let key = serial_key(r.raw_serial())
            .ok_or_else(|| CrlError::Parse("CRL lists a serial longer than 20 octets".into()))?;
        serials.push(key);
    }
    serials.sort_unstable();
    serials.dedup();
    let info = CrlInfo {
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
        revoked: serials.len(),
        number: crl.crl_number().and_then(|n| u64::try_from(n).ok()),
    };
    Ok((RevokedSerials(serials), info))
}

/// `WebPkiClientVerifier`, then EKU clientAuth required, then a lookup of the end-entity
/// serial in the CRL's table (if a CRL is loaded).
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Option<RevokedSerials>,
}

/// True if the certificate has an extendedKeyUsage extension listing clientAuth.
fn has_client_auth_eku(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth)
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let (_, cert) = X509Certificate::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        if !has_client_auth_eku(&cert) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose));
        }
        if self.revoked.as_ref().is_some_and(|r| r.contains(cert.raw_serial())) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the TLS state from files.
pub fn build(paths: &TlsPaths) -> Result<TlsState, TlsError> {
    let fingerprint = paths.fingerprint();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&paths.cert)?;
    let key_bytes = read(&paths.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| TlsError::Parse(paths.key.clone(), format!("no private key: {e}")))?;
    let ca = certs(&paths.client_ca)?;
    if ca.len() != 1 {
        return Err(TlsError::Parse(
            paths.client_ca.clone(),
            format!(
                "holds {} certificates; the client CA file must hold only the device issuing CA \
                 (a chain file here would make the broker trust every certificate its root signs): \
                 use HOME/device-ca.pem",
                ca.len()
            ),
        ));
    }
    let mut roots = RootCertStore::empty();
    for c in &ca {
        roots.add(c.clone()).map_err(|e| TlsError::Parse(paths.client_ca.clone(), e.to_string()))?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let (revoked, crl_info) = match &paths.crl {
        Some(crl_path) => {
            let (revoked, info) = load_crl(crl_path, &ca[0])?;
            (Some(revoked), Some(info))
        }
        None => (None, None),
    };
    let verifier = Arc::new(ClientVerifier { inner: webpki, revoked });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.max_fragment_size = None;
    // No resumption: a resumed TLS session skips client-certificate verification, so a
    // certificate revoked after the first handshake would come back in through a ticket. Every
    // admission is a full handshake (devices do not resume anyway), and no per-handshake ticket
    // or cache entry is made.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(TlsState {
        config: Arc::new(config),
        crl: crl_info,
        server_not_after: not_after(&paths.cert, &chain[0])?,
        client_ca_not_after: not_after(&paths.client_ca, &ca[0])?,
        fingerprint,
    })
}

/// True if `offered` would replace `loaded` with a lower-numbered CRL (a replay of an old,
/// validly signed CRL that may predate revocations). Neither a CRL without a number nor no CRL
/// at all (the file deleted) ever replaces a numbered one.
pub fn crl_replayed(loaded: Option<&CrlInfo>, offered: Option<&CrlInfo>) -> bool {
    match (loaded.and_then(|c| c.number), offered) {
        (Some(have), Some(new)) => new.number.is_none_or(|n| n < have),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Maps a failed handshake to a metric reason.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error as E};
    let Some(e) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => "peer_closed",
            _ => "io",
        };
    };
    match e {
        E::NoCertificatesPresented => "no_certificate",
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_expired",
            CertificateError::UnknownRevocationStatus => "revocation_unknown",
            other => {
                let s = format!("{other:?}");
                if s.contains("CaUsedAsEndEntity") {
                    "ca_as_client"
                } else {
                    "bad_certificate"
                }
            }
        },
        E::PeerIncompatible(_) | E::NoApplicationProtocol => "incompatible",
        E::InvalidMessage(_) => "malformed",
        E::AlertReceived(_) => "peer_alert",
        _ => "tls_error",
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
