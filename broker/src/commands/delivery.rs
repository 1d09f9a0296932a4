//! A device session's side of the command queue: which commands are in flight in this session,
//! read and marked sent through the writer, settled by the device's PUBACKs.

use crate::message::{Message, Props};
use fleet_registry::{Command, DeviceId};
use rumqttc::mqttbytes::QoS;
use tracing::warn;

use super::status::Reply;
use super::topic::pkid_of;
use super::writer::{self, Writer};
use crate::clock::now_millis;

/// Most commands in flight to one device.
const IN_FLIGHT: usize = 16;

/// A command sent in this session, awaiting the device's PUBACK.
#[derive(Debug)]
struct InFlight {
    pkid: u16,
    id: i64,
    name: String,
    /// Where its sender wants its statuses (MQTT 5).
    reply: Option<Reply>,
}

/// A device session's side of the queue: which commands are in flight in this session.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// Delivery is on: the device subscribed to its commands.
    pub(crate) active: bool,
    /// Sent, not yet acknowledged.
    in_flight: Vec<InFlight>,
    /// Highest command id sent in this session.
    last_sent: i64,
    /// The last read of the queue found less than the window: nothing more is queued until a
    /// wake-up ([`Delivery::wake`]) says otherwise, so an acknowledgement needs no new read.
    drained: bool,
}

impl Delivery {
    /// The commands to send now (in order), each marked as sent; statuses published.
    pub(crate) async fn due(&mut self, writer: &Writer, device: &DeviceId) -> Vec<Message> {
        let room = IN_FLIGHT.saturating_sub(self.in_flight.len());
        if !self.active || room == 0 || self.drained {
            return Vec::new();
        }
        let take = writer::Change::Take {
            device: device.clone(),
            after: self.last_sent,
            limit: room,
            now: now_millis(),
        };
        // Read and recorded as sent (attempts + 1, `delivered` the first time) in one commit
        // before they go out: a resend after a crash then carries DUP, which the SDK's
        // de-duplication relies on.
        let open = match writer.apply(vec![take]).await.and_then(|mut o| o.pop()) {
            Some(fleet_registry::CommandOutcome::Taken(c)) => c,
            _ => {
                warn!(%device, "cannot read the command queue: not sent now");
                return Vec::new();
            }
        };
        self.drained = open.len() < room;
        open.into_iter().map(|c| self.send(c)).collect()
    }

    fn send(&mut self, c: Command) -> Message {
        let pkid = pkid_of(c.id);
        self.in_flight.retain(|f| f.pkid != pkid);
        let reply = Reply::of(&c);
        self.in_flight.push(InFlight { pkid, id: c.id, name: c.name.clone(), reply: reply.clone() });
        self.last_sent = self.last_sent.max(c.id);
        let mut p = Message::new(
            fleet_topic::command(c.device_id.as_str(), &c.name).to_string(),
            QoS::AtLeastOnce,
            c.payload,
        );
        p.pkid = pkid;
        p.dup = c.attempts > 0;
        // A v5 device is told how long the command has left (MQTT 5 Message Expiry), and where
        // its sender wants the answer.
        p.props = Some(std::sync::Arc::new(Props {
            expires_at_ms: Some(c.expires_at),
            response_topic: reply.as_ref().map(|r| r.topic.clone()),
            correlation: reply.and_then(|r| r.correlation),
            ..Props::default()
        }));
        p
    }

    /// A command may have been stored for this device since the last read (a routed copy of
    /// a service's command, or the start of delivery): the next [`Delivery::due`] reads.
    pub(crate) fn wake(&mut self) {
        self.drained = false;
    }

    /// The device's PUBACK for `pkid`: settles the command if it is one (through the writer,
    /// not waited for). Returns whether it was.
    pub(crate) async fn acked(&mut self, writer: &Writer, device: &DeviceId, pkid: u16) -> bool {
        let Some(i) = self.in_flight.iter().position(|f| f.pkid == pkid) else { return false };
        let f = self.in_flight.remove(i);
        let change = writer::Change::Acknowledged {
            id: f.id,
            device: device.to_string(),
            name: f.name,
            now: now_millis(),
            reply: f.reply,
        };
        writer.submit(vec![change]).await;
        true
    }
}
