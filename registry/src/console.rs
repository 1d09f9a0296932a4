//! What an operator asks of the registry to look at the fleet: the station's listing, the
//! console's devices a page at a time, counts by status, the identities that expire soon. Each is
//! one query (never one per device), read-only and index-friendly (`devices` by id,
//! `certificates` by device). "Expiring" is [`crate::expiry`]'s definition everywhere.

use sqlx::Row;

use crate::db::{parse_id, parse_serial, Registry};
use crate::error::Result;
use crate::expiry::{ExpiryWindow, EXPIRY_SQL};
use crate::ids::{DeviceId, Role, SerialNumber, Status};
use crate::rows::{device_from_row, DeviceRecord};

/// One identity of the station's listing (`fleet-provision list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedIdentity {
    /// The identity.
    pub device: DeviceRecord,
    /// Its newest certificate (the last issued, whatever its status): serial and notAfter.
    pub newest: Option<(SerialNumber, i64)>,
    /// Its expiry ([`crate::expiry::expiry`]).
    pub expiry: Option<i64>,
}

/// Which devices a page lists.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this role.
    pub role: Option<Role>,
    /// Only ids starting with this (any text: compared, never interpreted).
    pub prefix: Option<String>,
    /// Only devices expiring at or before this (unix seconds; [`crate::expiry`]).
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
    /// Its expiry ([`crate::expiry::expiry`]; none: no active certificate).
    pub not_after: Option<i64>,
    /// Its open commands (queued or delivered, not yet acknowledged or expired).
    pub open_commands: i64,
}

/// An identity that expires soon ([`crate::expiry`]).
#[derive(Debug, Clone)]
pub struct Expiring {
    /// The identity.
    pub device_id: DeviceId,
    /// The active certificate that sets its expiry (the lowest serial if several end together).
    pub serial: SerialNumber,
    /// Its expiry, unix seconds.
    pub not_after: i64,
}

impl Registry {
    /// Every identity (or those of `status`), ordered by id, with its newest certificate and its
    /// expiry; with `expiring`, only those expiring within that window. One query, whatever
    /// the number of identities.
    pub async fn listing(
        &self,
        status: Option<Status>,
        expiring: Option<ExpiryWindow>,
    ) -> Result<Vec<ListedIdentity>> {
        // The newest certificate as `certificates_of` orders them: last issued first, then serial.
        const NEWEST: &str = "FROM certificates c WHERE c.device_id = d.device_id \
             ORDER BY c.issued_at DESC, c.serial LIMIT 1";
        let mut sql = format!(
            "SELECT * FROM (SELECT d.device_id, d.role, d.status, d.created_at, d.revoked_at, \
             (SELECT c.serial {NEWEST}) AS newest_serial, (SELECT c.not_after {NEWEST}) AS newest_not_after, \
             {EXPIRY_SQL} AS expiry FROM devices d"
        );
        if status.is_some() {
            sql.push_str(" WHERE d.status = $1");
        }
        sql.push_str(") t");
        if let Some(w) = expiring {
            sql.push_str(&format!(" WHERE {}", w.sql_condition("t.expiry")));
        }
        sql.push_str(" ORDER BY t.device_id");
        let mut query = sqlx::query(&sql);
        if let Some(s) = status {
            query = query.bind(s.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let serial: Option<String> = r.try_get(5)?;
                let not_after: Option<i64> = r.try_get(6)?;
                let newest = match (serial, not_after) {
                    (Some(s), Some(n)) => Some((parse_serial(&s)?, n)),
                    _ => None,
                };
                Ok(ListedIdentity { device: device_from_row(r)?, newest, expiry: r.try_get(7)? })
            })
            .collect()
    }

    /// One page of devices, ordered by id.
    pub async fn device_page(&self, q: &DeviceQuery) -> Result<Vec<DeviceRow>> {
        let mut sql = format!(
            "SELECT * FROM (SELECT d.device_id, d.role, d.status, d.created_at, d.revoked_at, \
             {EXPIRY_SQL} AS not_after, \
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
            sql.push_str(&format!(" WHERE {}", ExpiryWindow::until(before).sql_condition("t.not_after")));
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

    /// Identities expiring at or before `before` (unix seconds; [`crate::expiry`]): how many,
    /// and the first `limit` by expiry.
    pub async fn expiring(&self, before: i64, limit: i64) -> Result<(i64, Vec<Expiring>)> {
        let expiring = ExpiryWindow::until(before).sql_condition("t.expiry");
        let count: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) FROM (SELECT {EXPIRY_SQL} AS expiry FROM devices d) t WHERE {expiring}"
        ))
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let rows = sqlx::query(&format!(
            "SELECT t.device_id, MIN(c.serial), t.expiry FROM (SELECT d.device_id, {EXPIRY_SQL} AS expiry FROM devices d) t \
             JOIN certificates c ON c.device_id = t.device_id AND c.status = 'active' AND c.not_after = t.expiry \
             WHERE {expiring} GROUP BY t.device_id, t.expiry ORDER BY t.expiry, t.device_id LIMIT $1"
        ))
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
