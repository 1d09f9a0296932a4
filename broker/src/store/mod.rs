//! Durable ingest: every device PUBLISH becomes a telemetry row, committed in groups.
//!
//! One writer task owns the commits. Sessions submit rows and, for QoS 1, wait for the commit
//! before sending PUBACK: a message the device saw acknowledged is committed, in SQLite's WAL
//! flushed to disk (`store_fsync = every-commit`, the default: it survives a power cut) or
//! written to the operating system (`checkpoint`: it survives a crash of the broker), or in
//! PostgreSQL. The writer takes every row queued while the previous commit ran, so throughput
//! grows with load while latency stays one commit.
//!
//! The writer commits into a [`Sink`]: the registry's telemetry table
//! ([`fleet_registry::TelemetryWriter`]) on a single node; the cluster's JetStream stream plugs in
//! the same way. Whatever the sink, a PUBACK follows only its success.

use fleet_registry::{Telemetry, TelemetryWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::observe::metrics::Metrics;

pub(crate) mod feed;
pub(crate) mod log;
mod sink;

pub(crate) use sink::{Sink, SinkError};

impl Sink for TelemetryWriter {
    async fn store(&self, rows: &[Telemetry], _pkids: &[u16]) -> Result<(), SinkError> {
        // One transaction: all rows or none, so no retransmission meets a stored copy.
        Ok(self.insert(rows).await?)
    }
}

struct Job {
    row: Telemetry,
    pkid: u16,
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

/// A single node's telemetry log, started: the store writing into it, the writer's task, and the
/// task copying it into the registry (stopped by `stop`; it stops by itself once the writer is
/// gone and everything is copied).
pub(crate) struct Started {
    pub store: Store,
    pub writer: JoinHandle<()>,
    pub feeder: JoinHandle<()>,
}

/// Opens the telemetry log in `settings.dir` and starts the store on it and its copy into the
/// registry's table (`batch` rows per commit either way).
pub(crate) async fn start_log(
    settings: &log::Settings,
    registry: &fleet_registry::Registry,
    batch: usize,
    metrics: &Metrics,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Started, String> {
    let (id, lock) = log::open_id(settings).map_err(|e| e.to_string())?;
    let fed = registry
        .telemetry_fed(id)
        .await
        .map_err(|e| format!("telemetry log: reading its position in the registry: {e}"))?;
    let (log, reader) = log::Log::start(settings, id, lock, fed).map_err(|e| e.to_string())?;
    tracing::info!(dir = %settings.dir.display(), log_id = id, copied_up_to = fed, "telemetry log open");
    let (store, writer) = Store::start(log.with_metrics(metrics.clone()), batch, metrics.clone());
    let feeder =
        tokio::spawn(feed::run(reader, registry.telemetry_writer(), batch.max(1024), metrics.clone(), stop));
    Ok(Started { store, writer, feeder })
}

/// A broker switched to `store = registry` first copies what a telemetry log it ran with left
/// uncopied (a crash, a registry that was down), so that nothing acknowledged stays behind in a
/// directory no one reads any more. Nothing to do without a log in `settings.dir`.
pub(crate) async fn drain_log(
    settings: &log::Settings,
    registry: &fleet_registry::Registry,
    metrics: &Metrics,
) -> Result<(), String> {
    if log::read_id(&settings.dir).map_err(|e| e.to_string())?.is_none() {
        return Ok(());
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let started = start_log(settings, registry, 1024, metrics, stop).await?;
    let Started { store, writer, feeder } = started;
    drop(store);
    let _ = writer.await;
    if !feeder.is_finished() {
        tracing::info!(dir = %settings.dir.display(), "store = registry: copying what the telemetry log holds into the registry first");
    }
    let _ = feeder.await;
    Ok(())
}

impl Store {
    /// Starts the writer task: at most `batch` rows per commit.
    pub(crate) fn start<S: Sink>(sink: S, batch: usize, metrics: Metrics) -> (Store, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(batch * 8);
        let handle = tokio::spawn(writer(sink, rx, batch, metrics));
        (Store { tx }, handle)
    }

    /// Queues a row; the receiver yields `true` once it is committed, `false` if the commit
    /// failed (the message is then not stored and must not be acknowledged).
    /// `pkid` is the device's packet id of the QoS 1 PUBLISH.
    pub(crate) async fn submit(&self, row: Telemetry, pkid: u16) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        // If the writer is gone the sender is dropped and the receiver reports failure.
        let _ = self.tx.send(Job { row, pkid, done: Some(done) }).await;
        rx
    }

    /// Queues a QoS 0 row without waiting.
    pub(crate) async fn submit_nowait(&self, row: Telemetry) {
        let _ = self.tx.send(Job { row, pkid: 0, done: None }).await;
    }
}

async fn writer(sink: impl Sink, mut rx: mpsc::Receiver<Job>, batch: usize, metrics: Metrics) {
    let mut rows = Vec::with_capacity(batch);
    let mut pkids = Vec::with_capacity(batch);
    let mut waiting = Vec::with_capacity(batch);
    while let Some(first) = rx.recv().await {
        let mut take = |j: Job, rows: &mut Vec<Telemetry>| {
            rows.push(j.row);
            pkids.push(j.pkid);
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
        let ok = match sink.store(&rows, &pkids).await {
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
        pkids.clear();
        for done in waiting.drain(..) {
            let _ = done.send(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use fleet_registry::DeviceId;

    use super::*;

    /// A sink that records batch sizes and fails while `fail` is set.
    #[derive(Default)]
    struct Recording {
        batches: Mutex<Vec<usize>>,
        fail: AtomicBool,
    }

    impl Sink for Arc<Recording> {
        async fn store(&self, rows: &[Telemetry], _pkids: &[u16]) -> Result<(), SinkError> {
            if self.fail.load(Ordering::Relaxed) {
                return Err("sink down".into());
            }
            self.batches.lock().expect("lock").push(rows.len());
            Ok(())
        }
    }

    fn row(i: i64) -> Telemetry {
        Telemetry {
            device_id: DeviceId::parse("dev-1").expect("id"),
            topic: "devices/dev-1/t".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 1,
            received_at: i,
            properties: None,
        }
    }

    #[tokio::test]
    async fn rows_queued_together_commit_together_and_a_failed_commit_acknowledges_none() {
        let sink = Arc::new(Recording::default());
        let (store, writer) = Store::start(sink.clone(), 64, Metrics::new());
        let waits: Vec<_> = futures_util::future::join_all((0..10).map(|i| store.submit(row(i), 1))).await;
        for w in waits {
            assert_eq!(w.await, Ok(true));
        }
        assert_eq!(sink.batches.lock().expect("lock").iter().sum::<usize>(), 10);
        assert!(sink.batches.lock().expect("lock").len() < 10, "no group commit");
        sink.fail.store(true, Ordering::Relaxed);
        assert_eq!(store.submit(row(11), 1).await.await, Ok(false), "acknowledged though not stored");
        drop(store);
        writer.await.expect("writer");
    }
}
