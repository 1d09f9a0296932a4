//! What each node knows that the registry does not: its live sessions, its admission counts and
//! its recent events. The admin API asks every node of a cluster (a request on `fleet.admin.q`,
//! answers gathered for [`GATHER`]) and adds up the answers, so the views are cluster-wide
//! whichever node serves the API. A single node answers alone.
//!
//! Every node answers, with or without `admin_listen`: any node's API may ask it. A node that
//! does not answer within the window is missing from the sums (the summary lists the nodes that
//! answered).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::fabric::Fabric;
use crate::observe::events::Kind;
use crate::observe::Observe;
use crate::sessions::Sessions;

/// The subject of the question.
pub(crate) const SUBJECT: &str = "fleet.admin.q";
/// How long answers are gathered.
pub(crate) const GATHER: Duration = Duration::from_millis(300);
/// Most devices one question may name (a page of the device list).
const MAX_DEVICES: usize = 500;

/// The question.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Query {
    /// Window of the counts, minutes.
    pub(crate) minutes: i64,
    /// Devices whose live session (and, with `detail`, events) the answer should include.
    pub(crate) devices: Vec<String>,
    /// Include session details and events of `devices`.
    pub(crate) detail: bool,
}

/// One node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NodeView {
    pub(crate) node: String,
    pub(crate) sessions_live: u64,
    /// (kind, reason, count) over the window.
    pub(crate) counts: Vec<(Kind, String, u64)>,
    /// Those of the devices asked about that have a live session here.
    pub(crate) online: Vec<String>,
    /// With `detail`: their sessions (JSON of the API's `session`).
    pub(crate) sessions: Vec<Value>,
    /// With `detail`: their events here, newest first.
    pub(crate) events: Vec<Value>,
    /// The live sessions here of the devices asked about: what they have sent so far.
    #[serde(default)]
    pub(crate) activity: Vec<Activity>,
    /// The devices asked about that are offline here but had a session here that ended:
    /// (device, unix milliseconds it ended).
    #[serde(default)]
    pub(crate) last_seen: Vec<(String, i64)>,
}

/// A live session's traffic, for message rates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Activity {
    pub(crate) device: String,
    /// Unix milliseconds the session started.
    pub(crate) since_ms: i64,
    /// PUBLISH packets received from the device.
    pub(crate) received: u64,
}

impl Activity {
    /// Messages per minute from the device over its session so far (at least a second of it).
    pub(crate) fn per_minute(&self, now_ms: i64) -> f64 {
        let minutes = ((now_ms - self.since_ms).max(1000) as f64) / 60_000.0;
        (self.received as f64 / minutes * 10.0).round() / 10.0
    }
}

/// A node's views and the way to the other nodes'; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Views {
    /// This node, as the API names it (its MQTT listen address).
    node: String,
    sessions: Arc<Sessions>,
    observe: Observe,
    fabric: Fabric,
}

impl Views {
    /// Views of this node (`node`), asking the others through `fabric`.
    pub(crate) fn new(node: String, sessions: Arc<Sessions>, observe: Observe, fabric: Fabric) -> Self {
        Self { node, sessions, observe, fabric }
    }

    /// This node's name.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// This node's answer to `q`.
    fn local(&self, q: &Query) -> NodeView {
        let node = self.node.as_str();
        let events = self.observe.events();
        let counts = events.counts(q.minutes).into_iter().map(|((k, r), n)| (k, r.to_owned(), n)).collect();
        let mut view = NodeView {
            node: node.to_owned(),
            sessions_live: self.sessions.len() as u64,
            counts,
            online: Vec::new(),
            sessions: Vec::new(),
            events: Vec::new(),
            activity: Vec::new(),
            last_seen: Vec::new(),
        };
        for d in q.devices.iter().take(MAX_DEVICES) {
            let Some(s) = self.sessions.get(d) else {
                if let Some(at) = events.last_seen(d) {
                    view.last_seen.push((d.clone(), at));
                }
                continue;
            };
            view.online.push(d.clone());
            view.activity.push(Activity {
                device: d.clone(),
                since_ms: s.info.since_ms,
                received: s.info.received.load(Relaxed),
            });
            if q.detail {
                view.sessions.push(serde_json::json!({
                    "node": node, "peer": s.info.peer.to_string(), "since_ms": s.info.since_ms,
                    "serial": s.serial.to_hex(), "not_after": s.not_after,
                    "received": s.info.received.load(Relaxed), "sent": s.info.sent.load(Relaxed),
                }));
            }
        }
        if q.detail {
            for d in q.devices.iter().take(MAX_DEVICES) {
                let events = events.recent(Some(d), None, 20);
                view.events.extend(events.iter().filter_map(|e| serde_json::to_value(e).ok()));
            }
        }
        view
    }

    /// Every node's answer: this node's, then the others' (in a cluster).
    pub(crate) async fn gather(&self, q: &Query) -> Vec<NodeView> {
        let mut views = vec![self.local(q)];
        match serde_json::to_vec(q) {
            Ok(body) => {
                for answer in self.fabric.scatter(SUBJECT, body, GATHER).await {
                    match serde_json::from_slice::<NodeView>(&answer) {
                        Ok(v) => views.push(v),
                        Err(e) => warn!(error = %e, "admin: an unreadable answer from another node"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "admin: question not encoded"),
        }
        views
    }

    /// Answers other nodes' questions until the broker stops.
    pub(crate) async fn answer(self, shutdown: CancellationToken) {
        let me = self.clone();
        let served = self.fabric.answer(SUBJECT, move |question| {
            // A question that does not parse gets no answer (the asker's window just ends).
            let q: Query = serde_json::from_slice(&question).ok()?;
            serde_json::to_vec(&me.local(&q)).ok()
        });
        match served.await {
            Ok(None) => {}
            Ok(Some(task)) => {
                shutdown.cancelled().await;
                task.abort();
            }
            Err(e) => {
                warn!(error = %e, "admin: cannot answer other nodes' questions; their views miss this node")
            }
        }
    }
}
