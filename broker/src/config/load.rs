//! Reading, writing, checking and resolving a [`Config`]: TOML in and out, the range checks
//! that span keys, and the paths and durations the rest of the broker asks for.

use std::path::PathBuf;
use std::time::Duration;

use fleet_registry::Home;

use super::nats::redact_url;
use super::settings::Config;
use super::value::ConfigError;

/// The longest `moved_to` (the fleet SDK keeps a Server Reference of up to 96 bytes).
const MAX_SERVER_REFERENCE: usize = 96;

/// The longest `max_topic_length` of a cluster member.
const MAX_CLUSTER_TOPIC_LENGTH: usize = 640;

impl Config {
    /// Parses a TOML file.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File(e.to_string()))
    }

    /// The configuration as a bare TOML file.
    pub fn to_toml(&self) -> String {
        // Every field is a TOML scalar or absent: serialisation cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// The configuration as a TOML file to start from (what `check-config` prints): every key
    /// in file order, its doc as a comment above it; a key that is not set (an optional one
    /// that is off) is a comment too.
    pub fn to_commented_toml(&self) -> String {
        let table = self.table();
        let mut out = String::from(
            "# fleet-broker configuration: use it with `fleet-broker --config FILE`.\n\
             # Flags (--key-name) and FLEET_KEY_NAME environment variables override the file.\n",
        );
        for key in Self::KEYS {
            out.push('\n');
            for line in key.help.lines() {
                out.push_str(format!("# {}", line.trim()).trim_end());
                out.push('\n');
            }
            match table.get(key.name) {
                Some(v) => out.push_str(&format!("{} = {v}\n", key.name)),
                None => out.push_str(&format!("# {}: not set\n", key.name)),
            }
        }
        out
    }

    /// The keys that are set, as TOML values.
    fn table(&self) -> toml::Table {
        // Every field is a TOML scalar or absent: the conversion cannot fail.
        toml::Table::try_from(self).unwrap_or_default()
    }

    /// What a key is when nothing sets it, as `--help` shows it: the default value, the
    /// path or URL it falls back to, or `off`.
    pub fn default_text(key: &str) -> Option<String> {
        let d = Self::default();
        let text = |v: &toml::Value| match v {
            toml::Value::String(s) if s.is_empty() => "\"\"".to_owned(),
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if let Some(v) = d.table().get(key) {
            return Some(text(v));
        }
        Some(match key {
            "database_url" => d.database_url(),
            "cert" => d.cert_path().display().to_string(),
            "key" => d.key_path().display().to_string(),
            "client_ca" => d.client_ca_path().display().to_string(),
            "crl" => format!("{} when it exists", Home::new(&d.home).crl().display()),
            "ota_blob_dir" => d.ota_blob_dir_path().display().to_string(),
            "store_log_dir" => d.store_log_dir_path().display().to_string(),
            "admin_database_url" => "database_url".to_owned(),
            "org_name" => "the client CA's organisation".to_owned(),
            _ if Self::KEYS.iter().any(|k| k.name == key) => "off".to_owned(),
            _ => return None,
        })
    }

    /// The same configuration with every default path and URL written out.
    pub fn resolved(&self) -> Self {
        let mut c = self.clone();
        c.database_url = Some(self.database_url());
        c.cert = Some(self.cert_path());
        c.key = Some(self.key_path());
        c.client_ca = Some(self.client_ca_path());
        c.crl = self.crl_path();
        c.ota_blob_dir = Some(self.ota_blob_dir_path());
        c.store_log_dir = Some(self.store_log_dir_path());
        c
    }

    /// The balancers of `proxy_from`: (network address, prefix length), empty when unset.
    pub fn proxy_from(&self) -> Result<Vec<(std::net::IpAddr, u8)>, ConfigError> {
        let mut out = Vec::new();
        let Some(list) = &self.proxy_from else { return Ok(out) };
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad =
                || ConfigError::Range(format!("proxy_from: {entry:?} is not an IP address or CIDR block"));
            let (ip, bits) = entry.split_once('/').map_or((entry, None), |(a, b)| (a, Some(b)));
            let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(bad)?,
            };
            out.push((ip, bits));
        }
        Ok(out)
    }

    /// `store_fsync`, parsed.
    pub fn store_fsync(&self) -> fleet_registry::WriterSync {
        fleet_registry::WriterSync::parse(&self.store_fsync).unwrap_or_default()
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if fleet_registry::WriterSync::parse(&self.store_fsync).is_none() {
            return Err(ConfigError::Range(format!(
                "store_fsync: {:?} is neither every-commit nor checkpoint",
                self.store_fsync
            )));
        }
        if !matches!(self.store.as_str(), "log" | "registry") {
            return Err(ConfigError::Range(format!("store: {:?} is neither log nor registry", self.store)));
        }
        if let Some(to) = &self.moved_to {
            let port = to.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            let fine = to.len() <= MAX_SERVER_REFERENCE
                && to.bytes().all(|b| b.is_ascii_graphic())
                && port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
            if !fine {
                return Err(ConfigError::Range(format!(
                    "moved_to: {to:?} is not host:port (at most {MAX_SERVER_REFERENCE} printable ASCII bytes)"
                )));
            }
        }
        if self.nats_replicas == 0 || self.nats_replicas > 5 {
            return Err(ConfigError::Range(
                "nats_replicas must be between 1 and 5 (JetStream's limit)".into(),
            ));
        }
        if self.nats_stream.is_empty()
            || !self.nats_stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::Range("nats_stream must be letters, digits, '-' or '_'".into()));
        }
        for (v, name) in [
            (self.max_connections, "max_connections"),
            (self.max_pre_admission_per_source, "max_pre_admission_per_source"),
            (self.max_handshakes, "max_handshakes"),
            (self.max_subscriptions_per_session, "max_subscriptions_per_session"),
            (self.max_queued_messages, "max_queued_messages"),
            (self.store_batch, "store_batch"),
            (self.max_parked_sessions, "max_parked_sessions"),
            (self.max_sessions_per_claim, "max_sessions_per_claim"),
            (self.admin_handshakes, "admin_handshakes"),
            (self.admin_max_connections_per_identity, "admin_max_connections_per_identity"),
            (self.admin_max_connections_per_source, "admin_max_connections_per_source"),
            (self.admin_max_event_streams, "admin_max_event_streams"),
            (self.admin_max_event_streams_per_operator, "admin_max_event_streams_per_operator"),
        ] {
            if v == 0 {
                return Err(ConfigError::Range(format!("{name} must be at least 1")));
            }
        }
        if self.max_topic_levels < 3 || self.max_topic_length < 16 {
            return Err(ConfigError::Range(
                "max_topic_levels must be at least 3 and max_topic_length at least 16 (devices/<id>/<name>)"
                    .into(),
            ));
        }
        // A topic's NATS subject escapes a byte in up to three; a shared subscription's
        // hand-off subject holds its group, filter and topic: all must fit nats-server's 4 KiB
        // control line, or the server drops the node's connection.
        if self.nats.is_some() && self.max_topic_length > MAX_CLUSTER_TOPIC_LENGTH {
            return Err(ConfigError::Range(format!(
                "max_topic_length is at most {MAX_CLUSTER_TOPIC_LENGTH} on a cluster member (its NATS subjects must fit the server's 4 KiB control line)"
            )));
        }
        if !(128..=268_435_455).contains(&self.max_packet_size) {
            return Err(ConfigError::Range("max_packet_size must be between 128 and 268435455".into()));
        }
        if let Some(url) = &self.nats {
            self.nats_security(url)?;
        }
        self.nats_readers()?;
        if !self.proxy_from()?.is_empty() && !self.proxy_protocol {
            return Err(ConfigError::Range(
                "proxy_from names balancers: it needs proxy_protocol = true".into(),
            ));
        }
        if self.nats.is_some() && !self.database_url().starts_with("postgres") {
            return Err(ConfigError::Range(
                "nats (a cluster) needs a PostgreSQL registry shared by the nodes: set database_url to postgres://...".into(),
            ));
        }
        if !(2048..=16_389).contains(&self.max_tls_record_size) {
            return Err(ConfigError::Range("max_tls_record_size must be between 2048 and 16389".into()));
        }
        if self.revocation_poll_ms == 0 || self.reload_poll_ms == 0 {
            return Err(ConfigError::Range("revocation_poll_ms and reload_poll_ms must be positive".into()));
        }
        Ok(())
    }

    /// The configuration as `check-config` and the logs may show it: passwords in URLs
    /// replaced by `***`.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.nats = c.nats.as_deref().map(redact_url);
        c.database_url = c.database_url.as_deref().map(redact_url);
        c.admin_database_url = c.admin_database_url.as_deref().map(redact_url);
        c
    }

    /// Handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout_secs.duration()
    }

    /// Longest wait for a registry connection.
    pub fn registry_timeout(&self) -> Duration {
        self.registry_timeout_secs.duration()
    }

    /// Longest wait for a JetStream acknowledgement.
    pub fn nats_timeout(&self) -> Duration {
        self.nats_timeout_secs.duration()
    }

    /// Longest a write may wait for the peer to accept bytes.
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout_secs.duration()
    }

    /// Interval of rate-limited log lines.
    pub fn log_interval(&self) -> Duration {
        self.log_interval_secs.duration()
    }

    /// Admin listener: deadline for a request's headers.
    pub fn admin_header_timeout(&self) -> Duration {
        self.admin_header_timeout_secs.duration()
    }

    /// Admin listener: a connection that moves no byte for this long is closed.
    pub fn admin_idle_timeout(&self) -> Duration {
        self.admin_idle_timeout_secs.duration()
    }

    /// CONNECT deadline.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout_secs.duration()
    }

    fn fleet_home(&self) -> Home {
        Home::new(&self.home)
    }

    /// Broker certificate chain path.
    pub fn cert_path(&self) -> PathBuf {
        self.cert.clone().unwrap_or_else(|| self.fleet_home().broker_tls().cert())
    }

    /// Broker key path.
    pub fn key_path(&self) -> PathBuf {
        self.key.clone().unwrap_or_else(|| self.fleet_home().broker_tls().key())
    }

    /// Client CA path.
    pub fn client_ca_path(&self) -> PathBuf {
        self.client_ca.clone().unwrap_or_else(|| self.fleet_home().device_ca())
    }

    /// CRL path, if any: the configured one, or HOME/crl.pem once it exists.
    pub fn crl_path(&self) -> Option<PathBuf> {
        match &self.crl {
            Some(p) => Some(p.clone()),
            None => Some(self.fleet_home().crl()).filter(|p| p.exists()),
        }
    }

    /// The telemetry log's directory: `store_log_dir`, or HOME/telemetry-log.
    pub fn store_log_dir_path(&self) -> PathBuf {
        self.store_log_dir.clone().unwrap_or_else(|| self.fleet_home().root().join("telemetry-log"))
    }

    /// `store = log` (the default) rather than `registry`.
    pub fn store_in_log(&self) -> bool {
        self.store != "registry"
    }

    /// The directory of firmware images the broker serves: `ota_blob_dir`, or HOME/ota-blobs.
    pub fn ota_blob_dir_path(&self) -> PathBuf {
        self.ota_blob_dir.clone().unwrap_or_else(|| self.fleet_home().ota_blobs())
    }

    /// Registry URL.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| self.fleet_home().default_database_url())
    }
}
