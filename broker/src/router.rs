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
    retained: HashMap<String, Publish>,
}

/// The subscription table.
#[derive(Debug, Default)]
pub struct Router {
    inner: Mutex<Inner>,
}

fn key_of(filter: &str) -> String {
    match filter.split('/').nth(1) {
        Some("+") | Some("#") | None => String::new(),
        Some(id) => id.to_owned(),
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
        let list = inner.subs.entry(key_of(filter)).or_default();
        list.retain(|s| !(s.conn_id == conn_id && s.filter == filter));
        list.push(Sub { conn_id, filter: filter.to_owned(), qos, tx });
        inner.retained.values().filter(|p| matches(filter, &p.topic)).cloned().collect()
    }

    /// Removes one subscription.
    pub fn unsubscribe(&self, conn_id: u64, filter: &str) {
        let mut inner = lock(&self.inner);
        if let Some(list) = inner.subs.get_mut(&key_of(filter)) {
            list.retain(|s| !(s.conn_id == conn_id && s.filter == filter));
        }
    }

    /// Removes every subscription of a connection.
    pub fn remove_connection(&self, conn_id: u64) {
        let mut inner = lock(&self.inner);
        for list in inner.subs.values_mut() {
            list.retain(|s| s.conn_id != conn_id);
        }
        inner.subs.retain(|_, l| !l.is_empty());
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
        let candidates = inner.subs.get(&key).into_iter().chain(inner.subs.get("")).flatten();
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
