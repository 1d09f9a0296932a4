//! The one task that writes the command queue. Sessions submit changes (a service's new
//! command, a delivery, a device's acknowledgement); the writer applies every change submitted
//! while its previous commit ran in one transaction, then publishes the resulting statuses in
//! order and answers. One writer, not one transaction per session: SQLite has one write lock,
//! and sessions contending for it through the pool made a mass reconnect of 10,000 devices
//! with queued commands starve admissions (BENCHMARKS.md, commands). Reads for delivery go
//! through the writer too ([`Change::Take`]): on two busy cores a session holding a pooled
//! connection across its awaits kept it for long, and reads timed out waiting for the pool.

use std::time::Duration;

use fleet_registry::{
    Command, CommandOp, CommandOutcome, CommandStatus, DeviceId, NewCommand, Registry, WriterConnection,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::status::{Reply, Statuses};
use crate::outcome::CommandRefusal;

/// Changes applied in one transaction at most.
const BATCH: usize = 256;
/// Submitted changes waiting for the writer at most; a session waits for room beyond it.
const QUEUE: usize = 4096;

/// A change, owned (the writer outlives the session's borrow).
#[derive(Debug)]
pub(crate) enum Change {
    /// A service's command.
    Enqueue {
        device: DeviceId,
        name: String,
        payload: Vec<u8>,
        sender: String,
        now: i64,
        ttl_ms: i64,
        reply: Option<Reply>,
    },
    /// The device acknowledged command `id`.
    Acknowledged { id: i64, device: String, name: String, now: i64, reply: Option<Reply> },
    /// A command the session refused itself (too large, a bad `ttl=`): nothing to store, but
    /// its `refused` status goes out in order with the statuses of the commands around it.
    Refuse { device: String, name: String, reason: CommandRefusal, reply: Option<Reply> },
    /// Read the device's next open commands (id above `after`, at most `limit`) and mark them
    /// sent: a session's whole delivery step in the writer's transaction, not in the pool.
    Take { device: DeviceId, after: i64, limit: usize, now: i64 },
}

impl Change {
    /// What to apply in the registry, if anything.
    fn op(&self) -> Option<CommandOp<'_>> {
        Some(match self {
            Change::Enqueue { device, name, payload, sender, now, ttl_ms, reply } => {
                CommandOp::Enqueue(NewCommand {
                    device_id: device,
                    name,
                    payload,
                    sender,
                    now: *now,
                    ttl_ms: *ttl_ms,
                    response_topic: reply.as_ref().map(|r| r.topic.as_str()),
                    correlation: reply.as_ref().and_then(|r| r.correlation.as_deref()),
                })
            }
            Change::Acknowledged { id, now, .. } => CommandOp::Acknowledged { id: *id, now: *now },
            Change::Take { device, after, limit, now } => {
                CommandOp::Take { device, after: *after, limit: *limit, now: *now }
            }
            Change::Refuse { .. } => return None,
        })
    }
}

/// The answer to a job: each change's outcome, or `None` if nothing was stored.
pub(crate) type Answer = Option<Vec<CommandOutcome>>;

#[derive(Debug)]
struct Job {
    changes: Vec<Change>,
    reply: Option<oneshot::Sender<Answer>>,
}

/// Submits changes to the writer; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
}

/// The writer's end, handed to [`run`].
#[derive(Debug)]
pub(crate) struct Jobs(mpsc::Receiver<Job>);

/// A writer and its job queue.
pub(crate) fn channel() -> (Writer, Jobs) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Writer { tx }, Jobs(rx))
}

impl Writer {
    /// Applies `changes` (in order, all or none) and waits for the outcome.
    pub(crate) async fn apply(&self, changes: Vec<Change>) -> Answer {
        self.send(changes).await?.await.ok().flatten()
    }

    /// Queues `changes` (in the order of the calls) and returns where their outcome will come:
    /// waits only for room in the queue. `None`: the writer is gone.
    pub(crate) async fn send(&self, changes: Vec<Change>) -> Option<oneshot::Receiver<Answer>> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job { changes, reply: Some(reply) }).await.ok()?;
        Some(answer)
    }

    /// Submits `changes` without waiting (an acknowledgement: the device waits for nothing).
    pub(crate) async fn submit(&self, changes: Vec<Change>) {
        let _ = self.tx.send(Job { changes, reply: None }).await;
    }
}

/// A status change to publish once its batch is committed.
#[derive(Debug)]
struct Event {
    id: i64,
    device: String,
    name: String,
    status: CommandStatus,
    reason: Option<CommandRefusal>,
    reply: Option<Reply>,
}

