//! Persistent sessions (MQTT 3.1.1 clean session = 0, docs/spec/commands.md): when such a
//! client disconnects, its subscriptions stay in the router (delivering into its inbox, up to
//! `max_queued_messages`) and its unacknowledged QoS 1 deliveries are kept, for
//! `session_expiry_secs`. Node-local and in memory: a broker restart forgets them (the command
//! queue is in the database and does not depend on them).
//!
//! A kept session belongs to the certificate that parked it: only a connection on that same
//! certificate (serial) resumes it; any other certificate of the identity — a re-keyed or
//! renewed device, or a thief's copy of an old key — starts clean and the kept state is
//! discarded. A revoked certificate's kept sessions are discarded when the revocation is seen
//! (the registry feed and, in a cluster, other nodes' announcements both end in
//! [`crate::watch`]). Kept sessions are capped per claim (the nonces of one claim
//! certificate) and in total; one over a cap is not kept (`fleet_limits_total`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::message::Message;
use fleet_registry::SerialNumber;

use tokio_util::sync::CancellationToken;

use crate::fabric::Fabric;
use crate::inbox::Inbox;
use crate::observe::metrics::Limit;
use crate::observe::Observe;
use crate::outcome::Discard;
use crate::sessions::Sessions;

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
    pub(crate) in_flight: Vec<Message>,
    /// Forgotten after this.
    pub(crate) expires: Instant,
    /// The certificate that parked it: the only one that may resume it.
    pub(crate) serial: SerialNumber,
    /// The identity's id (a claim session's claim id: its caps count per claim).
    pub(crate) owner: String,
    /// Whether the owner is a claim (capped per claim).
    pub(crate) claim: bool,
}

/// Caps on kept sessions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ParkLimits {
    /// Per claim id (all nonces of one claim certificate).
    pub(crate) per_claim: usize,
    /// In the broker.
    pub(crate) total: usize,
}

impl Default for ParkLimits {
    fn default() -> Self {
        Self { per_claim: 16, total: 100_000 }
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_key: HashMap<String, Parked>,
    /// Kept sessions per claim id.
    per_claim: HashMap<String, usize>,
    /// Session keys by the serial that parked them: a revocation finds its sessions without
    /// a walk over every kept session (a batch revocation reports many serials).
    by_serial: HashMap<SerialNumber, HashSet<String>>,
}

impl Inner {
    fn insert(&mut self, key: String, p: Parked) {
        if p.claim {
            *self.per_claim.entry(p.owner.clone()).or_default() += 1;
        }
        self.by_serial.entry(p.serial.clone()).or_default().insert(key.clone());
        self.by_key.insert(key, p);
    }

    fn remove(&mut self, key: &str) -> Option<Parked> {
        let p = self.by_key.remove(key)?;
        if let Some(keys) = self.by_serial.get_mut(&p.serial) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_serial.remove(&p.serial);
            }
        }
        if p.claim {
            if let Some(n) = self.per_claim.get_mut(&p.owner) {
                *n -= 1;
                if *n == 0 {
                    self.per_claim.remove(&p.owner);
                }
            }
        }
        Some(p)
    }
}

/// Parked sessions by session key (the identity's id; a claim session's client id).
#[derive(Debug, Default)]
pub(crate) struct ParkedSessions {
    inner: Mutex<Inner>,
    limits: ParkLimits,
}

impl ParkedSessions {
    /// A store with these caps.
    pub(crate) fn new(limits: ParkLimits) -> Self {
        Self { inner: Mutex::default(), limits }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `p` for `key`, unless a cap is reached: then `p` comes back with the cap. A session
    /// already kept under `key` (none in practice: a session takes its key's at its start) is
    /// replaced and returned.
    pub(crate) fn park(&self, key: String, p: Parked) -> Result<Option<Parked>, (Limit, Box<Parked>)> {
        let mut m = self.lock();
        let old = m.remove(&key);
        if m.by_key.len() >= self.limits.total {
            if let Some(old) = old {
                m.insert(key, old);
            }
            return Err((Limit::ParkedTotal, Box::new(p)));
        }
        if p.claim && m.per_claim.get(&p.owner).copied().unwrap_or(0) >= self.limits.per_claim {
            if let Some(old) = old {
                m.insert(key, old);
            }
            return Err((Limit::ParkedPerClaim, Box::new(p)));
        }
        m.insert(key, p);
        Ok(old)
    }

    /// Takes the kept session of `key`, if any (a resume).
    pub(crate) fn take(&self, key: &str) -> Option<Parked> {
        self.lock().remove(key)
    }

    /// Takes the kept session of `key` if certificate `serial` parked it.
    pub(crate) fn take_if_parked_by(&self, key: &str, serial: &SerialNumber) -> Option<Parked> {
        let mut m = self.lock();
        if m.by_key.get(key).is_some_and(|p| &p.serial == serial) {
            m.remove(key)
        } else {
            None
        }
    }

    /// Takes every kept session certificate `serial` parked (it was revoked).
    pub(crate) fn take_parked_by(&self, serial: &SerialNumber) -> Vec<Parked> {
        let mut m = self.lock();
        let keys: Vec<String> =
            m.by_serial.get(serial).map(|k| k.iter().cloned().collect()).unwrap_or_default();
        keys.iter().filter_map(|k| m.remove(k)).collect()
    }

    /// Number kept.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    /// Removes the expired ones.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Parked> {
        let mut m = self.lock();
        let keys: Vec<String> =
            m.by_key.iter().filter(|(_, p)| p.expires <= now).map(|(k, _)| k.clone()).collect();
        keys.iter().filter_map(|k| m.remove(k)).collect()
    }
}

