//! Shared subscriptions across the nodes (`$share/<group>/<filter>`, docs/spec/mqtt5.md): each
//! message matching a group's filter goes to one member of the group, wherever in the cluster.
//!
//! A node whose sessions hold members of a group queue-subscribes to the filter's routing
//! subjects, in a NATS queue group named after group and filter ([`subject::queue_of`]): the
//! NATS server hands each routed message to one node with members, and that node to one of its
//! members in turn ([`Router::deliver_shared`]). Those subscriptions are on a second connection
//! that hears this node's own messages (the routing connection is `no_echo`), so a message
//! published here for a member here comes back through NATS like any other.
//!
//! A member that leaves with messages queued or unacknowledged hands them to another member
//! here, or else to another node: on `fleet.g.<queue>.<topic>`, which every node with members
//! reads in the same queue group on its routing connection (so a hand-off never comes back to
//! the node that sent it). A message that reaches a node whose last member just left, or whose
//! members' queues are all full (a member that never reads is passed over, as on one node), is
//! handed on the same way, at most [`MAX_HOPS`] times.
//!
//! When its last member leaves, a node does not drop its queue subscriptions at once: the NATS
//! server may have sent it messages it has not read yet, and the client would discard those.
//! It asks the server to stop after [`LINGER`] more messages (more than can be on their way to
//! it: the connection queues at most [`CAPACITY`] per subscription), and hands on whatever
//! still comes. A lingering set that hears nothing for [`LINGER_IDLE`] is dropped (nothing is
//! on its way), and a group keeps at most [`MAX_LINGERING`] lingering sets on a node (the
//! oldest is dropped), so members joining and leaving in a loop cannot pile up subscriptions.
//!
//! What arrives is checked as every routed message is (`relayable`: from a node, an origin
//! whose ACL allows the topic).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_nats::{Client, Subscriber};
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::bus::{self, admitted};
use super::subject;
use crate::message::Message;
use crate::observe::metrics::Metrics;
use crate::router::Router;

/// Messages the shares connection queues per subscription (more are dropped by the client:
/// a slow consumer).
pub(super) const CAPACITY: usize = 4096;
/// Messages a leaving node still takes (and hands on) after it asks the server to stop.
const LINGER: u64 = 2 * CAPACITY as u64;
/// A lingering set that heard nothing for this long is dropped.
const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Lingering sets a group keeps on a node.
const MAX_LINGERING: usize = 2;
/// Header: how many nodes handed the message on.
const HOPS: &str = "Fleet-Hops";
/// Hand-offs of one message at most (then it is dropped and counted, as a shared message with
/// no member takes).
const MAX_HOPS: u32 = 3;

