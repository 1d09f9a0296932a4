//! Signed firmware releases (docs/spec/ota.md): one row per board and version, written with its
//! `release` issuance-log entry in one transaction under the registry write lock, like every
//! other registry change. The station's signing key is logged by `firmware-key` entries
//! ([`Registry::record_firmware_key`]); `verify_log` checks each release row against its entry
//! and its key against those.
//!
//! The registry stores what the station signed and does not sign or verify anything itself:
//! a row's columns are the fields of its `manifest` (the 268 signed bytes a device is offered).

use sqlx::Row;

use crate::db::Registry;
use crate::error::{Error, Result};
use crate::log::LogEntry;

/// A release to record: the fields of its signed manifest, hex in lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRelease {
    /// The board it is built for.
    pub board: String,
    /// Its version, `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// The oldest running version that may install it.
    pub min_version: String,
    /// Image bytes.
    pub size: i64,
    /// SHA-512 of the image, hex.
    pub sha512: String,
    /// Ed25519 over the SHA-512 digest, hex.
    pub signature: String,
    /// The signing key's id, hex.
    pub key_id: String,
    /// The signed manifest's bytes.
    pub manifest: Vec<u8>,
}

/// A recorded release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRecord {
    /// What was recorded.
    pub release: NewRelease,
    /// When (unix seconds).
    pub created_at: i64,
}

/// What [`Registry::record_release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new row and its log entry, at this time.
    New(i64),
    /// The same manifest was recorded before, at this time (signing is deterministic: a second
    /// run over the same image, version, board and key makes the same bytes). Nothing written.
    Again(i64),
}

impl Recorded {
    /// When the release was first recorded.
    pub fn created_at(self) -> i64 {
        match self {
            Recorded::New(t) | Recorded::Again(t) => t,
        }
    }
}

const COLUMNS: &str = "board, version, min_version, size, sha512, signature, key_id, manifest, created_at";

fn record(r: &sqlx::any::AnyRow) -> Result<ReleaseRecord> {
    Ok(ReleaseRecord {
        release: NewRelease {
            board: r.try_get(0)?,
            version: r.try_get(1)?,
            min_version: r.try_get(2)?,
            size: r.try_get(3)?,
            sha512: r.try_get(4)?,
            signature: r.try_get(5)?,
            key_id: r.try_get(6)?,
            manifest: r.try_get(7)?,
        },
        created_at: r.try_get(8)?,
    })
}

impl Registry {
    /// Logs a new firmware signing key (`firmware-key`): its id and its 32-byte public key.
    pub async fn record_firmware_key(&self, key_id: &str, public_key: &[u8; 32], now: i64) -> Result<()> {
        let detail = serde_json::json!({ "algorithm": "ed25519", "public_key": hex::encode(public_key) });
        self.log_event("firmware-key", key_id, "", detail, now).await
    }

    /// Records a release and its `release` log entry. The same manifest again is
    /// [`Recorded::Again`]; another manifest under a board and version already released is
    /// refused ([`Error::ReleaseExists`]).
    pub async fn record_release(&self, r: &NewRelease, now: i64) -> Result<Recorded> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let existing =
            sqlx::query("SELECT manifest, created_at FROM releases WHERE board = $1 AND version = $2")
                .bind(&r.board)
                .bind(&r.version)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(row) = existing {
            let manifest: Vec<u8> = row.try_get(0)?;
            if manifest != r.manifest {
                return Err(Error::ReleaseExists { board: r.board.clone(), version: r.version.clone() });
            }
            return Ok(Recorded::Again(row.try_get(1)?));
        }
        sqlx::query(&format!("INSERT INTO releases ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"))
            .bind(&r.board)
            .bind(&r.version)
            .bind(&r.min_version)
            .bind(r.size)
            .bind(&r.sha512)
            .bind(&r.signature)
            .bind(&r.key_id)
            .bind(&r.manifest)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let mut head = self.log_head(&mut tx).await?;
        self.append_log(
            &mut tx,
            &mut head,
            LogEntry {
                at: now,
                event: "release",
                device_id: &r.board,
                serial: "",
                detail: release_detail(r),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Recorded::New(now))
    }

    /// The release of `board` and `version`, if there is one.
    pub async fn release(&self, board: &str, version: &str) -> Result<Option<ReleaseRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM releases WHERE board = $1 AND version = $2"))
            .bind(board)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record).transpose()
    }

    /// Every release (or `board`'s), by board, then oldest first.
    pub async fn releases(&self, board: Option<&str>) -> Result<Vec<ReleaseRecord>> {
        let rows = match board {
            Some(b) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM releases WHERE board = $1 ORDER BY board, created_at, version"
                ))
                .bind(b)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM releases ORDER BY board, created_at, version"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(record).collect()
    }
}

/// A release's log detail: every column but the board (the entry's subject) and the time.
pub(crate) fn release_detail(r: &NewRelease) -> String {
    serde_json::json!({
        "version": r.version,
        "min_version": r.min_version,
        "size": r.size,
        "sha512": r.sha512,
        "signature": r.signature,
        "key_id": r.key_id,
        "manifest": hex::encode(&r.manifest),
    })
    .to_string()
}
