//! The durable command queue, broker side (docs/spec/commands.md): a service's QoS 1 command is
//! stored in the registry before its PUBACK, delivered to the device in order with a packet id
//! fixed for the command's life ([`delivery`]), settled by the device's PUBACK, expired by its
//! time-to-live; every status change is published on `status/devices/<id>/commands/<name>`
//! ([`status`]). All writes go through one task ([`writer`]).

pub(crate) mod delivery;
pub(crate) mod status;
pub(crate) mod topic;
pub(crate) mod writer;

use std::time::Duration;

use crate::message::Message;
use fleet_registry::{CommandOutcome, CommandStatus, Registry};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::auth::Identity;
use crate::clock::now_millis;
use crate::outcome::CommandRefusal;
pub(crate) use delivery::Delivery;
use status::{Reply, Statuses};
pub(crate) use topic::parse;
use writer::Writer;

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

/// The command queue as sessions use it; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Commands {
    writer: Writer,
    registry: Registry,
    statuses: Statuses,
    /// `max_command_bytes`.
    max_bytes: usize,
    /// `command_ttl_secs`.
    default_ttl_secs: u64,
}

impl Commands {
    /// The queue behind `writer`.
    pub(crate) fn new(
        writer: Writer,
        registry: Registry,
        statuses: Statuses,
        max_bytes: usize,
        default_ttl_secs: u64,
    ) -> Self {
        Self { writer, registry, statuses, max_bytes, default_ttl_secs }
    }

    /// The writer, for a session's [`Delivery`].
    pub(crate) fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Takes a service's QoS 1 command: checks it and hands it to the writer, in the order the
    /// session read it (this waits only for room in the writer's queue). The future it returns
    /// resolves once the command is stored or refused (with its status published): the session
    /// reads on meanwhile, so a service is not held to one command per commit.
    pub(crate) async fn accept(&self, sender: &Identity, p: &Message) -> BoxFuture<'static, Accepted> {
        let done = |a: Accepted| -> BoxFuture<'static, Accepted> { Box::pin(std::future::ready(a)) };
        let Some(parsed) = parse(&p.topic) else { return done(Accepted::Refused) };
        let raw_device = p.topic.split('/').nth(1).unwrap_or_default();
        let reply = Reply::asked(sender, p);
        // A command refused here still has its status published by the writer, in order with
        // the statuses of the commands before it.
        let refuse = |device: &str, name: String, reason: CommandRefusal| writer::Change::Refuse {
            device: device.to_owned(),
            name,
            reason,
            reply: reply.clone(),
        };
        let (device, name, ttl) = match parsed {
            Err((reason, name)) => return self.refuse(refuse(raw_device, name, reason)).await,
            Ok((device, name, _)) if p.payload.len() > self.max_bytes => {
                return self.refuse(refuse(device.as_str(), name, CommandRefusal::TooLarge)).await;
            }
            Ok(x) => x,
        };
        // A `ttl=` level first (3.1.1 senders), then a v5 sender's Message Expiry (capped like
        // `ttl=`), then the default.
        let now = now_millis();
        let expiry_ms = p.props.as_ref().and_then(|props| props.expires_at_ms).map(|at| (at - now).max(1));
        let ttl_ms = match (ttl, expiry_ms) {
            (Some(secs), _) => secs.saturating_mul(1000),
            (None, Some(ms)) => ms.min(topic::MAX_TTL_SECS * 1000),
            (None, None) => (self.default_ttl_secs as i64).saturating_mul(1000),
        };
        let change = writer::Change::Enqueue {
            device,
            name,
            payload: p.payload.to_vec(),
            sender: sender.id.as_str().to_owned(),
            now,
            ttl_ms,
            reply,
        };
        // The device's check, the insert and the `queued` (or `refused`) status are the
        // writer's, in one transaction with the rest of its batch.
        let Some(answer) = self.writer.send(vec![change]).await else {
            return done(Accepted::Unavailable);
        };
        Box::pin(async move {
            match answer.await.ok().flatten().as_deref() {
                Some([CommandOutcome::Enqueued { .. }]) => Accepted::Queued,
                Some(_) => Accepted::Refused,
                None => {
                    warn!("registry unavailable: command not stored");
                    Accepted::Unavailable
                }
            }
        })
    }

    /// Hands a refusal to the writer: its status goes out after those of the commands before it.
    async fn refuse(&self, change: writer::Change) -> BoxFuture<'static, Accepted> {
        let Some(answer) = self.writer.send(vec![change]).await else {
            return Box::pin(std::future::ready(Accepted::Unavailable));
        };
        Box::pin(async move {
            match answer.await.ok().flatten() {
                Some(_) => Accepted::Refused,
                None => Accepted::Unavailable,
            }
        })
    }

    /// Every second until `shutdown`: expires commands past their time-to-live and counts the
    /// pending ones.
    pub(crate) async fn sweep(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.registry.expire_commands(now_millis()).await {
                Ok(expired) => {
                    for c in expired {
                        self.statuses
                            .publish(
                                c.id,
                                &c.device_id,
                                &c.name,
                                CommandStatus::Expired,
                                None,
                                Reply::of(&c).as_ref(),
                            )
                            .await;
                    }
                }
                Err(e) => warn!(error = %e, "cannot expire commands"),
            }
            if let Ok(n) = self.registry.open_command_count().await {
                self.statuses.metrics.commands_pending.set(n);
            }
        }
    }
}
