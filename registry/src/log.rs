//! The issuance log: an append-only, hash-chained record of every registry change.
//!
//! Entry `n` stores `hash(n-1)` and its own hash = SHA-256 over (prev_hash, seq, at, event,
//! device_id, serial, detail), each followed by a NUL byte. `log_anchor` holds the newest
//! `(seq, hash)`, updated in the same transaction as each append, so removing entries from the
//! end is detected too ([`crate::verify`]). Every registry change is written in the same
//! transaction as its log entry, under the registry write lock ([`Registry::lock_log`]).

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{Backend, Registry};
use crate::error::Result;

/// The `prev_hash` of the first entry.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One issuance-log entry, without its hash fields.
#[derive(Debug, Clone)]
pub(crate) struct LogEntry<'a> {
    pub(crate) at: i64,
    pub(crate) event: &'a str,
    pub(crate) device_id: &'a str,
    pub(crate) serial: &'a str,
    pub(crate) detail: String,
}

pub(crate) fn chain_hash(prev: &str, seq: i64, e: &LogEntry<'_>) -> String {
    let mut h = Sha256::new();
    for part in [prev, &seq.to_string(), &e.at.to_string(), e.event, e.device_id, e.serial, &e.detail] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

pub(crate) fn cert_digest(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl Registry {
    /// Serialises registry writers: every write transaction takes this first, so its reads
    /// see every earlier commit and nothing commits under it.
    pub(crate) async fn lock_log(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
        match self.backend {
            Backend::Postgres => {
                sqlx::query("LOCK TABLE issuance_log IN EXCLUSIVE MODE").execute(&mut **tx).await?;
            }
            Backend::Sqlite => {
                // sqlx opens a deferred transaction. A transaction that reads first and writes
                // later cannot wait for the write lock (SQLite answers "database is locked" at
                // once, whatever the busy timeout): two concurrent `revoke` runs failed. A write
                // as the first statement takes the lock, waiting up to the busy timeout.
                sqlx::query("UPDATE log_anchor SET seq = seq WHERE id = 1").execute(&mut **tx).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn append_log(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        head: &mut (i64, String),
        e: LogEntry<'_>,
    ) -> Result<i64> {
        let seq = head.0 + 1;
        let hash = chain_hash(&head.1, seq, &e);
        sqlx::query(
            "INSERT INTO issuance_log (seq, at, event, device_id, serial, detail, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(seq)
        .bind(e.at)
        .bind(e.event)
        .bind(e.device_id)
        .bind(e.serial)
        .bind(&e.detail)
        .bind(&head.1)
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO log_anchor (id, seq, hash) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        )
        .bind(seq)
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
        *head = (seq, hash);
        Ok(seq)
    }

    pub(crate) async fn log_head(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(i64, String)> {
        let row = sqlx::query("SELECT seq, hash FROM issuance_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
        Ok(match row {
            Some(r) => (r.try_get(0)?, r.try_get(1)?),
            None => (0, GENESIS.to_owned()),
        })
    }
    /// Appends a log entry that records something outside the registry tables (server certs).
    pub async fn log_event(
        &self,
        event: &str,
        subject: &str,
        serial: &str,
        detail: serde_json::Value,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let mut head = self.log_head(&mut tx).await?;
        let e = LogEntry { at: now, event, device_id: subject, serial, detail: detail.to_string() };
        self.append_log(&mut tx, &mut head, e).await?;
        tx.commit().await?;
        Ok(())
    }
}
