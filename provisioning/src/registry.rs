//! The registry: devices, their certificates, revocations, the issuance log and telemetry, in SQL.
//!
//! One schema, two dialects (`migrations/sqlite`, `migrations/postgres`), one code path through
//! sqlx's `Any` driver; every statement uses `$N` placeholders, which both engines accept.
//!
//! Invariants:
//! - Every registry change is written in the same transaction as its issuance-log entry, so the
//!   log and the tables can never disagree after a crash.
//! - The log is a hash chain: entry `n` stores `hash(n-1)`; `verify_log` recomputes it and
//!   cross-checks every certificate row against its `issue` entry (by certificate digest) and
//!   every revocation against its `revoke` entry, so editing or deleting any entry, or editing a
//!   certificate row, is detected.
//! - On PostgreSQL a revocation sends `NOTIFY fleet_revocations` in its transaction, so brokers
//!   learn of it when it commits; SQLite brokers poll `revoked_seq`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::ids::{DeviceId, RevocationReason, Role, SerialNumber};
use crate::pki::RevokedEntry;

/// Channel that revocations are announced on (PostgreSQL).
pub const REVOCATION_CHANNEL: &str = "fleet_revocations";

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Which SQL engine the registry lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (default).
    Sqlite,
    /// A PostgreSQL server (multi-node brokers).
    Postgres,
}

/// A clonable handle over the registry's connection pool.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
}

/// A device or service identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The id.
    pub device_id: DeviceId,
    /// Device or service.
    pub role: Role,
    /// `active` or `revoked`.
    pub status: Status,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
}

/// Status of a device or a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Status {
    /// May connect.
    Active,
    /// Never again.
    Revoked,
}

impl Status {
    /// Registry spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Revoked => "revoked",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Status::Active),
            "revoked" => Ok(Status::Revoked),
            other => Err(Error::CorruptRegistry(format!("unknown status `{other}`"))),
        }
    }
}

/// A certificate row.
#[derive(Debug, Clone)]
pub struct CertRecord {
    /// Serial.
    pub serial: SerialNumber,
    /// Owner.
    pub device_id: DeviceId,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// `station` or `csr`.
    pub key_source: String,
    /// Active or revoked.
    pub status: Status,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
    /// RFC 5280 reason, if revoked.
    pub revocation_reason: Option<String>,
    /// DER.
    pub cert_der: Vec<u8>,
}

/// A certificate about to be recorded.
#[derive(Debug, Clone)]
pub struct NewCert {
    /// Owner.
    pub device_id: DeviceId,
    /// Role of the owner (used when the owner is new).
    pub role: Role,
    /// Serial.
    pub serial: SerialNumber,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// `station` or `csr`.
    pub key_source: &'static str,
    /// DER.
    pub cert_der: Vec<u8>,
}

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

/// Result of `verify_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogReport {
    /// Entries checked.
    pub entries: i64,
    /// Hash of the last entry: write it down somewhere else to detect a rewrite of the whole log.
    pub head: String,
    /// Registry rows whose security-relevant columns (status, revocation time and reason,
    /// not_after, certificate bytes, owner, role) differ from what the log implies, one line
    /// each. Empty when the registry is what the log says it is.
    pub disagreements: Vec<String>,
}

/// What the log says about one certificate.
struct Issued {
    device_id: String,
    digest: String,
    not_after: Option<i64>,
}

/// What the log says about one certificate's revocation.
struct Revoked {
    seq: i64,
    at: i64,
    reason: String,
}

fn detail_json(seq: i64, detail: &str) -> Result<serde_json::Value> {
    serde_json::from_str(detail).map_err(|_| Error::LogTampered(format!("entry {seq} detail is not JSON")))
}

/// One issuance-log entry, without its hash fields.
#[derive(Debug, Clone)]
struct LogEntry<'a> {
    at: i64,
    event: &'a str,
    device_id: &'a str,
    serial: &'a str,
    detail: String,
}

