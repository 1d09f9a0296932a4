//! What a broker reads: the admission verdict for a certificate serial, and the revocation feed
//! that tells it which live sessions to cut.
//!
//! On PostgreSQL a revocation sends `NOTIFY fleet_revocations` in its transaction, so the feed
//! wakes when it commits; on SQLite (and as a safety net on PostgreSQL) the feed polls
//! `certificates.revoked_seq`. Sequence numbers only grow, so a feed that starts from
//! [`Registry::revocation_head`] misses nothing committed after that read.

use std::time::Duration;

use sqlx::Row;

use crate::db::{parse_id, parse_role, parse_serial, parse_status, Backend, Registry};
use crate::error::{Error, Result};
use crate::ids::{DeviceId, Role, SerialNumber, Status};

/// Channel that revocations are announced on (PostgreSQL).
pub const REVOCATION_CHANNEL: &str = "fleet_revocations";

/// What the broker needs to admit a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Owner of the certificate.
    pub device_id: DeviceId,
    /// Its role.
    pub role: Role,
    /// Device status.
    pub device_status: Status,
    /// Certificate status.
    pub cert_status: Status,
}

/// A revocation as the broker's watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEvent {
    /// Log sequence number of the revocation.
    pub seq: i64,
    /// Revoked certificate.
    pub serial: SerialNumber,
    /// Its owner.
    pub device_id: DeviceId,
}

impl Registry {
    /// What the broker needs to admit the certificate with `serial`.
    pub async fn admission(&self, serial: &SerialNumber) -> Result<Option<Admission>> {
        let row = sqlx::query(&format!("{ADMISSION_SELECT} = $1"))
            .bind(serial.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(admission_of).transpose()
    }

    /// [`Registry::admission`] of many serials in one statement (the broker's admission reader
    /// batches a reconnect storm's lookups): the verdicts in the order of `serials`. A row this
    /// build cannot read (a role or status a newer station wrote) is an error for its own
    /// serial only, as it was when each serial was read by itself.
    ///
    /// A read abandoned half way (its future dropped: the reader gave up waiting) discards its
    /// connection instead of returning it to the pool. Returned, the pool would test it with a
    /// ping before taking it back, and a backend that hangs, or a link that went dark after the
    /// query left, never answers: the connection would never come back, and a reader with a
    /// pool of one would wait for it forever.
    pub async fn admissions(&self, serials: &[SerialNumber]) -> Result<Vec<Result<Option<Admission>>>> {
        if serials.is_empty() {
            return Ok(Vec::new());
        }
        let hex: Vec<String> = serials.iter().map(SerialNumber::to_hex).collect();
        let sql = format!("{ADMISSION_SELECT} IN ({})", crate::commands::params(self.backend, 1, hex.len()));
        let mut q = sqlx::query(&sql);
        for h in &hex {
            q = q.bind(h.as_str());
        }
        let mut conn = DiscardUnlessReturned(Some(self.pool.acquire().await?));
        let rows = match conn.0.as_deref_mut() {
            Some(c) => q.fetch_all(c).await?,
            None => Vec::new(),
        };
        conn.give_back();
        let mut found = std::collections::HashMap::with_capacity(hex.len());
        for r in &rows {
            // Why a row cannot be read, kept as text: a serial asked twice gets it twice.
            let admission = admission_of(r).map_err(|e| match e {
                Error::CorruptRegistry(why) => why,
                other => other.to_string(),
            });
            found.insert(r.try_get::<String, _>(4)?, admission);
        }
        Ok(hex
            .iter()
            .map(|h| match found.get(h) {
                None => Ok(None),
                Some(Ok(a)) => Ok(Some(a.clone())),
                Some(Err(why)) => Err(Error::CorruptRegistry(format!("certificate {h}: {why}"))),
            })
            .collect())
    }

    /// This registry on a pool of its own of at most `max` connections, for a reader that must
    /// not queue behind the shared pool (the revocation feed, admissions during a storm).
    pub async fn with_own_pool(&self, max: u32, acquire_timeout: Duration) -> Result<Registry> {
        let pool = Registry::pool_with(self.backend, &self.url, max, acquire_timeout).await?;
        Ok(Registry { pool, ..self.clone() })
    }

    /// Revocations with log sequence number above `after`, oldest first.
    pub async fn revocations_since(&self, after: i64) -> Result<Vec<RevocationEvent>> {
        let rows = sqlx::query(
            "SELECT revoked_seq, serial, device_id FROM certificates WHERE revoked_seq > $1 ORDER BY revoked_seq",
        )
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RevocationEvent {
                    seq: r.try_get(0)?,
                    serial: parse_serial(&r.try_get::<String, _>(1)?)?,
                    device_id: parse_id(r.try_get(2)?)?,
                })
            })
            .collect()
    }

    /// Highest revocation sequence number so far (0 if none).
    pub async fn revocation_head(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COALESCE(MAX(revoked_seq), 0) FROM certificates")
            .fetch_one(&self.pool)
            .await?;
        Ok(r.try_get(0)?)
    }

    /// A feed of revocations committed after this call.
    pub async fn revocation_feed(&self) -> Result<RevocationFeed> {
        let head = self.revocation_head().await?;
        let listener = match self.backend {
            Backend::Postgres => match sqlx::postgres::PgListener::connect(&self.url).await {
                Ok(mut l) => match l.listen(REVOCATION_CHANNEL).await {
                    Ok(()) => Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed; polling only");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; polling only");
                    None
                }
            },
            Backend::Sqlite => None,
        };
        // Its own connection: the feed's polls keep the broker's admission cache trusted, so
        // they must not queue behind a busy pool (a mass reconnect reading command queues).
        let registry = self.with_own_pool(1, Duration::from_secs(3)).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no connection of its own for the revocation feed; sharing the pool");
            self.clone()
        });
        Ok(RevocationFeed { registry, head, listener })
    }
}

