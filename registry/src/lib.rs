//! fleet-registry: what the fleetgate station and broker share.
//!
//! - [`ids`]: `DeviceId`, `SerialNumber`, `Role`, `Status`, `RevocationReason`, each parsed, never
//!   validated after the fact.
//! - [`Registry`] ([`db`]): the SQL registry over SQLite (default) or PostgreSQL, with every
//!   migration (devices, certificates, the issuance log, CRL state, telemetry).
//! - [`rows`]: devices and certificates (issue, re-key, revoke, list, CRL snapshot).
//! - [`lifecycle`]: rotations over MQTT, forced-rotation requests, claims.
//! - [`log`] and [`verify`]: the hash-chained issuance log and its verifier.
//! - [`releases`]: signed firmware releases, one per board and version.
//! - [`console`] and [`expiry`]: listings and pages of the fleet in one query each; the one
//!   definition of an identity that expires soon.
//! - [`feed`]: what a broker reads: admission verdicts and the revocation feed.
//! - [`telemetry`]: typed batch inserts of stored device messages.
//! - [`home`]: the file layout of a fleet home, in one place.
//!
//! No certificate generation, no CLI: the station (`fleet-provision`) and the broker
//! (`fleet-broker`) both depend on this crate and on nothing of each other.
#![forbid(unsafe_code)]

pub mod commands;
pub mod console;
pub mod db;
pub mod error;
pub mod expiry;
pub mod feed;
pub mod home;
pub mod ids;
pub mod lifecycle;
pub mod log;
pub mod ota;
pub mod releases;
pub mod rows;
pub mod telemetry;
pub mod verify;

pub use commands::{Command, CommandOp, CommandOutcome, CommandStatus, NewCommand, WriterConnection};
pub use console::{DeviceQuery, DeviceRow, Expiring, ListedIdentity};
pub use db::{Backend, Registry, WriterSync};
pub use error::{report, Error, Result};
pub use expiry::{expiry, ExpiryWindow};
mod redact;
pub use feed::{Admission, RevocationEvent, RevocationFeed, REVOCATION_CHANNEL};
pub use home::{BrokerTls, Home, IdentityFiles, ReleaseFiles};
pub use ids::{
    DeviceId, RevocationReason, Role, SerialNumber, Status, CLAIM_URI_PREFIX, CSR_ORIGIN, DEVICE_URI_PREFIX,
    ISSUER_URI_PREFIX, NODE_URI_PREFIX, OPERATOR_URI_PREFIX, SERVICE_URI_PREFIX, STREAM_READER_URI_PREFIX,
};
pub use ota::{Campaign, DeviceSelector, Job, JobState, NewCampaign};
pub use redact::redact_url;
pub use releases::{NewRelease, ReleaseRecord};
pub use rows::{CertRecord, DeviceRecord, NewCert, RevokedEntry};
pub use telemetry::{Telemetry, TelemetryWriter};
pub use verify::LogReport;