impl Event {
    /// A command not stored (id 0).
    fn refused(device: String, name: String, reason: CommandRefusal, reply: Option<Reply>) -> Self {
        Event { id: 0, device, name, status: CommandStatus::Refused, reason: Some(reason), reply }
    }

    fn of(c: &Command, status: CommandStatus, reason: Option<CommandRefusal>) -> Self {
        Event {
            id: c.id,
            device: c.device_id.clone(),
            name: c.name.clone(),
            status,
            reason,
            reply: Reply::of(c),
        }
    }
}

/// The statuses a committed change caused, in order.
fn events(change: Change, outcome: &CommandOutcome, out: &mut Vec<Event>) {
    match (change, outcome) {
        (Change::Enqueue { device, name, reply, .. }, CommandOutcome::Enqueued { id, dropped }) => {
            let device = device.as_str().to_owned();
            out.push(Event { id: *id, device, name, status: CommandStatus::Queued, reason: None, reply });
            out.extend(
                dropped.iter().map(|d| Event::of(d, CommandStatus::Dropped, Some(CommandRefusal::QueueFull))),
            );
        }
        (Change::Enqueue { device, name, reply, .. }, CommandOutcome::NotAddressable { revoked }) => {
            let reason = if *revoked { CommandRefusal::Revoked } else { CommandRefusal::UnknownDevice };
            out.push(Event::refused(device.as_str().to_owned(), name, reason, reply));
        }
        (Change::Acknowledged { id, device, name, reply, .. }, CommandOutcome::Changed(true)) => {
            out.push(Event { id, device, name, status: CommandStatus::Acknowledged, reason: None, reply });
        }
        (Change::Refuse { device, name, reason, reply }, _) => {
            out.push(Event::refused(device, name, reason, reply))
        }
        (Change::Take { .. }, CommandOutcome::Taken(commands)) => out.extend(
            commands
                .iter()
                .filter(|c| c.status == CommandStatus::Queued)
                .map(|c| Event::of(c, CommandStatus::Delivered, None)),
        ),
        _ => {}
    }
}

