//! Broker configuration: a TOML file, overridden by flags and `FLEET_*` environment variables.
//! Every path defaults to the layout `fleet-provision` writes into its home, so
//! `fleet-provision init && fleet-provision server-cert --dns localhost && fleet-broker` works.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What to do when the CRL is past its nextUpdate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CrlPolicy {
    /// Refuse new connections until a fresh CRL is loaded (default); live sessions continue.
    #[default]
    FailClosed,
    /// Keep admitting (the registry is still consulted), but raise the alert metric.
    FailOpen,
}

/// Everything the broker needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT over TLS listen address.
    pub listen: SocketAddr,
    /// fleet-provision home (device CA, CRL, registry, broker-tls/).
    pub home: PathBuf,
    /// Registry URL; default: the SQLite registry in the home.
    pub database_url: Option<String>,
    /// Metrics and health endpoint (`/metrics`, `/healthz`); `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Broker certificate chain (PEM); default HOME/broker-tls/cert.pem.
    pub cert: Option<PathBuf>,
    /// Broker private key (PEM); default HOME/broker-tls/key.pem.
    pub key: Option<PathBuf>,
    /// CA that client certificates must chain to; default HOME/device-ca.pem.
    pub client_ca: Option<PathBuf>,
    /// CRL (PEM or DER) signed by the client CA; default HOME/crl.pem when it exists.
    pub crl: Option<PathBuf>,
    /// Expired-CRL policy.
    pub crl_policy: CrlPolicy,
    /// TLS handshake deadline, seconds.
    pub handshake_timeout_secs: f64,
    /// Deadline for CONNECT after the handshake, seconds.
    pub connect_timeout_secs: f64,
    /// Most open connections; more are closed at accept.
    pub max_connections: usize,
    /// Largest MQTT packet accepted from or sent to a client, bytes.
    pub max_packet_size: usize,
    /// How often the registry is polled for revocations, milliseconds (PostgreSQL also LISTENs).
    pub revocation_poll_ms: u64,
    /// How often certificate, key, CA and CRL files are checked for changes, milliseconds.
    pub reload_poll_ms: u64,
    /// Most messages committed in one store transaction.
    pub store_batch: usize,
    /// Longest wait for a registry connection, seconds: while the database is down, admissions
    /// are refused (CONNACK 3) and unstored messages unacknowledged after this long.
    pub registry_timeout_secs: f64,
    /// Most connections from one source address that may be in the pre-admission phase (TLS
    /// handshake + CONNECT) at once; more are closed at accept (reason `source_limit`).
    pub max_pre_admission_per_source: usize,
    /// A socket that accepts no bytes for this long is closed (reason `write_timeout`), seconds.
    pub write_timeout_secs: f64,
    /// Most subscriptions one session holds; more get SUBACK 0x80.
    pub max_subscriptions_per_session: usize,
    /// Most retained messages under one device's topics (`devices/<id>/...`).
    pub max_retained_per_device: usize,
    /// Most bytes (topic + payload) of retained messages in the whole broker.
    pub max_retained_bytes: usize,
    /// Most messages queued for delivery to one session; more are dropped (counted).
    pub max_queued_messages: usize,
    /// Longest topic or filter, bytes: a PUBLISH over it closes the session, a filter gets 0x80.
    pub max_topic_length: usize,
    /// Most levels in a topic or filter (same treatment).
    pub max_topic_levels: usize,
    /// ACL refusals and limit hits are logged at most once per session per this interval, with a
    /// count of those not logged, seconds.
    pub log_interval_secs: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            home: PathBuf::from("fleet-pki"),
            database_url: None,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            cert: None,
            key: None,
            client_ca: None,
            crl: None,
            crl_policy: CrlPolicy::FailClosed,
            handshake_timeout_secs: 10.0,
            connect_timeout_secs: 10.0,
            max_connections: 10_000,
            max_packet_size: 4096,
            revocation_poll_ms: 200,
            reload_poll_ms: 1000,
            store_batch: 4096,
            registry_timeout_secs: 3.0,
            max_pre_admission_per_source: 32,
            write_timeout_secs: 10.0,
            max_subscriptions_per_session: 64,
            max_retained_per_device: 16,
            max_retained_bytes: 16 << 20,
            max_queued_messages: 256,
            max_topic_length: 256,
            max_topic_levels: 8,
            log_interval_secs: 10.0,
        }
    }
}

/// A configuration that makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn secs(v: f64, name: &str) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v <= 3600.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError(format!("{name} must be between 0 and 3600 seconds, got {v}")))
    }
}

impl Config {
    /// Parses a TOML file.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        secs(self.handshake_timeout_secs, "handshake_timeout_secs")?;
        secs(self.connect_timeout_secs, "connect_timeout_secs")?;
        secs(self.registry_timeout_secs, "registry_timeout_secs")?;
        secs(self.write_timeout_secs, "write_timeout_secs")?;
        secs(self.log_interval_secs, "log_interval_secs")?;
        for (v, name) in [
            (self.max_pre_admission_per_source, "max_pre_admission_per_source"),
            (self.max_subscriptions_per_session, "max_subscriptions_per_session"),
            (self.max_queued_messages, "max_queued_messages"),
            (self.max_topic_length, "max_topic_length"),
            (self.max_topic_levels, "max_topic_levels"),
        ] {
            if v == 0 {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        if self.max_topic_levels < 3 || self.max_topic_length < 16 {
            return Err(ConfigError(
                "max_topic_levels must be at least 3 and max_topic_length at least 16 (devices/<id>/<name>)"
                    .into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("max_connections must be at least 1".into()));
        }
        if !(128..=268_435_455).contains(&self.max_packet_size) {
            return Err(ConfigError("max_packet_size must be between 128 and 268435455".into()));
        }
        if self.revocation_poll_ms == 0 || self.reload_poll_ms == 0 || self.store_batch == 0 {
            return Err(ConfigError("poll intervals and store_batch must be positive".into()));
        }
        Ok(())
    }

    /// Handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }

    /// Longest wait for a registry connection.
    pub fn registry_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.registry_timeout_secs)
    }

    /// Longest a write may wait for the peer to accept bytes.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.write_timeout_secs)
    }

    /// Interval of rate-limited log lines.
    pub fn log_interval(&self) -> Duration {
        Duration::from_secs_f64(self.log_interval_secs)
    }

    /// CONNECT deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    fn in_home(&self, p: &Option<PathBuf>, default: &str) -> PathBuf {
        p.clone().unwrap_or_else(|| self.home.join(default))
    }

    /// Broker certificate chain path.
    pub fn cert_path(&self) -> PathBuf {
        self.in_home(&self.cert, "broker-tls/cert.pem")
    }

    /// Broker key path.
    pub fn key_path(&self) -> PathBuf {
        self.in_home(&self.key, "broker-tls/key.pem")
    }

    /// Client CA path.
    pub fn client_ca_path(&self) -> PathBuf {
        self.in_home(&self.client_ca, "device-ca.pem")
    }

    /// CRL path, if any.
    pub fn crl_path(&self) -> Option<PathBuf> {
        match &self.crl {
            Some(p) => Some(p.clone()),
            None => Some(self.home.join("crl.pem")).filter(|p| Path::exists(p)),
        }
    }

    /// Registry URL.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.home.join("registry.db").display()))
    }
}
