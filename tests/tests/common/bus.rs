//! The cluster bus for tests: the shipped nats-server configuration with the fleet's
//! cluster-bus identities, broker nodes on it, and NATS clients holding one of its identities
//! (a node's, the stream reader's, or a device's).

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, HeaderMap};
use fleet_tests::NatsServer;

use super::{Fleet, PATIENCE};

/// The bus of `fleet` (its PKI, its registry): `deploy/nats/nats-server.conf` as shipped.
pub fn start(fleet: &Fleet) -> NatsServer {
    NatsServer::start(&fleet.home(), fleet.db.as_deref())
}

#[allow(unused_imports)] // each test binary uses some
pub use fleet_tests::fixture::node;

/// A NATS client presenting the certificate in `dir` (`cert.pem`, `key.pem`) and trusting
/// `trust` for the server; the connection's first failure is returned, not retried.
pub async fn client_with(
    nats: &NatsServer,
    dir: &Path,
    trust: &Path,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    ConnectOptions::new()
        .add_root_certificates(trust.to_path_buf())
        .add_client_certificate(dir.join("cert.pem"), dir.join("key.pem"))
        .require_tls(true)
        .connection_timeout(Duration::from_secs(3))
        .connect(nats.url())
        .await
}

/// A NATS client with cluster-bus identity `name` of `nats` (a node's or the reader's).
pub async fn client(nats: &NatsServer, name: &str) -> async_nats::Client {
    let dir = nats.identity(name);
    client_with(nats, &dir, &dir.join("broker-trust.pem")).await.unwrap()
}

/// The header a node puts on everything it publishes for the other nodes.
pub fn from_node() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Fleet-Node", "4242");
    h
}

/// As `from_node`, with the client the message came from (`Fleet-Origin`).
pub fn relayed_from(origin: &str) -> HeaderMap {
    let mut h = from_node();
    h.insert("Fleet-Origin", origin);
    h
}

/// Waits until the NATS server lists (or stops listing) `subject` among its subscriptions: a
/// node's interest travels to NATS after the SUBACK, asynchronously.
pub async fn wait_subscription(nats: &NatsServer, subject: &str, present: bool) {
    let t = Instant::now();
    // The monitor's JSON escapes `>` as \u003e.
    let listed = format!("\"{}\"", subject.replace('>', "\\u003e"));
    loop {
        let connz = nats.monitor("/connz?subs=1");
        if connz.contains(&listed) == present {
            return;
        }
        assert!(t.elapsed() < PATIENCE, "subscription {subject} present={present} not reached:\n{connz}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
