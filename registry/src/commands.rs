//! The durable per-device command queue (docs/spec/commands.md): commands a service sent, kept
//! until the device acknowledges them or their time-to-live passes. Every status change is one
//! statement guarded by the current status, so two broker nodes never both settle a command.

use sqlx::Row;

use crate::db::{Backend, Registry};
use crate::error::Result;
use crate::ids::{DeviceId, Role, Status};

/// A command's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    /// Stored, not yet sent.
    Queued,
    /// Sent to the device at least once, not yet acknowledged.
    Delivered,
    /// The device acknowledged it (final).
    Acknowledged,
    /// Its time-to-live passed first (final).
    Expired,
    /// Dropped to make room in a full queue (final).
    Dropped,
    /// Not stored (final; never in the table, only reported).
    Refused,
}

impl CommandStatus {
    /// The name used in the table, status messages and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Acknowledged => "acknowledged",
            Self::Expired => "expired",
            Self::Dropped => "dropped",
            Self::Refused => "refused",
        }
    }

    /// Every status, for metrics.
    pub const ALL: [CommandStatus; 6] =
        [Self::Queued, Self::Delivered, Self::Acknowledged, Self::Expired, Self::Dropped, Self::Refused];

    fn parse(s: &str) -> Self {
        Self::ALL.into_iter().find(|x| x.as_str() == s).unwrap_or(Self::Queued)
    }
}

/// One stored command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Its id (increasing in acceptance order).
    pub id: i64,
    /// The device.
    pub device_id: String,
    /// The command name (topic levels after `commands/`).
    pub name: String,
    /// The payload, unchanged.
    pub payload: Vec<u8>,
    /// Who sent it.
    pub sender: String,
    /// Status now.
    pub status: CommandStatus,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub expires_at: i64,
    /// Deliveries so far.
    pub attempts: i64,
    /// MQTT 5: where the sender wants its answers and statuses (a v5 service's Response Topic).
    pub response_topic: Option<String>,
    /// MQTT 5: the sender's Correlation Data, returned with every answer.
    pub correlation: Option<Vec<u8>>,
}

const SELECT: &str =
    "SELECT id, device_id, name, payload, sender, status, created_at, expires_at, attempts, response_topic, correlation FROM commands";

fn row(r: &sqlx::any::AnyRow) -> Result<Command> {
    Ok(Command {
        id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        name: r.try_get(2)?,
        payload: r.try_get(3)?,
        sender: r.try_get(4)?,
        status: CommandStatus::parse(&r.try_get::<String, _>(5)?),
        created_at: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        attempts: r.try_get(8)?,
        response_topic: r.try_get(9)?,
        correlation: r.try_get(10)?,
    })
}

/// `$from, $from+1, ...` (`n` of them).
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Binds every id in order.
trait BindAll<'q> {
    fn bind_all(self, ids: &'q [i64]) -> Self;
}

impl<'q> BindAll<'q> for sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    fn bind_all(mut self, ids: &'q [i64]) -> Self {
        for id in ids {
            self = self.bind(*id);
        }
        self
    }
}

/// One change to the command queue ([`Registry::apply_commands`]).
#[derive(Debug, Clone)]
pub enum CommandOp<'a> {
    /// Store a new command; when its device then has more than the limit of open commands, the
    /// oldest are dropped.
    Enqueue(NewCommand<'a>),
    /// Command `id` is being sent to its device (attempts + 1; queued → delivered the first time).
    Sent {
        /// The command.
        id: i64,
        /// Unix milliseconds now.
        now: i64,
    },
    /// The device acknowledged command `id` (queued or delivered → acknowledged).
    Acknowledged {
        /// The command.
        id: i64,
        /// Unix milliseconds now.
        now: i64,
    },
    /// Read `device`'s open, unexpired commands with an id above `after` (in order, at most
    /// `limit`) and mark them sent, as [`CommandOp::Sent`] does. All the takes of a batch are
    /// one query, run before the batch's new commands are stored: a command stored in the
    /// same batch is taken by the next one, so its `queued` status is announced first.
    Take {
        /// The device.
        device: &'a DeviceId,
        /// Highest command id already sent in this session.
        after: i64,
        /// At most this many.
        limit: usize,
        /// Unix milliseconds now.
        now: i64,
    },
}

