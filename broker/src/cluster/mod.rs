//! One broker node of a cluster on NATS (issue 12): device messages a node accepts are published
//! on the NATS subject of their topic ([`subject`]); a node subscribes to the subjects of the
//! filters its own sessions hold, for as long as one holds them, and hands what arrives to its
//! router. A node never receives its own messages back (`no_echo`): its local subscribers got
//! them from its router already.
//!
//! One session per device across the cluster: a node that admits a device publishes a claim
//! (its node id and the session's start time) on the device's session subject and listens
//! there while the session lives; a node holding an older session of that device cuts it
//! (`takeover`). Of two claims the later start wins (node id breaks a tie), so two nodes
//! admitting the same device at once end with one session.
//!
//! Device messages are stored in a JetStream stream ([`stream`]); a PUBACK follows its
//! acknowledgement, and the nodes' SQL sinks feed the telemetry table from it.
//!
//! Revocations fan out over NATS as well as through the registry: a node that sees one in its
//! registry feed announces it on `fleet.r`, and every node cuts the sessions of that
//! certificate and refuses it from then on, so a node whose PostgreSQL notifications lag still
//! cuts within a second.
//!
//! While the NATS connection is down the node admits no one (`cluster_unavailable`, CONNACK 3)
//! and acknowledges nothing it could not store; the client reconnects by itself.
//!
//! Shared subscriptions span the nodes through NATS queue groups ([`shares`]).
//!
//! Not shared across nodes: retained messages (each node keeps those published through it).

mod ask;
pub(crate) mod bus;
pub(crate) mod claims;
mod shares;
pub(crate) mod stream;
pub(crate) mod subject;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use std::time::Duration;

use crate::message::Message;
use async_nats::connection::State;
use async_nats::{jetstream, Client, Event, HeaderMap};
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::observe::metrics::Metrics;
use crate::router::Router;

/// Why the node could not join the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The NATS server is unreachable.
    #[error("NATS {url}: {source}")]
    Connect {
        /// Server URL.
        url: String,
        /// Cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The NATS connection would be unprotected, or its TLS or credential files are unusable.
    #[error("{0}")]
    Insecure(String),
    /// JetStream is off on the server, or the stream cannot be created as configured.
    #[error("JetStream stream {stream} (is the server started with -js?): {source}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// The NATS server takes smaller messages than a client may publish here: a node would
    /// send one over its limit, and the server would close the node's connection.
    #[error(
        "the NATS server takes messages of at most {max_payload} bytes, too few for max_packet_size {max_packet} \
         and the bus headers ({headroom} bytes): lower max_packet_size or raise the server's max_payload",
        headroom = stream::HEADROOM
    )]
    PayloadLimit {
        /// The server's `max_payload`.
        max_payload: usize,
        /// The broker's `max_packet_size`.
        max_packet: usize,
    },
}

/// The node's NATS connection and the subjects it subscribes to.
#[derive(Debug)]
pub(crate) struct Cluster {
    client: Client,
    /// JetStream on the same connection, with the configured acknowledgement timeout.
    pub(crate) js: jetstream::Context,
    /// Random, for the session claims of this node.
    node_id: u64,
    /// Metrics (bus refusals are counted where they happen).
    metrics: Metrics,
    /// Subject → (local filters needing it, the task forwarding it to the router).
    subs: Mutex<HashMap<String, (usize, JoinHandle<()>)>>,
    /// The server's largest message, read when the node joined.
    pub(crate) max_payload: usize,
    /// Shared subscriptions across the nodes.
    shares: shares::Shares,
}

