//! Status changes of queued commands, published to the services on
//! `status/devices/<id>/commands/<name>` and to a v5 sender's Response Topic (here and, in a
//! cluster, on every node).

use std::sync::Arc;

use crate::message::{Message, Props};
use bytes::Bytes;
use fleet_registry::{Command, CommandStatus};
use rumqttc::mqttbytes::QoS;

use crate::auth::Identity;
use crate::clock::now_millis;
use crate::cluster::bus::Origin;
use crate::fabric::Fabric;
use crate::observe::metrics::Metrics;
use crate::outcome::CommandRefusal;
use crate::router::RetainBudget;

/// Where a v5 service asked for a command's answers and statuses (its Response Topic), and the
/// Correlation Data it set (MQTT 5 request/response, docs/spec/mqtt5.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) topic: String,
    pub(crate) correlation: Option<Bytes>,
    /// The service that asked (its id): the other nodes relay the answers on its behalf, held
    /// to its subscribe ACL (`cluster::bus`).
    pub(crate) asker: String,
}

impl Reply {
    /// The reply a v5 sender asked for in its command's properties.
    pub(crate) fn asked(sender: &Identity, p: &Message) -> Option<Reply> {
        let props = p.props.as_deref()?;
        let topic = props.response_topic.clone()?;
        Some(Reply { topic, correlation: props.correlation.clone(), asker: sender.id.as_str().to_owned() })
    }

    /// The reply stored with a command.
    pub(crate) fn of(c: &Command) -> Option<Reply> {
        let topic = c.response_topic.clone()?;
        Some(Reply { topic, correlation: c.correlation.clone().map(Bytes::from), asker: c.sender.clone() })
    }
}

/// A status message's JSON, fields in the order docs/spec/commands.md shows them.
#[derive(serde::Serialize)]
struct StatusBody<'a> {
    id: i64,
    device: &'a str,
    name: &'a str,
    status: &'a str,
    at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// Publishes status changes; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Statuses {
    pub(crate) fabric: Fabric,
    pub(crate) metrics: Metrics,
}

impl Statuses {
    /// Publishes a status change to the services (here and, in a cluster, on every node).
    pub(crate) async fn publish(
        &self,
        id: i64,
        device: &str,
        name: &str,
        s: CommandStatus,
        reason: Option<CommandRefusal>,
        reply: Option<&Reply>,
    ) {
        self.metrics.commands.with_label_values(&[s.as_str()]).inc();
        let body = StatusBody {
            id,
            device,
            name,
            status: s.as_str(),
            at: now_millis(),
            reason: reason.map(|r| r.label()),
        };
        // Serialized straight from borrowed fields: no `serde_json::Value` map per status (a
        // service sending thousands of commands a second made one per command).
        let body = serde_json::to_string(&body).unwrap_or_default();
        if let Some(r) = reply {
            // The same status, where the sender asked, with its correlation data.
            let mut p = Message::new(r.topic.clone(), QoS::AtLeastOnce, body.clone());
            p.props = Some(Arc::new(Props {
                content_type: Some("application/json".into()),
                correlation: r.correlation.clone(),
                ..Props::default()
            }));
            let _ = self.fabric.publish_everywhere(&p, RetainBudget::Clients, Origin::Reply(&r.asker)).await;
        }
        let topic = fleet_topic::status(device, name).to_string();
        let p = Message::new(topic, QoS::AtLeastOnce, body);
        let _ = self.fabric.publish_everywhere(&p, RetainBudget::Clients, Origin::Broker).await;
    }
}
