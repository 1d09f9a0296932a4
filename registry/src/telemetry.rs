//! Telemetry rows: what the broker stores for every device PUBLISH before it acknowledges it.
//!
//! [`Registry::insert_telemetry`] writes a batch in one transaction (the broker's group commit),
//! 100 rows per `INSERT` statement. It is the seam an ingest sink plugs into: whatever stores
//! the rows, a PUBACK follows only its success.

use bytes::Bytes;
use sqlx::Row;

use crate::db::{parse_id, Backend, Registry};
use crate::error::Result;
use crate::ids::DeviceId;

/// One stored device message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// Publisher.
    pub device_id: DeviceId,
    /// Topic it was published on.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with (0 or 1).
    pub qos: u8,
    /// Unix milliseconds at the broker.
    pub received_at: i64,
    /// Its MQTT 5 properties as one line of JSON (docs/spec/mqtt5.md); `None` without any.
    pub properties: Option<String>,
}

/// Rows per INSERT statement (5 or 6 parameters each).
const ROWS_PER_STATEMENT: usize = 100;

/// `INSERT` for `rows` rows; `from_stream` adds the stream sequence column and skips rows whose
/// sequence is stored already. SQLite gets anonymous `?` parameters: for numbered ones sqlx asks
/// SQLite each parameter's name, a linear walk, which made binding quadratic in the row count
/// (16% of the broker's time under QoS 1 load).
fn insert_sql(backend: Backend, rows: usize, from_stream: bool, with_props: bool) -> String {
    let columns = 5 + usize::from(from_stream) + usize::from(with_props);
    let mut sql = String::from("INSERT INTO telemetry (");
    if from_stream {
        sql.push_str("stream_seq, ");
    }
    sql.push_str("device_id, topic, payload, qos, received_at");
    if with_props {
        sql.push_str(", properties");
    }
    sql.push_str(") VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => sql.push_str(&format!("${}", i * columns + c + 1)),
            }
        }
        sql.push(')');
    }
    if from_stream {
        // No conflict target: the only other unique column is the generated id. Needs the
        // INSERT privilege only (the broker's least-privilege role).
        sql.push_str(" ON CONFLICT DO NOTHING");
    }
    sql
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a row's columns after `device_id` (borrowed: the rows outlive the statement, so no
/// per-row copies).
fn bind_row<'q>(q: AnyQuery<'q>, m: &'q Telemetry, with_props: bool) -> AnyQuery<'q> {
    let q = q
        .bind(m.device_id.as_str())
        .bind(m.topic.as_str())
        .bind(&m.payload[..])
        .bind(i64::from(m.qos))
        .bind(m.received_at);
    if with_props {
        q.bind(m.properties.as_deref())
    } else {
        q
    }
}

/// Does a batch need the `properties` column? (Most carry none: 3.1.1 devices, and v5 ones
/// that set no properties; their statement stays the shorter one.)
fn with_props(rows: &[&Telemetry]) -> bool {
    rows.iter().any(|m| m.properties.is_some())
}

/// Statements prepared once per registry handle user (the full-size one is reused), and the one
/// connection the writer keeps: SQLite drops a connection's page cache whenever another one has
/// written since its last transaction, so a pooled connection per batch re-reads the table's
/// pages (the same finding as the command writer's, BENCHMARKS.md). Clones share it.
#[derive(Debug, Clone)]
pub struct TelemetryWriter {
    registry: Registry,
    full: String,
    conn: std::sync::Arc<tokio::sync::Mutex<Option<sqlx::pool::PoolConnection<sqlx::Any>>>>,
}

impl Registry {
    /// A writer of telemetry batches.
    pub fn telemetry_writer(&self) -> TelemetryWriter {
        TelemetryWriter {
            registry: self.clone(),
            full: insert_sql(self.backend, ROWS_PER_STATEMENT, false, false),
            conn: Default::default(),
        }
    }

    /// A device's stored messages, oldest first (topic, payload).
    pub async fn telemetry_of(&self, id: &DeviceId) -> Result<Vec<Telemetry>> {
        let rows = sqlx::query(
            "SELECT device_id, topic, payload, qos, received_at, properties FROM telemetry WHERE device_id = $1 ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Telemetry {
                    device_id: parse_id(r.try_get(0)?)?,
                    topic: r.try_get(1)?,
                    payload: Bytes::from(r.try_get::<Vec<u8>, _>(2)?),
                    qos: u8::try_from(r.try_get::<i64, _>(3)?).unwrap_or(u8::MAX),
                    received_at: r.try_get(4)?,
                    properties: r.try_get(5)?,
                })
            })
            .collect()
    }
}