impl Cluster {
    /// Connects to NATS at `config.nats` and creates the stream if it is missing. The
    /// connection comes back by itself after an outage (retried every ≤ 1 s).
    ///
    /// The node authenticates as `Config::nats_security` requires: TLS verified against
    /// `nats_ca`, a client certificate (`nats_cert`, `nats_key`), an nkey seed (`nats_nkey`), or the
    /// user and password of the URL (async-nats ignores those in the URL: they are passed
    /// explicitly, and the URL logged without them).
    pub(crate) async fn connect(
        config: &crate::config::Config,
        metrics: &Metrics,
    ) -> Result<Self, ClusterError> {
        let (options, parsed, security) = connect_options(config)?;
        let shown = crate::config::redact_url(parsed.as_str());
        if !(security.tls && security.identity) {
            warn!(
                url = %shown,
                "insecure_nats_no_auth: this node joins a NATS server without TLS or credentials; \
                 anyone who reaches that server can forge device messages, commands and revocations"
            );
        }
        metrics.cluster_member.set(1);
        let gauge = metrics.cluster_connected.clone();
        let client = options
            .no_echo()
            .name("fleet-broker")
            .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.min(10) as u64))
            .event_callback(move |event| {
                let gauge = gauge.clone();
                async move {
                    match event {
                        Event::Connected => {
                            gauge.set(1);
                            info!("NATS connection up");
                        }
                        Event::Disconnected => {
                            gauge.set(0);
                            warn!("NATS connection lost: admitting no one until it is back");
                        }
                        other => info!(event = %other, "NATS"),
                    }
                }
            })
            .connect(parsed.as_str())
            .await
            .map_err(|source| ClusterError::Connect { url: shown.clone(), source })?;
        // Shared subscriptions' queue subscriptions hear this node's own messages too (`shares`).
        let echo = connect_options(config)?
            .0
            .name("fleet-broker-shares")
            .subscription_capacity(shares::CAPACITY)
            .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.min(10) as u64))
            .connect(parsed.as_str())
            .await
            .map_err(|source| ClusterError::Connect { url: shown.clone(), source })?;
        metrics.cluster_connected.set(1);
        let max_payload = client.server_info().max_payload;
        if config.max_packet_size + stream::HEADROOM > max_payload {
            return Err(ClusterError::PayloadLimit { max_payload, max_packet: config.max_packet_size });
        }
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.nats_timeout());
        let want = stream::stream_config(
            &config.nats_stream,
            config.nats_replicas,
            config.nats_duplicate_window_secs.duration(),
        );
        let fleet_stream = js
            .get_or_create_stream(want)
            .await
            .map_err(|source| ClusterError::Stream { stream: config.nats_stream.clone(), source })?;
        // The readers' consumers: a reader may only fetch from and acknowledge its own, so the
        // nodes make it (validated with the configuration).
        for (name, filter) in config.nats_readers().unwrap_or_default() {
            let made =
                fleet_stream.get_or_create_consumer(&name, stream::reader_consumer(&name, &filter)).await;
            match made {
                Ok(_) => info!(consumer = %name, %filter, "stream reader's consumer ready"),
                Err(e) => warn!(consumer = %name, error = %e, "stream reader's consumer not created"),
            }
        }
        info!(url = %shown, tls = security.tls, stream = %config.nats_stream, "cluster member: routing through NATS, storing in JetStream");
        let node_id = rand::random();
        Ok(Self {
            shares: shares::Shares::new(echo, client.clone(), node_id, metrics.clone(), max_payload),
            client,
            js,
            node_id,
            metrics: metrics.clone(),
            subs: Mutex::default(),
            max_payload,
        })
    }

    /// Is the NATS connection up?
    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (usize, JoinHandle<()>)>> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The headers every message this node publishes for the other nodes carries.
    fn node_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(bus::NODE, self.node_id.to_string().as_str());
        headers
    }

    /// Publishes a message this node accepted from `origin`, for the other nodes' subscribers.
    /// Best effort, like delivery to local subscribers: the publisher's acknowledgement is the
    /// store's.
    pub(crate) async fn publish(&self, p: &Message, origin: bus::Origin<'_>) {
        let headers = bus::headers(self.node_id, p, &origin.encode(), self.max_payload);
        let subject = subject::subject_of(&p.topic);
        if let Err(e) = self.client.publish_with_headers(subject, headers, p.payload.clone()).await {
            warn!(error = %e, topic = p.topic.as_str(), "cluster publish failed");
        }
    }

    /// A local session holds `filter`: subscribe to its subjects unless already subscribed.
    pub(crate) async fn watch(&self, filter: &str, router: &Arc<Router>, metrics: &Metrics) {
        if let Some(Ok((group, inner))) = crate::router::split_shared(filter) {
            return self.shares.join(group, inner, router).await;
        }
        for subject in subject::filter_subjects(filter) {
            if let Some((n, _)) = self.lock().get_mut(&subject) {
                *n += 1;
                continue;
            }
            let sub = match self.client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, %subject, "cluster subscribe failed");
                    continue;
                }
            };
            let task = tokio::spawn(forward(sub, Arc::downgrade(router), metrics.clone()));
            let mut subs = self.lock();
            match subs.get_mut(&subject) {
                // Another session subscribed meanwhile: keep one subscription.
                Some((n, _)) => {
                    *n += 1;
                    task.abort();
                }
                None => {
                    subs.insert(subject, (1, task));
                }
            }
        }
    }

    /// A local session let go of `filter`: unsubscribe from what no other one needs.
    pub(crate) fn unwatch(&self, filter: &str) {
        if let Some(Ok((group, inner))) = crate::router::split_shared(filter) {
            return self.shares.leave(group, inner);
        }
        let mut subs = self.lock();
        for subject in subject::filter_subjects(filter) {
            if let Some((n, task)) = subs.get_mut(&subject) {
                *n -= 1;
                if *n == 0 {
                    task.abort(); // dropping the subscriber unsubscribes
                    subs.remove(&subject);
                }
            }
        }
    }
}