fn chain_hash(prev: &str, seq: i64, e: &LogEntry<'_>) -> String {
    let mut h = Sha256::new();
    for part in [prev, &seq.to_string(), &e.at.to_string(), e.event, e.device_id, e.serial, &e.detail] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

fn cert_digest(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn parse_id(s: String) -> Result<DeviceId> {
    DeviceId::parse(&s).map_err(|_| Error::CorruptRegistry(format!("bad device id `{s}` in registry")))
}

fn parse_serial(s: &str) -> Result<SerialNumber> {
    SerialNumber::parse(s).map_err(|_| Error::CorruptRegistry(format!("bad serial `{s}` in registry")))
}

impl Registry {
    /// Opens (and with `create`, creates) the registry at `url` and applies migrations.
    ///
    /// `url` is `sqlite://PATH` or `postgres://...`.
    pub async fn open(url: &str, create: bool) -> Result<Self> {
        Self::open_with_timeout(url, create, Duration::from_secs(10)).await
    }

    /// [`Registry::open`] with the longest wait for a database connection (a server that
    /// refuses connections is retried until then; after that queries fail).
    pub async fn open_with_timeout(url: &str, create: bool, acquire_timeout: Duration) -> Result<Self> {
        let registry = Self::connect(url, create, acquire_timeout).await?;
        registry.migrator().run(&registry.pool).await?;
        Ok(registry)
    }

    /// Opens a registry that the station has already created and migrated, **without**
    /// changing its schema (the broker: under a least-privilege PostgreSQL role it could not).
    /// Fails if the schema is older than this build expects.
    pub async fn open_existing(url: &str, acquire_timeout: Duration) -> Result<Self> {
        let registry = Self::connect(url, false, acquire_timeout).await?;
        let want = registry.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let have: Option<i64> = sqlx::query("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
            .fetch_one(&registry.pool)
            .await
            .map_err(|e| Error::SchemaNotCurrent(format!("cannot read the schema version: {e}")))?
            .try_get(0)?;
        if have.unwrap_or(0) < want {
            return Err(Error::SchemaNotCurrent(format!(
                "schema version {} but this build needs {want}",
                have.unwrap_or(0)
            )));
        }
        Ok(registry)
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    /// The SQL that gives PostgreSQL role `role` exactly what a broker needs: read devices and
    /// certificates (admission, the revocation feed) and the schema version, insert telemetry.
    /// Nothing else: it cannot change a certificate or device row, the issuance log or the CRL
    /// state. Creates the role (LOGIN, no password: set one, or use peer/cert authentication)
    /// if it does not exist. Idempotent.
    pub fn broker_role_sql(role: &str) -> Result<Vec<String>> {
        let ok = role.len() <= 63
            && role.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && role.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(Error::InvalidInput(format!(
                "invalid role name `{role}`: use up to 63 of a-z, 0-9, '_', not starting with a digit"
            )));
        }
        Ok(vec![
            format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF; END $$"
            ),
            format!("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"),
            format!("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"),
            format!("GRANT USAGE ON SCHEMA public TO {role}"),
            format!("GRANT SELECT ON devices, certificates, _sqlx_migrations TO {role}"),
            format!("GRANT INSERT ON telemetry TO {role}"),
            format!("GRANT USAGE ON SEQUENCE telemetry_id_seq TO {role}"),
        ])
    }

    /// Applies [`Registry::broker_role_sql`] (PostgreSQL only; needs the schema owner).
    pub async fn apply_broker_role(&self, role: &str) -> Result<()> {
        if self.backend != Backend::Postgres {
            return Err(Error::InvalidInput(
                "database roles are a PostgreSQL feature: the SQLite registry is protected by file permissions".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        for stmt in Self::broker_role_sql(role)? {
            sqlx::raw_sql(&stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn connect(url: &str, create: bool, acquire_timeout: Duration) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::InvalidInput(format!(
                "unsupported database URL `{url}`: use sqlite://PATH or postgres://..."
            )));
        };
        let mut url = url.to_owned();
        if backend == Backend::Sqlite && create && !url.contains("mode=") {
            url.push_str(if url.contains('?') { "&mode=rwc" } else { "?mode=rwc" });
        }
        let opts = AnyConnectOptions::from_str(&url)?;
        let mut pool_opts = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(acquire_timeout);
        if backend == Backend::Sqlite {
            pool_opts = pool_opts.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets a broker read while the station writes; NORMAL keeps commits
                    // durable across process crashes (power loss may lose the last commit).
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        let pool = pool_opts.connect_with(opts).await?;
        Ok(Self { pool, backend })
    }

    /// The connection pool (for the broker's own queries).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The SQL engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Serialises registry writers: every write transaction takes this first, so its reads
    /// see every earlier commit and nothing commits under it.
    async fn lock_log(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
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

    async fn append_log(
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

    async fn log_head(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<(i64, String)> {
        let row = sqlx::query("SELECT seq, hash FROM issuance_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
        Ok(match row {
            Some(r) => (r.try_get(0)?, r.try_get(1)?),
            None => (0, GENESIS.to_owned()),
        })
    }

    /// Records new certificates in one transaction, creating their devices when
    /// `new_devices` is set (mint, service-cert, sign-csr for a new id) or requiring the device to
    /// exist and be active otherwise (renew).
    pub async fn record_certificates(&self, certs: &[NewCert], new_devices: bool, now: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let mut head = self.log_head(&mut tx).await?;
        for c in certs {
            let id = c.device_id.as_str();
            let existing = sqlx::query("SELECT status FROM devices WHERE device_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            match (existing, new_devices) {
                (Some(_), true) => return Err(Error::DuplicateDevice(id.to_owned())),
                (None, false) => return Err(Error::UnknownDevice(id.to_owned())),
                (Some(r), false) => {
                    let status: String = r.try_get(0)?;
                    if Status::parse(&status)? == Status::Revoked {
                        return Err(Error::DeviceRevoked(id.to_owned()));
                    }
                }
                (None, true) => {
                    sqlx::query(
                        "INSERT INTO devices (device_id, role, status, created_at) VALUES ($1, $2, 'active', $3)",
                    )
                    .bind(id)
                    .bind(c.role.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            self.insert_certificate(&mut tx, &mut head, c, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Inserts one certificate row and its `issue` log entry (the device row exists).
    async fn insert_certificate(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        head: &mut (i64, String),
        c: &NewCert,
        now: i64,
    ) -> Result<()> {
        let id = c.device_id.as_str();
        let serial = c.serial.to_hex();
        let dup = sqlx::query("SELECT 1 FROM certificates WHERE serial = $1")
            .bind(&serial)
            .fetch_optional(&mut **tx)
            .await?;
        if dup.is_some() {
            return Err(Error::CorruptRegistry(format!("serial {serial} issued twice")));
        }
        sqlx::query(
            "INSERT INTO certificates (serial, device_id, not_before, not_after, key_source, status, issued_at, cert_der) \
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $7)",
        )
        .bind(&serial)
        .bind(id)
        .bind(c.not_before)
        .bind(c.not_after)
        .bind(c.key_source)
        .bind(now)
        .bind(&c.cert_der)
        .execute(&mut **tx)
        .await?;
        let detail = serde_json::json!({
            "role": c.role.as_str(),
            "key_source": c.key_source,
            "not_after": c.not_after,
            "cert_sha256": cert_digest(&c.cert_der),
        })
        .to_string();
        self.append_log(
            tx,
            head,
            LogEntry { at: now, event: "issue", device_id: id, serial: &serial, detail },
        )
        .await?;
        Ok(())
    }

    /// Re-keys an active device: inserts `cert` and revokes (reason superseded) every other
    /// active certificate of the device, logging a `rekey` entry, all in one transaction.
    /// Returns the superseded serials.
    pub async fn rekey(&self, cert: &NewCert, now: i64) -> Result<Vec<SerialNumber>> {
        let id = cert.device_id.as_str();
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let status: String = sqlx::query("SELECT status FROM devices WHERE device_id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::UnknownDevice(id.to_owned()))?
            .try_get(0)?;
        if Status::parse(&status)? == Status::Revoked {
            return Err(Error::DeviceRevoked(id.to_owned()));
        }
        let old: Vec<String> = sqlx::query(
            "SELECT serial FROM certificates WHERE device_id = $1 AND status = 'active' ORDER BY serial",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        let mut head = self.log_head(&mut tx).await?;
        self.insert_certificate(&mut tx, &mut head, cert, now).await?;
        let detail = serde_json::json!({ "new_serial": cert.serial.to_hex(), "superseded": old }).to_string();
        let new_serial = cert.serial.to_hex();
        self.append_log(
            &mut tx,
            &mut head,
            LogEntry { at: now, event: "rekey", device_id: id, serial: &new_serial, detail },
        )
        .await?;
        let mut out = Vec::new();
        for s in &old {
            self.revoke_in_tx(&mut tx, &mut head, id, s, RevocationReason::Superseded, now).await?;
            out.push(parse_serial(s)?);
        }
        tx.commit().await?;
        Ok(out)
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

    /// Whether any device id in `ids` is registered.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        let row = sqlx::query(
            "SELECT device_id, role, status, created_at, revoked_at FROM devices WHERE device_id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| device_from_row(&r)).transpose()
    }

    /// All devices, optionally filtered by status, ordered by id.
    pub async fn devices(&self, status: Option<Status>) -> Result<Vec<DeviceRecord>> {
        let rows = match status {
            Some(s) => sqlx::query(
                "SELECT device_id, role, status, created_at, revoked_at FROM devices WHERE status = $1 ORDER BY device_id",
            )
            .bind(s.as_str())
            .fetch_all(&self.pool)
            .await?,
            None => sqlx::query("SELECT device_id, role, status, created_at, revoked_at FROM devices ORDER BY device_id")
                .fetch_all(&self.pool)
                .await?,
        };
        rows.iter().map(device_from_row).collect()
    }

    /// A device's certificates, newest first.
    pub async fn certificates_of(&self, id: &DeviceId) -> Result<Vec<CertRecord>> {
        let rows =
            sqlx::query(&format!("{CERT_SELECT} WHERE device_id = $1 ORDER BY issued_at DESC, serial"))
                .bind(id.as_str())
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(cert_from_row).collect()
    }

    /// One certificate by serial.
    pub async fn certificate(&self, serial: &SerialNumber) -> Result<Option<CertRecord>> {
        let row = sqlx::query(&format!("{CERT_SELECT} WHERE serial = $1"))
            .bind(serial.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(cert_from_row).transpose()
    }

    /// Revokes a device and all its active certificates. Returns the serials revoked.
    pub async fn revoke_device(
        &self,
        id: &DeviceId,
        reason: RevocationReason,
        now: i64,
    ) -> Result<Vec<SerialNumber>> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let found = sqlx::query("SELECT status FROM devices WHERE device_id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(Error::UnknownDevice(id.to_string()));
        }
        let changed = sqlx::query(
            "UPDATE devices SET status = 'revoked', revoked_at = $1, revocation_reason = $2 WHERE device_id = $3 AND status = 'active'",
        )
        .bind(now)
        .bind(reason.as_str())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let mut head = self.log_head(&mut tx).await?;
        if changed == 1 {
            let detail = serde_json::json!({ "reason": reason.as_str() }).to_string();
            let e = LogEntry { at: now, event: "revoke-device", device_id: id.as_str(), serial: "", detail };
            self.append_log(&mut tx, &mut head, e).await?;
        }
        let serials: Vec<String> = sqlx::query(
            "SELECT serial FROM certificates WHERE device_id = $1 AND status = 'active' ORDER BY serial",
        )
        .bind(id.as_str())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        let mut out = Vec::new();
        for s in &serials {
            self.revoke_in_tx(&mut tx, &mut head, id.as_str(), s, reason, now).await?;
            out.push(parse_serial(s)?);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Revokes one certificate. Returns its owner.
    pub async fn revoke_serial(
        &self,
        serial: &SerialNumber,
        reason: RevocationReason,
        now: i64,
    ) -> Result<DeviceId> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let row = sqlx::query("SELECT device_id, status FROM certificates WHERE serial = $1")
            .bind(serial.to_hex())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::UnknownSerial(serial.to_hex()))?;
        let owner: String = row.try_get(0)?;
        let status: String = row.try_get(1)?;
        if Status::parse(&status)? == Status::Active {
            let mut head = self.log_head(&mut tx).await?;
            self.revoke_in_tx(&mut tx, &mut head, &owner, &serial.to_hex(), reason, now).await?;
        }
        tx.commit().await?;
        parse_id(owner)
    }

    async fn revoke_in_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        head: &mut (i64, String),
        owner: &str,
        serial: &str,
        reason: RevocationReason,
        now: i64,
    ) -> Result<()> {
        let detail = serde_json::json!({ "reason": reason.as_str() }).to_string();
        let seq = self
            .append_log(tx, head, LogEntry { at: now, event: "revoke", device_id: owner, serial, detail })
            .await?;
        sqlx::query(
            "UPDATE certificates SET status = 'revoked', revoked_at = $1, revocation_reason = $2, revoked_seq = $3 WHERE serial = $4",
        )
        .bind(now)
        .bind(reason.as_str())
        .bind(seq)
        .bind(serial)
        .execute(&mut **tx)
        .await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(REVOCATION_CHANNEL)
                .bind(format!("{seq} {serial} {owner}"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Allocates the next CRL number (strictly increasing), reads every revoked certificate and
    /// logs the CRL issuance, in **one** transaction under the registry write lock: a CRL with a
    /// higher number always lists every revocation a lower-numbered one lists, however many
    /// `revoke` runs race.
    pub async fn crl_snapshot(&self, now: i64) -> Result<(u64, Vec<RevokedEntry>)> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let current: Option<i64> = sqlx::query("SELECT crl_number FROM crl_state WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        let next = current.unwrap_or(0) + 1;
        if current.is_some() {
            sqlx::query("UPDATE crl_state SET crl_number = $1, issued_at = $2 WHERE id = 1")
                .bind(next)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("INSERT INTO crl_state (id, crl_number, issued_at) VALUES (1, $1, $2)")
                .bind(next)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let entries = revoked_entries_on(&mut tx).await?;
        let mut head = self.log_head(&mut tx).await?;
        let detail = serde_json::json!({ "crl_number": next, "revoked": entries.len() }).to_string();
        self.append_log(
            &mut tx,
            &mut head,
            LogEntry { at: now, event: "crl", device_id: "", serial: "", detail },
        )
        .await?;
        tx.commit().await?;
        let number = u64::try_from(next).map_err(|_| Error::CorruptRegistry("negative CRL number".into()))?;
        Ok((number, entries))
    }

    /// Recomputes the hash chain and cross-checks it with the certificates table.
    pub async fn verify_log(&self) -> Result<LogReport> {
        let rows = sqlx::query(
            "SELECT seq, at, event, device_id, serial, detail, prev_hash, hash FROM issuance_log ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut prev = GENESIS.to_owned();
        let mut issued: HashMap<String, Issued> = HashMap::new();
        let mut revoked: HashMap<String, Revoked> = HashMap::new();
        let mut roles: HashMap<String, String> = HashMap::new();
        let mut device_revocations: HashMap<String, (i64, String)> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            let seq: i64 = r.try_get(0)?;
            let expected_seq = i as i64 + 1;
            if seq != expected_seq {
                return Err(Error::LogTampered(format!("entry {expected_seq} is missing (next is {seq})")));
            }
            let event: String = r.try_get(2)?;
            let device_id: String = r.try_get(3)?;
            let serial: String = r.try_get(4)?;
            let e = LogEntry {
                at: r.try_get(1)?,
                event: &event,
                device_id: &device_id,
                serial: &serial,
                detail: r.try_get(5)?,
            };
            let prev_hash: String = r.try_get(6)?;
            let hash: String = r.try_get(7)?;
            if prev_hash != prev {
                return Err(Error::LogTampered(format!("entry {seq} does not chain to entry {}", seq - 1)));
            }
            if chain_hash(&prev, seq, &e) != hash {
                return Err(Error::LogTampered(format!("entry {seq} was edited (hash mismatch)")));
            }
            match event.as_str() {
                "issue" => {
                    let d = detail_json(seq, &e.detail)?;
                    let role = d["role"].as_str().unwrap_or_default().to_owned();
                    roles.entry(device_id.clone()).or_insert(role);
                    issued.insert(
                        serial.clone(),
                        Issued {
                            device_id: device_id.clone(),
                            digest: d["cert_sha256"].as_str().unwrap_or_default().to_owned(),
                            not_after: d["not_after"].as_i64(),
                        },
                    );
                }
                "revoke" => {
                    let d = detail_json(seq, &e.detail)?;
                    let reason = d["reason"].as_str().unwrap_or_default().to_owned();
                    revoked.insert(serial.clone(), Revoked { seq, at: e.at, reason });
                }
                "revoke-device" => {
                    let d = detail_json(seq, &e.detail)?;
                    let reason = d["reason"].as_str().unwrap_or_default().to_owned();
                    device_revocations.insert(device_id.clone(), (e.at, reason));
                }
                _ => {}
            }
            prev = hash;
        }
        let anchor =
            sqlx::query("SELECT seq, hash FROM log_anchor WHERE id = 1").fetch_optional(&self.pool).await?;
        let anchor: (i64, String) = match anchor {
            Some(r) => (r.try_get(0)?, r.try_get(1)?),
            None => (0, GENESIS.to_owned()),
        };
        if anchor != (rows.len() as i64, prev.clone()) {
            return Err(Error::LogTampered(format!(
                "the log ends at entry {} but entry {} was recorded as the newest",
                rows.len(),
                anchor.0
            )));
        }
        let mut bad = Vec::new();
        let certs = sqlx::query(
            "SELECT serial, device_id, cert_der, revoked_seq, status, revoked_at, revocation_reason, not_after \
             FROM certificates",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut seen = std::collections::HashSet::new();
        for r in &certs {
            let serial: String = r.try_get(0)?;
            let owner: String = r.try_get(1)?;
            let der: Vec<u8> = r.try_get(2)?;
            let row_revoked_seq: Option<i64> = r.try_get(3)?;
            let status: String = r.try_get(4)?;
            let row_revoked_at: Option<i64> = r.try_get(5)?;
            let row_reason: Option<String> = r.try_get(6)?;
            let not_after: i64 = r.try_get(7)?;
            seen.insert(serial.clone());
            let Some(issue) = issued.get(&serial) else {
                bad.push(format!("certificate {serial} has no issue entry in the log"));
                continue;
            };
            if issue.device_id != owner || issue.digest != cert_digest(&der) {
                bad.push(format!("certificate {serial} differs from what the log recorded (owner or bytes)"));
            }
            if issue.not_after != Some(not_after) {
                bad.push(format!("certificate {serial}: not_after {not_after} disagrees with the log"));
            }
            let expected = revoked.get(&serial);
            let want_status = if expected.is_some() { "revoked" } else { "active" };
            if status != want_status {
                bad.push(format!(
                    "certificate {serial}: status `{status}` disagrees with the log (`{want_status}`)"
                ));
            }
            let want =
                expected.map_or((None, None, None), |e| (Some(e.seq), Some(e.at), Some(e.reason.clone())));
            if (row_revoked_seq, row_revoked_at, row_reason) != want {
                bad.push(format!(
                    "certificate {serial}: revocation (seq, time, reason) disagrees with the log"
                ));
            }
        }
        for serial in issued.keys().filter(|s| !seen.contains(*s)) {
            bad.push(format!("certificate {serial} was issued per the log but is missing from the registry"));
        }
        let device_rows =
            sqlx::query("SELECT device_id, role, status, revoked_at, revocation_reason FROM devices")
                .fetch_all(&self.pool)
                .await?;
        for r in &device_rows {
            let id: String = r.try_get(0)?;
            let role: String = r.try_get(1)?;
            let status: String = r.try_get(2)?;
            let revoked_at: Option<i64> = r.try_get(3)?;
            let reason: Option<String> = r.try_get(4)?;
            match roles.get(&id) {
                None => bad.push(format!("device {id} has no issue entry in the log")),
                Some(want) if *want != role => {
                    bad.push(format!("device {id}: role `{role}` disagrees with the log (`{want}`)"))
                }
                Some(_) => {}
            }
            let want = device_revocations.get(&id);
            let want_status = if want.is_some() { "revoked" } else { "active" };
            if status != want_status {
                bad.push(format!("device {id}: status `{status}` disagrees with the log (`{want_status}`)"));
            }
            if want.map(|(at, why)| (Some(*at), Some(why.clone()))).unwrap_or((None, None))
                != (revoked_at, reason)
            {
                bad.push(format!("device {id}: revocation (time, reason) disagrees with the log"));
            }
        }
        Ok(LogReport { entries: rows.len() as i64, head: prev, disagreements: bad })
    }

    /// What the broker needs to admit the certificate with `serial`.
    pub async fn admission(&self, serial: &SerialNumber) -> Result<Option<Admission>> {
        let row = sqlx::query(
            "SELECT c.device_id, d.role, d.status, c.status FROM certificates c \
             JOIN devices d ON d.device_id = c.device_id WHERE c.serial = $1",
        )
        .bind(serial.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Admission {
                device_id: parse_id(r.try_get(0)?)?,
                role: Role::parse(&r.try_get::<String, _>(1)?)?,
                device_status: Status::parse(&r.try_get::<String, _>(2)?)?,
                cert_status: Status::parse(&r.try_get::<String, _>(3)?)?,
            })
        })
        .transpose()
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
}

/// Every revoked certificate, oldest revocation first (for the CRL).
async fn revoked_entries_on(conn: &mut sqlx::AnyConnection) -> Result<Vec<RevokedEntry>> {
    let rows = sqlx::query(
        "SELECT serial, revoked_at, revocation_reason FROM certificates WHERE status = 'revoked' ORDER BY revoked_seq",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let serial: String = r.try_get(0)?;
            let at: Option<i64> = r.try_get(1)?;
            let reason: Option<String> = r.try_get(2)?;
            Ok(RevokedEntry {
                serial: parse_serial(&serial)?,
                revoked_at: at.unwrap_or_default(),
                reason: reason
                    .as_deref()
                    .and_then(RevocationReason::parse)
                    .unwrap_or(RevocationReason::Unspecified),
            })
        })
        .collect()
}

const CERT_SELECT: &str = "SELECT serial, device_id, not_before, not_after, key_source, status, issued_at, \
                           revoked_at, revocation_reason, cert_der FROM certificates";

fn device_from_row(r: &sqlx::any::AnyRow) -> Result<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: parse_id(r.try_get(0)?)?,
        role: Role::parse(&r.try_get::<String, _>(1)?)?,
        status: Status::parse(&r.try_get::<String, _>(2)?)?,
        created_at: r.try_get(3)?,
        revoked_at: r.try_get(4)?,
    })
}

fn cert_from_row(r: &sqlx::any::AnyRow) -> Result<CertRecord> {
    Ok(CertRecord {
        serial: parse_serial(&r.try_get::<String, _>(0)?)?,
        device_id: parse_id(r.try_get(1)?)?,
        not_before: r.try_get(2)?,
        not_after: r.try_get(3)?,
        key_source: r.try_get(4)?,
        status: Status::parse(&r.try_get::<String, _>(5)?)?,
        issued_at: r.try_get(6)?,
        revoked_at: r.try_get(7)?,
        revocation_reason: r.try_get(8)?,
        cert_der: r.try_get(9)?,
    })
}
