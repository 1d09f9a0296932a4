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
    /// `firmware-key` would replace the station's firmware signing key (or its public half,
    /// which devices embed).
    #[error("{0} already exists: this station has its firmware signing key; refusing to make another")]
    FirmwareKeyExists(PathBuf),
    /// `release` on a station that never made a firmware signing key.
    #[error("this station has no firmware signing key ({0} is missing)")]
    NoFirmwareKey(PathBuf),
    /// The signing key is not where `release` looks by default: moved offline.
    #[error("the firmware signing key is not at {0} (moved offline?)")]
    FirmwareKeyOffline(PathBuf),
    /// A signing key that is not the one whose public half the devices embed.
    #[error("the key in {path} (id {given}) is not this station's firmware signing key (id {expected}): devices would refuse what it signs")]
    FirmwareKeyMismatch {
        /// The key file given.
        path: PathBuf,
        /// Its key id.
        given: String,
        /// The station's key id (`firmware.pub`).
        expected: String,
    },
    /// An image larger than a release may be.
    #[error("the image {path} is {size} bytes, more than the {max} bytes a release may be (--max-size)")]
    ImageTooLarge {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// An image of no bytes.
    #[error("the image {0} is empty")]
    ImageEmpty(PathBuf),
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
