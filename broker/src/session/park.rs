//! Persistent sessions (MQTT 3.1.1 clean session = 0, docs/spec/commands.md): when such a
//! client disconnects, its subscriptions stay in the router (delivering into its inbox, up to
//! `max_queued_messages`) and its unacknowledged QoS 1 deliveries are kept, for
//! `session_expiry_secs`. Node-local and in memory: a broker restart forgets them (the command
//! queue is in the database and does not depend on them).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rumqttc::mqttbytes::v4::Publish;

use crate::inbox::Inbox;
use crate::Shared;

/// What a disconnected persistent session keeps.
#[derive(Debug)]
pub(crate) struct Parked {
    /// The router key its subscriptions are held under (its first connection's id).
    pub(crate) router_id: u64,
    /// Where the router keeps delivering.
    pub(crate) inbox: Arc<Inbox>,
    /// Its filters.
    pub(crate) subs: HashSet<String>,
    /// QoS 1 deliveries sent and not acknowledged (re-sent with DUP on resume).
    pub(crate) in_flight: Vec<Publish>,
    /// Forgotten after this.
    pub(crate) expires: Instant,
}

/// Parked sessions by session key.
#[derive(Debug, Default)]
pub(crate) struct ParkedSessions {
    inner: Mutex<HashMap<String, Parked>>,
}

impl ParkedSessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Parked>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `p` for `key`.
    pub(crate) fn park(&self, key: String, p: Parked) {
        self.lock().insert(key, p);
    }

    /// Takes the kept session of `key`, if any (a resume).
    pub(crate) fn take(&self, key: &str) -> Option<Parked> {
        self.lock().remove(key)
    }

    /// Number kept.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Removes the expired ones (and `key`'s, when given: a clean start or a revocation).
    pub(crate) fn expire(&self, now: Instant) -> Vec<Parked> {
        let mut m = self.lock();
        let keys: Vec<String> = m.iter().filter(|(_, p)| p.expires <= now).map(|(k, _)| k.clone()).collect();
        keys.into_iter().filter_map(|k| m.remove(&k)).collect()
    }
}

/// Forgets a kept session: its subscriptions leave the router (and the cluster).
pub(crate) fn discard(shared: &Shared, p: Parked) {
    for f in shared.router.remove_connection(p.router_id) {
        if let Some(cluster) = &shared.cluster {
            cluster.unwatch(&f);
        }
    }
}