/// Applies one batch on the writer's own connection (taken, or taken again after an error),
/// retrying once after a short pause (a busy or briefly unreachable database); `None` if it
/// failed both times.
async fn commit(
    registry: &Registry,
    conn: &mut Option<WriterConnection>,
    limit: usize,
    batch: &[Job],
) -> Option<Vec<CommandOutcome>> {
    let ops: Vec<CommandOp<'_>> =
        batch.iter().flat_map(|j| j.changes.iter().filter_map(Change::op)).collect();
    if ops.is_empty() {
        return Some(Vec::new());
    }
    for attempt in 0..2 {
        let result = match conn.as_mut() {
            Some(c) => registry.apply_commands_on(c, &ops, limit).await,
            None => match registry.writer_connection().await {
                Ok(c) => registry.apply_commands_on(conn.insert(c), &ops, limit).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(out) => return Some(out),
            Err(e) => {
                // The connection may be what failed: the next attempt takes another.
                *conn = None;
                if attempt == 0 {
                    warn!(error = %e, changes = ops.len(), "command queue write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    warn!(error = %e, changes = ops.len(), "command queue write failed");
                }
            }
        }
    }
    None
}

/// Answers each job of a committed batch (`outcomes`; `None`: not stored) and collects the
/// statuses the batch caused, in order.
fn settle(batch: Vec<Job>, outcomes: Option<Vec<CommandOutcome>>, done: &mut Vec<Event>) {
    let mut outcomes = outcomes.map(Vec::into_iter);
    for job in batch {
        // A refusal has no registry outcome: it stands in as "not stored".
        let answer = outcomes.as_mut().map(|it| {
            job.changes
                .iter()
                .map(|c| match c {
                    Change::Refuse { .. } => CommandOutcome::Changed(false),
                    _ => it.next().unwrap_or(CommandOutcome::Changed(false)),
                })
                .collect::<Vec<_>>()
        });
        if let Some(mine) = &answer {
            for (c, o) in job.changes.into_iter().zip(mine) {
                events(c, o, done);
            }
        }
        if let Some(reply) = job.reply {
            let _ = reply.send(answer);
        }
    }
}

/// Statuses of answered batches waiting to be published at most; the writer waits beyond it.
const ANNOUNCE_QUEUE: usize = 64;

/// The writer, two stages in a row, each in commit order:
///
/// 1. **commit**: until shutdown, takes every job waiting (up to [`BATCH`] changes), commits
///    them in one transaction on its own connection ([`Registry::writer_connection`]: with
///    `store_fsync = every-commit` SQLite flushes the write-ahead log at the commit, before it
///    returns), and only then answers each job: a PUBACK means the command is on disk, and a
///    delivery sends only what is;
/// 2. **announce**: publishes the statuses the batches caused (a status never holds a PUBACK).
///
/// On SQLite a batch of new commands only is one call to SQLite's worker thread, flush
/// included. (A flush stage that synced the log for several commits at once, while the next
/// batch committed, was slower once a batch was one call: 34,000 against 46,000 commands/s,
/// BENCHMARKS.md, issue 29's fifth pass.)
///
/// A failed batch answers `None`: a new command is not acknowledged to its service (it
/// retransmits); a delivery is not sent (the session tries again on its next wake-up); an
/// acknowledgement is lost and the command is sent again (DUP) in the device's next session,
/// where the SDK filters it out. A commit whose flush failed is not a commit (SQLite rolls it
/// back), and the next commit writes its frames of the log in its place and flushes them.
pub(crate) async fn run(
    registry: Registry,
    statuses: Statuses,
    max_queued_commands: usize,
    jobs: Jobs,
    shutdown: CancellationToken,
) {
    let (announce_tx, mut announce_rx) = mpsc::channel::<Vec<Event>>(ANNOUNCE_QUEUE);
    let write = async move {
        let Jobs(mut rx) = jobs;
        let mut conn = None;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                j = rx.recv() => match j { Some(j) => j, None => return },
            };
            let mut n = first.changes.len();
            let mut batch = vec![first];
            while n < BATCH {
                match rx.try_recv() {
                    Ok(j) => {
                        n += j.changes.len();
                        batch.push(j);
                    }
                    Err(_) => break,
                }
            }
            let outcomes = commit(&registry, &mut conn, max_queued_commands, &batch).await;
            let mut done = Vec::new();
            settle(batch, outcomes, &mut done);
            if !done.is_empty() && announce_tx.send(done).await.is_err() {
                return;
            }
        }
    };
    let announce = async move {
        while let Some(done) = announce_rx.recv().await {
            for e in done {
                statuses.publish(e.id, &e.device, &e.name, e.status, e.reason, e.reply.as_ref()).await;
            }
        }
    };
    tokio::join!(write, announce);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::{Fabric, Link};
    use crate::observe::metrics::Metrics;
    use crate::router::{RetainLimits, Router};

    fn enqueue(device: &DeviceId, name: &str) -> Change {
        Change::Enqueue {
            device: device.clone(),
            name: name.to_owned(),
            payload: b"x".to_vec(),
            sender: "svc".to_owned(),
            now: 1,
            ttl_ms: 3_600_000,
            reply: None,
        }
    }

    /// A command is answered once its commit is done (visible to every other connection), a
    /// command to an unknown device is answered refused, and what the writer answers while the
    /// registry is unreachable is "not stored", never a guess.
    #[tokio::test]
    async fn a_command_is_answered_after_its_commit_and_a_failed_batch_is_answered_not_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("r.db");
        let reg = Registry::open(&format!("sqlite://{}", db.display()), true).await.expect("open");
        sqlx::query(
            "INSERT INTO devices (device_id, role, status, created_at) VALUES ('d0', 'device', 'active', 0)",
        )
        .execute(reg.pool())
        .await
        .expect("device");
        let metrics = Metrics::new();
        let fabric = Fabric::new(Router::new(RetainLimits::default()), Link::Local, metrics.clone());
        let (writer, jobs) = channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(reg.clone(), Statuses { fabric, metrics }, 100, jobs, shutdown.clone()));
        let (d0, ghost) = (DeviceId::parse("d0").expect("id"), DeviceId::parse("ghost").expect("id"));

        let answer = writer.apply(vec![enqueue(&d0, "first"), enqueue(&ghost, "lost")]).await;
        let Some([CommandOutcome::Enqueued { id, .. }, CommandOutcome::NotAddressable { revoked: false }]) =
            answer.as_deref()
        else {
            panic!("{answer:?}")
        };
        let stored: (i64, String) = sqlx::query_as("SELECT id, name FROM commands")
            .fetch_one(reg.pool())
            .await
            .expect("committed before the answer");
        assert_eq!(stored, (*id, "first".to_owned()));

        // The registry gone (the table dropped behind the writer's back): not stored, twice.
        sqlx::query("DROP TABLE commands").execute(reg.pool()).await.expect("drop");
        assert!(
            writer.apply(vec![enqueue(&d0, "second")]).await.is_none(),
            "a failed batch was answered stored"
        );
        shutdown.cancel();
        drop(writer);
        task.await.expect("writer");
    }
}
