//! Devices and their certificates: issuing, re-keying, revoking, listing, and the snapshot a
//! CRL is signed from. Every change here is written with its issuance-log entry in one
//! transaction under the registry write lock.

use sqlx::Row;

use crate::db::{parse_id, parse_role, parse_serial, parse_status, Backend, Registry};
use crate::error::{Error, Result};
use crate::feed::REVOCATION_CHANNEL;
use crate::ids::{DeviceId, RevocationReason, Role, SerialNumber, Status};
use crate::log::{cert_digest, LogEntry};

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

/// One line of a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Serial of the revoked certificate.
    pub serial: SerialNumber,
    /// When (unix seconds).
    pub revoked_at: i64,
    /// Why.
    pub reason: RevocationReason,
}

impl Registry {
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
                    if parse_status(&status)? == Status::Revoked {
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
    pub(crate) async fn insert_certificate(
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
        if parse_status(&status)? == Status::Revoked {
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
        self.revoke_device_by(id, reason, None, now).await
    }

    /// [`Registry::revoke_device`], naming who asked (an operator through the admin API) in the
    /// issuance log's `revoke-device` entry (`"by"`).
    pub async fn revoke_device_by(
        &self,
        id: &DeviceId,
        reason: RevocationReason,
        by: Option<&str>,
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
            let mut detail = serde_json::json!({ "reason": reason.as_str() });
            if let Some(by) = by {
                detail["by"] = serde_json::Value::from(by);
            }
            let detail = detail.to_string();
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
        if parse_status(&status)? == Status::Active {
            let mut head = self.log_head(&mut tx).await?;
            self.revoke_in_tx(&mut tx, &mut head, &owner, &serial.to_hex(), reason, now).await?;
        }
        tx.commit().await?;
        parse_id(owner)
    }

    pub(crate) async fn revoke_in_tx(
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

pub(crate) const CERT_SELECT: &str =
    "SELECT serial, device_id, not_before, not_after, key_source, status, issued_at, \
                           revoked_at, revocation_reason, cert_der FROM certificates";

pub(crate) fn device_from_row(r: &sqlx::any::AnyRow) -> Result<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: parse_id(r.try_get(0)?)?,
        role: parse_role(&r.try_get::<String, _>(1)?)?,
        status: parse_status(&r.try_get::<String, _>(2)?)?,
        created_at: r.try_get(3)?,
        revoked_at: r.try_get(4)?,
    })
}

pub(crate) fn cert_from_row(r: &sqlx::any::AnyRow) -> Result<CertRecord> {
    Ok(CertRecord {
        serial: parse_serial(&r.try_get::<String, _>(0)?)?,
        device_id: parse_id(r.try_get(1)?)?,
        not_before: r.try_get(2)?,
        not_after: r.try_get(3)?,
        key_source: r.try_get(4)?,
        status: parse_status(&r.try_get::<String, _>(5)?)?,
        issued_at: r.try_get(6)?,
        revoked_at: r.try_get(7)?,
        revocation_reason: r.try_get(8)?,
        cert_der: r.try_get(9)?,
    })
}
