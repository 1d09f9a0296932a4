//! Admissions, refusals and session ends as events, for the admin API and console: the recent
//! ones (a ring), counts per minute for the last hour, and a live feed (server-sent events).
//!
//! Memory is bounded whatever the rate: the ring holds `RECENT` events, the per-minute counts
//! one small map per minute for `MINUTES` minutes, and a feed subscriber that falls behind by
//! `FEED` events skips ahead (it is told how many it missed). Metrics remain the record; this
//! is what an operator looks at.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::clock::now_millis;

/// Events kept for the console and the device pages.
const RECENT: usize = 1024;
/// Minutes of counts kept.
pub(crate) const MINUTES: i64 = 60;
/// Events a feed subscriber may lag before it skips.
const FEED: usize = 256;
/// Identities whose last session end is remembered (one entry per identity that had a
/// session: bounded by the identities the fleet's CA issued, and by this).
const LAST_SEEN: usize = 1 << 20;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// A session admitted (reason `ok`).
    Admitted,
    /// A connection refused (reason: the refusal's label).
    Refused,
    /// A session ended (reason: the close reason's label).
    Closed,
}

impl Kind {
    /// The name in JSON and the SSE `event:` field.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::Refused => "refused",
            Self::Closed => "closed",
        }
    }
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Event {
    /// Unix milliseconds.
    pub(crate) at_ms: i64,
    pub(crate) kind: Kind,
    /// `ok`, a refusal label or a close-reason label (docs: the metrics' labels).
    pub(crate) reason: &'static str,
    /// The identity's id, when the certificate named one.
    pub(crate) device: Option<String>,
    /// The certificate's serial (hex), when there was one.
    pub(crate) serial: Option<String>,
    /// The client's address.
    pub(crate) peer: String,
}

impl Event {
    pub(crate) fn new(kind: Kind, reason: &'static str, peer: SocketAddr) -> Self {
        Self { at_ms: now_millis(), kind, reason, device: None, serial: None, peer: peer.to_string() }
    }

    /// With the identity of the certificate.
    pub(crate) fn of(mut self, device: &str, serial: String) -> Self {
        self.device = Some(device.to_owned());
        self.serial = Some(serial);
        self
    }
}

/// Counts by kind and reason.
pub(crate) type Counts = BTreeMap<(Kind, &'static str), u64>;

#[derive(Debug, Default)]
struct Inner {
    recent: VecDeque<Event>,
    /// (minute since the epoch, counts by kind and reason), oldest first.
    minutes: VecDeque<(i64, Counts)>,
    /// When each identity's last session here ended (unix milliseconds).
    last_seen: HashMap<String, i64>,
}

/// The broker's event log.
#[derive(Debug)]
pub(crate) struct Events {
    inner: Mutex<Inner>,
    feed: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self { inner: Mutex::default(), feed: broadcast::channel(FEED).0 }
    }
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event and sends it to the feed's subscribers.
    pub(crate) fn record(&self, e: Event) {
        let minute = e.at_ms.div_euclid(60_000);
        {
            let mut m = self.lock();
            if m.recent.len() == RECENT {
                m.recent.pop_front();
            }
            if let (Kind::Closed, Some(d)) = (e.kind, &e.device) {
                if m.last_seen.len() < LAST_SEEN || m.last_seen.contains_key(d) {
                    m.last_seen.insert(d.clone(), e.at_ms);
                }
            }
            m.recent.push_back(e.clone());
            if m.minutes.back().is_none_or(|(at, _)| *at < minute) {
                m.minutes.push_back((minute, BTreeMap::new()));
            }
            while m.minutes.front().is_some_and(|(at, _)| *at <= minute - MINUTES) {
                m.minutes.pop_front();
            }
            if let Some((_, counts)) = m.minutes.iter_mut().rev().find(|(at, _)| *at <= minute) {
                *counts.entry((e.kind, e.reason)).or_default() += 1;
            }
        }
        // No subscriber is not an error.
        let _ = self.feed.send(e);
    }

    /// Counts by kind and reason over the last `minutes` minutes (the current one included).
    pub(crate) fn counts(&self, minutes: i64) -> Counts {
        let now = now_millis().div_euclid(60_000);
        let mut out = BTreeMap::new();
        for (at, counts) in self.lock().minutes.iter() {
            if *at > now - minutes {
                for (k, n) in counts {
                    *out.entry(*k).or_default() += n;
                }
            }
        }
        out
    }

    /// The newest `limit` events of `device` (all devices: `None`), newest first.
    pub(crate) fn recent(&self, device: Option<&str>, kind: Option<Kind>, limit: usize) -> Vec<Event> {
        self.lock()
            .recent
            .iter()
            .rev()
            .filter(|e| device.is_none_or(|d| e.device.as_deref() == Some(d)))
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .take(limit)
            .cloned()
            .collect()
    }

    /// When `device`'s last session on this node ended (unix milliseconds), if one did since
    /// the broker started.
    pub(crate) fn last_seen(&self, device: &str) -> Option<i64> {
        self.lock().last_seen.get(device).copied()
    }

    /// A live feed of the events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.feed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: Kind, reason: &'static str, device: &str) -> Event {
        Event::new(kind, reason, SocketAddr::from(([127, 0, 0, 1], 9))).of(device, "01".into())
    }

    #[test]
    fn the_ring_keeps_the_newest_and_counts_keep_every_event() {
        let e = Events::default();
        for i in 0..RECENT + 10 {
            let kind = if i % 2 == 0 { Kind::Admitted } else { Kind::Refused };
            e.record(ev(kind, if i % 2 == 0 { "ok" } else { "revoked" }, &format!("d{i}")));
        }
        let recent = e.recent(None, None, usize::MAX);
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].device.as_deref(), Some(&*format!("d{}", RECENT + 9)));
        assert!(e.recent(Some("d3"), None, 10).is_empty(), "pushed out of the ring");
        assert_eq!(e.recent(Some(&format!("d{}", RECENT + 9)), None, 10).len(), 1);
        let counts = e.counts(5);
        assert_eq!(counts[&(Kind::Admitted, "ok")] + counts[&(Kind::Refused, "revoked")], RECENT as u64 + 10);
    }

    #[tokio::test]
    async fn a_subscriber_sees_events_recorded_after_it_subscribed() {
        let e = Events::default();
        e.record(ev(Kind::Admitted, "ok", "before"));
        let mut rx = e.subscribe();
        e.record(ev(Kind::Closed, "revoked", "after"));
        let got = rx.recv().await.expect("event");
        assert_eq!((got.kind, got.reason, got.device.as_deref()), (Kind::Closed, "revoked", Some("after")));
    }
}
