//! What a connection's tasks hold: the services a session uses, shared by every session of the
//! broker through one `Arc` (mini-redis's `Handler`: its db, its connection, its shutdown).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::park::Parking;
use super::rate::KeyedBuckets;
use crate::config::Config;
use crate::fabric::Fabric;
use crate::gate::Gate;
use crate::ingest::Ingest;
use crate::observe::Observe;
use crate::ota::Ota;
use crate::sessions::Sessions;

/// The services of the MQTT side.
#[derive(Debug)]
pub(crate) struct Services {
    /// Limits and deadlines.
    pub(crate) config: Arc<Config>,
    /// Admission.
    pub(crate) gate: Arc<Gate>,
    /// Routing, here and to the other nodes.
    pub(crate) fabric: Fabric,
    /// The store and the command queue.
    pub(crate) ingest: Ingest,
    /// The live-session table (one per device id, takeover, revocation).
    pub(crate) sessions: Arc<Sessions>,
    /// Persistent sessions whose clients are away.
    pub(crate) parking: Parking,
    /// Metrics and events.
    pub(crate) observe: Observe,
    /// CSR buckets by identity (`csr_interval_secs`).
    pub(crate) csr_rate: KeyedBuckets,
    /// Firmware updates: chunks, status reports (docs/spec/ota.md).
    pub(crate) ota: Ota,
    /// Cancelled to stop the broker.
    pub(crate) shutdown: CancellationToken,
}

impl Services {
    /// Within the configured topic length and depth?
    pub(crate) fn topic_within(&self, topic: &str) -> bool {
        topic.len() <= self.config.max_topic_length
            && topic.split('/').count() <= self.config.max_topic_levels
    }

    /// A shared subscription's filter within the limits, and its group with it: `<group>/<filter>`
    /// is no longer than a topic may be (both become one NATS queue name and, escaped, part of
    /// the subjects that hand its messages between nodes: `cluster::subject::queue_of`).
    pub(crate) fn share_within(&self, group: &str, filter: &str) -> bool {
        self.topic_within(filter) && group.len() + 1 + filter.len() <= self.config.max_topic_length
    }
}
