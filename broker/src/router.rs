//! Routing: who is subscribed to what, retained `state` messages, and delivery.
//!
//! Subscriptions are indexed by the device-id level of their filter (`devices/<id>/...`), so a
//! command for one device is matched against that device's subscriptions plus the wildcard
//! subscriptions of services, not against every session. Delivery never blocks a publisher: each
//! session has a bounded [`Inbox`] and a full one drops the message (counted).
//!
//! Retained messages are indexed the same way, so a device's SUBSCRIBE (always to its own
//! literal `devices/<id>/...`) looks only at that device's retained messages. They are capped per
//! device and in bytes for the whole broker ([`RetainLimits`]); a revoked device's are cleared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::{device_level, matches};
use crate::inbox::Inbox;
use crate::metrics::Limit;
use crate::metrics::Metrics;
use crate::outcome::CloseReason;
use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;

#[derive(Debug, Clone)]
struct Sub {
    qos: QoS,
    inbox: Arc<Inbox>,
}

/// A subscription's identity: connection and filter.
type SubKey = (u64, String);

#[derive(Debug, Default)]
struct Inner {
    /// Key: the literal device-id level, or "" for filters with a wildcard there.
    subs: HashMap<String, HashMap<SubKey, Sub>>,
    /// (key, filter) of each connection's subscriptions: a (un)subscribe or disconnect touches
    /// only its own entries, never a scan of other sessions' subscriptions.
    by_conn: HashMap<u64, std::collections::HashSet<(String, String)>>,
    /// Retained messages by device-id level, then topic.
    retained: HashMap<String, HashMap<String, Publish>>,
    /// Topic + payload bytes of every retained message.
    retained_bytes: usize,
}

/// Caps on retained messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetainLimits {
    /// Per device-id level.
    pub(crate) per_device: usize,
    /// Topic + payload bytes in total.
    pub(crate) total_bytes: usize,
}

impl Default for RetainLimits {
    fn default() -> Self {
        Self { per_device: 16, total_bytes: 16 << 20 }
    }
}

/// A retained PUBLISH over a cap: nothing was routed or retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetainRefused {
    /// The device already has `per_device` retained topics.
    PerDevice,
    /// The broker holds `total_bytes` of retained messages.
    TotalBytes,
}

impl RetainRefused {
    /// The cap counted in `fleet_limits_total`.
    pub(crate) fn limit(self) -> Limit {
        match self {
            Self::PerDevice => Limit::RetainedPerDevice,
            Self::TotalBytes => Limit::RetainedBytes,
        }
    }

    /// Why the publisher's session is closed.
    pub(crate) fn close_reason(self) -> CloseReason {
        match self {
            Self::PerDevice => CloseReason::RetainedPerDevice,
            Self::TotalBytes => CloseReason::RetainedBytes,
        }
    }
}

/// The subscription table.
#[derive(Debug, Default)]
pub(crate) struct Router {
    inner: Mutex<Inner>,
    limits: RetainLimits,
}

fn remove_sub(inner: &mut Inner, key: &str, conn_id: u64, filter: &str) {
    if let Some(map) = inner.subs.get_mut(key) {
        map.remove(&(conn_id, filter.to_owned()));
        if map.is_empty() {
            inner.subs.remove(key);
        }
    }
}

fn retained_size(p: &Publish) -> usize {
    p.topic.len() + p.payload.len()
}

