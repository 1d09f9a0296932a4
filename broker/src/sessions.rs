//! The live-session table: at most one session per device id, and the revocation race.
//!
//! The table also remembers every serial the revocation feed has reported since the broker
//! started, under the same lock as the sessions: a session registered after its serial was
//! reported is cut at registration, one registered before is cut by the feed. That closes the
//! window between the admission query and registration without a second registry round trip per
//! admission.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use fleet_registry::{DeviceId, SerialNumber};
use tokio_util::sync::CancellationToken;

use crate::outcome::CloseReason;

/// Cuts a session, remembering why (the first reason wins).
#[derive(Debug, Clone, Default)]
pub(crate) struct Kick {
    token: CancellationToken,
    reason: Arc<OnceLock<CloseReason>>,
}

impl Kick {
    /// A kick that the broker's `shutdown` also triggers (one future for a session to watch).
    pub(crate) fn under(shutdown: &CancellationToken) -> Self {
        Self { token: shutdown.child_token(), reason: Arc::default() }
    }

    /// Why the session ended once [`Kick::cut_done`] completed: the cut's reason, or the
    /// broker's shutdown.
    pub(crate) fn end_reason(&self) -> CloseReason {
        self.reason().unwrap_or(CloseReason::Shutdown)
    }

    /// Cuts the session for `reason` (a later cut keeps the first reason).
    pub(crate) fn cut(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Completes once the session is cut (or, for [`Kick::under`], the broker shuts down).
    pub(crate) async fn cut_done(&self) {
        self.token.cancelled().await;
    }

    /// Why it was cut, once it was.
    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Whether it was cut.
    #[cfg(test)]
    pub(crate) fn is_cut(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// What the admin API shows of a live session: where from, since when, packets in and out.
#[derive(Debug)]
pub(crate) struct SessionInfo {
    /// The client's address (behind a PROXY-protocol balancer: the one it reported).
    pub(crate) peer: std::net::SocketAddr,
    /// Admission time, unix milliseconds.
    pub(crate) since_ms: i64,
    /// PUBLISH packets received from the client.
    pub(crate) received: AtomicU64,
    /// PUBLISH packets sent to it.
    pub(crate) sent: AtomicU64,
}

impl SessionInfo {
    pub(crate) fn new(peer: std::net::SocketAddr, since_ms: i64) -> Arc<Self> {
        Arc::new(Self { peer, since_ms, received: AtomicU64::new(0), sent: AtomicU64::new(0) })
    }

    /// One PUBLISH received.
    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// One PUBLISH sent.
    pub(crate) fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// One live session, as the table knows it.
#[derive(Debug, Clone)]
pub(crate) struct LiveSession {
    /// The connection running it.
    pub(crate) conn_id: u64,
    /// The certificate it was admitted with.
    pub(crate) serial: SerialNumber,
    /// That certificate's notAfter (unix seconds).
    pub(crate) not_after: i64,
    /// How to cut it.
    pub(crate) kick: Kick,
    /// Peer, admission time, counters.
    pub(crate) info: Arc<SessionInfo>,
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<String, LiveSession>,
    /// Live claim sessions (`claims/<claim>/<nonce>`) per claim id.
    claims: HashMap<String, usize>,
    revoked: HashSet<SerialNumber>,
    /// Connections of other listeners (the admin API), by certificate, then connection id.
    attached: HashMap<SerialNumber, HashMap<u64, Kick>>,
}

/// The claim id of a claim session's key (`claims/<claim>/<nonce>`).
fn claim_of(key: &str) -> Option<&str> {
    fleet_topic::parse_claim_session(key).map(|(claim, _)| claim)
}

/// Live sessions by session key (the device id; a claim session's client id).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Single inserts/removes: a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session, returning the kick handle of the one it replaces. A session whose
    /// serial the feed already reported as revoked is cut at once.
    pub(crate) fn register(&self, key: &str, s: LiveSession) -> Option<Kick> {
        let mut m = self.lock();
        if m.revoked.contains(&s.serial) {
            s.kick.cut(CloseReason::Revoked);
        }
        let old = m.live.insert(key.to_owned(), s).map(|old| old.kick);
        if old.is_none() {
            if let Some(claim) = claim_of(key) {
                *m.claims.entry(claim.to_owned()).or_default() += 1;
            }
        }
        old
    }

    /// Live sessions of claim `claim` (all its nonces).
    pub(crate) fn claim_sessions(&self, claim: &str) -> usize {
        self.lock().claims.get(claim).copied().unwrap_or(0)
    }

    /// Forgets the session of `id` if connection `conn_id` still runs it (a takeover may have
    /// replaced it already).
    pub(crate) fn remove(&self, key: &str, conn_id: u64) {
        let mut m = self.lock();
        if m.live.get(key).is_some_and(|s| s.conn_id == conn_id) {
            m.live.remove(key);
            if let Some(claim) = claim_of(key) {
                if let Some(n) = m.claims.get_mut(claim) {
                    *n -= 1;
                    if *n == 0 {
                        m.claims.remove(claim);
                    }
                }
            }
        }
    }

    /// Attaches a connection of another listener (the admin API) to its certificate: the
    /// revocation feed cuts it as it cuts an MQTT session, and one whose serial the feed
    /// already reported is cut at once (the same race, closed the same way). Detach it when it
    /// ends.
    pub(crate) fn attach(&self, serial: &SerialNumber, conn_id: u64, kick: &Kick) {
        let mut m = self.lock();
        if m.revoked.contains(serial) {
            kick.cut(CloseReason::Revoked);
        }
        m.attached.entry(serial.clone()).or_default().insert(conn_id, kick.clone());
    }

    /// Forgets an attached connection.
    pub(crate) fn detach(&self, serial: &SerialNumber, conn_id: u64) {
        let mut m = self.lock();
        if let Some(conns) = m.attached.get_mut(serial) {
            conns.remove(&conn_id);
            if conns.is_empty() {
                m.attached.remove(serial);
            }
        }
    }

    /// Records that certificate `serial` of `id` is revoked and cuts the session running on it,
    /// if any, and every connection attached to it. Returns whether a session was cut.
    pub(crate) fn kick_serial(&self, id: &DeviceId, serial: &SerialNumber) -> bool {
        let mut m = self.lock();
        m.revoked.insert(serial.clone());
        for kick in m.attached.remove(serial).into_iter().flat_map(HashMap::into_values) {
            kick.cut(CloseReason::Revoked);
        }
        match m.live.get(id.as_str()) {
            Some(s) if &s.serial == serial => {
                s.kick.cut(CloseReason::Revoked);
                true
            }
            _ => false,
        }
    }

    /// True if the feed has reported `serial` as revoked.
    pub(crate) fn is_revoked(&self, serial: &SerialNumber) -> bool {
        self.lock().revoked.contains(serial)
    }

    /// Live sessions by how soon their certificates expire: `counts[i]` is the number expiring
    /// within `bounds[i]` seconds from `now` but not within `bounds[i - 1]`; the last entry,
    /// one past `bounds`, counts the rest.
    pub(crate) fn expiry_buckets(&self, now: i64, bounds: &[i64]) -> Vec<i64> {
        let mut counts = vec![0; bounds.len() + 1];
        for s in self.lock().live.values() {
            let left = s.not_after.saturating_sub(now);
            let i = bounds.iter().position(|&b| left <= b).unwrap_or(bounds.len());
            counts[i] += 1;
        }
        counts
    }

    /// The live session under `key` (a device id), if any.
    pub(crate) fn get(&self, key: &str) -> Option<LiveSession> {
        self.lock().live.get(key).cloned()
    }

    /// Number of live sessions.
    pub(crate) fn len(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> Arc<SessionInfo> {
        SessionInfo::new(std::net::SocketAddr::from(([127, 0, 0, 1], 1)), 0)
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("id")
    }

    fn session(conn_id: u64, serial: &SerialNumber) -> LiveSession {
        LiveSession { conn_id, serial: serial.clone(), not_after: 0, kick: Kick::default(), info: info() }
    }

    #[test]
    fn a_revocation_reported_before_registration_cuts_at_registration() {
        let t = Sessions::default();
        let serial = SerialNumber::random();
        assert!(!t.kick_serial(&id("d"), &serial), "nothing live to cut yet");
        let s = session(1, &serial);
        assert!(t.register("d", s.clone()).is_none());
        assert!(s.kick.is_cut());
        assert_eq!(s.kick.reason(), Some(CloseReason::Revoked));
        assert!(t.is_revoked(&serial));
    }

    #[test]
    fn a_revocation_reported_after_registration_cuts_the_live_session() {
        let t = Sessions::default();
        let serial = SerialNumber::random();
        let s = session(1, &serial);
        t.register("d", s.clone());
        assert!(!s.kick.is_cut());
        assert!(t.kick_serial(&id("d"), &serial));
        assert_eq!(s.kick.reason(), Some(CloseReason::Revoked));
    }

    #[test]
    fn another_certificates_revocation_leaves_the_session_alone() {
        let t = Sessions::default();
        let (old, new) = (SerialNumber::random(), SerialNumber::random());
        let s = session(1, &new);
        t.register("d", s.clone());
        assert!(!t.kick_serial(&id("d"), &old), "superseded certificate, not this session's");
        assert!(!s.kick.is_cut());
    }

    #[test]
    fn takeover_returns_the_old_session_and_only_the_owner_removes_itself() {
        let t = Sessions::default();
        let serial = SerialNumber::random();
        let first = session(1, &serial);
        t.register("d", first.clone());
        let old = t.register("d", session(2, &serial)).expect("replaced");
        old.cut(CloseReason::Takeover);
        assert_eq!(first.kick.reason(), Some(CloseReason::Takeover));
        t.remove("d", 1); // the replaced connection ends: must not remove its successor
        assert_eq!(t.len(), 1);
        t.remove("d", 2);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn attached_connections_are_cut_by_their_certificates_revocation_before_or_after() {
        let t = Sessions::default();
        let (serial, other) = (SerialNumber::random(), SerialNumber::random());
        let (a, b, c) = (Kick::default(), Kick::default(), Kick::default());
        t.attach(&serial, 1, &a);
        t.attach(&serial, 2, &b);
        t.attach(&other, 3, &c);
        assert!(!t.kick_serial(&id("op"), &serial), "no MQTT session to cut");
        assert!(a.is_cut() && b.is_cut(), "both connections of the revoked certificate");
        assert!(!c.is_cut(), "another certificate's connection");
        let late = Kick::default();
        t.attach(&serial, 4, &late);
        assert_eq!(late.reason(), Some(CloseReason::Revoked), "attached after the report: cut at once");
        t.detach(&other, 3);
        t.detach(&serial, 4);
    }

    #[test]
    fn the_first_reason_wins() {
        let k = Kick::default();
        k.cut(CloseReason::Takeover);
        k.cut(CloseReason::Revoked);
        assert_eq!(k.reason(), Some(CloseReason::Takeover));
    }

    #[test]
    fn sessions_are_counted_by_how_soon_their_certificate_expires() {
        let t = Sessions::default();
        for (i, days_left) in [0, 3, 3, 45, 4000].into_iter().enumerate() {
            let live = LiveSession {
                conn_id: i as u64,
                serial: SerialNumber::random(),
                not_after: 1_000 + days_left * 86_400,
                kick: Kick::default(),
                info: info(),
            };
            t.register(&format!("dev-{i}"), live);
        }
        let bounds = [86_400, 7 * 86_400, 30 * 86_400, 90 * 86_400];
        assert_eq!(t.expiry_buckets(1_000, &bounds), [1, 2, 0, 1, 1]);
    }
}
