//! Routing: who is subscribed to what, retained `state` messages, and delivery.
//!
//! Subscriptions are indexed by the device-id level of their filter (`devices/<id>/...`), so a
//! command for one device is matched against that device's subscriptions plus the wildcard
//! subscriptions of services, not against every session. Delivery never blocks a publisher: each
//! session has a bounded queue and a full queue drops the message (counted). Queued messages are
//! boxed: a queue allocates its slots in blocks of 32, and an idle session should not pay for 32
//! inline `Publish`es.

use std::collections::HashMap;
use std::sync::Mutex;

use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;

use crate::auth::matches;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct Sub {
    conn_id: u64,
    filter: String,
    qos: QoS,
    tx: mpsc::Sender<Box<Publish>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Key: the literal device-id level, or "" for filters with a wildcard there.
    subs: HashMap<String, Vec<Sub>>,
    /// The keys each connection has subscriptions under, so a disconnect touches only those.
    keys_by_conn: HashMap<u64, Vec<String>>,
    retained: HashMap<String, Publish>,
}

/// The subscription table.
#[derive(Debug, Default)]
pub struct Router {
    inner: Mutex<Inner>,
}

fn key_of(filter: &str) -> &str {
    match filter.split('/').nth(1) {
        Some("+") | Some("#") | None => "",
        Some(id) => id,
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the maps half-updated in a way that matters
    // (each operation is a single insert/retain), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// Adds (or replaces) a subscription; returns the retained messages it matches.
    pub fn subscribe(
        &self,
        conn_id: u64,
        filter: &str,
        qos: QoS,
        tx: mpsc::Sender<Box<Publish>>,
    ) -> Vec<Publish> {
        let mut inner = lock(&self.inner);
        let key = key_of(filter);
        let keys = inner.keys_by_conn.entry(conn_id).or_default();
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
        }
        let list = inner.subs.entry(key.to_owned()).or_default();
        list.retain(|s| !(s.conn_id == conn_id && s.filter == filter));
        list.push(Sub { conn_id, filter: filter.to_owned(), qos, tx });
        inner.retained.values().filter(|p| matches(filter, &p.topic)).cloned().collect()
    }

    /// Removes one subscription.
    pub fn unsubscribe(&self, conn_id: u64, filter: &str) {
        let mut inner = lock(&self.inner);
        if let Some(list) = inner.subs.get_mut(key_of(filter)) {
            list.retain(|s| !(s.conn_id == conn_id && s.filter == filter));
        }
    }

    /// Removes every subscription of a connection.
    pub fn remove_connection(&self, conn_id: u64) {
        let mut inner = lock(&self.inner);
        for key in inner.keys_by_conn.remove(&conn_id).unwrap_or_default() {
            if let Some(list) = inner.subs.get_mut(&key) {
                list.retain(|s| s.conn_id != conn_id);
                if list.is_empty() {
                    inner.subs.remove(&key);
                }
            }
        }
    }

    /// Delivers to every matching subscription (once per connection); stores it if retained.
    pub fn route(&self, publish: &Publish, metrics: &Metrics) {
        let mut inner = lock(&self.inner);
        if publish.retain {
            if publish.payload.is_empty() {
                inner.retained.remove(&publish.topic);
            } else {
                inner.retained.insert(publish.topic.clone(), publish.clone());
            }
        }
        let key = key_of(&publish.topic);
        let mut seen: Vec<u64> = Vec::new();
        let candidates = inner.subs.get(key).into_iter().chain(inner.subs.get("")).flatten();
        for s in candidates {
            if seen.contains(&s.conn_id) || !matches(&s.filter, &publish.topic) {
                continue;
            }
            seen.push(s.conn_id);
            let mut p = publish.clone();
            p.qos = if s.qos == QoS::AtMostOnce || publish.qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            p.retain = false;
            p.dup = false;
            match s.tx.try_send(Box::new(p)) {
                Ok(()) => metrics.messages_delivered.inc(),
                Err(_) => metrics.messages_dropped.inc(),
            }
        }
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
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        router.subscribe(1, "devices/a/commands/#", QoS::AtMostOnce, tx1.clone());
        router.subscribe(1, "devices/+/telemetry", QoS::AtMostOnce, tx1);
        router.subscribe(2, "devices/a/commands/#", QoS::AtMostOnce, tx2);
        router.route(&publish("devices/a/commands/reboot"), &metrics);
        router.route(&publish("devices/b/telemetry"), &metrics);
        assert_eq!(rx1.try_recv().map(|p| p.topic).ok().as_deref(), Some("devices/a/commands/reboot"));
        assert_eq!(rx1.try_recv().map(|p| p.topic).ok().as_deref(), Some("devices/b/telemetry"));
        assert!(rx2.try_recv().is_ok());

        router.remove_connection(1);
        router.route(&publish("devices/a/commands/reboot"), &metrics);
        router.route(&publish("devices/b/telemetry"), &metrics);
        assert!(rx1.try_recv().is_err(), "a removed connection still receives");
        assert!(rx2.try_recv().is_ok());
        router.remove_connection(2);
        let inner = lock(&router.inner);
        assert!(inner.subs.is_empty() && inner.keys_by_conn.is_empty(), "{inner:?}");
    }
}
