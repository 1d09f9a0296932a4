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
//!
//! The issuer's retained messages (`devices/<id>/certs/rotate`, operator-forced rotation) count
//! against a budget of their own ([`RetainBudget::Issuer`]): devices that fill theirs cannot
//! stop a rotation, and they do not count toward the device's per-device cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::inbox::Inbox;
use crate::message::{Message, SubOpts};
use crate::observe::metrics::Limit;
use crate::observe::metrics::Metrics;
use crate::outcome::CloseReason;
use fleet_topic::{device_level, matches};
use rumqttc::mqttbytes::QoS;

/// A subscription's identity: connection and filter.
type SubKey = (u64, String);

#[derive(Debug, Default)]
struct Inner {
    /// Key: the literal device-id level, or "" for filters with a wildcard there.
    subs: HashMap<String, HashMap<SubKey, Sub>>,
    /// (key, filter) of each connection's subscriptions: a (un)subscribe or disconnect touches
    /// only its own entries, never a scan of other sessions' subscriptions.
    by_conn: HashMap<u64, std::collections::HashSet<(String, String)>>,
    /// Shared subscriptions.
    shared: shared::Groups,
    /// Retained messages by device-id level, then topic.
    retained: HashMap<String, HashMap<String, Retained>>,
    /// Topic + payload bytes of every retained message, per budget ([`RetainBudget::index`]).
    retained_bytes: [usize; 2],
}

/// A retained message and the budget it counts against.
#[derive(Debug, Clone)]
struct Retained {
    publish: Message,
    budget: RetainBudget,
}

/// Whose budget a retained message counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetainBudget {
    /// Devices' and services' (`max_retained_per_device`, `max_retained_bytes`).
    Clients,
    /// The online issuer's (`max_retained_bytes_issuer`; no per-device count).
    Issuer,
}

impl RetainBudget {
    /// The budget of a publisher of this role.
    pub(crate) fn of(role: fleet_registry::Role) -> Self {
        if role == fleet_registry::Role::Issuer {
            Self::Issuer
        } else {
            Self::Clients
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Clients => 0,
            Self::Issuer => 1,
        }
    }
}

/// Caps on retained messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetainLimits {
    /// Per device-id level.
    pub(crate) per_device: usize,
    /// Topic + payload bytes in total.
    pub(crate) total_bytes: usize,
    /// Topic + payload bytes of the issuer's retained messages.
    pub(crate) issuer_bytes: usize,
}

impl RetainLimits {
    fn bytes(&self, budget: RetainBudget) -> usize {
        match budget {
            RetainBudget::Clients => self.total_bytes,
            RetainBudget::Issuer => self.issuer_bytes,
        }
    }
}

