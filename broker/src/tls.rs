//! TLS: the rustls server configuration, built from the broker certificate, the client CA and the
//! CRL, and swapped atomically when any of those files change (live sessions keep the
//! configuration they were accepted with).
//!
//! Client certificates are verified by rustls' `WebPkiClientVerifier` (chain to the client CA,
//! validity, EKU clientAuth, not a CA, and the CRL when one is loaded). A CRL is only ever loaded
//! after its signature verifies against the client CA, so a forged or corrupt file can never
//! replace a good one. Key exchange keeps secp256r1 (embedded-tls offers only P-256) and records
//! are never fragmented below 16 KiB (embedded-tls cannot reassemble handshake messages).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
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

/// Reads a CRL (PEM or DER) and checks its signature against `ca_der`.
pub fn load_crl(
    path: &Path,
    ca_der: &[u8],
) -> Result<(CertificateRevocationListDer<'static>, CrlInfo), TlsError> {
    let bytes = read(path)?;
    let der = if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
        CertificateRevocationListDer::from_pem_slice(&bytes)
            .map_err(|e| TlsError::Parse(path.to_path_buf(), format!("bad CRL PEM: {e}")))?
    } else {
        CertificateRevocationListDer::from(bytes)
    };
    let (_, crl) = CertificateRevocationList::from_der(&der)
        .map_err(|e| TlsError::Parse(path.to_path_buf(), format!("bad CRL: {e}")))?;
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| TlsError::Parse(path.to_path_buf(), e.to_string()))?;
    if crl.issuer() != ca.subject() || crl.verify_signature(ca.public_key()).is_err() {
        return Err(TlsError::CrlSignature(path.to_path_buf()));
    }
    let info = CrlInfo {
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
        revoked: crl.iter_revoked_certificates().count(),
    };
    Ok((der, info))
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
    let mut roots = RootCertStore::empty();
    for c in &ca {
        roots.add(c.clone()).map_err(|e| TlsError::Parse(paths.client_ca.clone(), e.to_string()))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let mut crl_info = None;
    if let Some(crl_path) = &paths.crl {
        let (der, info) = load_crl(crl_path, &ca[0])?;
        builder = builder.with_crls([der]).only_check_end_entity_revocation();
        crl_info = Some(info);
    }
    let verifier = builder.build().map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.max_fragment_size = None;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(TlsState {
        config: Arc::new(config),
        crl: crl_info,
        server_not_after: not_after(&paths.cert, &chain[0])?,
        client_ca_not_after: not_after(&paths.client_ca, &ca[0])?,
        fingerprint,
    })
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
