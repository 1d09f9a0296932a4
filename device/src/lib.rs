//! fleet-device: the fleetgate SDK for microcontrollers.
//!
//! `no_std`, no allocator, no `unsafe`. The core never reads a clock or an RNG by itself: time and
//! entropy are passed in by the firmware. Modules: the credentials bundle (`credentials.bin`) that
//! the factory station writes and the device reads from flash; the sans-IO MQTT 3.1.1 codec and
//! session; `tls` (the strict broker verifier, the `DeviceSigner` that holds the key, P-256 on
//! `p256-cm4` for Cortex-M4/M7); `client`, the device API, blocking over `embedded-io` and, with
//! the `async` feature, async over `embedded-io-async`; `transport` (read timeouts only between
//! TLS records); rotation, CSRs and the A/B credential store; `release`, the manifest of a signed
//! firmware release (docs/spec/ota.md).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]
#![warn(clippy::std_instead_of_core, clippy::alloc_instead_of_core)]

#[macro_use]
mod fmt;

#[cfg(feature = "tls")]
pub mod client;
pub mod credentials;
#[cfg(feature = "tls")]
pub mod csr;
pub mod mqtt;
#[cfg(feature = "_ota")]
pub mod ota;
pub mod release;
#[cfg(feature = "tls")]
pub mod rotation;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tls")]
pub mod transport;

/// The topic scheme (`fleet-topic`): the suffixes a device publishes on
/// (`topic::suffix::CERTS_CSR`), its levels and filters, the identity URI prefixes.
pub use fleet_topic as topic;
