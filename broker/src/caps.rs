//! Caps on things held per key: connections per source before admission ([`Tally`],
//! [`Source`]: an IPv4 address or an IPv6 /64), and handshake slots shared fairly between
//! sources ([`FairShare`]). Both listeners (MQTT and admin) and the admin event streams use them.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

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

/// A fixed number of slots (handshakes in progress) shared fairly between sources: a source
/// gets at most `min(per_source, total / (holders + 1))`, where `holders` counts the sources
/// holding slots, itself included; and a source's second and later slots leave that much free.
/// The `+ 1` keeps a share free for a source that has none yet, so a few flooding addresses
/// cannot take every slot (filling it takes about `2 * sqrt(total)` addresses: 44 for 512),
/// and the more sources flood, the smaller each one's share.
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
    /// Slots taken now.
    pub(crate) fn used(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).used
    }

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
        let fair = (total / (holders + 1)).max(1);
        let share = per_source.min(fair);
        // A share is checked only as a slot is taken, so the first sources of a nearly empty
        // table got large ones: a source's second and later slots must also leave a fair share
        // free for a newcomer, or a few addresses flooding one after another fill the table.
        let reserve = if held == 0 { 0 } else { fair };
        if s.used + reserve >= total || held >= share {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_max_slots_and_gets_them_back() {
        let t = Arc::new(Tally::<Source>::default());
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
        let t = Arc::new(Tally::<Source>::default());
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

    /// Shares were checked only as a slot was taken, so the sources that came first kept the
    /// large shares of a nearly empty table: with the defaults (512, 32), 17 addresses flooding
    /// one after the other took every slot, and by closing and reopening their sockets kept
    /// devices out indefinitely. A source's second and later slots now leave a newcomer's share
    /// free, so only the last share's worth of addresses, one slot each, can fill the table.
    #[test]
    fn a_burst_from_a_few_dozen_sources_cannot_take_every_slot() {
        let src = |i: u32| Source::of(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)));
        let (total, per_source) = (512, 32);
        // The attacker's best order: `bulk` sources flood to their share, then single sources.
        for bulk in 0..=40 {
            let t = Arc::new(FairShare::default());
            let mut held = Vec::new();
            for i in 0..40 {
                let tries = if i < bulk { 100 } else { 1 };
                held.extend((0..tries).map_while(|_| t.enter(src(i), per_source, total)));
            }
            assert!(
                t.enter(src(1000), per_source, total).is_some(),
                "40 addresses ({bulk} flooding first) took all {total} slots: {} held",
                held.len()
            );
        }
    }
}
