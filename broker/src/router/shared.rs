//! Shared subscriptions (`$share/<group>/<filter>`, MQTT 5 §4.8.2, also offered to 3.1.1
//! clients as Mosquitto does): every message matching a group's filter goes to one member of the
//! group, the members in turn. A member whose queue is full is passed over; a message in the
//! queue (or unacknowledged) of a member whose session ends goes to another member
//! ([`super::Router::redeliver`]).
//!
//! On a cluster member the router does not pick members for routed messages: the cluster link
//! chooses one node per message among those with members (a NATS queue group) and hands the
//! message to [`super::Router::deliver_shared`] there (`cluster/shares.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fleet_topic::matches;
use rumqttc::mqttbytes::QoS;

use crate::inbox::Inbox;
use crate::message::{GroupKey, Message, SubOpts};
use crate::observe::metrics::{Limit, Metrics};

/// A subscription: its QoS, options and the session's inbox (shared or not).
#[derive(Debug, Clone)]
pub(super) struct Sub {
    pub(super) qos: QoS,
    pub(super) opts: SubOpts,
    pub(super) inbox: Arc<Inbox>,
}

/// The key a shared subscription is filed under in `by_conn`.
pub(super) const KEY: &str = "$share";

/// `$share/<group>/<filter>` split into group and filter; `None` for a filter that is not
/// shared, `Some(Err(()))` for a malformed one (an empty group, or one with `/`, `+` or `#`, or
/// no filter).
pub(crate) fn split(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() => {
            Ok((group, inner))
        }
        _ => Err(()),
    })
}

#[derive(Debug, Default)]
struct Group {
    key: GroupKey,
    /// Connections in the order they joined.
    members: Vec<(u64, Sub)>,
    /// Who gets the next message.
    next: AtomicUsize,
}

/// Every shared subscription of the router.
#[derive(Debug, Default)]
pub(super) struct Groups {
    groups: HashMap<(String, String), Group>,
}

impl Groups {
    /// `conn` joins `group` on `filter` (or changes its options there).
    pub(super) fn join(&mut self, group: &str, filter: &str, conn: u64, sub: Sub) {
        let key = (group.to_owned(), filter.to_owned());
        let g = self
            .groups
            .entry(key.clone())
            .or_insert_with(|| Group { key: Arc::new(key), ..Group::default() });
        match g.members.iter_mut().find(|(c, _)| *c == conn) {
            Some(m) => m.1 = sub,
            None => g.members.push((conn, sub)),
        }
    }

    /// `conn` leaves `group` on `filter`.
    pub(super) fn leave(&mut self, group: &str, filter: &str, conn: u64) {
        let key = (group.to_owned(), filter.to_owned());
        if let Some(g) = self.groups.get_mut(&key) {
            g.members.retain(|(c, _)| *c != conn);
            if g.members.is_empty() {
                self.groups.remove(&key);
            }
        }
    }

    /// Hands `publish` to one member of every group whose filter it matches.
    pub(super) fn deliver(&self, publish: &Message, metrics: &Metrics) {
        for g in self.groups.values().filter(|g| matches(&g.key.1, &publish.topic)) {
            if !deliver_to_one(g, publish, metrics) {
                dropped_full(metrics);
            }
        }
    }

    /// Hands `publish` to one member of `group` on `filter`: `None` if the group has no member
    /// here, else whether a member's queue took it (the caller counts a message no one took: it
    /// may yet go to a member elsewhere).
    pub(super) fn deliver_in(
        &self,
        group: &str,
        filter: &str,
        publish: &Message,
        metrics: &Metrics,
    ) -> Option<bool> {
        let g = self.groups.get(&(group.to_owned(), filter.to_owned()))?;
        Some(deliver_to_one(g, publish, metrics))
    }
}

/// Counts a shared message dropped because every member's queue was full.
pub(super) fn dropped_full(metrics: &Metrics) {
    metrics.messages_dropped.inc();
    metrics.limit(Limit::QueuedMessages);
}

/// The next member in turn whose queue takes it; false if none did.
fn deliver_to_one(g: &Group, publish: &Message, metrics: &Metrics) -> bool {
    let n = g.members.len();
    let start = g.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..n {
        let (_, sub) = &g.members[(start + i) % n];
        let mut p = publish.clone();
        p.qos = if sub.qos == QoS::AtMostOnce || publish.qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        p.retain = sub.opts.retain_as_published && publish.retain;
        p.dup = false;
        p.sub_ids = sub.opts.id.into_iter().collect();
        p.shared = Some(g.key.clone());
        if sub.inbox.push(Box::new(p)) {
            metrics.messages_delivered.inc();
            return true;
        }
    }
    false
}
