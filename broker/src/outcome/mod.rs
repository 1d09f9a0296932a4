//! Why a connection was refused ([`Refusal`]) and why a session closed ([`CloseReason`]): what
//! the broker counts, logs and tests. Each has a `label()`, the one place its metric label is
//! spelled (the smaller label sets, caps and reload outcomes, are in `metrics`).
//!
//! The label set is part of the broker's interface (dashboards and alerts key on it): a variant
//! may be added, never renamed.

mod bus;
mod close;
mod internal;
mod refusal;

pub use bus::BusRefusal;
pub use close::{CloseCounter, CloseReason};
pub(crate) use internal::{CommandRefusal, Discard};
pub use refusal::Refusal;