/// The admission columns of a certificate and its device, up to the serial's condition
/// (`= $1`, or `IN (...)`).
const ADMISSION_SELECT: &str =
    "SELECT c.device_id, d.role, d.status, c.status, c.serial FROM certificates c \
     JOIN devices d ON d.device_id = c.device_id WHERE c.serial";

/// An [`ADMISSION_SELECT`] row.
fn admission_of(r: &sqlx::any::AnyRow) -> Result<Admission> {
    Ok(Admission {
        device_id: parse_id(r.try_get(0)?)?,
        role: parse_role(&r.try_get::<String, _>(1)?)?,
        device_status: parse_status(&r.try_get::<String, _>(2)?)?,
        cert_status: parse_status(&r.try_get::<String, _>(3)?)?,
    })
}

/// A pooled connection that goes back to the pool only through
/// [`DiscardUnlessReturned::give_back`]; dropped otherwise (a read abandoned, or failed, half
/// way), it is closed and the pool opens another.
struct DiscardUnlessReturned(Option<sqlx::pool::PoolConnection<sqlx::Any>>);

impl DiscardUnlessReturned {
    /// The read is complete: the connection goes back to the pool.
    fn give_back(mut self) {
        drop(self.0.take());
    }
}

impl Drop for DiscardUnlessReturned {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

/// Revocations in commit order, each delivered once.
#[derive(Debug)]
pub struct RevocationFeed {
    registry: Registry,
    head: i64,
    listener: Option<sqlx::postgres::PgListener>,
}

impl RevocationFeed {
    /// Waits until a revocation may have committed: a NOTIFY arrived (PostgreSQL) or `poll`
    /// passed. Cancel-safe.
    pub async fn changed(&mut self, poll: Duration) {
        let notified = async {
            match self.listener.as_mut() {
                Some(l) => {
                    // recv reconnects by itself; while the database is down it fails at once,
                    // so wait before the next attempt instead of spinning.
                    if l.recv().await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = notified => {}
        }
    }

    /// The revocations committed since the last successful call, oldest first. On error
    /// nothing is lost: the next call returns them.
    pub async fn next_batch(&mut self) -> Result<Vec<RevocationEvent>> {
        let events = self.registry.revocations_since(self.head).await?;
        if let Some(last) = events.last() {
            self.head = self.head.max(last.seq);
        }
        Ok(events)
    }

    /// Sequence number of the newest revocation delivered.
    pub fn head(&self) -> i64 {
        self.head
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::db::WriterSync;

    /// A PostgreSQL server that lets clients in and answers their pings (`Sync`), but never
    /// answers a query, nor anything after one: a backend that hangs, or a link that went dark
    /// after the query was sent. Returns its URL and how many connections it has accepted.
    async fn dark_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("postgres://fleet@{}/fleet?sslmode=disable", listener.local_addr().expect("addr"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // The startup message: length, then the rest.
                    let len = sock.read_u32().await.unwrap_or(4) as usize;
                    let mut startup = vec![0; len.saturating_sub(4)];
                    if sock.read_exact(&mut startup).await.is_err() {
                        return;
                    }
                    // AuthenticationOk, BackendKeyData, ReadyForQuery (idle).
                    let mut hello = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                    hello.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2]);
                    hello.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                    if sock.write_all(&hello).await.is_err() {
                        return;
                    }
                    let mut dark = false;
                    loop {
                        let Ok(kind) = sock.read_u8().await else { return };
                        let len = sock.read_u32().await.unwrap_or(4) as usize;
                        let mut body = vec![0; len.saturating_sub(4)];
                        if sock.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        dark |= kind != b'S';
                        if !dark && sock.write_all(&[b'Z', 0, 0, 0, 5, b'I']).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn an_abandoned_admission_read_leaves_its_pool_a_connection() {
        sqlx::any::install_default_drivers();
        let (url, accepted) = dark_server().await;
        let pool =
            Registry::pool_with(Backend::Postgres, &url, 1, Duration::from_millis(500)).await.expect("pool");
        let reg = Registry { pool, backend: Backend::Postgres, url, writer_sync: WriterSync::default() };
        let serial = SerialNumber::parse("01").expect("serial");
        // The broker's admission reader gives up on a read after its wait.
        let hung =
            tokio::time::timeout(Duration::from_millis(200), reg.admissions(std::slice::from_ref(&serial)));
        assert!(hung.await.is_err(), "the server never answers");
        // The next read must reach the database on a connection of its own, not wait for the
        // hung one, which the pool would only get back if the dark server answered a ping.
        let next =
            tokio::time::timeout(Duration::from_secs(2), reg.admissions(std::slice::from_ref(&serial))).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the next read did not open a new connection: {next:?}"
        );
    }
}
