//! The registry handle: one connection pool over SQLite or PostgreSQL, the migrations, and the
//! least-privilege role a broker runs under.
//!
//! One schema, two dialects (`migrations/sqlite`, `migrations/postgres`), one code path through
//! sqlx's `Any` driver; every statement uses `$N` placeholders, which both engines accept. The
//! station opens the registry with [`Registry::open`] (creating and migrating it); a broker
//! opens it with [`Registry::open_existing`], which never changes the schema.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::ids::{DeviceId, Role, SerialNumber, Status};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

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
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// The URL it was opened with (the revocation feed opens its own LISTEN connection).
    pub(crate) url: String,
    /// How the writers' commits reach the disk (SQLite).
    pub(crate) writer_sync: WriterSync,
}

/// How a writer's commits (telemetry, the command queue) reach the disk on SQLite, i.e. what an
/// acknowledgement promises. PostgreSQL decides this itself (`synchronous_commit`, on by default:
/// every commit is flushed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriterSync {
    /// The write-ahead log is flushed (`fsync`) at every commit, before anything it holds is
    /// acknowledged: an acknowledged message survives a power cut (SQLite `synchronous = FULL`).
    #[default]
    EveryCommit,
    /// Every commit is written to the operating system before it is acknowledged, and flushed at
    /// checkpoints only: an acknowledged message survives the broker's crash (`kill -9`), but a
    /// power cut or a kernel crash may lose what was committed since the last checkpoint
    /// (SQLite `synchronous = NORMAL`).
    Checkpoint,
}

impl WriterSync {
    /// The config value: `every-commit` or `checkpoint`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "every-commit" => Some(Self::EveryCommit),
            "checkpoint" => Some(Self::Checkpoint),
            _ => None,
        }
    }

    fn pragma(self) -> &'static str {
        match self {
            Self::EveryCommit => "PRAGMA synchronous = FULL",
            Self::Checkpoint => "PRAGMA synchronous = NORMAL",
        }
    }
}

/// A device id read from the registry.
pub(crate) fn parse_id(s: String) -> Result<DeviceId> {
    DeviceId::parse(&s).map_err(|_| Error::CorruptRegistry(format!("bad device id `{s}` in registry")))
}

/// A serial read from the registry.
pub(crate) fn parse_serial(s: &str) -> Result<SerialNumber> {
    SerialNumber::parse(s).map_err(|_| Error::CorruptRegistry(format!("bad serial `{s}` in registry")))
}

/// A role read from the registry.
pub(crate) fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| Error::CorruptRegistry(format!("unknown role `{s}`")))
}

/// A status read from the registry.
pub(crate) fn parse_status(s: &str) -> Result<Status> {
    Status::parse(s).ok_or_else(|| Error::CorruptRegistry(format!("unknown status `{s}`")))
}

impl Registry {
    /// This handle with its writers' commits reaching the disk as `sync` says.
    pub fn with_writer_sync(mut self, sync: WriterSync) -> Self {
        self.writer_sync = sync;
        self
    }

    /// A writer's transaction on `conn`. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`), waiting for it up to `busy_timeout`: a transaction that reads first and then
    /// writes gets SQLITE_BUSY at once, with no wait, when another connection wrote meanwhile,
    /// and the broker's writers (telemetry, the command queue, firmware jobs) write concurrently.
    pub(crate) async fn begin_write<'c>(
        &self,
        conn: &'c mut sqlx::AnyConnection,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE").await?,
            Backend::Postgres => sqlx::Connection::begin(conn).await?,
        })
    }

    /// A pooled connection for a writer, its durability set ([`WriterSync`]).
    pub(crate) async fn acquire_writer(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Sqlite {
            sqlx::query(self.writer_sync.pragma()).execute(&mut *conn).await?;
        }
        Ok(conn)
    }

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
            return Err(Error::InvalidRoleName(role.to_owned()));
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
            // The single-node broker's log position, written with the rows it copies.
            format!("GRANT SELECT, INSERT, UPDATE ON telemetry_feed TO {role}"),
            // The command queue: the broker stores, delivers and settles commands.
            format!("GRANT SELECT, INSERT, UPDATE ON commands TO {role}"),
            format!("GRANT USAGE ON SEQUENCE commands_id_seq TO {role}"),
            // Firmware updates: the campaign runner advances and ends campaigns, the chunk
            // server reads jobs, status reports move them. Creating them is the station's.
            format!("GRANT SELECT ON ota_campaigns, ota_jobs TO {role}"),
            format!("GRANT UPDATE (state, wave, reason, updated_at) ON ota_campaigns TO {role}"),
            format!("GRANT UPDATE (state, reason, progress, command_id, updated_at) ON ota_jobs TO {role}"),
            // The manifest a campaign offers.
            format!("GRANT SELECT ON releases TO {role}"),
        ])
    }

    /// Applies [`Registry::broker_role_sql`] (PostgreSQL only; needs the schema owner).
    pub async fn apply_broker_role(&self, role: &str) -> Result<()> {
        if self.backend != Backend::Postgres {
            return Err(Error::RolesNeedPostgres);
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
            return Err(Error::UnsupportedUrl(crate::redact_url(url)));
        };
        let given = url.to_owned();
        let mut url = url.to_owned();
        if backend == Backend::Sqlite && create && !url.contains("mode=") {
            url.push_str(if url.contains('?') { "&mode=rwc" } else { "?mode=rwc" });
        }
        let max = if backend == Backend::Sqlite { 4 } else { 8 };
        let pool = Self::pool_with(backend, &url, max, acquire_timeout).await?;
        Ok(Self { pool, backend, url: given, writer_sync: WriterSync::default() })
    }

    /// A pool of at most `max` connections to `url` (SQLite: WAL, durable commits).
    pub(crate) async fn pool_with(
        backend: Backend,
        url: &str,
        max: u32,
        acquire_timeout: Duration,
    ) -> Result<AnyPool> {
        let opts = AnyConnectOptions::from_str(url)?;
        let mut pool_opts = AnyPoolOptions::new().max_connections(max).acquire_timeout(acquire_timeout);
        if backend == Backend::Sqlite {
            // A local file has no link to test: no ping round trip before every query.
            pool_opts = pool_opts.test_before_acquire(false);
            pool_opts = pool_opts.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets a broker read while the station writes; NORMAL keeps commits
                    // durable across process crashes (power loss may lose the last commit).
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    // A multi-row INSERT inside a transaction keeps a statement journal (to undo
                    // that statement alone): in memory, not a temporary file written page by
                    // page (a tenth of the ingest writer's time, BENCHMARKS.md).
                    sqlx::query("PRAGMA temp_store = MEMORY").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        Ok(pool_opts.connect_with(opts).await?)
    }

    /// The connection pool, for queries this crate does not offer (tests, reports).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The SQL engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[tokio::test]
    async fn a_writers_connection_flushes_every_commit_unless_told_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let reg = Registry::open(&url, true).await.expect("open");
        let level = |reg: Registry| async move {
            let mut c = reg.acquire_writer().await.expect("writer");
            let r = sqlx::query("PRAGMA synchronous").fetch_one(&mut *c).await.expect("pragma");
            r.try_get::<i64, _>(0).expect("level")
        };
        // SQLite: 2 = FULL (the WAL is fsync'd at every commit), 1 = NORMAL.
        assert_eq!(level(reg.clone()).await, 2);
        assert_eq!(level(reg.with_writer_sync(WriterSync::Checkpoint)).await, 1);
    }
}