/// What a [`CommandOp`] did.
#[derive(Debug, Clone)]
pub enum CommandOutcome {
    /// Stored as `id`; `dropped` are the commands it pushed out of a full queue.
    Enqueued {
        /// The new command's id.
        id: i64,
        /// Now dropped.
        dropped: Vec<Command>,
    },
    /// `Sent`: true if this was the first delivery (queued → delivered). `Acknowledged`: true
    /// if this settled the command (false: already final).
    Changed(bool),
    /// `Take`: the commands now being sent, each as it was before (status `queued` and
    /// `attempts` 0 on a first delivery).
    Taken(Vec<Command>),
    /// `Enqueue`: not stored, the device takes no commands: it is revoked (`revoked`), or it
    /// is unknown, not a device, or not active.
    NotAddressable {
        /// The device is revoked.
        revoked: bool,
    },
}

/// The open, unexpired commands of each `(device, after, limit)`, in order: one query for all.
async fn take(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    takes: &[(&str, i64, usize)],
    now: i64,
) -> Result<Vec<Vec<Command>>> {
    if takes.is_empty() {
        return Ok(Vec::new());
    }
    let mut devices: Vec<&str> = takes.iter().map(|t| t.0).collect();
    devices.sort_unstable();
    devices.dedup();
    let sql = format!(
        "{SELECT} WHERE status IN ('queued', 'delivered') AND expires_at > {} AND device_id IN ({}) \
         ORDER BY device_id, id",
        params(backend, 1, 1),
        params(backend, 2, devices.len())
    );
    let mut q = sqlx::query(&sql).bind(now);
    for d in &devices {
        q = q.bind(*d);
    }
    let open = q.fetch_all(&mut *conn).await?.iter().map(row).collect::<Result<Vec<_>>>()?;
    Ok(takes
        .iter()
        .map(|(device, after, limit)| {
            open.iter().filter(|c| c.device_id == *device && c.id > *after).take(*limit).cloned().collect()
        })
        .collect())
}

/// Rows per multi-row statement: 8 parameters a row stays far below SQLite's and PostgreSQL's
/// parameter limits.
const ROWS_PER_STATEMENT: usize = 100;

/// `n` parameters from `$from` on PostgreSQL; `?` each on SQLite, whose named parameters cost a
/// scan of the statement's names per bound value (a fifth of a large insert's binding time).
pub(crate) fn params(backend: Backend, from: usize, n: usize) -> String {
    match backend {
        Backend::Sqlite => vec!["?"; n].join(", "),
        Backend::Postgres => placeholders(from, n),
    }
}

