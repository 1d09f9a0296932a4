//! The durable command queue, broker side (docs/spec/commands.md): a service's QoS 1 command is
//! stored in the registry before its PUBACK, delivered to the device in order with a packet id
//! fixed for the command's life, settled by the device's PUBACK, expired by its time-to-live;
//! every status change is published on `status/devices/<id>/commands/<name>`.

pub(crate) mod writer;

use std::time::Duration;

use fleet_registry::{Command, CommandStatus, DeviceId, Role, Status};
use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use tracing::warn;

use crate::auth::{Identity, COMMANDS, DEVICES};
use crate::{now_millis, Shared};

/// The first level of the services-only status topics.
pub(crate) const STATUS: &str = "status";
/// Most commands in flight to one device.
pub(crate) const IN_FLIGHT: usize = 16;
/// Longest time-to-live a `ttl=` level may ask for, seconds (30 days).
const MAX_TTL_SECS: i64 = 30 * 86_400;

/// The packet identifier of command `id`, the same in every session: 32768 + id mod 32767
/// (other QoS 1 deliveries use 1..=32767).
pub(crate) fn pkid_of(id: i64) -> u16 {
    32_768 + id.rem_euclid(32_767) as u16
}

/// A parsed command topic: the device, the name, the time-to-live in seconds (`None`: default).
pub(crate) type Target = (DeviceId, String, Option<i64>);

/// A service's command topic `devices/<id>/commands/<name>[/ttl=<secs>]`, parsed. `Err` for a
/// bad `ttl=`: the reason and the command's name (the refusal's status names the command).
pub(crate) fn parse(topic: &str) -> Option<Result<Target, (&'static str, String)>> {
    let rest = topic.strip_prefix(DEVICES)?.strip_prefix('/')?;
    let (device, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix(COMMANDS)?.strip_prefix('/')?;
    let device = DeviceId::parse(device).ok()?;
    let (name, ttl) = match name.rsplit_once('/') {
        Some((n, last)) if last.starts_with("ttl=") => {
            match last[4..].parse::<i64>().ok().filter(|t| (1..=MAX_TTL_SECS).contains(t)) {
                Some(t) => (n, Some(t)),
                None => return Some(Err(("bad_ttl", n.to_owned()))),
            }
        }
        _ => (name, None),
    };
    Some(Ok((device, name.to_owned(), ttl)))
}

/// Publishes a status change to the services (here and, in a cluster, on every node).
pub(crate) async fn status(
    shared: &Shared,
    id: i64,
    device: &str,
    name: &str,
    s: CommandStatus,
    reason: Option<&str>,
) {
    shared.metrics.commands.with_label_values(&[s.as_str()]).inc();
    let mut body = serde_json::json!({
        "id": id, "device": device, "name": name, "status": s.as_str(), "at": now_millis(),
    });
    if let Some(r) = reason {
        body["reason"] = serde_json::Value::from(r);
    }
    let topic = format!("{STATUS}/{DEVICES}/{device}/{COMMANDS}/{name}");
    let p = Publish::new(topic, QoS::AtLeastOnce, body.to_string());
    let _ = shared.router.route(&p, crate::router::RetainBudget::Clients, &shared.metrics);
    if let Some(cluster) = &shared.cluster {
        cluster.publish(&p, crate::cluster::bus::Origin::Broker).await;
    }
}

/// What became of a service's command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Stored: route the publish so the device's session (on any node) reads the queue.
    Queued,
    /// Refused, status published: do not route it.
    Refused,
    /// The registry failed: withhold the PUBACK (the service retransmits).
    Unavailable,
}

/// Stores a service's QoS 1 command (or refuses it, with a status).
pub(crate) async fn accept(shared: &Shared, sender: &Identity, p: &Publish) -> Accepted {
    let Some(parsed) = parse(&p.topic) else { return Accepted::Refused };
    let raw_device = p.topic.split('/').nth(1).unwrap_or_default();
    let (device, name, ttl) = match parsed {
        Ok(x) => x,
        Err((reason, name)) => {
            status(shared, 0, raw_device, &name, CommandStatus::Refused, Some(reason)).await;
            return Accepted::Refused;
        }
    };
    let refuse = |reason| status(shared, 0, device.as_str(), &name, CommandStatus::Refused, Some(reason));
    if p.payload.len() > shared.config.max_command_bytes {
        refuse("too_large").await;
        return Accepted::Refused;
    }
    match shared.registry.device(&device).await {
        Ok(Some(d)) if d.role == Role::Device && d.status == Status::Active => {}
        Ok(Some(d)) if d.status == Status::Revoked => {
            refuse("revoked").await;
            return Accepted::Refused;
        }
        Ok(_) => {
            refuse("unknown_device").await;
            return Accepted::Refused;
        }
        Err(e) => {
            warn!(error = %e, "registry unavailable: command not stored");
            return Accepted::Unavailable;
        }
    }
    let ttl_ms = ttl.unwrap_or(shared.config.command_ttl_secs as i64).saturating_mul(1000);
    let change = writer::Change::Enqueue {
        device,
        name,
        payload: p.payload.to_vec(),
        sender: sender.id.as_str().to_owned(),
        now: now_millis(),
        ttl_ms,
    };
    // Stored (and its `queued` status published) by the writer before the answer.
    match shared.command_writer.apply(vec![change]).await {
        Some(_) => Accepted::Queued,
        None => {
            warn!("registry unavailable: command not stored");
            Accepted::Unavailable
        }
    }
}

