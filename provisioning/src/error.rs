//! Errors of the provisioning library: each says what went wrong and, where there is one, what
//! to do about it.

use std::path::PathBuf;

/// Everything `fleet-provision` can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The home directory does not hold an initialised station.
    #[error("{0} is not an initialised fleet home (missing {1}); run `fleet-provision init --org NAME` first or pass --home")]
    NotInitialised(PathBuf, &'static str),
    /// `init` would overwrite an existing CA.
    #[error("{0} already holds a CA hierarchy; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    /// A device id that does not fit the id rules.
    #[error("invalid device id `{0}`: use 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    InvalidDeviceId(String),
    /// A serial that is not hex.
    #[error("invalid serial number `{0}`: expected hex")]
    InvalidSerial(String),
    /// The id is already in the registry.
    #[error("device id `{0}` is already registered")]
    DuplicateDevice(String),
    /// A CSR names a device that already has an identity: only an explicit re-key replaces its key.
    #[error("device `{0}` already exists; a CSR never replaces an existing device's key. To re-key it deliberately, run `fleet-provision rekey {0} --csr FILE` (revokes its current certificate as superseded)")]
    DeviceExists(String),
    /// An id reserved for the broker, services or the topic scheme.
    #[error("device id `{0}` is reserved and cannot be issued to a device")]
    ReservedId(String),
    /// A lifetime longer than the issuing CA's remaining validity.
    #[error("a {days}-day certificate would outlive the issuing CA ({issuer_days_left} days left); use --days {issuer_days_left} or less, or renew the CA")]
    OutlivesIssuer {
        /// Requested lifetime.
        days: i64,
        /// Whole days the issuing CA has left.
        issuer_days_left: i64,
    },
    /// The id is not in the registry.
    #[error("unknown device id `{0}`")]
    UnknownDevice(String),
    /// The serial is not in the registry.
    #[error("unknown certificate serial `{0}`")]
    UnknownSerial(String),
    /// Renewing a revoked device.
    #[error("device `{0}` is revoked; a revoked identity cannot be renewed")]
    DeviceRevoked(String),
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
    /// The registry database failed.
    #[error("registry database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The registry schema could not be brought up to date.
    #[error("registry migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The registry's schema is not what this build expects (or cannot be read).
    #[error("registry schema is not current ({0}): run a `fleet-provision` command (e.g. `fleet-provision list`) against this database as its owner to migrate it")]
    SchemaNotCurrent(String),
    /// The registry holds values that cannot be right.
    #[error("registry is corrupt: {0}")]
    CorruptRegistry(String),
    /// The issuance log's hash chain does not verify.
    #[error("issuance log verification failed: {0}")]
    LogTampered(String),
    /// Bad user input not covered above.
    #[error("{0}")]
    InvalidInput(String),
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