/// The batch's devices, each once, sorted.
fn devices_of<'a>(cmds: &[&'a NewCommand<'_>]) -> Vec<&'a str> {
    let mut devices: Vec<&str> = cmds.iter().map(|c| c.device_id.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

/// Binds a new command's 8 columns, in the order of the inserts' column lists.
fn bind_command<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    c: &'q NewCommand<'_>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    q.bind(c.device_id.as_str())
        .bind(c.name)
        .bind(c.payload)
        .bind(c.sender)
        .bind(c.now)
        .bind(c.now.saturating_add(c.ttl_ms))
        .bind(c.response_topic)
        .bind(c.correlation)
}

/// Stores a batch's new commands inside the caller's transaction: on SQLite with
/// [`enqueue_sqlite`]; on PostgreSQL in a handful of statements that return (almost) no rows:
/// the devices that cannot take commands, multi-row inserts, the devices whose queue is now
/// over the limit, and the drops that needs. Only an active device takes commands: checked in
/// the transaction that stores them, so a command never lands for a device revoked before the
/// commit.
async fn enqueue_all(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    cmds: &[&NewCommand<'_>],
    limit: usize,
) -> Result<Vec<CommandOutcome>> {
    if backend == Backend::Sqlite {
        return enqueue_sqlite(conn, cmds, limit, false).await;
    }
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    let devices = devices_of(cmds);
    // Devices that take no commands: unknown (no row), not a device, or not active.
    let mut refused: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for chunk in devices.chunks(ROWS_PER_STATEMENT * 8) {
        let values = (0..chunk.len())
            .map(|k| format!("({})", params(backend, 1 + k, 1)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "WITH wanted(id) AS (VALUES {values}) SELECT wanted.id, devices.status FROM wanted \
             LEFT JOIN devices ON devices.device_id = wanted.id \
             WHERE devices.device_id IS NULL OR devices.role <> '{}' OR devices.status <> '{}'",
            Role::Device.as_str(),
            Status::Active.as_str()
        );
        let mut q = sqlx::query(&sql);
        for d in chunk {
            q = q.bind(*d);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let status: Option<String> = r.try_get(1)?;
            refused.insert(r.try_get(0)?, status.as_deref() == Some(Status::Revoked.as_str()));
        }
    }
    let mut out: Vec<CommandOutcome> = cmds
        .iter()
        .map(|c| match refused.get(c.device_id.as_str()) {
            None => CommandOutcome::Enqueued { id: 0, dropped: Vec::new() },
            Some(revoked) => CommandOutcome::NotAddressable { revoked: *revoked },
        })
        .collect();
    let stored: Vec<usize> =
        (0..cmds.len()).filter(|i| matches!(out[*i], CommandOutcome::Enqueued { .. })).collect();
    for chunk in stored.chunks(ROWS_PER_STATEMENT) {
        let rows = (0..chunk.len())
            .map(|k| format!("('queued', 0, {})", params(backend, 1 + 8 * k, 8)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO commands (status, attempts, device_id, name, payload, sender, created_at, expires_at, \
             response_topic, correlation) VALUES {rows} RETURNING id"
        );
        let mut q = sqlx::query(&sql);
        for &i in chunk {
            q = bind_command(q, cmds[i]);
        }
        // Increasing in the order of its VALUES; RETURNING lists them in no promised order.
        let mut ids = q
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        ids.sort_unstable();
        for (&i, id) in chunk.iter().zip(ids) {
            out[i] = CommandOutcome::Enqueued { id, dropped: Vec::new() };
        }
    }
    // Only a queue now over the limit reads the ones it drops, reported with the device's last
    // new command.
    let mut targets: Vec<&str> = stored.iter().map(|&i| cmds[i].device_id.as_str()).collect();
    targets.sort_unstable();
    targets.dedup();
    let mut over = Vec::new();
    let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
    for chunk in targets.chunks(ROWS_PER_STATEMENT * 8) {
        let sql = format!(
            "SELECT device_id, COUNT(*) FROM commands WHERE status IN ('queued', 'delivered') AND device_id IN ({}) \
             GROUP BY device_id HAVING COUNT(*) > {limit_i64}",
            params(backend, 1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for d in chunk {
            q = q.bind(*d);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let open: i64 = r.try_get(1)?;
            over.push((r.try_get::<String, _>(0)?, open - limit_i64));
        }
    }
    for (device, n) in over {
        let Some(last) = stored.iter().rev().copied().find(|&i| cmds[i].device_id.as_str() == device) else {
            continue;
        };
        let now = cmds[last].now;
        let oldest = sqlx::query(&format!(
            "{SELECT} WHERE device_id = $1 AND status IN ('queued', 'delivered') ORDER BY id LIMIT $2"
        ))
        .bind(device.as_str())
        .bind(n)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(row)
        .collect::<Result<Vec<_>>>()?;
        let ids: Vec<i64> = oldest.iter().map(|c| c.id).collect();
        if ids.is_empty() {
            continue;
        }
        sqlx::query(&format!(
            "UPDATE commands SET status = 'dropped', done_at = {} WHERE status IN ('queued', 'delivered') AND id IN ({})",
            params(backend, 1, 1),
            params(backend, 2, ids.len())
        ))
        .bind(now)
        .bind_all(&ids)
        .execute(&mut *conn)
        .await?;
        if let CommandOutcome::Enqueued { dropped, .. } = &mut out[last] {
            dropped.extend(oldest.into_iter().map(|cmd| Command { status: CommandStatus::Dropped, ..cmd }));
        }
    }
    Ok(out)
}

/// The SQL of a multi-row VALUES list of `rows` rows of `width` unnumbered parameters each, the
/// row's ordinal first: `(0, ?, ?), (1, ?, ?)`.
fn numbered_rows(rows: usize, width: usize) -> String {
    let one = vec!["?"; width].join(", ");
    (0..rows).map(|k| format!("({k}, {one})")).collect::<Vec<_>>().join(", ")
}

/// What a row of [`enqueue_sqlite`]'s answer is, by its first column's name.
const REFUSED: &str = "refused_device";
const STORED: &str = "stored_id";

/// SQLite: a batch's new commands in one call to SQLite's worker thread, and with
/// `own_transaction` (a batch of new commands only: a service's commands, the hot path) the
/// whole transaction in that call, where the general path makes more (BEGIN, the rest of the
/// batch, COMMIT). Each call is a hand-off to that thread and back, and every result it sends
/// may wake the caller's thread: a batch of 34 took 680 µs and 18.8 thread switches in six
/// calls, 460 µs and 6.0 in one (`cargo bench -p fleet-registry --bench command_batches`,
/// BENCHMARKS.md). The query, in order, returning rows only for what is not the rule:
///
/// 1. `BEGIN IMMEDIATE` (own transaction);
/// 2. the batch's devices that take no commands: unknown (no row), not a device, not active;
/// 3. per 100 commands, an `INSERT ... SELECT` joined with the devices that take commands and
///    ordered by the command's place in the batch, so its rows take consecutive increasing ids
///    in the batch's order (the writer holds the write lock); then SQLite's last rowid and the
///    count of rows the insert made;
/// 4. the drops: every open command of those devices beyond the newest `limit`, marked
///    `dropped` (at the batch's latest time) and returned;
/// 5. `COMMIT` (own transaction).
///
/// The device check, the insert and the drops are in the transaction that stores them: a
/// command never lands for a device revoked before the commit. If a statement fails, SQLite's
/// worker stops there; a transaction of its own is then rolled back here, and if the call is cut
/// short the connection is closed, not pooled ([`WriterConnection`]).
async fn enqueue_sqlite(
    conn: &mut sqlx::AnyConnection,
    cmds: &[&NewCommand<'_>],
    limit: usize,
    own_transaction: bool,
) -> Result<Vec<CommandOutcome>> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    let devices = devices_of(cmds);
    let now = cmds.iter().map(|c| c.now).max().unwrap_or_default();
    let (device, active) = (Role::Device.as_str(), Status::Active.as_str());
    let listed = params(Backend::Sqlite, 1, devices.len());
    let wanted = vec!["(?)"; devices.len()].join(", ");
    let mut sql = format!(
        "{}WITH wanted(id) AS (VALUES {wanted}) SELECT wanted.id AS {REFUSED}, devices.status FROM wanted \
         LEFT JOIN devices ON devices.device_id = wanted.id \
         WHERE devices.device_id IS NULL OR devices.role <> '{device}' OR devices.status <> '{active}';\n",
        if own_transaction { "BEGIN IMMEDIATE;\n" } else { "" }
    );
    for chunk in cmds.chunks(ROWS_PER_STATEMENT) {
        sql.push_str(&format!(
            "INSERT INTO commands (status, attempts, device_id, name, payload, sender, created_at, expires_at, \
             response_topic, correlation) \
             SELECT 'queued', 0, w.column2, w.column3, w.column4, w.column5, w.column6, w.column7, w.column8, w.column9 \
             FROM (VALUES {}) AS w, devices \
             WHERE devices.device_id = w.column2 AND devices.role = '{device}' AND devices.status = '{active}' \
             ORDER BY w.column1;\n\
             SELECT last_insert_rowid() AS {STORED}, changes();\n",
            numbered_rows(chunk.len(), 8),
        ));
    }
    let columns = SELECT.trim_start_matches("SELECT ").trim_end_matches(" FROM commands");
    sql.push_str(&format!(
        "UPDATE commands SET status = 'dropped', done_at = ? WHERE id IN (\
         SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY id DESC) AS newer \
         FROM commands WHERE status IN ('queued', 'delivered') AND device_id IN (SELECT device_id FROM devices \
         WHERE device_id IN ({listed}) AND role = '{device}' AND status = '{active}')) \
         WHERE newer > {}) RETURNING {columns};\n",
        i64::try_from(limit).unwrap_or(i64::MAX)
    ));
    if own_transaction {
        sql.push_str("COMMIT;");
    }
    let mut q = sqlx::query(&sql);
    for d in &devices {
        q = q.bind(*d);
    }
    for c in cmds {
        q = bind_command(q, c);
    }
    q = q.bind(now);
    for d in &devices {
        q = q.bind(*d);
    }
    let rows = match q.fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(e) => {
            // The worker stopped at the failed statement: roll back what it began (an error
            // here, "no transaction is active", means SQLite already did; any other, the
            // writer drops this connection and it is closed, not pooled). In the caller's
            // transaction the caller rolls back.
            if own_transaction {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            }
            return Err(e.into());
        }
    };
    let mut refused = std::collections::HashMap::new();
    let mut ids = Vec::with_capacity(cmds.len());
    let mut dropped: std::collections::HashMap<String, Vec<Command>> = std::collections::HashMap::new();
    for r in &rows {
        match r.columns().first().map(sqlx::Column::name) {
            Some(REFUSED) => {
                let status: Option<String> = r.try_get(1)?;
                refused
                    .insert(r.try_get::<String, _>(0)?, status.as_deref() == Some(Status::Revoked.as_str()));
            }
            Some(STORED) => {
                // A statement's rows took consecutive ids, the last one is SQLite's last rowid.
                let (last, n): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                ids.extend(last - n + 1..=last);
            }
            _ => {
                let c = row(r)?;
                dropped.entry(c.device_id.clone()).or_default().push(c);
            }
        }
    }
    let stored: Vec<usize> =
        (0..cmds.len()).filter(|&i| !refused.contains_key(cmds[i].device_id.as_str())).collect();
    // Cannot differ unless something else inserts into the table (a trigger): then the ids
    // cannot be matched to their commands, and none is acknowledged (the service resends).
    if stored.len() != ids.len() {
        return Err(crate::error::Error::CorruptRegistry(format!(
            "storing {} commands returned {} new rows",
            stored.len(),
            ids.len()
        )));
    }
    let mut out: Vec<CommandOutcome> = cmds
        .iter()
        .map(|c| CommandOutcome::NotAddressable {
            // No row: an unknown device.
            revoked: refused.get(c.device_id.as_str()).copied().unwrap_or(false),
        })
        .collect();
    for (&i, id) in stored.iter().zip(ids) {
        out[i] = CommandOutcome::Enqueued { id, dropped: Vec::new() };
    }
    // The drops are reported with the device's last new command, oldest first.
    for (device, mut gone) in dropped {
        gone.sort_unstable_by_key(|c| c.id);
        if let Some(&last) = stored.iter().rev().find(|&&i| cmds[i].device_id.as_str() == device) {
            if let CommandOutcome::Enqueued { dropped, .. } = &mut out[last] {
                *dropped = gone;
            }
        }
    }
    Ok(out)
}

/// A pooled connection a writer keeps across its batches ([`Registry::writer_connection`]).
/// Closed when dropped, never returned to the pool: on SQLite a batch may be one call that
/// begins and commits its own transaction ([`Registry::apply_commands_on`]), and a call cut
/// short must not hand a connection with an open write transaction to another user.
#[derive(Debug)]
pub struct WriterConnection(sqlx::pool::PoolConnection<sqlx::Any>);

impl WriterConnection {
    fn new(mut conn: sqlx::pool::PoolConnection<sqlx::Any>) -> Self {
        conn.close_on_drop();
        WriterConnection(conn)
    }
}

/// A new command to store.
#[derive(Debug, Clone)]
pub struct NewCommand<'a> {
    /// The device.
    pub device_id: &'a DeviceId,
    /// The name.
    pub name: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// The sending service.
    pub sender: &'a str,
    /// Unix milliseconds now.
    pub now: i64,
    /// Time-to-live, milliseconds.
    pub ttl_ms: i64,
    /// MQTT 5: the sender's Response Topic.
    pub response_topic: Option<&'a str>,
    /// MQTT 5: the sender's Correlation Data.
    pub correlation: Option<&'a [u8]>,
}

impl Registry {
    /// Applies `ops` in one transaction (one commit for the whole batch: the broker's single
    /// command writer groups what its sessions submitted meanwhile). All or nothing: on an
    /// error nothing is stored. New commands are stored in order, then the deliveries and the
    /// acknowledgements each in one statement (a delivery and the acknowledgement of the same
    /// command never share a batch: the device acknowledges what was sent after its commit).
    /// `limit` is the per-device queue limit for `Enqueue`.
    pub async fn apply_commands(&self, ops: &[CommandOp<'_>], limit: usize) -> Result<Vec<CommandOutcome>> {
        let mut conn = self.writer_connection().await?;
        self.apply_commands_on(&mut conn, ops, limit).await
    }

    /// A connection for a writer to keep: SQLite discards a connection's page cache whenever
    /// another connection has written since its last transaction, so a writer that takes a
    /// pooled connection per batch reads the queue's pages from the file again each time
    /// (BENCHMARKS.md, commands). The writer's own connection keeps its cache.
    pub async fn writer_connection(&self) -> Result<WriterConnection> {
        Ok(WriterConnection::new(self.acquire_writer().await?))
    }

    /// [`Registry::apply_commands`] on the given connection (one from
    /// [`Registry::writer_connection`]).
    pub async fn apply_commands_on(
        &self,
        conn: &mut WriterConnection,
        ops: &[CommandOp<'_>],
        limit: usize,
    ) -> Result<Vec<CommandOutcome>> {
        let new: Vec<&NewCommand<'_>> = ops
            .iter()
            .filter_map(|op| match op {
                CommandOp::Enqueue(c) => Some(c),
                _ => None,
            })
            .collect();
        if self.backend == Backend::Sqlite && new.len() == ops.len() {
            return enqueue_sqlite(&mut conn.0, &new, limit, true).await;
        }
        let mut sent = Vec::new();
        let mut acked = Vec::new();
        let mut takes = Vec::new();
        let mut now = 0;
        for op in ops {
            match op {
                CommandOp::Enqueue(_) => {}
                CommandOp::Take { device, after, limit, now: t } => {
                    takes.push((device.as_str(), *after, *limit));
                    now = now.max(*t);
                }
                CommandOp::Sent { id, now: t } => {
                    sent.push(*id);
                    now = now.max(*t);
                }
                CommandOp::Acknowledged { id, now: t } => {
                    acked.push(*id);
                    now = now.max(*t);
                }
            }
        }
        let mut tx = self.begin_write(&mut conn.0).await?;
        let mut taken = take(&mut tx, self.backend, &takes, now).await?;
        sent.extend(taken.iter().flatten().map(|c| c.id));
        let enqueued = enqueue_all(&mut tx, self.backend, &new, limit).await?;
        // Already delivered ones count an attempt; queued ones become delivered (first delivery).
        let first = if sent.is_empty() {
            Vec::new()
        } else {
            sqlx::query(&format!(
                "UPDATE commands SET attempts = attempts + 1 WHERE status = 'delivered' AND id IN ({})",
                params(self.backend, 1, sent.len())
            ))
            .bind_all(&sent)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "UPDATE commands SET status = 'delivered', delivered_at = {}, attempts = attempts + 1 \
                 WHERE status = 'queued' AND id IN ({}) RETURNING id",
                params(self.backend, 1, 1),
                params(self.backend, 2, sent.len())
            ))
            .bind(now)
            .bind_all(&sent)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<std::result::Result<Vec<_>, _>>()?
        };
        let settled = if acked.is_empty() {
            Vec::new()
        } else {
            sqlx::query(&format!(
                "UPDATE commands SET status = 'acknowledged', done_at = {} \
                 WHERE status IN ('queued', 'delivered') AND id IN ({}) RETURNING id",
                params(self.backend, 1, 1),
                params(self.backend, 2, acked.len())
            ))
            .bind(now)
            .bind_all(&acked)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<std::result::Result<Vec<_>, _>>()?
        };
        tx.commit().await?;
        let mut enqueued = enqueued.into_iter();
        let mut taken = taken.drain(..);
        Ok(ops
            .iter()
            .map(|op| match op {
                CommandOp::Enqueue(_) => enqueued.next().unwrap_or(CommandOutcome::Changed(false)),
                CommandOp::Sent { id, .. } => CommandOutcome::Changed(first.contains(id)),
                CommandOp::Acknowledged { id, .. } => CommandOutcome::Changed(settled.contains(id)),
                CommandOp::Take { .. } => CommandOutcome::Taken(taken.next().unwrap_or_default()),
            })
            .collect())
    }

    /// Expires every open command whose time-to-live has passed; returns them.
    pub async fn expire_commands(&self, now: i64) -> Result<Vec<Command>> {
        let due = sqlx::query(&format!(
            "{SELECT} WHERE status IN ('queued', 'delivered') AND expires_at <= $1 ORDER BY id LIMIT 1000"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &due {
            let c = row(r)?;
            let n = sqlx::query(
                "UPDATE commands SET status = 'expired', done_at = $1 WHERE id = $2 AND status IN ('queued', 'delivered')",
            )
            .bind(now)
            .bind(c.id)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if n == 1 {
                out.push(Command { status: CommandStatus::Expired, ..c });
            }
        }
        Ok(out)
    }

    /// A device's commands, newest first (at most `limit`).
    pub async fn commands_of(&self, device: &DeviceId, limit: i64) -> Result<Vec<Command>> {
        let rows = sqlx::query(&format!("{SELECT} WHERE device_id = $1 ORDER BY id DESC LIMIT $2"))
            .bind(device.as_str())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row).collect()
    }

    /// Open (not final) commands of every device.
    pub async fn open_command_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM commands WHERE status IN ('queued', 'delivered')")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }
}
