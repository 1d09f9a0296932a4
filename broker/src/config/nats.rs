//! The cluster's keys: how a node authenticates to NATS (`nats_security`) and the stream
//! readers' consumers (`nats_readers`).

use super::settings::Config;
use super::value::ConfigError;

/// The durable consumer the nodes' SQL sinks share (no reader may take its name).
pub const SQL_CONSUMER: &str = "fleet-sql-sink";

impl Config {
    /// How a node's NATS connection is protected, or why it is refused: TLS (a CA to verify
    /// the server, a client certificate or a `tls://` URL) and a client identity (certificate,
    /// nkey seed or `user:password@` in the URL), unless `insecure_nats_no_auth`.
    pub fn nats_security(&self, url: &str) -> Result<NatsSecurity, ConfigError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| ConfigError::Range(format!("nats: {} is not a URL: {e}", redact_url(url))))?;
        if !matches!(parsed.scheme(), "nats" | "tls") {
            return Err(ConfigError::Range(format!(
                "nats: {} must start with nats:// or tls://",
                redact_url(url)
            )));
        }
        if self.nats_cert.is_some() != self.nats_key.is_some() {
            return Err(ConfigError::Range("nats_cert and nats_key go together: set both or neither".into()));
        }
        let password = !parsed.username().is_empty();
        let identity = self.nats_cert.is_some() || self.nats_nkey.is_some() || password;
        let tls = self.nats_ca.is_some() || self.nats_cert.is_some() || parsed.scheme() == "tls";
        let security = NatsSecurity { tls, identity };
        let protected = tls && identity;
        if !protected && !self.insecure_nats_no_auth {
            let missing = match (tls, identity) {
                (false, false) => "neither TLS nor a client identity",
                (false, true) => "no TLS (credentials would cross the network in clear)",
                _ => "no client identity",
            };
            return Err(ConfigError::Range(format!(
                "nats: the cluster bus has {missing}. Anyone who reaches an open NATS server can forge \
                 device messages, commands and revocations. Give this node a certificate \
                 (fleet-provision node-cert --name <node>; nats_ca, nats_cert, nats_key; or nats_nkey) and run \
                 nats-server with deploy/nats/nats-server.conf, or set insecure_nats_no_auth = true \
                 for a development server on loopback"
            )));
        }
        Ok(security)
    }

    /// The stream readers' consumers of `nats_readers`: (name, MQTT filter; `#` when none).
    pub fn nats_readers(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        for entry in self.nats_readers.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, filter) = entry.split_once('=').unwrap_or((entry, "#"));
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok || name == SQL_CONSUMER {
                return Err(ConfigError::Range(format!(
                    "nats_readers: {name:?} is not a reader's consumer name (letters, digits, '-', '_'; not the nodes' {})",
                    SQL_CONSUMER
                )));
            }
            if fleet_topic::TopicFilter::parse(filter).is_err() {
                return Err(ConfigError::Range(format!(
                    "nats_readers: {filter:?} is not an MQTT topic filter"
                )));
            }
            out.push((name.to_owned(), filter.to_owned()));
        }
        Ok(out)
    }
}

/// What protects a node's NATS connection (`Config::nats_security`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatsSecurity {
    /// The connection uses TLS.
    pub tls: bool,
    /// The node presents an identity (certificate, credentials file or user and password).
    pub identity: bool,
}

/// `url` with its passwords replaced by `***` (user information and query parameters).
pub fn redact_url(url: &str) -> String {
    fleet_registry::redact_url(url)
}
