//! The accept loop: never blocks on a handshake (that runs in the connection's own task), caps
//! connections in total and per source address before admission, backs off when accept fails
//! (EMFILE), and stops on shutdown.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::log_limit::LogLimiter;
use crate::metrics::Limit;
use crate::outcome::Refusal;
use crate::{session, Shared};

/// Where a connection comes from, for per-source caps: an IPv4 address, or an IPv6 /64 (a
/// host given a /64, the usual end-site prefix, may use any of its 2^64 addresses, so counting
/// IPv6 addresses one by one would cap nothing). An IPv4-mapped IPv6 address is its IPv4
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(Ipv4Addr),
    /// The upper 64 bits.
    V6(u64),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Self::V4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// Open things counted per key (a source, an identity), each under its own cap.
#[derive(Debug)]
pub(crate) struct Tally<K> {
    inner: Mutex<HashMap<K, usize>>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self { inner: Mutex::default() }
    }
}

/// One thing counted in a [`Tally`] until dropped.
#[derive(Debug)]
pub(crate) struct TallySlot<K: Hash + Eq> {
    table: Arc<Tally<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Tally<K> {
    /// Counts one more under `key`, or `None` if `key` already has `max`.
    pub(crate) fn enter(self: &Arc<Self>, key: K, max: usize) -> Option<TallySlot<K>> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                m.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(TallySlot { table: self.clone(), key })
    }
}

impl<K: Hash + Eq> Drop for TallySlot<K> {
    fn drop(&mut self) {
        let mut m = self.table.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Connections per source still in the pre-admission phase (TLS handshake + CONNECT): one
/// source cannot hold more than `max_pre_admission_per_source` of the broker's connection
/// slots with sockets that never authenticate.
pub(crate) type PreAdmission = Tally<Source>;

/// A connection counted in [`PreAdmission`] until dropped (at admission or when it ends).
pub(crate) type PreAdmissionSlot = TallySlot<Source>;

/// A fixed number of slots (handshakes in progress) shared fairly between sources: a source
/// gets at most `min(per_source, total / (holders + 1))`, where `holders` counts the sources
/// holding slots, itself included. The `+ 1` keeps a share free for a source that has none
/// yet, so a few flooding addresses cannot take every slot, and the more sources flood, the
/// smaller each one's share.
#[derive(Debug, Default)]
pub(crate) struct FairShare {
    inner: Mutex<Shares>,
}

#[derive(Debug, Default)]
struct Shares {
    by_source: HashMap<Source, usize>,
    used: usize,
}

/// A slot of a [`FairShare`], given back when dropped.
#[derive(Debug)]
pub(crate) struct FairSlot {
    table: Arc<FairShare>,
    source: Source,
}

impl FairShare {
    /// A slot for `source`, or `None` if all `total` are taken or `source` holds its share.
    pub(crate) fn enter(
        self: &Arc<Self>,
        source: Source,
        per_source: usize,
        total: usize,
    ) -> Option<FairSlot> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let held = s.by_source.get(&source).copied().unwrap_or(0);
        let holders = s.by_source.len() + usize::from(held == 0);
        let share = per_source.min((total / (holders + 1)).max(1));
        if s.used >= total || held >= share {
            return None;
        }
        s.used += 1;
        *s.by_source.entry(source).or_insert(0) += 1;
        Some(FairSlot { table: self.clone(), source })
    }
}

impl Drop for FairSlot {
    fn drop(&mut self) {
        let mut s = self.table.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.used = s.used.saturating_sub(1);
        if let Some(n) = s.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                s.by_source.remove(&self.source);
            }
        }
    }
}

