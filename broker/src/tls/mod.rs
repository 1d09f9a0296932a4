//! TLS: the rustls server configuration, built from the broker certificate, the client CA and the
//! CRL, and swapped atomically when any of those files change (live sessions keep the
//! configuration they were accepted with).
//!
//! Client certificates are verified by [`verifier`] (webpki chain to the client CA, validity,
//! not a CA; EKU clientAuth; the [`crl`] table). The client-CA file must hold exactly one
//! certificate, the device issuing CA: a chain file there would make the broker trust
//! everything the root ever signed. Key exchange keeps secp256r1 (embedded-tls offers only
//! P-256) and records are capped at `max_tls_record_size` (4096 by default) so a device can
//! read with a 4,352-byte buffer (`fleet_device::client::rx_buffer_for(4096)`) instead of
//! 16,640. Resumption is off: a resumed session skips client-certificate checks.

pub(crate) mod crl;
mod files;
mod verifier;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::{FromDer, X509Certificate};

pub(crate) use crl::crl_replayed;
pub use crl::{parse_crl, CrlError, CrlInfo, RevokedSerials};

use crate::outcome::Refusal;
pub use files::TlsError;
use files::{pem_words, read, NOT_A_CERT};
use verifier::ClientVerifier;

/// A complete, consistent TLS state.
#[derive(Debug)]
pub(crate) struct TlsState {
    /// For accepting connections.
    pub config: Arc<ServerConfig>,
    /// The CRL in force, if any.
    pub crl: Option<CrlInfo>,
    /// The serials it lists (the verifier's table), for the console's check against the
    /// registry.
    pub crl_serials: Option<Arc<RevokedSerials>>,
    /// The organisation (O) in the client CA's subject, if it has one.
    pub client_ca_org: Option<String>,
    /// Expiry (unix seconds) of the server leaf and the client CA.
    pub server_not_after: i64,
    /// Expiry of the client CA.
    pub client_ca_not_after: i64,
    /// The file fingerprint this state was built from.
    pub fingerprint: Vec<Option<SystemTime>>,
}

/// The files the TLS state is built from.
#[derive(Debug, Clone)]
pub(crate) struct TlsPaths {
    /// Broker chain.
    pub cert: PathBuf,
    /// Broker key.
    pub key: PathBuf,
    /// Client CA.
    pub client_ca: PathBuf,
    /// CRL.
    pub crl: Option<PathBuf>,
    /// Largest record sent, header included (rustls `max_fragment_size`); `None`: 16 KiB.
    pub max_record: Option<usize>,
}

impl TlsPaths {
    /// The files `config` names (the CRL: HOME/crl.pem once it exists).
    pub(crate) fn of(config: &crate::config::Config) -> Self {
        Self {
            cert: config.cert_path(),
            key: config.key_path(),
            client_ca: config.client_ca_path(),
            crl: config.crl_path(),
            max_record: Some(config.max_tls_record_size),
        }
    }

    /// Modification times, to notice changes.
    pub(crate) fn fingerprint(&self) -> Vec<Option<SystemTime>> {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut v = vec![mtime(&self.cert), mtime(&self.key), mtime(&self.client_ca)];
        v.push(self.crl.as_deref().and_then(mtime));
        v
    }
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(p)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse(p.to_path_buf(), pem_words(&e).into()))?;
    if certs.is_empty() {
        return Err(TlsError::Parse(p.to_path_buf(), "no CERTIFICATE in file".into()));
    }
    // Decoded here so that a broken one is named by its file, in words.
    for c in &certs {
        X509Certificate::from_der(c).map_err(|_| TlsError::Parse(p.to_path_buf(), NOT_A_CERT.into()))?;
    }
    Ok(certs)
}

fn not_after(p: &Path, der: &[u8]) -> Result<i64, TlsError> {
    let (_, c) =
        X509Certificate::from_der(der).map_err(|_| TlsError::Parse(p.to_path_buf(), NOT_A_CERT.into()))?;
    Ok(c.validity().not_after.timestamp())
}

/// The organisation (O) in a certificate's subject.
fn organisation(der: &[u8]) -> Option<String> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    let o = c.subject().iter_organization().next()?.as_str().ok()?.trim().to_owned();
    (!o.is_empty()).then_some(o)
}

/// Builds the TLS state from files.
pub(crate) fn build(paths: &TlsPaths) -> Result<TlsState, TlsError> {
    let fingerprint = paths.fingerprint();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&paths.cert)?;
    let key_bytes = read(&paths.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| TlsError::Parse(paths.key.clone(), format!("no private key: {}", pem_words(&e))))?;
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
            let (revoked, info) = crl::load_crl(crl_path, &ca[0])?;
            (Some(Arc::new(revoked)), Some(info))
        }
        None => (None, None),
    };
    let verifier = Arc::new(ClientVerifier { inner: webpki, revoked: revoked.clone() });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    // Every record the broker sends, handshake included, fits a device receive buffer of
    // `rx_buffer_for(max_record)` = `max_record + 256` bytes (4,352 by default; the SDK's
    // margin for the content type, AEAD tag and padding). The handshake messages are far
    // smaller than the minimum allowed (a P-256 chain is ~1 KiB), so embedded-tls, which cannot
    // reassemble a handshake message across records, never sees one split.
    config.max_fragment_size = paths.max_record;
    // No resumption: a resumed TLS session skips client-certificate verification, so a
    // certificate revoked after the first handshake would come back in through a ticket. Every
    // admission is a full handshake (devices do not resume anyway), and no per-handshake ticket
    // or cache entry is made.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(TlsState {
        config: Arc::new(config),
        crl: crl_info,
        crl_serials: revoked,
        client_ca_org: organisation(&ca[0]),
        server_not_after: not_after(&paths.cert, &chain[0])?,
        client_ca_not_after: not_after(&paths.client_ca, &ca[0])?,
        fingerprint,
    })
}

/// Why a TLS handshake failed, by the rustls (and webpki) error variant.
pub(crate) fn refusal(err: &std::io::Error) -> Refusal {
    use rustls::{CertificateError, Error as E};
    let Some(e) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Refusal::PeerClosed,
            _ => Refusal::Io,
        };
    };
    match e {
        E::NoCertificatesPresented => Refusal::NoCertificate,
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refusal::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Refusal::NotYetValid
            }
            CertificateError::Revoked => Refusal::Revoked,
            CertificateError::UnknownIssuer => Refusal::UnknownCa,
            CertificateError::BadSignature => Refusal::BadSignature,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Refusal::WrongPurpose
            }
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => Refusal::CrlExpired,
            CertificateError::UnknownRevocationStatus => Refusal::RevocationUnknown,
            // rustls passes the webpki errors it has no variant for through `Other`.
            CertificateError::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
                Some(webpki::Error::CaUsedAsEndEntity) => Refusal::CaAsClient,
                _ => Refusal::BadCertificate,
            },
            _ => Refusal::BadCertificate,
        },
        E::PeerIncompatible(_) | E::NoApplicationProtocol => Refusal::Incompatible,
        E::InvalidMessage(_) => Refusal::Malformed,
        E::AlertReceived(_) => Refusal::PeerAlert,
        _ => Refusal::TlsError,
    }
}

/// A client connection after the TLS handshake.
pub(crate) type Tls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
