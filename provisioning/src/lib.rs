//! fleet-provision: the factory provisioning station of fleetgate.
//!
//! It creates the CA hierarchy (root, device issuing CA, server CA), mints one X.509 identity per
//! device (station-generated P-256 keys or device CSRs), records every issuance in a SQL registry
//! with a hash-chained issuance log, revokes identities and signs CRLs. The broker reads the same
//! registry (`fleet-registry`, which the broker shares). It also keeps the firmware
//! image-signing key and signs firmware releases (`firmware`, `ota`; docs/spec/ota.md).

pub mod campaign;
pub mod error;
pub mod firmware;
pub mod home;
pub mod issuer;
pub mod lifecycle;
pub mod ota;
pub mod pki;
pub mod station;

pub use error::{Error, Result};
pub use fleet_registry::{DeviceId, RevocationReason, Role, SerialNumber, Status};
