//! The message fabric: the node's router and, on a cluster member, its NATS link, behind one
//! handle. A message accepted here is routed to the local subscribers and, through the link,
//! to the other nodes'; a subscription held here pulls the other nodes' messages in; a session
//! claims its device across the cluster. No caller asks whether a cluster exists: a single
//! node's link is [`Link::Local`], whose bus operations do nothing (rumqttd's `link/`: local
//! clients, remote nodes and the console all reach one router through a link).
//!
//! The link is an enum, not a trait object: the per-message path (`publish`) is one `match`,
//! statically dispatched, with no allocation and no lock beyond the router's own.

use std::sync::Arc;
use std::time::Duration;

use crate::message::{Message, SubOpts};
use bytes::Bytes;
use fleet_registry::{DeviceId, SerialNumber};
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cluster::bus::Origin;
use crate::cluster::claims::ClaimGuard;
use crate::cluster::Cluster;
use crate::inbox::Inbox;
use crate::observe::metrics::Metrics;
use crate::router::{RetainBudget, RetainRefused, Router};

/// How this node reaches the others.
#[derive(Debug)]
pub(crate) enum Link {
    /// A single node: there are no others.
    Local,
    /// A cluster member's NATS connection.
    Nats(Box<Cluster>),
}

/// The router and the link; clone freely (two `Arc`s and the metrics handle).
#[derive(Debug, Clone)]
pub(crate) struct Fabric {
    router: Arc<Router>,
    link: Arc<Link>,
    metrics: Metrics,
}

/// Other nodes' revocation announcements: the task receiving them and its queue.
pub(crate) type Announcements = (JoinHandle<()>, mpsc::Receiver<(DeviceId, SerialNumber)>);

impl Fabric {
    /// A fabric over `router` reaching the other nodes through `link`.
    pub(crate) fn new(mut router: Router, link: Link, metrics: Metrics) -> Self {
        if let Link::Nats(_) = link {
            router.span_groups_over_nodes();
        }
        Self { router: Arc::new(router), link: Arc::new(link), metrics }
    }

    /// Routes a message a client (or the broker) published to the local subscribers, keeping it
    /// if retained (against `budget`), then, if it was routed, hands it to the other nodes.
    pub(crate) async fn publish(
        &self,
        p: &Message,
        budget: RetainBudget,
        origin: Origin<'_>,
    ) -> Result<(), RetainRefused> {
        self.router.route(p, budget, &self.metrics)?;
        self.to_others(p, origin).await;
        Ok(())
    }

    /// As [`Fabric::publish`], but the other nodes get it even if a retain cap refused it here
    /// (a stored command, a command status: the other nodes' sessions must see those).
    pub(crate) async fn publish_everywhere(
        &self,
        p: &Message,
        budget: RetainBudget,
        origin: Origin<'_>,
    ) -> Result<(), RetainRefused> {
        let routed = self.router.route(p, budget, &self.metrics);
        self.to_others(p, origin).await;
        routed
    }

    async fn to_others(&self, p: &Message, origin: Origin<'_>) {
        if let Link::Nats(c) = &*self.link {
            c.publish(p, origin).await;
        }
    }

    /// Subscribes `router_id`'s inbox to `filter`; returns the retained messages it matches.
    /// `first`: the session did not hold `filter` yet (the link then subscribes to the other
    /// nodes' messages on it).
    pub(crate) async fn subscribe(
        &self,
        router_id: u64,
        filter: &str,
        qos: QoS,
        opts: SubOpts,
        inbox: Arc<Inbox>,
        first: bool,
    ) -> Vec<Message> {
        let retained = self.router.subscribe(router_id, filter, qos, opts, inbox);
        if let (true, Link::Nats(c)) = (first, &*self.link) {
            c.watch(filter, &self.router, &self.metrics).await;
        }
        retained
    }

