//! Errors of the registry: each names what was refused and why, never a command or a flag of a
//! program that uses this crate (the station's CLI adds its own hints).

/// Everything the registry can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device id that does not fit the id rules.
    #[error("invalid device id `{0}`: use 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    InvalidDeviceId(String),
    /// An id reserved for the broker, services or the topic scheme.
    #[error("device id `{0}` is reserved and cannot be issued to a device")]
    ReservedId(String),
    /// A serial that is not hex.
    #[error("invalid serial number `{0}`: expected hex")]
    InvalidSerial(String),
    /// The id is already in the registry.
    #[error("device id `{0}` is already registered")]
    DuplicateDevice(String),
    /// The id is not in the registry.
    #[error("unknown device id `{0}`")]
    UnknownDevice(String),
    /// The serial is not in the registry.
    #[error("unknown certificate serial `{0}`")]
    UnknownSerial(String),
    /// Issuing for a revoked device.
    #[error("device `{0}` is revoked; a revoked identity cannot be renewed")]
    DeviceRevoked(String),
    /// A claim that has minted its whole quota.
    #[error("claim `{0}` is exhausted: it has issued every identity of its quota")]
    ClaimExhausted(String),
    /// An identity that is not a claim used as one.
    #[error("`{0}` is not an active claim")]
    NotAClaim(String),
    /// A campaign could not be started as asked (docs/spec/ota.md, "Campaigns").
    #[error("{0}")]
    Campaign(String),
    /// A board and version released before with another manifest (another image, minimum
    /// version or key): a version is released once per board.
    #[error("board `{board}` already has a release {version} of another image; a version is released once per board")]
    ReleaseExists {
        /// The board.
        board: String,
        /// The version.
        version: String,
    },
    /// A database URL of an engine the registry does not support.
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// A PostgreSQL role name that is not a plain identifier.
    #[error("invalid role name `{0}`: use up to 63 of a-z, 0-9, '_', not starting with a digit")]
    InvalidRoleName(String),
    /// Database roles asked of an engine that has none.
    #[error("database roles are a PostgreSQL feature: the SQLite registry is protected by file permissions")]
    RolesNeedPostgres,
    /// The registry database failed.
    #[error("registry database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The registry schema could not be brought up to date.
    #[error("registry migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The registry's schema is older than this build expects (or cannot be read): its owner
    /// must migrate it (`Registry::open` does).
    #[error("registry schema is not current ({0})")]
    SchemaNotCurrent(String),
    /// The registry holds values that cannot be right.
    #[error("registry is corrupt: {0}")]
    CorruptRegistry(String),
    /// The issuance log's hash chain does not verify.
    #[error("issuance log verification failed: {0}")]
    LogTampered(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, each said once: `context: cause: its cause`. A cause
/// whose text the line already holds is left out (many errors, sqlx's among them, print their
/// source in their own message), so that nothing is said twice.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "unable to open database file");
        let e = Error::Database(sqlx::Error::Io(io));
        let once = "registry database error: error communicating with database: unable to open database file";
        assert_eq!(report(&e), once);
        let p = std::io::Error::other(e);
        assert_eq!(report(&p), once);
    }
}