/// A connection's place under `max_connections` and in `fleet_connections_open`, from accept
/// until it closes (whichever task holds it then).
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    gauge: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ConnectionSlot {
    fn new(metrics: &crate::Metrics, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.connections_open.inc();
        Self { gauge: metrics.connections_open.clone(), _permit: permit }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts a connection refused by the per-source pre-admission cap.
pub(crate) fn source_limited(shared: &Shared) {
    shared.metrics.rejected_at_accept(Refusal::SourceLimit);
    shared.metrics.limit(Limit::PerSource);
}

/// Is `ip` in the block `net`/`bits`? (IPv4-mapped IPv6 peers are compared as IPv4.)
pub(crate) fn within(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Accepts until shutdown, spawning one task per connection on `tracker`.
pub(crate) async fn run(shared: &Arc<Shared>, listener: TcpListener, tracker: &TaskTracker) {
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let pre_admission = Arc::new(PreAdmission::default());
    let mut source_limit_log = LogLimiter::new(shared.config.log_interval());
    let mut proxy_log = LogLimiter::new(shared.config.log_interval());
    // Validated at start (`Config::validate`).
    let balancers = shared.config.proxy_from().unwrap_or_default();
    let next_conn = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        // Behind a PROXY-protocol balancer the client's address is known only once its header
        // is read, in the connection's task (`session::serve`), which applies the cap then.
        let slot = if shared.config.proxy_protocol {
            if !balancers.is_empty() && !balancers.iter().any(|&(net, bits)| within(peer.ip(), net, bits)) {
                shared.metrics.rejected_at_accept(Refusal::ProxyHeader);
                if let Some(skipped) = proxy_log.allow() {
                    warn!(%peer, reason = Refusal::ProxyHeader.label(), skipped, "connection refused: not from a balancer in proxy_from");
                }
                continue;
            }
            None
        } else {
            match pre_admission.enter(Source::of(peer.ip()), shared.config.max_pre_admission_per_source) {
                Some(s) => Some(s),
                None => {
                    source_limited(shared);
                    if let Some(skipped) = source_limit_log.allow() {
                        warn!(%peer, reason = Refusal::SourceLimit.label(), skipped, "connection refused: too many unauthenticated connections from this address");
                    }
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.rejected_at_accept(Refusal::MaxConnections);
            warn!(%peer, reason = Refusal::MaxConnections.label(), "connection refused: max_connections reached");
            continue;
        };
        let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
        let accepted = session::Accepted {
            sock,
            peer,
            conn_id,
            pre_admission: slot,
            sources: pre_admission.clone(),
            slot: ConnectionSlot::new(&shared.metrics, permit),
            tracker: tracker.clone(),
        };
        tracker.spawn(session::serve(shared.clone(), accepted));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_max_slots_and_gets_them_back() {
        let t = Arc::new(PreAdmission::default());
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let (a, b) = (Source::of(a), Source::of(b));
        let first = t.enter(a, 2).expect("1st");
        let _second = t.enter(a, 2).expect("2nd");
        assert!(t.enter(a, 2).is_none(), "third from the same address");
        assert!(t.enter(b, 2).is_some(), "another address is not affected");
        drop(first);
        assert!(t.enter(a, 2).is_some(), "a slot comes back when its connection moves on");
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64_bit_prefix() {
        let ip = |s: &str| Source::of(s.parse::<IpAddr>().expect("ip"));
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_ne!(ip("192.0.2.7"), ip("192.0.2.8"));
        // One /64 rotating addresses holds one source's cap, not one per address.
        let t = Arc::new(PreAdmission::default());
        let held: Vec<_> = (1..=4).filter_map(|i| t.enter(ip(&format!("2001:db8:0:1::{i:x}")), 3)).collect();
        assert_eq!(held.len(), 3, "a fourth address of the same /64 got past the cap");
        assert!(t.enter(ip("2001:db8:0:2::1"), 3).is_some(), "another /64 is not affected");
    }

    #[test]
    fn floods_from_a_few_sources_leave_handshake_slots_for_others() {
        let t = Arc::new(FairShare::default());
        let src = |i: u8| Source::of(IpAddr::from([127, 0, 0, i]));
        let (total, per_source) = (64, 32);
        let mut held = Vec::new();
        for flooder in [2, 3] {
            held.extend((0..100).map_while(|_| t.enter(src(flooder), per_source, total)));
        }
        assert!(held.len() < total, "two sources took all {total} slots");
        assert!(t.enter(src(1), per_source, total).is_some(), "a third source is locked out");
        // Many sources: each newcomer still finds a slot until every one is used.
        let mut newcomers = 0;
        for i in 10..80 {
            if let Some(s) = t.enter(src(i), per_source, total) {
                held.push(s);
                newcomers += 1;
            }
        }
        assert!(newcomers >= 10, "only {newcomers} newcomers got a slot");
        assert!(held.len() <= total);
        held.clear();
        assert!(t.enter(src(2), per_source, total).is_some(), "slots come back");
    }
}
