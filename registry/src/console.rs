//! What an operator's console asks of the registry: devices a page at a time, counts by status,
//! the certificates that expire soon. Read-only and index-friendly (`devices` by id, no scan of
//! the whole table per page).

use sqlx::Row;

use crate::db::{parse_id, parse_serial, Registry};
use crate::error::Result;
use crate::ids::{DeviceId, Role, SerialNumber, Status};
use crate::rows::{device_from_row, DeviceRecord};

/// Which devices a page lists.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this role.
    pub role: Option<Role>,
    /// Only ids starting with this (any text: compared, never interpreted).
    pub prefix: Option<String>,
    /// Only devices whose newest active certificate expires before this (unix seconds).
    pub expiring_before: Option<i64>,
    /// Ids after this one (the previous page's last).
    pub after: Option<String>,
    /// Most rows.
    pub limit: i64,
}

/// One row of a device page.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// The device.
    pub device: DeviceRecord,
    /// notAfter of its newest active certificate (none: no active certificate).
    pub not_after: Option<i64>,
    /// Its open commands (queued or delivered, not yet acknowledged or expired).
    pub open_commands: i64,
}

/// A certificate that expires soon.
#[derive(Debug, Clone)]
pub struct Expiring {
    /// Owner.
    pub device_id: DeviceId,
    /// Serial.
    pub serial: SerialNumber,
    /// Unix seconds.
    pub not_after: i64,
}

impl Registry {
    /// One page of devices, ordered by id.
    pub async fn device_page(&self, q: &DeviceQuery) -> Result<Vec<DeviceRow>> {
        let mut sql = String::from(
            "SELECT * FROM (SELECT d.device_id, d.role, d.status, d.created_at, d.revoked_at, \
             (SELECT MAX(c.not_after) FROM certificates c WHERE c.device_id = d.device_id AND c.status = 'active') AS not_after, \
             (SELECT COUNT(*) FROM commands k WHERE k.device_id = d.device_id AND k.status IN ('queued', 'delivered')) AS open_commands \
             FROM devices d WHERE 1 = 1",
        );
        let mut binds: Vec<String> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, v: String| {
            binds.push(v);
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        if let Some(s) = q.status {
            arg(&mut sql, " AND d.status = ?", s.as_str().to_owned());
        }
        if let Some(r) = q.role {
            arg(&mut sql, " AND d.role = ?", r.as_str().to_owned());
        }
        if let Some(p) = q.prefix.as_deref().filter(|p| !p.is_empty()) {
            let n = p.chars().count();
            arg(&mut sql, &format!(" AND substr(d.device_id, 1, {n}) = ?"), p.to_owned());
        }
        if let Some(a) = &q.after {
            arg(&mut sql, " AND d.device_id > ?", a.clone());
        }
        sql.push_str(") t");
        if let Some(before) = q.expiring_before {
            sql.push_str(&format!(" WHERE t.not_after IS NOT NULL AND t.not_after <= {before}"));
        }
        sql.push_str(&format!(" ORDER BY t.device_id LIMIT {}", q.limit.clamp(1, 1000)));
        let mut query = sqlx::query(&sql);
        for b in &binds {
            query = query.bind(b);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(DeviceRow {
                    device: device_from_row(r)?,
                    not_after: r.try_get(5)?,
                    open_commands: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Identities of `role` by status.
    pub async fn status_counts(&self, role: Role) -> Result<Vec<(Status, i64)>> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) FROM devices WHERE role = $1 GROUP BY status ORDER BY status",
        )
        .bind(role.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let s: String = r.try_get(0)?;
            if let Some(s) = Status::parse(&s) {
                out.push((s, r.try_get(1)?));
            }
        }
        Ok(out)
    }

    /// Active certificates that expire before `before` (unix seconds): how many, and the first
    /// `limit` by notAfter.
    pub async fn expiring(&self, before: i64, limit: i64) -> Result<(i64, Vec<Expiring>)> {
        let count: i64 =
            sqlx::query("SELECT COUNT(*) FROM certificates WHERE status = 'active' AND not_after <= $1")
                .bind(before)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
        let rows = sqlx::query(
            "SELECT device_id, serial, not_after FROM certificates WHERE status = 'active' AND not_after <= $1 \
             ORDER BY not_after, serial LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let first = rows
            .iter()
            .map(|r| {
                Ok(Expiring {
                    device_id: parse_id(r.try_get(0)?)?,
                    serial: parse_serial(&r.try_get::<String, _>(1)?)?,
                    not_after: r.try_get(2)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok((count, first))
    }
}
