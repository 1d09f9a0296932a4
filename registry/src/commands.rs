//! The durable per-device command queue (docs/spec/commands.md): commands a service sent, kept
//! until the device acknowledges them or their time-to-live passes. Every status change is one
//! statement guarded by the current status, so two broker nodes never both settle a command.

use sqlx::Row;

use crate::db::Registry;
use crate::error::Result;
use crate::ids::DeviceId;

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
}

const SELECT: &str =
    "SELECT id, device_id, name, payload, sender, status, created_at, expires_at, attempts FROM commands";

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
    })
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
}

impl Registry {
    /// Stores a command; when the device then has more than `limit` open commands, the oldest
    /// are dropped. Returns the new command's id and the commands dropped.
    pub async fn enqueue_command(&self, c: &NewCommand<'_>, limit: usize) -> Result<(i64, Vec<Command>)> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query(
            "INSERT INTO commands (device_id, name, payload, sender, status, created_at, expires_at, attempts) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, 0) RETURNING id",
        )
        .bind(c.device_id.as_str())
        .bind(c.name)
        .bind(c.payload)
        .bind(c.sender)
        .bind(c.now)
        .bind(c.now.saturating_add(c.ttl_ms))
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        let open = sqlx::query(&format!(
            "{SELECT} WHERE device_id = $1 AND status IN ('queued', 'delivered') ORDER BY id"
        ))
        .bind(c.device_id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut dropped = Vec::new();
        if open.len() > limit {
            for r in &open[..open.len() - limit] {
                let cmd = row(r)?;
                sqlx::query(
                    "UPDATE commands SET status = 'dropped', done_at = $1 WHERE id = $2 AND status IN ('queued', 'delivered')",
                )
                .bind(c.now)
                .bind(cmd.id)
                .execute(&mut *tx)
                .await?;
                dropped.push(Command { status: CommandStatus::Dropped, ..cmd });
            }
        }
        tx.commit().await?;
        Ok((id, dropped))
    }

    /// A device's open (queued or delivered, unexpired) commands in order, at most `limit`,
    /// with ids above `after`.
    pub async fn open_commands(
        &self,
        device: &DeviceId,
        after: i64,
        now: i64,
        limit: i64,
    ) -> Result<Vec<Command>> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE device_id = $1 AND status IN ('queued', 'delivered') AND id > $2 AND expires_at > $3 \
             ORDER BY id LIMIT $4"
        ))
        .bind(device.as_str())
        .bind(after)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row).collect()
    }

    /// Records a delivery; returns true if it was the first (queued → delivered).
    pub async fn command_sent(&self, id: i64, now: i64) -> Result<bool> {
        let first = sqlx::query(
            "UPDATE commands SET status = 'delivered', delivered_at = $1, attempts = attempts + 1 \
             WHERE id = $2 AND status = 'queued'",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        if !first {
            sqlx::query("UPDATE commands SET attempts = attempts + 1 WHERE id = $1 AND status = 'delivered'")
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(first)
    }

    /// The device acknowledged command `id`: returns it if this settled it.
    pub async fn command_acknowledged(&self, id: i64, now: i64) -> Result<Option<Command>> {
        let settled = sqlx::query(
            "UPDATE commands SET status = 'acknowledged', done_at = $1 WHERE id = $2 AND status IN ('queued', 'delivered')",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        if !settled {
            return Ok(None);
        }
        let r = sqlx::query(&format!("{SELECT} WHERE id = $1")).bind(id).fetch_optional(&self.pool).await?;
        r.as_ref().map(row).transpose()
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