    /// Drops `router_id`'s subscription to `filter`; `held`: the session held it (the link
    /// lets go of it too).
    pub(crate) fn unsubscribe(&self, router_id: u64, filter: &str, held: bool) {
        self.router.unsubscribe(router_id, filter);
        if let (true, Link::Nats(c)) = (held, &*self.link) {
            c.unwatch(filter);
        }
    }

    /// Drops every subscription of `router_id` (a session, or a kept one, gone for good).
    pub(crate) fn remove_connection(&self, router_id: u64) {
        for f in self.router.remove_connection(router_id) {
            if let Link::Nats(c) = &*self.link {
                c.unwatch(&f);
            }
        }
    }

    /// Hands a shared delivery that its member left unacknowledged to another member: here if
    /// one takes it, else (on a cluster member) on another node.
    pub(crate) fn redeliver(&self, p: &Message) {
        if self.router.redeliver(p, &self.metrics) {
            return;
        }
        match &*self.link {
            Link::Local => {}
            Link::Nats(_) => {
                let (link, p) = (self.link.clone(), p.clone());
                tokio::spawn(async move {
                    if let Link::Nats(c) = &*link {
                        c.hand_on(&p).await;
                    }
                });
            }
        }
    }

    /// Forgets a device's retained messages (it was revoked); returns how many.
    pub(crate) fn clear_retained(&self, device: &str) -> usize {
        self.router.clear_retained(device)
    }

    /// A cluster member's JetStream (the shared firmware images live there); `None` alone.
    pub(crate) fn jetstream(&self) -> Option<async_nats::jetstream::Context> {
        match &*self.link {
            Link::Local => None,
            Link::Nats(c) => Some(c.js.clone()),
        }
    }

    /// Can this node route and store now? (A cluster member: is its NATS connection up?)
    pub(crate) fn connected(&self) -> bool {
        match &*self.link {
            Link::Local => true,
            Link::Nats(c) => c.connected(),
        }
    }

    /// This node admitted a session under `key`: the others' sessions of it end, and the
    /// callback `cut()` makes runs if another node admits it later (made only on a cluster
    /// member: a single node's admission allocates nothing for it). Held while the session lives.
    pub(crate) async fn claim<F>(&self, key: &str, cut: impl FnOnce() -> F) -> Option<ClaimGuard>
    where
        F: Fn() + Send + 'static,
    {
        match &*self.link {
            Link::Local => None,
            Link::Nats(c) => c.claim(key, cut()).await,
        }
    }

    /// Tells the other nodes of a revocation this node saw in the registry.
    pub(crate) async fn announce_revocation(&self, device: &DeviceId, serial: &SerialNumber) {
        if let Link::Nats(c) = &*self.link {
            c.announce_revocation(device, serial).await;
        }
    }

    /// The revocations other nodes announce (`None`: there are no other nodes).
    pub(crate) async fn announcements(&self) -> Result<Option<Announcements>, async_nats::SubscribeError> {
        match &*self.link {
            Link::Local => Ok(None),
            Link::Nats(c) => c.revocations().await.map(Some),
        }
    }

    /// Asks every other node on `subject`; the answers that arrive within `wait`.
    pub(crate) async fn scatter(
        &self,
        subject: &'static str,
        question: Vec<u8>,
        wait: Duration,
    ) -> Vec<Bytes> {
        match &*self.link {
            Link::Local => Vec::new(),
            Link::Nats(c) => c.scatter(subject, question, wait).await,
        }
    }

    /// Answers other nodes' questions on `subject` until the returned task is aborted
    /// (`None`: there are no other nodes to answer).
    pub(crate) async fn answer(
        &self,
        subject: &'static str,
        reply: impl Fn(Bytes) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<Option<JoinHandle<()>>, async_nats::SubscribeError> {
        match &*self.link {
            Link::Local => Ok(None),
            Link::Nats(c) => c.answer(subject, reply).await.map(Some),
        }
    }
}
