//! `verify_log`: recomputes the issuance log's hash chain and checks every registry row against
//! what the log says it must be.
//!
//! Every certificate row is cross-checked with its `issue` entry (owner, certificate digest,
//! notAfter) and its `revoke` entry (status, time, reason); every device row with its first
//! `issue` entry (role) and its `revoke-device` entry. Editing or deleting any entry breaks the
//! chain or the anchor; editing a row is reported as a disagreement.
//!
//! Serials are checked against the certificates themselves: the serial of every certificate row
//! (which its `issue` entry names and whose bytes that entry's digest covers) must be the one
//! inside its DER, and a `server-cert` entry that carries its certificate must name that
//! certificate's serial. A log and registry rewritten to a serial the certificate does not hold
//! (a CRL listing that serial would not revoke the certificate) is a disagreement even with the
//! hash chain recomputed.
//!
//! Every firmware release row must be what its `release` entry recorded (the signed manifest and
//! each of its columns), every logged release must still have its row, and every release must
//! be signed by a key a `firmware-key` entry created.

use std::collections::HashMap;

use sqlx::Row;

use crate::db::Registry;
use crate::error::{Error, Result};
use crate::log::{cert_digest, chain_hash, LogEntry, GENESIS};
use crate::releases::release_detail;

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

/// The serial inside a DER certificate, lowercase hex as the registry keys it; `None` if the
/// bytes are not a certificate.
fn der_serial(der: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    crate::SerialNumber::from_bytes(x509.raw_serial()).map(|s| s.to_hex())
}

fn detail_json(seq: i64, detail: &str) -> Result<serde_json::Value> {
    serde_json::from_str(detail).map_err(|_| Error::LogTampered(format!("entry {seq} detail is not JSON")))
}

impl Registry {
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
        let mut server_mismatches = Vec::new();
        let mut logged_releases: HashMap<(String, String), serde_json::Value> = HashMap::new();
        let mut firmware_keys = std::collections::HashSet::new();
        let mut logged_campaigns: HashMap<String, serde_json::Value> = HashMap::new();
        let mut logged_jobs: HashMap<(String, String), i64> = HashMap::new();
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
                "server-cert" => {
                    // Entries written before the certificate was logged carry none to check.
                    let d = detail_json(seq, &e.detail)?;
                    if let Some(h) = d["cert_der"].as_str() {
                        let inside = hex::decode(h).ok().and_then(|der| der_serial(&der));
                        if inside.as_deref() != Some(serial.as_str()) {
                            server_mismatches.push(format!(
                                "entry {seq} (server-cert) names serial {serial} but its certificate holds {}",
                                inside.as_deref().unwrap_or("no readable serial")
                            ));
                        }
                    }
                }
                "release" => {
                    let d = detail_json(seq, &e.detail)?;
                    let version = d["version"].as_str().unwrap_or_default().to_owned();
                    logged_releases.insert((device_id.clone(), version), d);
                }
                "firmware-key" => {
                    firmware_keys.insert(device_id.clone());
                }
                "ota-campaign" => {
                    logged_campaigns.insert(device_id.clone(), detail_json(seq, &e.detail)?);
                }
                "ota-job" => {
                    let d = detail_json(seq, &e.detail)?;
                    let campaign = d["campaign"].as_str().unwrap_or_default().to_owned();
                    logged_jobs.insert((campaign, device_id.clone()), d["wave"].as_i64().unwrap_or(-1));
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
        let mut bad = server_mismatches;
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
            let inside = der_serial(&der);
            if inside.as_deref() != Some(serial.as_str()) {
                bad.push(format!(
                    "certificate {serial}: the certificate's own serial is {} (serial rewritten?)",
                    inside.as_deref().unwrap_or("unreadable")
                ));
            }
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
        let releases = self.releases(None).await?;
        let mut present = std::collections::HashSet::new();
        for r in &releases {
            let (board, version) = (&r.release.board, &r.release.version);
            present.insert((board.clone(), version.clone()));
            let Some(logged) = logged_releases.get(&(board.clone(), version.clone())) else {
                bad.push(format!("release {board} {version} has no release entry in the log"));
                continue;
            };
            let row = detail_json(0, &release_detail(&r.release))?;
            if row != *logged {
                bad.push(format!(
                    "release {board} {version} differs from what the log recorded (manifest, digest, signature, size, key or minimum version)"
                ));
            }
            if !firmware_keys.contains(&r.release.key_id) {
                bad.push(format!(
                    "release {board} {version} is signed by key {}, which no firmware-key entry of the log created",
                    r.release.key_id
                ));
            }
        }
        let mut missing: Vec<_> = logged_releases.keys().filter(|k| !present.contains(*k)).collect();
        missing.sort();
        for (board, version) in missing {
            bad.push(format!(
                "release {board} {version} was recorded per the log but is missing from the registry"
            ));
        }
        bad.extend(crate::ota::verify_campaigns(&self.pool, &logged_campaigns, &logged_jobs).await?);
        Ok(LogReport { entries: rows.len() as i64, head: prev, disagreements: bad })
    }
}