/// A command sent in this session, awaiting the device's PUBACK.
#[derive(Debug)]
struct InFlight {
    pkid: u16,
    id: i64,
    name: String,
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
    pub(crate) async fn due(&mut self, shared: &Shared, device: &DeviceId) -> Vec<Publish> {
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
        let open = match shared.command_writer.apply(vec![take]).await.and_then(|mut o| o.pop()) {
            Some(fleet_registry::CommandOutcome::Taken(c)) => c,
            _ => {
                warn!(%device, "cannot read the command queue: not sent now");
                return Vec::new();
            }
        };
        self.drained = open.len() < room;
        open.into_iter().map(|c| self.send(c)).collect()
    }

    fn send(&mut self, c: Command) -> Publish {
        let pkid = pkid_of(c.id);
        self.in_flight.retain(|f| f.pkid != pkid);
        self.in_flight.push(InFlight { pkid, id: c.id, name: c.name.clone() });
        self.last_sent = self.last_sent.max(c.id);
        let mut p = Publish::new(
            format!("{DEVICES}/{}/{COMMANDS}/{}", c.device_id, c.name),
            QoS::AtLeastOnce,
            c.payload,
        );
        p.pkid = pkid;
        p.dup = c.attempts > 0;
        p
    }

    /// A command may have been stored for this device since the last read (a routed copy of
    /// a service's command, or the start of delivery): the next [`Delivery::due`] reads.
    pub(crate) fn wake(&mut self) {
        self.drained = false;
    }

    /// The device's PUBACK for `pkid`: settles the command if it is one (through the writer,
    /// not waited for). Returns whether it was.
    pub(crate) async fn acked(&mut self, shared: &Shared, device: &DeviceId, pkid: u16) -> bool {
        let Some(i) = self.in_flight.iter().position(|f| f.pkid == pkid) else { return false };
        let f = self.in_flight.remove(i);
        let change = writer::Change::Acknowledged {
            id: f.id,
            device: device.to_string(),
            name: f.name,
            now: now_millis(),
        };
        shared.command_writer.submit(vec![change]).await;
        true
    }
}

/// Every second: expires commands past their time-to-live, counts the pending ones, and
/// forgets persistent sessions past their expiry.
pub(crate) async fn sweep(shared: std::sync::Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.registry.expire_commands(now_millis()).await {
            Ok(expired) => {
                for c in expired {
                    status(&shared, c.id, &c.device_id, &c.name, CommandStatus::Expired, None).await;
                }
            }
            Err(e) => warn!(error = %e, "cannot expire commands"),
        }
        if let Ok(n) = shared.registry.open_command_count().await {
            shared.metrics.commands_pending.set(n);
        }
        // Persistent sessions whose clients stayed away too long.
        for p in shared.parked.expire(std::time::Instant::now()) {
            crate::session::park::discard(&shared, p, crate::session::park::Discard::Expired);
        }
        shared.metrics.sessions_parked.set(shared.parked.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_names_and_ttls() {
        let ok = |t: &str| parse(t).and_then(Result::ok).map(|(d, n, ttl)| (d.to_string(), n, ttl));
        assert_eq!(ok("devices/dev-1/commands/blink"), Some(("dev-1".into(), "blink".into(), None)));
        assert_eq!(
            ok("devices/dev-1/commands/fw/update/ttl=60"),
            Some(("dev-1".into(), "fw/update".into(), Some(60)))
        );
        assert_eq!(parse("devices/dev-1/commands/blink/ttl=0"), Some(Err(("bad_ttl", "blink".into()))));
        assert_eq!(parse("devices/dev-1/commands/blink/ttl=x"), Some(Err(("bad_ttl", "blink".into()))));
        assert_eq!(
            parse("devices/dev-1/commands/blink/ttl=99999999"),
            Some(Err(("bad_ttl", "blink".into())))
        );
        assert!(parse("devices/dev-1/telemetry").is_none());
        assert!(parse("devices/BAD/commands/x").is_none());
        // Command packet ids never collide with the session's own (1..=32767), and stay put.
        for id in [1, 2, 32_766, 32_767, 32_768, i64::MAX] {
            assert!(pkid_of(id) >= 32_768);
        }
        assert_eq!(pkid_of(5), pkid_of(5 + 32_767));
    }
}
