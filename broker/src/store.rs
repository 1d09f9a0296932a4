//! Durable ingest: every device PUBLISH becomes a telemetry row, committed in groups.
//!
//! One writer task owns the commits. Sessions submit rows and, for QoS 1, wait for the commit
//! before sending PUBACK: a message the device saw acknowledged is on disk (within SQLite's
//! `synchronous=NORMAL` WAL guarantee: durable across process crashes) or in PostgreSQL. The
//! writer takes every row queued while the previous commit ran, so throughput grows with load
//! while latency stays one commit.
//!
//! The sink is [`fleet_registry::TelemetryWriter`]; another sink (a JetStream stream) plugs in
//! at [`Store::start`]: whatever it is, a PUBACK follows only its success.

use fleet_registry::{Telemetry, TelemetryWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

struct Job {
    row: Telemetry,
    done: Option<oneshot::Sender<bool>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("topic", &self.row.topic).finish()
    }
}

/// Handle to the writer; clone freely. The writer stops when every handle is dropped, after
/// committing what was queued.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    tx: mpsc::Sender<Job>,
}

impl Store {
    /// Starts the writer task: at most `batch` rows per commit.
    pub(crate) fn start(sink: TelemetryWriter, batch: usize, metrics: Metrics) -> (Store, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(batch * 8);
        let handle = tokio::spawn(writer(sink, rx, batch, metrics));
        (Store { tx }, handle)
    }

    /// Queues a row; the receiver yields `true` once it is committed, `false` if the commit
    /// failed (the message is then not stored and must not be acknowledged).
    pub(crate) async fn submit(&self, row: Telemetry) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        // If the writer is gone the sender is dropped and the receiver reports failure.
        let _ = self.tx.send(Job { row, done: Some(done) }).await;
        rx
    }

    /// Queues a QoS 0 row without waiting.
    pub(crate) async fn submit_nowait(&self, row: Telemetry) {
        let _ = self.tx.send(Job { row, done: None }).await;
    }
}

async fn writer(sink: TelemetryWriter, mut rx: mpsc::Receiver<Job>, batch: usize, metrics: Metrics) {
    let mut rows = Vec::with_capacity(batch);
    let mut waiting = Vec::with_capacity(batch);
    while let Some(first) = rx.recv().await {
        let mut take = |j: Job, rows: &mut Vec<Telemetry>| {
            rows.push(j.row);
            waiting.extend(j.done);
        };
        take(first, &mut rows);
        // One turn of the scheduler lets sessions that are already running queue what they
        // have, so a commit rarely starts with a single row while hundreds are on their way.
        tokio::task::yield_now().await;
        while rows.len() < batch {
            match rx.try_recv() {
                Ok(j) => take(j, &mut rows),
                Err(_) => break,
            }
        }
        let ok = match sink.insert(&rows).await {
            Ok(()) => {
                metrics.messages_stored.inc_by(rows.len() as u64);
                true
            }
            Err(e) => {
                metrics.store_errors.inc();
                tracing::error!(error = %e, messages = rows.len(), "store commit failed; messages not acknowledged");
                false
            }
        };
        rows.clear();
        for done in waiting.drain(..) {
            let _ = done.send(ok);
        }
    }
}
