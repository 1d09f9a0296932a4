//! Reading TLS material from files, and how it fails ([`TlsError`]).

use std::path::{Path, PathBuf};

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

/// What a certificate that does not decode is called (x509-parser's own message is its parser's
/// `Debug`).
pub(crate) const NOT_A_CERT: &str = "not an X.509 certificate (the DER does not decode)";

/// The bytes of a TLS file.
pub(crate) fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.to_path_buf(), e))
}

/// A PEM error in words (its own message shows the base64 decoder's `Debug`).
pub(crate) fn pem_words(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "bad PEM: a section has no END line",
        E::IllegalSectionStart { .. } => "bad PEM: a malformed BEGIN line",
        E::Base64Decode(_) => "bad PEM: the base64 does not decode",
        E::NoItemsFound => "no PEM items of the expected kind",
        E::SectionTooLarge => "bad PEM: a section is too large",
        _ => "bad PEM",
    }
}