/// A batch for [`TelemetryWriter::insert_marked`].
#[derive(Clone, Copy)]
enum Batch<'a> {
    /// Rows the broker stored itself.
    Plain(&'a [Telemetry]),
    /// Rows copied from a telemetry log, with their log sequence numbers, up to `last`.
    Log { log_id: i64, last: u64, rows: &'a [(u64, Telemetry)] },
}

impl TelemetryWriter {
    /// Stores `rows` in one transaction: all of them or none.
    pub async fn insert(&self, rows: &[Telemetry]) -> Result<()> {
        self.insert_marked(Batch::Plain(rows)).await
    }

    /// Stores `rows`, copied from the broker's telemetry log `log_id` with their log sequence
    /// numbers, and moves that log's position to `last_seq` (at least the last of them), in
    /// one transaction: a copy that fails stores neither. Rows at or below the position
    /// already stored are skipped and the position never moves back, so a batch sent again
    /// after its commit landed unseen (a connection lost during COMMIT), or copied by a second
    /// broker on the same log, is stored once.
    pub async fn insert_from_log(&self, log_id: i64, last_seq: u64, rows: &[(u64, Telemetry)]) -> Result<()> {
        self.insert_marked(Batch::Log { log_id, last: last_seq, rows }).await
    }

    async fn insert_marked(&self, batch: Batch<'_>) -> Result<()> {
        let mut held = self.conn.lock().await;
        let conn = match held.as_mut() {
            Some(c) => c,
            None => held.insert(self.registry.acquire_writer().await?),
        };
        let result = self.insert_on(conn, batch).await;
        if result.is_err() {
            // The connection may be what failed: the next batch takes another.
            *held = None;
        }
        result
    }

    async fn insert_on(&self, conn: &mut sqlx::AnyConnection, batch: Batch<'_>) -> Result<()> {
        let mut tx = self.registry.begin_write(conn).await?;
        let rows: Vec<&Telemetry> = match batch {
            Batch::Plain(rows) => rows.iter().collect(),
            Batch::Log { log_id, last, rows } => {
                // The position stored, its row locked until the commit (PostgreSQL; SQLite's
                // write transaction is exclusive): a second copier waits, then sees this one's.
                let stored: i64 = sqlx::query_scalar(
                    "INSERT INTO telemetry_feed (log_id, fed_seq) VALUES ($1, 0) \
                     ON CONFLICT (log_id) DO UPDATE SET fed_seq = telemetry_feed.fed_seq RETURNING fed_seq",
                )
                .bind(log_id)
                .fetch_one(&mut *tx)
                .await?;
                let stored = u64::try_from(stored).unwrap_or(0);
                if last > stored {
                    sqlx::query("UPDATE telemetry_feed SET fed_seq = $2 WHERE log_id = $1")
                        .bind(log_id)
                        .bind(i64::try_from(last).unwrap_or(i64::MAX))
                        .execute(&mut *tx)
                        .await?;
                }
                rows.iter().filter(|(seq, _)| *seq > stored).map(|(_, row)| row).collect()
            }
        };
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let props = with_props(chunk);
            let partial;
            let sql = if chunk.len() == ROWS_PER_STATEMENT && !props {
                &self.full
            } else {
                partial = insert_sql(self.registry.backend, chunk.len(), false, props);
                &partial
            };
            let mut q = sqlx::query(sql);
            for m in chunk {
                q = bind_row(q, m, props);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Registry {
    /// How far the broker's telemetry log `log_id` is copied into the table: the sequence number
    /// of the last record stored (0: none yet).
    pub async fn telemetry_fed(&self, log_id: i64) -> Result<u64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT fed_seq FROM telemetry_feed WHERE log_id = $1")
            .bind(log_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
    }
}

impl TelemetryWriter {
    /// Stores rows taken from a cluster's stream, each with its stream sequence number, in one
    /// transaction; a row whose sequence is already in the table is skipped, so delivering a
    /// batch again (a sink that crashed before acknowledging it) stores nothing twice.
    pub async fn insert_from_stream(&self, rows: &[(u64, Telemetry)]) -> Result<()> {
        let mut tx = self.registry.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let props = with_props(&chunk.iter().map(|(_, m)| m).collect::<Vec<_>>());
            let sql = insert_sql(self.registry.backend, chunk.len(), true, props);
            let mut q = sqlx::query(&sql);
            for (seq, m) in chunk {
                q = bind_row(q.bind(i64::try_from(*seq).unwrap_or(i64::MAX)), m, props);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statement_shapes() {
        assert_eq!(
            insert_sql(Backend::Sqlite, 2, false, false),
            "INSERT INTO telemetry (device_id, topic, payload, qos, received_at) VALUES (?, ?, ?, ?, ?),(?, ?, ?, ?, ?)"
        );
        assert!(insert_sql(Backend::Postgres, 2, false, false)
            .ends_with("($1, $2, $3, $4, $5),($6, $7, $8, $9, $10)"));
        assert_eq!(
            insert_sql(Backend::Sqlite, 1, false, true),
            "INSERT INTO telemetry (device_id, topic, payload, qos, received_at, properties) VALUES (?, ?, ?, ?, ?, ?)"
        );
        assert!(insert_sql(Backend::Postgres, 2, true, false)
            .ends_with("($1, $2, $3, $4, $5, $6),($7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING"));
    }

    #[tokio::test]
    async fn a_batch_is_stored_whole_and_read_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let reg = Registry::open(&url, true).await.expect("open");
        let id = DeviceId::parse("dev-1").expect("id");
        let rows: Vec<Telemetry> = (0..250)
            .map(|i| Telemetry {
                device_id: id.clone(),
                topic: format!("devices/dev-1/t/{i}"),
                payload: Bytes::from(vec![i as u8; 3]),
                qos: 1,
                received_at: i,
                properties: (i % 7 == 0).then(|| format!("{{\"content_type\":\"t{i}\"}}")),
            })
            .collect();
        reg.telemetry_writer().insert(&rows).await.expect("insert");
        assert_eq!(reg.telemetry_of(&id).await.expect("read"), rows);
    }

    /// A new SQLite registry in a temporary directory (kept while the guard lives).
    async fn sqlite() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let reg = Registry::open(&url, true).await.expect("open");
        (dir, reg)
    }

    /// Message `i` of `dev-1`.
    fn row(i: u8) -> Telemetry {
        Telemetry {
            device_id: DeviceId::parse("dev-1").expect("id"),
            topic: format!("devices/dev-1/t/{i}"),
            payload: Bytes::from(vec![i; 2]),
            qos: 1,
            received_at: i64::from(i),
            properties: None,
        }
    }

    #[tokio::test]
    async fn rows_from_a_log_and_the_log_position_commit_together() {
        let (_dir, reg) = sqlite().await;
        let id = DeviceId::parse("dev-1").expect("id");
        let w = reg.telemetry_writer();
        assert_eq!(reg.telemetry_fed(7).await.expect("fed"), 0);
        w.insert_from_log(7, 3, &[(1, row(1)), (2, row(2)), (3, row(3))]).await.expect("insert");
        w.insert_from_log(7, 4, &[(4, row(4))]).await.expect("insert");
        w.insert_from_log(8, 1, &[(1, row(5))]).await.expect("another log");
        assert_eq!(
            (reg.telemetry_fed(7).await.expect("fed"), reg.telemetry_fed(8).await.expect("fed")),
            (4, 1)
        );
        // A batch that fails (a row the table refuses) moves neither rows nor the position.
        sqlx::query("CREATE TRIGGER no_five BEFORE INSERT ON telemetry WHEN NEW.received_at = 5 BEGIN SELECT RAISE(ABORT, 'no'); END")
            .execute(&reg.pool)
            .await
            .expect("trigger");
        assert!(w.insert_from_log(7, 6, &[(5, row(6)), (6, row(5))]).await.is_err());
        assert_eq!(reg.telemetry_fed(7).await.expect("fed"), 4);
        assert_eq!(reg.telemetry_of(&id).await.expect("read").len(), 5);
    }

    #[tokio::test]
    async fn a_log_batch_sent_again_after_its_commit_landed_is_stored_once() {
        let (_dir, reg) = sqlite().await;
        let id = DeviceId::parse("dev-1").expect("id");
        let w = reg.telemetry_writer();
        w.insert_from_log(7, 2, &[(1, row(1)), (2, row(2))]).await.expect("insert");
        // The commit landed but its answer was lost (PostgreSQL's connection dropped during
        // COMMIT): the copy sends the batch again.
        w.insert_from_log(7, 2, &[(1, row(1)), (2, row(2))]).await.expect("again");
        assert_eq!(reg.telemetry_of(&id).await.expect("read"), vec![row(1), row(2)]);
        assert_eq!(reg.telemetry_fed(7).await.expect("fed"), 2);
        // A second copier of the same log, a batch overlapping what is stored: only the new
        // rows land, and the position never moves back.
        w.insert_from_log(7, 3, &[(2, row(2)), (3, row(3))]).await.expect("overlap");
        w.insert_from_log(7, 1, &[(1, row(1))]).await.expect("behind");
        assert_eq!(reg.telemetry_of(&id).await.expect("read"), vec![row(1), row(2), row(3)]);
        assert_eq!(reg.telemetry_fed(7).await.expect("fed"), 3);
    }

    #[tokio::test]
    async fn a_stream_batch_delivered_twice_is_stored_once() {
        let (_dir, reg) = sqlite().await;
        let id = DeviceId::parse("dev-1").expect("id");
        let first: Vec<(u64, Telemetry)> = (0..150).map(|i| (u64::from(i) + 1, row(i))).collect();
        let w = reg.telemetry_writer();
        w.insert_from_stream(&first).await.expect("insert");
        // Redelivered, overlapping a new batch: only the new sequence numbers land.
        let again: Vec<(u64, Telemetry)> = (100..200).map(|i| (u64::from(i) + 1, row(i))).collect();
        w.insert_from_stream(&again).await.expect("insert again");
        let stored = reg.telemetry_of(&id).await.expect("read");
        assert_eq!(stored, (0..200).map(row).collect::<Vec<_>>());
    }
}
