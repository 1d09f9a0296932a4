//! Certificate lifecycle in the field (docs/spec/rotation.md): certificates the online issuer
//! signs for a device's own CSR (rotations), operator-forced rotation requests, and claims
//! (batch identities that mint device identities at first boot, within a quota).
//!
//! Every change is written with its issuance-log entry in one transaction under the registry
//! write lock, like [`crate::rows`].

use sqlx::Row;

use crate::db::{parse_id, parse_serial, parse_status, Registry};
use crate::error::{Error, Result};
use crate::ids::{DeviceId, RevocationReason, Role, SerialNumber, Status};
use crate::log::LogEntry;
use crate::rows::NewCert;

/// A claim and what is left of its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The claim identity.
    pub claim_id: DeviceId,
    /// Devices it creates are named `<id_prefix>-...`.
    pub id_prefix: String,
    /// Identities it may mint in all.
    pub quota: i64,
    /// Identities minted so far.
    pub used: i64,
    /// Whether the claim identity is active.
    pub status: Status,
}

/// An issued rotation whose old certificates are due to be superseded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRotation {
    /// The device.
    pub device_id: DeviceId,
    /// The certificate the device now uses.
    pub serial: SerialNumber,
}

impl Registry {
    /// Records a certificate the issuer signed for an active device's own CSR: the certificate,
    /// its `issue` entry, a `rotate` entry and the `rotations` row; an operator's pending request
    /// for the device is fulfilled. The device's other certificates stay valid until
    /// [`Registry::supersede`].
    pub async fn record_rotation(&self, cert: &NewCert, forced: bool, now: i64) -> Result<()> {
        let id = cert.device_id.as_str();
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let row = sqlx::query("SELECT status, role FROM devices WHERE device_id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::UnknownDevice(id.to_owned()))?;
        let (status, role): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        if parse_status(&status)? == Status::Revoked {
            return Err(Error::DeviceRevoked(id.to_owned()));
        }
        if role != Role::Device.as_str() {
            return Err(Error::UnknownDevice(id.to_owned()));
        }
        let mut head = self.log_head(&mut tx).await?;
        self.insert_certificate(&mut tx, &mut head, cert, now).await?;
        let serial = cert.serial.to_hex();
        sqlx::query("INSERT INTO rotations (serial, device_id, issued_at, forced) VALUES ($1, $2, $3, $4)")
            .bind(&serial)
            .bind(id)
            .bind(now)
            .bind(i64::from(forced))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM rotation_requests WHERE device_id = $1").bind(id).execute(&mut *tx).await?;
        let detail = serde_json::json!({ "forced": forced }).to_string();
        self.append_log(
            &mut tx,
            &mut head,
            LogEntry { at: now, event: "rotate", device_id: id, serial: &serial, detail },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The broker saw `device` use rotated certificate `serial`: starts its grace period. Returns
    /// false if `serial` is not a rotation of `device` or was seen before.
    pub async fn rotation_seen(&self, device: &DeviceId, serial: &SerialNumber, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE rotations SET activated_at = $1 WHERE serial = $2 AND device_id = $3 AND activated_at IS NULL",
        )
        .bind(now)
        .bind(serial.to_hex())
        .bind(device.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Rotations seen in use at or before `seen_before` whose old certificates are not yet
    /// superseded.
    pub async fn rotations_due(&self, seen_before: i64) -> Result<Vec<DueRotation>> {
        let rows = sqlx::query(
            "SELECT device_id, serial FROM rotations WHERE activated_at IS NOT NULL AND activated_at <= $1 \
             AND superseded_at IS NULL ORDER BY activated_at",
        )
        .bind(seen_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DueRotation {
                    device_id: parse_id(r.try_get(0)?)?,
                    serial: parse_serial(&r.try_get::<String, _>(1)?)?,
                })
            })
            .collect()
    }

    /// Revokes (reason superseded) every active certificate of `device` issued before rotation
    /// `serial`, and marks the rotation done. Returns the serials revoked. A certificate issued
    /// after `serial` (a later rotation) is left alone.
    pub async fn supersede(
        &self,
        device: &DeviceId,
        serial: &SerialNumber,
        now: i64,
    ) -> Result<Vec<SerialNumber>> {
        let id = device.as_str();
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let issued_at: i64 = sqlx::query("SELECT issued_at FROM certificates WHERE serial = $1")
            .bind(serial.to_hex())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::UnknownSerial(serial.to_hex()))?
            .try_get(0)?;
        let old: Vec<String> = sqlx::query(
            "SELECT serial FROM certificates WHERE device_id = $1 AND status = 'active' AND serial <> $2 \
             AND issued_at <= $3 ORDER BY serial",
        )
        .bind(id)
        .bind(serial.to_hex())
        .bind(issued_at)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        let mut head = self.log_head(&mut tx).await?;
        let mut out = Vec::with_capacity(old.len());
        for s in &old {
            self.revoke_in_tx(&mut tx, &mut head, id, s, RevocationReason::Superseded, now).await?;
            out.push(parse_serial(s)?);
        }
        sqlx::query("UPDATE rotations SET superseded_at = $1 WHERE serial = $2")
            .bind(now)
            .bind(serial.to_hex())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The newest certificate issued to `device` for its own CSR, and when (unix seconds).
    pub async fn last_rotation(&self, device: &DeviceId) -> Result<Option<(SerialNumber, i64)>> {
        let row = sqlx::query(
            "SELECT serial, issued_at FROM rotations WHERE device_id = $1 ORDER BY issued_at DESC, serial LIMIT 1",
        )
        .bind(device.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((parse_serial(&r.try_get::<String, _>(0)?)?, r.try_get(1)?))).transpose()
    }

    /// Asks for `devices` to rotate now, whatever their certificates' expiry (operator-forced
    /// rotation): one `rotate-request` log entry each. Unknown, revoked or non-device ids are
    /// refused before anything is written.
    pub async fn request_rotation(&self, devices: &[DeviceId], by: &str, now: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let mut head = self.log_head(&mut tx).await?;
        for d in devices {
            let id = d.as_str();
            let row = sqlx::query("SELECT status, role FROM devices WHERE device_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| Error::UnknownDevice(id.to_owned()))?;
            let (status, role): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            if parse_status(&status)? == Status::Revoked {
                return Err(Error::DeviceRevoked(id.to_owned()));
            }
            if role != Role::Device.as_str() {
                return Err(Error::UnknownDevice(id.to_owned()));
            }
            sqlx::query("DELETE FROM rotation_requests WHERE device_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO rotation_requests (device_id, requested_at, requested_by) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(now)
            .bind(by)
            .execute(&mut *tx)
            .await?;
            let detail = serde_json::json!({ "by": by }).to_string();
            self.append_log(
                &mut tx,
                &mut head,
                LogEntry { at: now, event: "rotate-request", device_id: id, serial: "", detail },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Devices with a pending operator request, oldest first.
    pub async fn rotation_requests(&self) -> Result<Vec<(DeviceId, i64)>> {
        let rows = sqlx::query(
            "SELECT device_id, requested_at FROM rotation_requests ORDER BY requested_at, device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((parse_id(r.try_get(0)?)?, r.try_get(1)?))).collect()
    }

    /// Records a new claim identity (its certificate, role claim) and its quota.
    pub async fn record_claim(&self, cert: &NewCert, id_prefix: &str, quota: i64, now: i64) -> Result<()> {
        debug_assert_eq!(cert.role, Role::Claim);
        self.record_certificates(std::slice::from_ref(cert), true, now).await?;
        sqlx::query("INSERT INTO claims (claim_id, id_prefix, quota, used) VALUES ($1, $2, $3, 0)")
            .bind(cert.device_id.as_str())
            .bind(id_prefix)
            .bind(quota)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A claim, if `id` is one.
    pub async fn claim(&self, id: &DeviceId) -> Result<Option<ClaimRecord>> {
        let row = sqlx::query(
            "SELECT c.claim_id, c.id_prefix, c.quota, c.used, d.status FROM claims c \
             JOIN devices d ON d.device_id = c.claim_id WHERE c.claim_id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ClaimRecord {
                claim_id: parse_id(r.try_get(0)?)?,
                id_prefix: r.try_get(1)?,
                quota: r.try_get(2)?,
                used: r.try_get(3)?,
                status: parse_status(&r.try_get::<String, _>(4)?)?,
            })
        })
        .transpose()
    }

    /// Creates a device from a claim: the claim must be active and under its quota, the device
    /// id new. Counts one against the quota and logs a `claim` entry naming the claim.
    pub async fn record_claimed_device(&self, claim: &DeviceId, cert: &NewCert, now: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let row = sqlx::query(
            "SELECT c.quota, c.used, d.status FROM claims c JOIN devices d ON d.device_id = c.claim_id \
             WHERE c.claim_id = $1",
        )
        .bind(claim.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotAClaim(claim.to_string()))?;
        let (quota, used, status): (i64, i64, String) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if parse_status(&status)? == Status::Revoked {
            return Err(Error::NotAClaim(claim.to_string()));
        }
        if used >= quota {
            return Err(Error::ClaimExhausted(claim.to_string()));
        }
        let id = cert.device_id.as_str();
        let exists = sqlx::query("SELECT 1 FROM devices WHERE device_id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(Error::DuplicateDevice(id.to_owned()));
        }
        sqlx::query(
            "INSERT INTO devices (device_id, role, status, created_at) VALUES ($1, 'device', 'active', $2)",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut head = self.log_head(&mut tx).await?;
        self.insert_certificate(&mut tx, &mut head, cert, now).await?;
        sqlx::query("UPDATE claims SET used = used + 1 WHERE claim_id = $1")
            .bind(claim.as_str())
            .execute(&mut *tx)
            .await?;
        let detail =
            serde_json::json!({ "claim": claim.as_str(), "used": used + 1, "quota": quota }).to_string();
        let serial = cert.serial.to_hex();
        self.append_log(
            &mut tx,
            &mut head,
            LogEntry { at: now, event: "claim", device_id: id, serial: &serial, detail },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