/// One set of a group's queue subscriptions on this node (the filter's subjects and the
/// hand-off subject), and the signals that end it: `soft` lingers first, `hard` drops at once.
#[derive(Debug)]
struct Set {
    soft: CancellationToken,
    hard: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Set {
    fn alive(&self) -> bool {
        self.tasks.iter().any(|t| !t.is_finished())
    }

    /// Lingers (the module's documentation).
    fn leave(self) -> Self {
        self.soft.cancel();
        self
    }

    /// Drops its subscriptions now.
    fn drop_now(self) {
        self.hard.cancel();
    }
}

/// A group on this node: its local members, the set they use, the sets still lingering.
#[derive(Debug, Default)]
struct Entry {
    members: usize,
    active: Option<Set>,
    lingering: VecDeque<Set>,
}

type Held = HashMap<(String, String), Entry>;

/// This node's part in the cluster's shared subscriptions.
#[derive(Debug)]
pub(super) struct Shares {
    /// The connection that hears this node's own routed messages.
    echo: Client,
    /// The routing connection (`no_echo`): hand-offs, sent and received.
    routing: Client,
    node_id: u64,
    metrics: Metrics,
    max_payload: usize,
    held: Mutex<Held>,
}

/// What a group's subscription task needs.
#[derive(Debug)]
struct Group {
    name: String,
    filter: String,
    queue: String,
    router: Weak<Router>,
    routing: Client,
    metrics: Metrics,
}

impl Shares {
    pub(super) fn new(
        echo: Client,
        routing: Client,
        node_id: u64,
        metrics: Metrics,
        max_payload: usize,
    ) -> Self {
        Self { echo, routing, node_id, metrics, max_payload, held: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A local session joined `$share/<name>/<filter>`: this node takes part in the group's
    /// queue unless it does already.
    pub(super) async fn join(&self, name: &str, filter: &str, router: &Arc<Router>) {
        let key = (name.to_owned(), filter.to_owned());
        {
            let mut held = self.lock();
            let entry = held.entry(key.clone()).or_default();
            entry.members += 1;
            if entry.active.is_some() {
                return;
            }
        }
        let queue = subject::queue_of(name, filter);
        let group = Arc::new(Group {
            name: key.0.clone(),
            filter: key.1.clone(),
            queue: queue.clone(),
            router: Arc::downgrade(router),
            routing: self.routing.clone(),
            metrics: self.metrics.clone(),
        });
        let set = Set { soft: CancellationToken::new(), hard: CancellationToken::new(), tasks: Vec::new() };
        let mut tasks = Vec::new();
        let routed = subject::filter_subjects(filter).into_iter().map(|s| (&self.echo, s));
        let handoffs = std::iter::once((&self.routing, subject::handoff_filter(&queue)));
        let subs: Vec<_> = routed.chain(handoffs).collect();
        if !subs.iter().all(|(_, s)| subject::fits_control_line(s, &queue)) {
            // The session's limits keep this from happening (`Services::share_within`).
            warn!(group = name, "cluster shared subscription not joined: its subjects are too long for NATS");
            return;
        }
        for (client, s) in subs {
            match client.queue_subscribe(s.clone(), queue.clone()).await {
                Ok(sub) => {
                    tasks.push(tokio::spawn(take(sub, group.clone(), set.soft.clone(), set.hard.clone())))
                }
                Err(e) => warn!(error = %e, subject = %s, "cluster shared subscribe failed"),
            }
        }
        let set = Set { tasks, ..set };
        let mut held = self.lock();
        let entry = held.entry(key).or_default();
        match (&entry.active, entry.members) {
            // Another session joined meanwhile and made a set: one is enough.
            (Some(_), _) => set.drop_now(),
            // Every member left while it was made: it lingers at once.
            (None, 0) => entry.lingering.push_back(set.leave()),
            (None, _) => entry.active = Some(set),
        }
        prune(&mut held);
    }

    /// A local session left `$share/<name>/<filter>`: the last one takes this node out of the
    /// group's queue (its set lingers).
    pub(super) fn leave(&self, name: &str, filter: &str) {
        let mut held = self.lock();
        let key = (name.to_owned(), filter.to_owned());
        if let Some(entry) = held.get_mut(&key) {
            entry.members = entry.members.saturating_sub(1);
            if entry.members == 0 {
                if let Some(set) = entry.active.take() {
                    entry.lingering.push_back(set.leave());
                }
            }
        }
        prune(&mut held);
    }

    /// Hands `p` (a shared delivery whose member here left it unacknowledged) to another node
    /// with members of its group.
    pub(super) async fn hand_on(&self, p: &Message) {
        let (Some(key), Some(origin)) = (&p.shared, &p.origin) else {
            self.metrics.messages_dropped.inc();
            return;
        };
        let queue = subject::queue_of(&key.0, &key.1);
        let subject = subject::handoff_subject(&queue, &p.topic);
        if !subject::fits_control_line(&subject, "") {
            self.metrics.messages_dropped.inc();
            return;
        }
        let mut headers = bus::headers(self.node_id, p, origin, self.max_payload);
        headers.insert(HOPS, "1");
        if let Err(e) = self.routing.publish_with_headers(subject, headers, p.payload.clone()).await {
            warn!(error = %e, topic = p.topic.as_str(), "cluster hand-off failed");
        }
    }
}

/// Forgets lingering sets that ended, keeps at most [`MAX_LINGERING`] per group (dropping the
/// oldest), and groups with nothing left.
fn prune(held: &mut Held) {
    for entry in held.values_mut() {
        entry.lingering.retain(Set::alive);
        while entry.lingering.len() > MAX_LINGERING {
            if let Some(oldest) = entry.lingering.pop_front() {
                oldest.drop_now();
            }
        }
    }
    held.retain(|_, e| e.members > 0 || e.active.is_some() || !e.lingering.is_empty());
}

/// Takes the messages of one of a group's queue subscriptions until `soft`, then lingers (the
/// module's documentation) until the server has sent its last, nothing came for
/// [`LINGER_IDLE`], or `hard`.
async fn take(mut sub: Subscriber, group: Arc<Group>, soft: CancellationToken, hard: CancellationToken) {
    let _counted = Counted::new(&group.metrics);
    let mut taken: u64 = 0;
    let mut idle_until: Option<tokio::time::Instant> = None;
    loop {
        let idle = async {
            match idle_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let m = tokio::select! {
            m = sub.next() => m,
            () = soft.cancelled(), if idle_until.is_none() => {
                idle_until = Some(tokio::time::Instant::now() + LINGER_IDLE);
                if sub.unsubscribe_after(taken + LINGER).await.is_err() {
                    return;
                }
                continue;
            }
            () = hard.cancelled() => None,
            () = idle => None,
        };
        let Some(m) = m else {
            let _ = sub.unsubscribe().await;
            return;
        };
        taken += 1;
        if let Some(at) = idle_until.as_mut() {
            *at = tokio::time::Instant::now() + LINGER_IDLE;
        }
        group.deliver(m).await;
    }
}

/// One live queue subscription of this node's, in `fleet_cluster_share_subscriptions`.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(metrics: &Metrics) -> Self {
        metrics.cluster_share_subscriptions.inc();
        Self(metrics.cluster_share_subscriptions.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Group {
    /// Hands a message of the group's queue to a member here, or on to another node (no member
    /// here, or every member's queue full: a member that never reads is passed over, as on a
    /// single node).
    async fn deliver(&self, m: async_nats::Message) {
        let Some(router) = self.router.upgrade() else { return };
        let subject = m.subject.as_str();
        let topic = match subject.starts_with(subject::GROUPS) {
            // A hand-off's subject is any topic under the queue: only one the group's filter
            // matches is the group's (the routed subjects match it by construction).
            true => subject::topic_of_handoff(&self.queue, subject)
                .filter(|t| fleet_topic::matches(&self.filter, t)),
            false => subject::topic_of(subject),
        };
        let Some(mut p) = admitted(&m, topic, &self.metrics) else { return };
        let origin = m.headers.as_ref().and_then(|h| h.get(bus::ORIGIN)).map(|v| v.as_str());
        p.origin = origin.map(Arc::from);
        if router.deliver_shared(&self.name, &self.filter, &p, &self.metrics) == Some(true) {
            return;
        }
        // No member here any more (the last one just left), or none whose queue takes it:
        // another node's, if one has any.
        let Some(hops) = next_hop(m.headers.as_ref().and_then(|h| h.get(HOPS)).map(|v| v.as_str())) else {
            debug!(topic = p.topic.as_str(), "shared message dropped: no member took it");
            self.metrics.messages_dropped.inc();
            return;
        };
        let mut headers = m.headers.clone().unwrap_or_default();
        headers.insert(HOPS, hops.to_string().as_str());
        let to = subject::handoff_subject(&self.queue, &p.topic);
        if !subject::fits_control_line(&to, "") {
            self.metrics.messages_dropped.inc();
            return;
        }
        if let Err(e) = self.routing.publish_with_headers(to, headers, m.payload).await {
            warn!(error = %e, topic = p.topic.as_str(), "cluster hand-off failed");
        }
    }
}

/// The `Fleet-Hops` a message handed on carries, given the one it came with (none on a routed
/// message); `None` once it was handed on [`MAX_HOPS`] times, or if the value is no count (a
/// node writes one: a forged `4294967295` must neither overflow nor start the count again).
fn next_hop(came_with: Option<&str>) -> Option<u32> {
    let hops = match came_with {
        None => 0,
        Some(v) => v.parse::<u32>().ok()?,
    };
    Some(hops.saturating_add(1)).filter(|h| *h <= MAX_HOPS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_handed_on_at_most_max_hops_times_whatever_its_header_says() {
        assert_eq!(next_hop(None), Some(1));
        assert_eq!(next_hop(Some("1")), Some(2));
        assert_eq!(next_hop(Some("2")), Some(MAX_HOPS));
        assert_eq!(next_hop(Some("3")), None);
        for forged in ["4294967295", "-1", "", "1x", "99999999999"] {
            assert_eq!(next_hop(Some(forged)), None, "{forged:?}");
        }
    }
}
