//! Broker configuration: one struct, read from a TOML file, then overridden by `FLEET_<KEY>`
//! environment variables and `--<key>` flags (the binary builds those from [`Config::KEYS`]).
//!
//! Every key is declared once, in the `settings!` list below: its type, default and doc. That
//! gives the serde field (file), the key table (flags, env, `--help`), the string parser
//! ([`Config::set`]) and the `check-config` output (serialised). Every path defaults to the
//! layout of [`fleet_registry::Home`], so `fleet-provision init && fleet-provision server-cert
//! --dns localhost && fleet-broker` works.

mod load;
mod nats;
mod settings;
mod value;

pub use nats::{redact_url, NatsSecurity, SQL_CONSUMER};
pub use settings::Config;
pub use value::{ConfigError, CrlPolicy, Endpoint, Key, Secs};

#[cfg(test)]
mod tests;
