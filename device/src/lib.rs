//! fleet-device: the fleetgate SDK for microcontrollers.
//!
//! `no_std`, no allocator, no `unsafe`. The core never reads a clock or an RNG by itself: time and
//! entropy are passed in by the firmware. This first module set holds the credentials bundle
//! (`credentials.bin`) that the factory station writes and the device reads from flash, and the
//! sans-IO MQTT 3.1.1 codec; the TLS transport and session state machine build on them.
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
#[cfg(feature = "tls")]
pub mod rotation;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tls")]
pub mod transport;
