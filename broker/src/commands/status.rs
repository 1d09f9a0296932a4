//! Status changes of queued commands, published to the services on
//! `status/devices/<id>/commands/<name>` (here and, in a cluster, on every node).

use crate::message::Message;
use fleet_registry::CommandStatus;
use rumqttc::mqttbytes::QoS;

use crate::clock::now_millis;
use crate::cluster::bus::Origin;
use crate::fabric::Fabric;
use crate::observe::metrics::Metrics;
use crate::outcome::CommandRefusal;
use crate::router::RetainBudget;

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
    ) {
        self.metrics.commands.with_label_values(&[s.as_str()]).inc();
        let mut body = serde_json::json!({
            "id": id, "device": device, "name": name, "status": s.as_str(), "at": now_millis(),
        });
        if let Some(r) = reason {
            body["reason"] = serde_json::Value::from(r.label());
        }
        let topic = fleet_topic::status(device, name).to_string();
        let p = Message::new(topic, QoS::AtLeastOnce, body.to_string());
        let _ = self.fabric.publish_everywhere(&p, RetainBudget::Clients, Origin::Broker).await;
    }
}