/// Index key of a topic or filter: its literal device-id level, or "" for a wildcard there.
fn key_of(filter: &str) -> &str {
    match device_level(filter) {
        Some("+") | Some("#") | None => "",
        Some(id) => id,
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the maps half-updated in a way that matters
    // (each operation is a single insert/retain), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a copy to every subscription matching `publish` (once per connection).
fn deliver(inner: &Inner, publish: &Publish, metrics: &Metrics) {
    let key = key_of(&publish.topic);
    let mut seen: Vec<u64> = Vec::new();
    let candidates = inner.subs.get(key).into_iter().chain(inner.subs.get("")).flatten();
    for ((conn_id, filter), s) in candidates {
        if seen.contains(conn_id) || !matches(filter, &publish.topic) {
            continue;
        }
        seen.push(*conn_id);
        let mut p = publish.clone();
        p.qos = if s.qos == QoS::AtMostOnce || publish.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        p.retain = false;
        p.dup = false;
        if s.inbox.push(Box::new(p)) {
            metrics.messages_delivered.inc();
        } else {
            metrics.messages_dropped.inc();
            metrics.limit(Limit::QueuedMessages);
        }
    }
}

impl Router {
    /// A router with these retained-message caps.
    pub(crate) fn new(limits: RetainLimits) -> Self {
        Self { inner: Mutex::default(), limits }
    }

    /// Adds (or replaces) a subscription; returns the retained messages it matches. A filter
    /// with a literal device level looks only at that device's retained messages.
    pub(crate) fn subscribe(&self, conn_id: u64, filter: &str, qos: QoS, inbox: Arc<Inbox>) -> Vec<Publish> {
        let mut inner = lock(&self.inner);
        let key = key_of(filter);
        inner.by_conn.entry(conn_id).or_default().insert((key.to_owned(), filter.to_owned()));
        inner
            .subs
            .entry(key.to_owned())
            .or_default()
            .insert((conn_id, filter.to_owned()), Sub { qos, inbox });
        let retained: Box<dyn Iterator<Item = &HashMap<String, Publish>>> = match key {
            "" => Box::new(inner.retained.values()),
            key => Box::new(inner.retained.get(key).into_iter()),
        };
        retained.flat_map(|m| m.values()).filter(|p| matches(filter, &p.topic)).cloned().collect()
    }

    /// Drops every retained message under `devices/<device>/` (a revoked device's). Returns how
    /// many.
    pub(crate) fn clear_retained(&self, device: &str) -> usize {
        let mut inner = lock(&self.inner);
        let Some(gone) = inner.retained.remove(device) else { return 0 };
        inner.retained_bytes -= gone.values().map(retained_size).sum::<usize>();
        gone.len()
    }

    /// Removes one subscription.
    pub(crate) fn unsubscribe(&self, conn_id: u64, filter: &str) {
        let mut inner = lock(&self.inner);
        let key = key_of(filter).to_owned();
        if let Some(mine) = inner.by_conn.get_mut(&conn_id) {
            mine.remove(&(key.clone(), filter.to_owned()));
        }
        remove_sub(&mut inner, &key, conn_id, filter);
    }

    /// Removes every subscription of a connection; returns their filters.
    pub(crate) fn remove_connection(&self, conn_id: u64) -> Vec<String> {
        let mut inner = lock(&self.inner);
        let mut filters = Vec::new();
        for (key, filter) in inner.by_conn.remove(&conn_id).unwrap_or_default() {
            remove_sub(&mut inner, &key, conn_id, &filter);
            filters.push(filter);
        }
        filters
    }

    /// Delivers to every matching subscription (once per connection); keeps it if retained.
    /// A retained message over a cap is refused whole: not kept, not delivered.
    pub(crate) fn route(&self, publish: &Publish, metrics: &Metrics) -> Result<(), RetainRefused> {
        let mut inner = lock(&self.inner);
        if publish.retain {
            self.retain(&mut inner, key_of(&publish.topic), publish)?;
        }
        deliver(&inner, publish, metrics);
        Ok(())
    }

    /// Delivers a message another cluster node accepted to the matching local subscriptions.
    pub(crate) fn deliver_remote(&self, publish: &Publish, metrics: &Metrics) {
        deliver(&lock(&self.inner), publish, metrics);
    }

    fn retain(&self, inner: &mut Inner, key: &str, publish: &Publish) -> Result<(), RetainRefused> {
        let old = inner.retained.get(key).and_then(|m| m.get(&publish.topic)).map(retained_size);
        if publish.payload.is_empty() {
            if let Some(old) = old {
                inner.retained_bytes -= old;
                if let Some(m) = inner.retained.get_mut(key) {
                    m.remove(&publish.topic);
                    if m.is_empty() {
                        inner.retained.remove(key);
                    }
                }
            }
            return Ok(());
        }
        let count = inner.retained.get(key).map_or(0, HashMap::len);
        if old.is_none() && count >= self.limits.per_device {
            return Err(RetainRefused::PerDevice);
        }
        let bytes = inner.retained_bytes - old.unwrap_or(0) + retained_size(publish);
        if bytes > self.limits.total_bytes {
            return Err(RetainRefused::TotalBytes);
        }
        inner.retained_bytes = bytes;
        let mut kept = publish.clone();
        kept.dup = false;
        inner.retained.entry(key.to_owned()).or_default().insert(publish.topic.clone(), kept);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str) -> Publish {
        Publish::new(topic, QoS::AtMostOnce, b"x".to_vec())
    }

    #[test]
    fn a_closed_connection_gets_nothing_and_leaves_nothing_behind() {
        let router = Router::default();
        let metrics = Metrics::new();
        let route = |p: &Publish| router.route(p, &metrics).expect("not retained");
        let (rx1, rx2) = (Arc::new(Inbox::new(8)), Arc::new(Inbox::new(8)));
        router.subscribe(1, "devices/a/commands/#", QoS::AtMostOnce, rx1.clone());
        router.subscribe(1, "devices/+/telemetry", QoS::AtMostOnce, rx1.clone());
        router.subscribe(2, "devices/a/commands/#", QoS::AtMostOnce, rx2.clone());
        route(&publish("devices/a/commands/reboot"));
        route(&publish("devices/b/telemetry"));
        assert_eq!(rx1.try_next().map(|p| p.topic).as_deref(), Some("devices/a/commands/reboot"));
        assert_eq!(rx1.try_next().map(|p| p.topic).as_deref(), Some("devices/b/telemetry"));
        assert!(rx2.try_next().is_some());

        router.remove_connection(1);
        route(&publish("devices/a/commands/reboot"));
        route(&publish("devices/b/telemetry"));
        assert!(rx1.try_next().is_none(), "a removed connection still receives");
        assert!(rx2.try_next().is_some());
        router.remove_connection(2);
        let inner = lock(&router.inner);
        assert!(inner.subs.is_empty() && inner.by_conn.is_empty(), "{inner:?}");
    }

    fn retained(topic: &str, payload: &[u8]) -> Publish {
        let mut p = Publish::new(topic, QoS::AtMostOnce, payload.to_vec());
        p.retain = true;
        p
    }

    #[test]
    fn retained_messages_are_capped_per_device_and_in_bytes_and_cleared() {
        let router = Router::new(RetainLimits { per_device: 2, total_bytes: 100 });
        let m = Metrics::new();
        assert_eq!(router.route(&retained("devices/a/s1", b"x"), &m), Ok(()));
        assert_eq!(router.route(&retained("devices/a/s2", b"x"), &m), Ok(()));
        assert_eq!(router.route(&retained("devices/a/s3", b"x"), &m), Err(RetainRefused::PerDevice));
        // Replacing an existing topic is no new entry.
        assert_eq!(router.route(&retained("devices/a/s1", b"y"), &m), Ok(()));
        assert_eq!(router.route(&retained("devices/b/big", &[0u8; 90]), &m), Err(RetainRefused::TotalBytes));
        assert_eq!(router.route(&retained("devices/b/ok", &[0u8; 50]), &m), Ok(()));
        // Only the device's own retained messages are looked at for its literal filter.
        let inbox = Arc::new(Inbox::new(8));
        assert_eq!(router.subscribe(1, "devices/a/#", QoS::AtMostOnce, inbox.clone()).len(), 2);
        assert_eq!(router.subscribe(2, "devices/+/#", QoS::AtMostOnce, inbox).len(), 3);
        assert_eq!(router.clear_retained("a"), 2);
        assert_eq!(lock(&router.inner).retained_bytes, "devices/b/ok".len() + 50);
        // An empty retained payload deletes.
        assert_eq!(router.route(&retained("devices/b/ok", b""), &m), Ok(()));
        let inner = lock(&router.inner);
        assert!(inner.retained.is_empty() && inner.retained_bytes == 0, "{inner:?}");
    }
}