/// Kept sessions and what forgetting one involves (its subscriptions leave the fabric): the
/// service the session task, the revocation watcher and the sweep share.
#[derive(Debug, Clone)]
pub(crate) struct Parking {
    table: Arc<ParkedSessions>,
    fabric: Fabric,
    observe: Observe,
    /// Serials the revocation feed reported.
    sessions: Arc<Sessions>,
}

impl Parking {
    /// Kept sessions within `limits`.
    pub(crate) fn new(limits: ParkLimits, fabric: Fabric, observe: Observe, sessions: Arc<Sessions>) -> Self {
        Self { table: Arc::new(ParkedSessions::new(limits)), fabric, observe, sessions }
    }

    /// Takes the kept session of `key`, if any (a resume).
    pub(crate) fn take(&self, key: &str) -> Option<Parked> {
        self.table.take(key)
    }

    /// Sets the kept-sessions gauge.
    pub(crate) fn count(&self) {
        self.observe.metrics().sessions_parked.set(self.table.len() as i64);
    }

    /// Forgets a kept session: its subscriptions leave the router (and the cluster).
    pub(crate) fn discard(&self, p: Parked, why: Discard) {
        self.observe.metrics().parked_discarded(why);
        self.release(p);
    }

    /// Drops a session's subscriptions from the router (and the cluster).
    pub(crate) fn release(&self, p: Parked) {
        self.fabric.remove_connection(p.router_id);
        // What it held through shared subscriptions, unacknowledged or not yet sent, goes to
        // another member of the group (MQTT 5 §4.8.2).
        for m in p.in_flight.iter().filter(|m| m.shared.is_some()) {
            self.fabric.redeliver(m);
        }
        while let Some(m) = p.inbox.try_next() {
            if m.shared.is_some() {
                self.fabric.redeliver(&m);
            }
        }
    }

    /// Keeps a persistent session whose client left, within the caps. A revocation of its
    /// certificate seen meanwhile is honoured: the feed marks the serial revoked before it
    /// looks for kept sessions ([`Parking::revoked`]), and this looks at the mark after
    /// keeping, so whichever runs second finds the other's work and the session is never left
    /// kept.
    pub(crate) fn keep(&self, key: String, p: Parked) {
        let serial = p.serial.clone();
        match self.table.park(key.clone(), p) {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    self.release(old);
                }
                if self.sessions.is_revoked(&serial) {
                    if let Some(p) = self.table.take_if_parked_by(&key, &serial) {
                        self.discard(p, Discard::Revoked);
                    }
                }
            }
            Err((limit, p)) => {
                self.observe.metrics().limit(limit);
                tracing::warn!(session = %key, limit = limit.label(), "persistent session not kept: cap reached");
                self.release(*p);
            }
        }
        self.count();
    }

    /// Certificate `serial` was revoked: its kept sessions go (subscriptions out of the
    /// router). Returns how many. Called after the session table recorded the revocation.
    pub(crate) fn revoked(&self, serial: &SerialNumber) -> usize {
        let gone = self.table.take_parked_by(serial);
        let n = gone.len();
        for p in gone {
            self.discard(p, Discard::Revoked);
        }
        if n > 0 {
            self.count();
        }
        n
    }

    /// Every second until `shutdown`: forgets the kept sessions whose clients stayed away
    /// longer than `session_expiry_secs`.
    pub(crate) async fn sweep(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for p in self.table.expire(Instant::now()) {
                self.discard(p, Discard::Expired);
            }
            self.count();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(owner: &str, claim: bool, serial: &SerialNumber) -> Parked {
        Parked {
            router_id: 1,
            inbox: Arc::new(Inbox::new(1)),
            subs: Default::default(),
            in_flight: Vec::new(),
            expires: Instant::now() + std::time::Duration::from_secs(60),
            serial: serial.clone(),
            owner: owner.into(),
            claim,
        }
    }

    #[test]
    fn kept_sessions_are_capped_per_claim_and_in_total() {
        let s = ParkedSessions::new(ParkLimits { per_claim: 2, total: 4 });
        let serial = SerialNumber::random();
        for nonce in ["a", "b"] {
            assert!(s.park(format!("claims/c1/{nonce}"), parked("c1", true, &serial)).is_ok());
        }
        let over = s.park("claims/c1/c".into(), parked("c1", true, &serial));
        assert!(matches!(over, Err((Limit::ParkedPerClaim, _))));
        assert!(s.park("claims/c2/a".into(), parked("c2", true, &serial)).is_ok());
        assert!(s.park("dev-1".into(), parked("dev-1", false, &serial)).is_ok());
        let over = s.park("dev-2".into(), parked("dev-2", false, &serial));
        assert!(matches!(over, Err((Limit::ParkedTotal, _))));
        // A resume frees its claim's place.
        assert!(s.take("claims/c1/a").is_some());
        assert_eq!(s.len(), 3);
        assert!(s.park("claims/c1/c".into(), parked("c1", true, &serial)).is_ok());
    }

    #[test]
    fn only_the_parking_certificate_takes_it_and_a_revocation_takes_all_of_its() {
        let s = ParkedSessions::default();
        let (old, new) = (SerialNumber::random(), SerialNumber::random());
        s.park("dev-1".into(), parked("dev-1", false, &old)).unwrap();
        s.park("claims/c/n1".into(), parked("c", true, &old)).unwrap();
        s.park("dev-2".into(), parked("dev-2", false, &new)).unwrap();
        assert!(s.take_if_parked_by("dev-1", &new).is_none());
        assert_eq!(s.take_parked_by(&old).len(), 2);
        assert_eq!(s.len(), 1);
        assert!(s.take_if_parked_by("dev-2", &new).is_some());
        let inner = s.lock();
        assert!(inner.by_key.is_empty() && inner.by_serial.is_empty() && inner.per_claim.is_empty());
    }
}