impl Default for RetainLimits {
    fn default() -> Self {
        Self { per_device: 16, total_bytes: 16 << 20, issuer_bytes: 4 << 20 }
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
    /// Shared subscriptions get their messages from the cluster link (one node is chosen per
    /// message), never from [`Router::route`] or [`Router::deliver_remote`].
    groups_span_nodes: bool,
}

fn remove_sub(inner: &mut Inner, key: &str, conn_id: u64, filter: &str) {
    if let Some(map) = inner.subs.get_mut(key) {
        map.remove(&(conn_id, filter.to_owned()));
        if map.is_empty() {
            inner.subs.remove(key);
        }
    }
}

/// What a retained message counts against its budget: topic, payload and MQTT 5 properties.
fn retained_size(p: &Message) -> usize {
    p.size()
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

/// One connection's copy of a message: (connection, its inbox, QoS, subscription identifiers,
/// retain as published).
type Pick<'a> = (u64, &'a Arc<Inbox>, QoS, Vec<u32>, bool);

/// Sends a copy to every subscription matching `publish`, once per connection: at the highest
/// QoS of its matching subscriptions, with all their Subscription Identifiers, the retain flag
/// kept if one of them asked for it (Retain As Published), none to a subscription with No
/// Local on the publisher's own connection.
fn deliver(inner: &Inner, publish: &Message, metrics: &Metrics) {
    let key = key_of(&publish.topic);
    // Few per message, found linearly.
    let mut picks: Vec<Pick<'_>> = Vec::new();
    let candidates = inner.subs.get(key).into_iter().chain(inner.subs.get("")).flatten();
    for ((conn_id, filter), s) in candidates {
        if (s.opts.no_local && publish.from_conn == Some(*conn_id)) || !matches(filter, &publish.topic) {
            continue;
        }
        let pick = match picks.iter_mut().position(|p| p.0 == *conn_id) {
            Some(i) => &mut picks[i],
            None => {
                picks.push((*conn_id, &s.inbox, QoS::AtMostOnce, Vec::new(), false));
                picks.last_mut().expect("just pushed")
            }
        };
        if s.qos != QoS::AtMostOnce {
            pick.2 = QoS::AtLeastOnce;
        }
        pick.3.extend(s.opts.id);
        pick.4 |= s.opts.retain_as_published;
    }
    for (_, inbox, qos, ids, retain) in picks {
        let mut p = publish.clone();
        p.qos = if qos == QoS::AtMostOnce || publish.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        p.retain = retain && publish.retain;
        p.dup = false;
        p.sub_ids = ids;
        if inbox.push(Box::new(p)) {
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
        Self { inner: Mutex::default(), limits, groups_span_nodes: false }
    }

    /// Leaves the shared subscriptions' messages to the cluster link ([`Router::deliver_shared`]).
    pub(crate) fn span_groups_over_nodes(&mut self) {
        self.groups_span_nodes = true;
    }

    /// Adds (or replaces) a subscription; returns the retained messages it matches. A filter
    /// with a literal device level looks only at that device's retained messages.
    pub(crate) fn subscribe(
        &self,
        conn_id: u64,
        filter: &str,
        qos: QoS,
        opts: SubOpts,
        inbox: Arc<Inbox>,
    ) -> Vec<Message> {
        let mut inner = lock(&self.inner);
        if let Some(Ok((group, inner_filter))) = shared::split(filter) {
            // A shared subscription gets no retained messages (MQTT 5 §4.8.2).
            inner.by_conn.entry(conn_id).or_default().insert((shared::KEY.to_owned(), filter.to_owned()));
            inner.shared.join(group, inner_filter, conn_id, Sub { qos, opts, inbox });
            return Vec::new();
        }
        let key = key_of(filter);
        inner.by_conn.entry(conn_id).or_default().insert((key.to_owned(), filter.to_owned()));
        inner
            .subs
            .entry(key.to_owned())
            .or_default()
            .insert((conn_id, filter.to_owned()), Sub { qos, opts, inbox });
        let retained: Box<dyn Iterator<Item = &HashMap<String, Retained>>> = match key {
            "" => Box::new(inner.retained.values()),
            key => Box::new(inner.retained.get(key).into_iter()),
        };
        retained
            .flat_map(|m| m.values())
            .filter(|r| matches(filter, &r.publish.topic) && !r.publish.expired())
            .map(|r| r.publish.clone())
            .collect()
    }

    /// Drops every retained message under `devices/<device>/` (a revoked device's). Returns how
    /// many.
    pub(crate) fn clear_retained(&self, device: &str) -> usize {
        let mut inner = lock(&self.inner);
        let Some(gone) = inner.retained.remove(device) else { return 0 };
        for r in gone.values() {
            inner.retained_bytes[r.budget.index()] -= retained_size(&r.publish);
        }
        gone.len()
    }

    /// Removes one subscription.
    pub(crate) fn unsubscribe(&self, conn_id: u64, filter: &str) {
        let mut inner = lock(&self.inner);
        if let Some(Ok((group, inner_filter))) = shared::split(filter) {
            inner.shared.leave(group, inner_filter, conn_id);
            if let Some(mine) = inner.by_conn.get_mut(&conn_id) {
                mine.remove(&(shared::KEY.to_owned(), filter.to_owned()));
            }
            return;
        }
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
            match shared::split(&filter) {
                Some(Ok((group, inner_filter))) if key == shared::KEY => {
                    inner.shared.leave(group, inner_filter, conn_id)
                }
                _ => remove_sub(&mut inner, &key, conn_id, &filter),
            }
            filters.push(filter);
        }
        filters
    }

    /// Delivers to every matching subscription (once per connection); keeps it if retained,
    /// against `budget`. A retained message over a cap is refused whole: not kept, not delivered.
    pub(crate) fn route(
        &self,
        publish: &Message,
        budget: RetainBudget,
        metrics: &Metrics,
    ) -> Result<(), RetainRefused> {
        let mut inner = lock(&self.inner);
        if publish.retain {
            self.retain(&mut inner, key_of(&publish.topic), publish, budget)?;
        }
        deliver(&inner, publish, metrics);
        if !self.groups_span_nodes {
            inner.shared.deliver(publish, metrics);
        }
        Ok(())
    }

    /// Hands a shared delivery whose session ended unacknowledged to another member of its
    /// group here; false if none here took it (on a single node, a message every member's full
    /// queue refused is counted as dropped; a cluster member hands it on).
    pub(crate) fn redeliver(&self, publish: &Message, metrics: &Metrics) -> bool {
        let Some(key) = &publish.shared else { return false };
        match self.deliver_shared(&key.0, &key.1, publish, metrics) {
            Some(true) => true,
            Some(false) => {
                if !self.groups_span_nodes {
                    shared::dropped_full(metrics);
                }
                false
            }
            None => false,
        }
    }

    /// Hands `publish` to one local member of the shared subscription `$share/<group>/<filter>`:
    /// `None` if it has no member here, else whether a member's queue took it (not counted as
    /// dropped if none did: the caller may hand it on).
    pub(crate) fn deliver_shared(
        &self,
        group: &str,
        filter: &str,
        publish: &Message,
        metrics: &Metrics,
    ) -> Option<bool> {
        lock(&self.inner).shared.deliver_in(group, filter, publish, metrics)
    }

    /// Delivers a message another cluster node accepted to the matching local subscriptions
    /// (not shared ones: the cluster link picks their node, [`Router::deliver_shared`]).
    pub(crate) fn deliver_remote(&self, publish: &Message, metrics: &Metrics) {
        deliver(&lock(&self.inner), publish, metrics);
    }

    fn retain(
        &self,
        inner: &mut Inner,
        key: &str,
        publish: &Message,
        budget: RetainBudget,
    ) -> Result<(), RetainRefused> {
        let old = inner
            .retained
            .get(key)
            .and_then(|m| m.get(&publish.topic))
            .map(|r| (r.budget, retained_size(&r.publish)));
        if publish.payload.is_empty() {
            if let Some((was, size)) = old {
                inner.retained_bytes[was.index()] -= size;
                if let Some(m) = inner.retained.get_mut(key) {
                    m.remove(&publish.topic);
                    if m.is_empty() {
                        inner.retained.remove(key);
                    }
                }
            }
            return Ok(());
        }
        if budget == RetainBudget::Clients {
            let count = inner
                .retained
                .get(key)
                .map_or(0, |m| m.values().filter(|r| r.budget == RetainBudget::Clients).count());
            if old.is_none_or(|(was, _)| was != budget) && count >= self.limits.per_device {
                return Err(RetainRefused::PerDevice);
            }
        }
        let freed = old.filter(|(was, _)| *was == budget).map_or(0, |(_, size)| size);
        let bytes = inner.retained_bytes[budget.index()] - freed + retained_size(publish);
        if bytes > self.limits.bytes(budget) {
            return Err(RetainRefused::TotalBytes);
        }
        if let Some((was, size)) = old.filter(|(was, _)| *was != budget) {
            inner.retained_bytes[was.index()] -= size;
        }
        inner.retained_bytes[budget.index()] = bytes;
        let mut kept = publish.clone();
        kept.dup = false;
        inner
            .retained
            .entry(key.to_owned())
            .or_default()
            .insert(publish.topic.clone(), Retained { publish: kept, budget });
        Ok(())
    }
}

mod shared;
pub(crate) use shared::split as split_shared;
use shared::Sub;

#[cfg(test)]
mod tests;
