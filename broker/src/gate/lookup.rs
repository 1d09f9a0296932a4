//! The registry's admission verdicts, read by one task on a connection of its own, in batches.
//!
//! Asked one by one through the shared pool, a reconnect storm's lookups collapsed: with every
//! core busy in TLS handshakes, a task that had taken one of the pool's few connections waited
//! for its turn to run its query and give it back, so lookups timed out waiting for the pool,
//! the refused devices came back at once for another handshake, and 16,000 devices reconnecting
//! with queued commands never got in (BENCHMARKS.md, commands). Here every lookup waiting is
//! answered by one statement (up to [`BATCH`] serials), run by a task that needs no pool.

use std::time::Duration;

use fleet_registry::{Admission, Registry, SerialNumber};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Serials read in one statement at most.
const BATCH: usize = 256;
/// Lookups waiting for the reader at most; an admission waits for room beyond it.
const QUEUE: usize = 16_384;

/// A lookup's answer: the verdict, or `Err` if the registry could not be read.
type Answer = Result<Option<Admission>, ()>;

/// Asks the reader; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Lookups {
    tx: mpsc::Sender<(SerialNumber, oneshot::Sender<Answer>)>,
    /// The longest an admission waits for its verdict (`registry_timeout_ms`).
    wait: Duration,
}

impl Lookups {
    /// Starts the reader on `registry` (give it a pool of its own: [`Registry::with_own_pool`]).
    /// It stops when the last [`Lookups`] is dropped.
    pub(crate) fn start(registry: Registry, wait: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(read(registry, rx, wait));
        Self { tx, wait }
    }

    /// The registry's verdict on `serial`; `Err` if it could not be read within the wait.
    pub(crate) async fn admission(&self, serial: &SerialNumber) -> Answer {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.tx.send((serial.clone(), reply)).await.map_err(|_| ())?;
            answer.await.map_err(|_| ())?
        };
        tokio::time::timeout(self.wait, asked).await.unwrap_or(Err(()))
    }
}

/// The reader: every lookup waiting, one statement, each answered; until no one can ask.
///
/// A statement is given up after `wait` (its admissions have given up by then): a connection
/// that never answers (a backend that hangs, a link that went dark after the query left) would
/// otherwise hold the one reader, and every admission after it, for good. The registry
/// discards the connection of a read given up, so the next batch reads on a new one.
async fn read(
    registry: Registry,
    mut rx: mpsc::Receiver<(SerialNumber, oneshot::Sender<Answer>)>,
    wait: Duration,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // A lookup whose admission gave up waiting is not read.
        batch.retain(|(_, reply)| !reply.is_closed());
        let serials: Vec<SerialNumber> = batch.iter().map(|(s, _)| s.clone()).collect();
        let read = match tokio::time::timeout(wait, registry.admissions(&serials)).await {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} s", wait.as_secs_f64())),
        };
        match read {
            Ok(verdicts) => {
                for ((serial, reply), verdict) in batch.drain(..).zip(verdicts) {
                    let verdict = verdict.map_err(|e| {
                        warn!(error = %e, %serial, "registry unavailable during admission");
                    });
                    let _ = reply.send(verdict);
                }
            }
            Err(e) => {
                warn!(error = %e, lookups = batch.len(), "registry unavailable during admission");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_registry::{Role, Status};

    /// A registry with devices `d0`..`d{n-1}`, certificate serials `0001`..; `d1` revoked.
    async fn registry(n: usize) -> (tempfile::TempDir, Registry, Vec<SerialNumber>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let reg = Registry::open(&url, true).await.expect("open");
        let mut serials = Vec::new();
        for i in 0..n {
            let serial = SerialNumber::parse(&format!("{:04x}", i + 1)).expect("serial");
            sqlx::query(
                "INSERT INTO devices (device_id, role, status, created_at) VALUES ($1, 'device', $2, 0)",
            )
            .bind(format!("d{i}"))
            .bind(if i == 1 { "revoked" } else { "active" })
            .execute(reg.pool())
            .await
            .expect("device");
            sqlx::query(
                "INSERT INTO certificates (serial, device_id, not_before, not_after, key_source, status, issued_at, cert_der) \
                 VALUES ($1, $2, 0, 0, 'station', 'active', 0, x'00')",
            )
            .bind(serial.to_hex())
            .bind(format!("d{i}"))
            .execute(reg.pool())
            .await
            .expect("certificate");
            serials.push(serial);
        }
        (dir, reg, serials)
    }

    #[tokio::test]
    async fn a_storm_of_lookups_is_answered_each_with_its_own_verdict() {
        let (_dir, reg, serials) = registry(600).await;
        let lookups = Lookups::start(reg, Duration::from_secs(10));
        let unknown = SerialNumber::parse("ffff").expect("serial");
        let mut asks: Vec<_> = serials
            .iter()
            .chain(std::iter::once(&unknown))
            .map(|s| {
                let (l, s) = (lookups.clone(), s.clone());
                tokio::spawn(async move { l.admission(&s).await })
            })
            .collect();
        let none = asks.pop().expect("unknown").await.expect("task");
        assert_eq!(none, Ok(None), "an unknown serial has no verdict");
        for (i, ask) in asks.into_iter().enumerate() {
            let a = ask.await.expect("task").expect("read").expect("known");
            assert_eq!(a.device_id.as_str(), format!("d{i}"));
            assert_eq!(a.role, Role::Device);
            let status = if i == 1 { Status::Revoked } else { Status::Active };
            assert_eq!(a.device_status, status);
        }
    }

    #[tokio::test]
    async fn a_row_this_build_cannot_read_refuses_its_own_admission_only() {
        let (_dir, reg, serials) = registry(3).await;
        // A role a newer station may write (a newer schema is accepted by an older broker).
        sqlx::query("UPDATE devices SET role = 'gateway' WHERE device_id = 'd2'")
            .execute(reg.pool())
            .await
            .expect("role");
        let lookups = Lookups::start(reg, Duration::from_secs(10));
        // Asked at once: one batch, one statement.
        let asks: Vec<_> = serials
            .iter()
            .map(|s| {
                let (l, s) = (lookups.clone(), s.clone());
                tokio::spawn(async move { l.admission(&s).await })
            })
            .collect();
        let mut answers = Vec::new();
        for ask in asks {
            answers.push(ask.await.expect("task"));
        }
        assert_eq!(answers[2], Err(()), "d2's row cannot be read");
        let d0 = answers[0].clone().expect("d0 is read").expect("known");
        assert_eq!(d0.device_id.as_str(), "d0");
        let d1 = answers[1].clone().expect("d1 is read").expect("known");
        assert_eq!(d1.device_status, Status::Revoked);
    }

    #[tokio::test]
    async fn an_unreadable_registry_is_an_error_not_an_unknown_device() {
        let (dir, reg, serials) = registry(2).await;
        sqlx::query("ALTER TABLE certificates RENAME TO gone").execute(reg.pool()).await.expect("rename");
        let lookups = Lookups::start(reg, Duration::from_secs(10));
        assert_eq!(lookups.admission(&serials[0]).await, Err(()));
        drop(dir);
    }
}
