//! How a configuration key is declared, named and parsed from text: the `settings!` macro
//! behind [`super::Config`], the [`Key`] table that flags and environment variables are built
//! from, and the text parsers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to do when the CRL is past its nextUpdate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CrlPolicy {
    /// Refuse new connections until a fresh CRL is loaded (default); live sessions continue.
    #[default]
    FailClosed,
    /// Keep admitting (the registry is still consulted), but raise the alert metric.
    FailOpen,
}

/// An address, or `off`: how the file, flags and environment spell an endpoint that can be
/// disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(pub Option<SocketAddr>);

/// A duration setting, in seconds: finite, above 0 and at most an hour. It is checked where it
/// is parsed (file, environment, flag), so a duration key is one declaration in `settings!`
/// and nothing else: no range check to add to `validate`, no accessor to write by hand.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Secs(f64);

impl Secs {
    /// Longest duration a setting may name, seconds.
    pub const MAX: f64 = 3600.0;

    /// `v` seconds, if within (0, [`Secs::MAX`]].
    pub fn new(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 && v <= Self::MAX {
            Ok(Self(v))
        } else {
            Err(format!("must be between 0 and {} seconds, got {v}", Self::MAX))
        }
    }

    /// A default written in the `settings!` list (checked by the configuration's tests).
    pub(crate) const fn of(v: f64) -> Self {
        Self(v)
    }

    /// The number of seconds.
    pub fn get(self) -> f64 {
        self.0
    }

    /// As a duration.
    pub fn duration(self) -> Duration {
        Duration::from_secs_f64(self.0)
    }
}

impl TryFrom<f64> for Secs {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        Secs::new(v)
    }
}

impl From<Secs> for f64 {
    fn from(s: Secs) -> f64 {
        s.0
    }
}

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl FromSetting for Secs {
    fn from_setting(s: &str) -> Result<Self, String> {
        Secs::new(f64::from_setting(s)?)
    }
}

impl TryFrom<String> for Endpoint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Endpoint::from_setting(&s)
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.0.map_or_else(|| "off".to_owned(), |a| a.to_string())
    }
}

/// One configuration key, as flags, environment and `--help` show it.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// TOML key (`max_packet_size`); the environment variable is `FLEET_` + its upper case.
    pub name: &'static str,
    /// An older flag spelling, still accepted (e.g. `handshake-timeout` for
    /// `--handshake-timeout-secs`).
    pub alias: Option<&'static str>,
    /// The key's doc comment.
    pub help: &'static str,
}

impl Key {
    /// `--flag` name without the dashes: the key with `-` for `_`.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// Environment variable.
    pub fn env(&self) -> String {
        format!("FLEET_{}", self.name.to_ascii_uppercase())
    }
}

/// A configuration that makes no sense.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid configuration: {0}")]
    File(String),
    /// A value (flag or environment) that does not parse as the key's type.
    #[error("invalid value for {key}: `{value}` ({why})")]
    Value {
        /// The key.
        key: String,
        /// What was given.
        value: String,
        /// Why it does not parse.
        why: String,
    },
    /// A key this broker does not have.
    #[error("unknown configuration key `{0}`")]
    UnknownKey(String),
    /// A value out of range.
    #[error("invalid configuration: {0}")]
    Range(String),
}

/// Parsing one key's value from a flag or an environment variable.
pub(crate) trait FromSetting: Sized {
    /// Parses the text form.
    fn from_setting(s: &str) -> Result<Self, String>;
}

macro_rules! from_str_setting {
    ($($t:ty),*) => {$(
        impl FromSetting for $t {
            fn from_setting(s: &str) -> Result<Self, String> {
                s.parse().map_err(|e| format!("{e}"))
            }
        }
    )*};
}
from_str_setting!(SocketAddr, PathBuf, String, usize, u64, f64, bool);

/// `off` (or nothing) turns an optional setting off.
impl<T: FromSetting> FromSetting for Option<T> {
    fn from_setting(s: &str) -> Result<Self, String> {
        if s.is_empty() || s == "off" {
            Ok(None)
        } else {
            T::from_setting(s).map(Some)
        }
    }
}

impl FromSetting for Endpoint {
    fn from_setting(s: &str) -> Result<Self, String> {
        Option::<SocketAddr>::from_setting(s).map(Endpoint).map_err(|e| format!("{e}; or `off`"))
    }
}

impl FromSetting for CrlPolicy {
    fn from_setting(s: &str) -> Result<Self, String> {
        match s {
            "fail-closed" => Ok(Self::FailClosed),
            "fail-open" => Ok(Self::FailOpen),
            _ => Err("expected fail-closed or fail-open".into()),
        }
    }
}

macro_rules! settings {
    ($( $(#[doc = $doc:literal])+ $name:ident : $ty:ty = $default:expr $(, alias $alias:literal)? ;)+) => {
        /// Everything the broker needs to run. See each key's doc; `fleet-broker --help` shows
        /// the same text.
        #[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Config {
            $( $(#[doc = $doc])+ pub $name: $ty, )+
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )+ }
            }
        }

        impl Config {
            /// Every key, in file order.
            pub const KEYS: &'static [$crate::config::value::Key] = &[
                $( $crate::config::value::Key { name: stringify!($name), alias: $crate::config::value::settings!(@alias $($alias)?), help: concat!($($doc, "\n"),+) }, )+
            ];

            /// Sets `key` from its text form (a flag or environment value).
            pub fn set(&mut self, key: &str, value: &str) -> Result<(), $crate::config::value::ConfigError> {
                let bad = |why: String| $crate::config::value::ConfigError::Value { key: key.to_owned(), value: value.to_owned(), why };
                match key {
                    $( stringify!($name) => self.$name = $crate::config::value::FromSetting::from_setting(value).map_err(bad)?, )+
                    _ => return Err($crate::config::value::ConfigError::UnknownKey(key.to_owned())),
                }
                Ok(())
            }
        }
    };
    (@alias) => { None };
    (@alias $alias:literal) => { Some($alias) };
}
pub(crate) use settings;