/// The options of a node's NATS connections, the URL to connect to (without credentials) and
/// how the connection is protected.
fn connect_options(
    config: &crate::config::Config,
) -> Result<(async_nats::ConnectOptions, url::Url, crate::config::NatsSecurity), ClusterError> {
    let url = config.nats.clone().unwrap_or_default();
    let security = config.nats_security(&url).map_err(|e| ClusterError::Insecure(e.to_string()))?;
    // async-nats builds its rustls configuration from the process default provider: the
    // broker's (ring), unless the embedding program installed one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut options = async_nats::ConnectOptions::new();
    let mut parsed = url::Url::parse(&url).map_err(|e| ClusterError::Insecure(e.to_string()))?;
    if !parsed.username().is_empty() {
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| {
                ClusterError::Insecure(
                    "nats: the URL's user or password is not valid percent-encoding".into(),
                )
            })
        };
        let user = decode(parsed.username())?;
        options = match parsed.password() {
            Some(p) => options.user_and_password(user, decode(p)?),
            // `nats://<token>@host`: NATS's token authentication.
            None => options.token(user),
        };
        // Neither in the URL async-nats keeps (it shows up in its errors) nor in ours.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
    }
    if let Some(ca) = &config.nats_ca {
        file_readable(ca)?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.nats_cert, &config.nats_key) {
        file_readable(cert)?;
        file_readable(key)?;
        options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    if let Some(path) = &config.nats_nkey {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| ClusterError::Insecure(format!("nats_nkey {}: {e}", path.display())))?;
        let seed = seed.trim();
        if !seed.starts_with("SU") {
            return Err(ClusterError::Insecure(format!(
                "nats_nkey {}: not a user nkey seed (it starts with SU)",
                path.display()
            )));
        }
        options = options.nkey(seed.to_owned());
    }
    Ok((options, parsed, security))
}

impl Cluster {
    /// Hands a shared subscription's message, which its member here left unacknowledged and no
    /// other member here took, to a member on another node.
    pub(crate) async fn hand_on(&self, p: &Message) {
        self.shares.hand_on(p).await;
    }
}

/// `%XX`-decoded user or password of a URL.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A TLS file the node needs, readable (async-nats reports a missing one only as a failed
/// connection, retried for ever).
fn file_readable(path: &std::path::Path) -> Result<(), ClusterError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| ClusterError::Insecure(format!("nats: {}: {e}", path.display())))
}

/// Hands every message of `sub` that passes [`bus::relayable`] to the router's local subscribers.
async fn forward(mut sub: async_nats::Subscriber, router: Weak<Router>, metrics: Metrics) {
    while let Some(m) = sub.next().await {
        let Some(router) = router.upgrade() else { return };
        if let Some(p) = bus::admitted(&m, subject::topic_of(m.subject.as_str()), &metrics) {
            router.deliver_remote(&p, &metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stream::{props_fit, HEADROOM};

    #[test]
    fn properties_are_relayed_only_while_the_message_fits_the_server() {
        let limit = 1 << 20;
        assert!(props_fit(limit, 4096, &"x".repeat(1000)));
        assert!(props_fit(limit, limit - HEADROOM - 10, &"x".repeat(10)));
        assert!(!props_fit(limit, limit - HEADROOM - 10, &"x".repeat(11)));
    }
}
