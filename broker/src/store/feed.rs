//! Copies the telemetry log ([`super::log`]) into the registry's `telemetry` table.
//!
//! One task reads what the store writer appended, in batches of up to `batch` records, and
//! inserts each batch with the log's position in one transaction
//! ([`fleet_registry::TelemetryWriter::insert_from_log`]): after a crash it starts again from
//! the position the table holds, so every record is copied exactly once. A batch the registry
//! refuses is retried until it lands; meanwhile the log grows (up to `store_log_max_bytes`) and
//! acknowledgements go on. A segment is deleted once everything in it is in the table.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_registry::TelemetryWriter;
use tokio_util::sync::CancellationToken;

use super::log::Reader;
use crate::observe::metrics::Metrics;

/// Pause after a failed copy before the same batch is tried again.
const RETRY: Duration = Duration::from_millis(500);
/// During an outage a failed copy is logged once, then at most once per this interval (with
/// the number of failed attempts); every attempt is counted in `fleet_store_feed_errors_total`.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(30);

/// Runs until the log's writer is gone and everything it wrote is copied, or until `stop`.
pub(crate) async fn run(
    mut reader: Reader,
    writer: TelemetryWriter,
    batch: usize,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        let end = *reader.end.borrow_and_update();
        super::log::gauges(&metrics, end.seq, &reader.copied, &reader.backlog);
        if !reader.behind(end) {
            tokio::select! {
                changed = reader.end.changed() => {
                    if changed.is_err() && !reader.behind(*reader.end.borrow()) {
                        return;
                    }
                }
                _ = stop.cancelled() => return,
            }
            continue;
        }
        let read = tokio::task::spawn_blocking(move || {
            let out = reader.read(end, batch);
            (reader, out)
        })
        .await;
        let (rows, last);
        (reader, (rows, last)) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "telemetry log: the reader stopped; the rest is copied at the next start");
                return;
            }
        };
        if let Some(e) = reader.stalled.take() {
            metrics.store_feed_errors.inc();
            tracing::warn!(error = %e, "telemetry log: reading a segment failed; trying again (move the segment away to pass it over)");
            if rows.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
        let Some(last) = last else { continue };
        let (mut failed, mut logged) = (0u64, None::<tokio::time::Instant>);
        while !rows.is_empty() {
            match writer.insert_from_log(reader.id, last, &rows).await {
                Ok(()) => {
                    metrics.store_fed_rows.inc_by(rows.len() as u64);
                    if failed > 0 {
                        tracing::info!(
                            failed_attempts = failed,
                            "telemetry log: copy into the registry resumed"
                        );
                    }
                    break;
                }
                Err(e) => {
                    metrics.store_feed_errors.inc();
                    failed += 1;
                    if logged.is_none_or(|t| t.elapsed() >= OUTAGE_LOG_EVERY) {
                        logged = Some(tokio::time::Instant::now());
                        tracing::warn!(error = %e, rows = rows.len(), failed_attempts = failed, "telemetry log: copy into the registry failed; retrying every 500 ms, logged again in 30 s if it still fails");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
        reader.fed = reader.fed.max(last);
        reader.copied.store(reader.fed, Ordering::Relaxed);
        reader.settle();
    }
}
