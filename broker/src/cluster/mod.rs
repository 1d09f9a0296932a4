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
//! What this step does not do yet: durable ingest through JetStream (the store still commits
//! to the registry), revocation fan-out over NATS (every node already watches the shared
//! PostgreSQL registry), retained messages across nodes.

pub(crate) mod subject;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::router::Router;

/// Header carrying the QoS a message was published with.
const QOS: &str = "Fleet-QoS";
/// Header set on retained messages.
const RETAIN: &str = "Fleet-Retain";

/// Why the node could not join the cluster.
#[derive(Debug, thiserror::Error)]
#[error("NATS {url}: {source}")]
pub struct ClusterError {
    url: String,
    #[source]
    source: async_nats::ConnectError,
}

/// The node's NATS connection and the subjects it subscribes to.
#[derive(Debug)]
pub(crate) struct Cluster {
    client: Client,
    /// Random, for the session claims of this node.
    node_id: u64,
    /// Subject → (local filters needing it, the task forwarding it to the router).
    subs: Mutex<HashMap<String, (usize, JoinHandle<()>)>>,
}

impl Cluster {
    /// Connects to NATS at `url`. The connection comes back by itself after an outage.
    pub(crate) async fn connect(url: &str) -> Result<Self, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .no_echo()
            .name("fleet-broker")
            .connect(url)
            .await
            .map_err(|source| ClusterError { url: url.to_owned(), source })?;
        info!(%url, "cluster member: routing through NATS");
        Ok(Self { client, node_id: rand::random(), subs: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (usize, JoinHandle<()>)>> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a message this node accepted, for the other nodes' subscribers. Best effort,
    /// like delivery to local subscribers: the publisher's acknowledgement is the store's.
    pub(crate) async fn publish(&self, p: &Publish) {
        let mut headers = HeaderMap::new();
        headers.insert(QOS, if p.qos == QoS::AtMostOnce { "0" } else { "1" });
        if p.retain {
            headers.insert(RETAIN, "1");
        }
        let subject = subject::subject_of(&p.topic);
        if let Err(e) = self.client.publish_with_headers(subject, headers, p.payload.clone()).await {
            warn!(error = %e, topic = %p.topic, "cluster publish failed");
        }
    }

    /// A local session holds `filter`: subscribe to its subjects unless already subscribed.
    pub(crate) async fn watch(&self, filter: &str, router: &Arc<Router>, metrics: &Metrics) {
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

/// A claim: which node admitted a session of a device, and when (unix nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    started: u128,
    node: u64,
}

impl Claim {
    fn encode(self) -> Bytes {
        Bytes::from(format!("{} {}", self.started, self.node))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let (started, node) = std::str::from_utf8(b).ok()?.split_once(' ')?;
        Some(Self { started: started.parse().ok()?, node: node.parse().ok()? })
    }
}

/// Listens to other nodes' claims on a device for as long as this node's session of it lives.
#[derive(Debug)]
pub(crate) struct ClaimGuard(JoinHandle<()>);

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Cluster {
    /// This node admitted a session of `device`: tells the other nodes, and calls `cut` if
    /// another node admits the device later.
    pub(crate) async fn claim(&self, device: &str, cut: impl Fn() + Send + 'static) -> Option<ClaimGuard> {
        let mine = Claim {
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            node: self.node_id,
        };
        let subject = subject::session_subject(device);
        // Subscribed before the claim goes out: a claim racing ours is seen either way.
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, %subject, "cluster session subscribe failed");
                return None;
            }
        };
        if let Err(e) = self.client.publish(subject, mine.encode()).await {
            warn!(error = %e, "cluster session claim failed");
        }
        Some(ClaimGuard(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                match Claim::decode(&m.payload) {
                    Some(theirs) if theirs > mine => {
                        cut();
                        return;
                    }
                    _ => {}
                }
            }
        })))
    }
}

/// Hands every message of `sub` to the router's local subscribers.
async fn forward(mut sub: async_nats::Subscriber, router: Weak<Router>, metrics: Metrics) {
    while let Some(m) = sub.next().await {
        let Some(router) = router.upgrade() else { return };
        let Some(topic) = subject::topic_of(m.subject.as_str()) else { continue };
        let header = |name: &str| m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str() == "1");
        let qos = if header(QOS) == Some(true) { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        let mut p = Publish::new(topic, qos, Bytes::new());
        p.payload = m.payload;
        p.retain = header(RETAIN) == Some(true);
        router.deliver_remote(&p, &metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_claim_wins_and_the_node_id_breaks_a_tie() {
        let a = Claim { started: 10, node: 7 };
        let later = Claim { started: 11, node: 1 };
        let same_time = Claim { started: 10, node: 8 };
        assert!(later > a && same_time > a);
        assert_eq!(Claim::decode(&later.encode()), Some(later));
        assert_eq!(Claim::decode(b"garbage"), None);
        assert_eq!(Claim::decode(b"1 x"), None);
    }
}
