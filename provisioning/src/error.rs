//! Errors of the provisioning library: each says what went wrong and, where there is one, what
//! to do about it.

use std::path::PathBuf;

/// Everything `fleet-provision` can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The home directory does not hold an initialised station.
    #[error("{0} is not an initialised fleet home (missing {1})")]
    NotInitialised(PathBuf, &'static str),
    /// `init` would overwrite an existing CA.
    #[error("{0} already holds a CA hierarchy; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    /// A CSR names a device that already has an identity: only an explicit re-key replaces its key.
    #[error("device `{0}` already exists; a CSR never replaces an existing device's key")]
    DeviceExists(String),
    /// A lifetime longer than the issuing CA's remaining validity.
    #[error("a {days}-day certificate would outlive the issuing CA ({issuer_days_left} days left)")]
    OutlivesIssuer {
        /// Requested lifetime.
        days: i64,
        /// Whole days the issuing CA has left.
        issuer_days_left: i64,
    },
    /// A CSR that cannot be read.
    #[error("CSR is not readable: {0}")]
    CsrUnreadable(String),
    /// The CSR's signature does not verify with its own public key.
    #[error("CSR signature does not verify: the request was altered or not signed by its key")]
    CsrBadSignature,
    /// A CSR outside the device certificate profile.
    #[error("CSR refused by the device profile: {0}")]
    CsrProfile(String),
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A CA or key file in the home is unreadable.
    #[error("{0}: {1}")]
    BadPkiFile(PathBuf, String),
    /// rcgen refused to build or sign.
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Bad user input not covered above.
    #[error("{0}")]
    InvalidInput(String),
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] fleet_registry::Error),
    /// The registry database failed outside a registry call.
    #[error("registry database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The credentials bundle could not be encoded.
    #[error("credentials bundle: {0}")]
    Bundle(fleet_device::credentials::BundleError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
