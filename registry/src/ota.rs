//! Firmware update campaigns and jobs (docs/spec/ota.md, "Campaigns"): the station writes a
//! campaign and one job per device ([`Registry::create_campaign`], logged); the brokers' campaign
//! runner and chunk server read them and move the jobs' states with single guarded statements, so
//! that two nodes never both offer a wave or settle a job.

use sqlx::Row;

use crate::db::Registry;
use crate::error::{Error, Result};
use crate::log::LogEntry;

/// A job's state (docs/spec/ota.md, "Status reports").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobState {
    /// Its wave has not started.
    Pending,
    /// The offer is in the device's command queue.
    Queued,
    /// The offer was delivered.
    Offered,
    /// The device downloads.
    Downloading,
    /// The image is verified and marked for swap.
    Verified,
    /// The new image runs its trial boot.
    Rebooted,
    /// The new image confirmed itself (final).
    Confirmed,
    /// The old image runs again (final).
    RolledBack,
    /// Failed, with a reason (final).
    Failed,
    /// Its campaign stopped before its wave (final).
    Cancelled,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 10] = [
        Self::Pending,
        Self::Queued,
        Self::Offered,
        Self::Downloading,
        Self::Verified,
        Self::Rebooted,
        Self::Confirmed,
        Self::RolledBack,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Its name on the wire and in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Offered => "offered",
            Self::Downloading => "downloading",
            Self::Verified => "verified",
            Self::Rebooted => "rebooted",
            Self::Confirmed => "confirmed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// No later state: the job is settled.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Confirmed | Self::RolledBack | Self::Failed | Self::Cancelled)
    }

    /// A state a device may report (the others are the station's or the broker's).
    pub fn device_may_report(self) -> bool {
        matches!(
            self,
            Self::Downloading
                | Self::Verified
                | Self::Rebooted
                | Self::Confirmed
                | Self::RolledBack
                | Self::Failed
        )
    }

    /// Order along the update: a job never moves back.
    fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Queued => 1,
            Self::Offered => 2,
            Self::Downloading => 3,
            Self::Verified => 4,
            Self::Rebooted => 5,
            _ => 6,
        }
    }

    /// The states a job may be in to move to `self`.
    fn states_before(self) -> Vec<&'static str> {
        Self::ALL.into_iter().filter(|s| !s.is_final() && s.rank() <= self.rank()).map(Self::as_str).collect()
    }

    /// Non-final states, quoted for SQL.
    fn open_sql() -> String {
        quoted(Self::ALL.into_iter().filter(|s| !s.is_final()).map(Self::as_str))
    }
}

/// How long a job may stay claimed (`queued`) without its offer's command id before the
/// campaign runner offers it again: the node that claimed it stopped in between.
pub const CLAIM_TIMEOUT_MS: i64 = 60_000;

fn quoted<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
}

/// Which devices a campaign targets (`--devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceSelector {
    /// Every active device.
    All,
    /// Active devices whose id starts with this.
    Prefix(String),
    /// These devices (each must exist and be active).
    List(Vec<String>),
    /// Devices in this registry status (e.g. `active`); revoked devices are never targeted.
    Status(String),
}

/// A campaign to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    /// `ota-<16 hex>`.
    pub id: String,
    /// The release's board.
    pub board: String,
    /// The release's version.
    pub version: String,
    /// The selector as given.
    pub devices: String,
    /// Cumulative percentages, ending at 100.
    pub waves: Vec<u32>,
    /// Stop past this share of failed jobs, basis points.
    pub abort_bp: i64,
    /// The offers' time-to-live, seconds.
    pub offer_ttl: i64,
}

/// A campaign as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Campaign {
    /// Its id.
    pub id: String,
    /// The release's board.
    pub board: String,
    /// The release's version.
    pub version: String,
    /// The image's SHA-512, hex.
    pub sha512: String,
    /// The selector as given.
    pub devices: String,
    /// Cumulative percentages.
    pub waves: Vec<u32>,
    /// Failure threshold, basis points.
    pub abort_bp: i64,
    /// The offers' time-to-live, seconds.
    pub offer_ttl: i64,
    /// `running`, `completed` or `aborted`.
    pub state: String,
    /// The wave offered last (0-based; -1 before the first).
    pub wave: i64,
    /// Why it was aborted.
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// A device's job in a campaign.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Job {
    /// The campaign.
    pub campaign: String,
    /// The device.
    pub device_id: String,
    /// Its wave (0-based).
    pub wave: i64,
    /// Its state.
    #[serde(serialize_with = "ser_state")]
    pub state: JobState,
    /// Why it failed.
    pub reason: Option<String>,
    /// The last offset the device reported.
    pub progress: i64,
    /// The image size.
    pub size: i64,
    /// The offer's command id.
    pub command_id: Option<i64>,
    /// Unix milliseconds.
    pub updated_at: i64,
}

fn ser_state<S: serde::Serializer>(s: &JobState, ser: S) -> std::result::Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str())
}

const CAMPAIGN_COLUMNS: &str =
    "id, board, version, sha512, devices, waves, abort_bp, offer_ttl, state, wave, reason, created_at, updated_at";
const JOB_COLUMNS: &str = "campaign, device_id, wave, state, reason, progress, size, command_id, updated_at";

fn campaign(r: &sqlx::any::AnyRow) -> Result<Campaign> {
    let waves: String = r.try_get(5)?;
    Ok(Campaign {
        id: r.try_get(0)?,
        board: r.try_get(1)?,
        version: r.try_get(2)?,
        sha512: r.try_get(3)?,
        devices: r.try_get(4)?,
        waves: waves.split(',').filter_map(|w| w.parse().ok()).collect(),
        abort_bp: r.try_get(6)?,
        offer_ttl: r.try_get(7)?,
        state: r.try_get(8)?,
        wave: r.try_get(9)?,
        reason: r.try_get(10)?,
        created_at: r.try_get(11)?,
        updated_at: r.try_get(12)?,
    })
}

fn job(r: &sqlx::any::AnyRow) -> Result<Job> {
    let state: String = r.try_get(3)?;
    Ok(Job {
        campaign: r.try_get(0)?,
        device_id: r.try_get(1)?,
        wave: r.try_get(2)?,
        state: JobState::parse(&state)
            .ok_or_else(|| Error::CorruptRegistry(format!("ota job state `{state}`")))?,
        reason: r.try_get(4)?,
        progress: r.try_get(5)?,
        size: r.try_get(6)?,
        command_id: r.try_get(7)?,
        updated_at: r.try_get(8)?,
    })
}

/// The wave (0-based) of the `i`-th of `n` devices under cumulative percentages `waves`: wave `w`
/// holds the devices up to `ceil(n × waves[w] / 100)` (at least one), so 1%,10%,100% over 50
/// devices is 1, 4 and 45.
pub fn wave_of(i: usize, n: usize, waves: &[u32]) -> usize {
    for (w, pct) in waves.iter().enumerate() {
        let upto = (n * *pct as usize).div_ceil(100).clamp(1, n.max(1));
        if i < upto {
            return w;
        }
    }
    waves.len().saturating_sub(1)
}

impl Registry {
    /// The devices `selector` names (role `device`, status active unless the selector asks for a
    /// status), sorted by id. A listed id that is unknown, revoked or not a device is an error.
    pub async fn select_devices(&self, selector: &DeviceSelector) -> Result<Vec<String>> {
        let base = "SELECT device_id, status FROM devices WHERE role = 'device'";
        let rows = match selector {
            DeviceSelector::All | DeviceSelector::List(_) => {
                sqlx::query(&format!("{base} AND status = 'active' ORDER BY device_id"))
                    .fetch_all(&self.pool)
                    .await?
            }
            DeviceSelector::Prefix(p) => {
                // Not LIKE: `_` in an id is a LIKE wildcard.
                sqlx::query(&format!("{base} AND status = 'active' ORDER BY device_id"))
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .filter(|r| r.try_get::<String, _>(0).is_ok_and(|id| id.starts_with(p.as_str())))
                    .collect()
            }
            DeviceSelector::Status(s) => {
                if s == "revoked" {
                    return Err(Error::Campaign("revoked devices cannot be updated".into()));
                }
                sqlx::query(&format!("{base} AND status = $1 ORDER BY device_id"))
                    .bind(s)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let ids: Vec<String> = rows.iter().map(|r| r.try_get(0)).collect::<std::result::Result<_, _>>()?;
        if let DeviceSelector::List(want) = selector {
            let mut out = Vec::with_capacity(want.len());
            for w in want {
                if !ids.contains(w) {
                    return Err(Error::Campaign(format!("`{w}` is not an active device")));
                }
                if !out.contains(w) {
                    out.push(w.clone());
                }
            }
            out.sort();
            return Ok(out);
        }
        Ok(ids)
    }

    /// Creates a campaign for the release `c.board`/`c.version` over `devices` (one `pending`
    /// job each, waves assigned in the order given), with an `ota-campaign` log entry and one
    /// `ota-job` entry per job, in one transaction. Refused: an unknown release, no devices, a
    /// device with an open job in another campaign.
    pub async fn create_campaign(
        &self,
        c: &NewCampaign,
        devices: &[String],
        now_ms: i64,
    ) -> Result<Campaign> {
        if devices.is_empty() {
            return Err(Error::Campaign("no device matches --devices".into()));
        }
        let mut tx = self.pool.begin().await?;
        self.lock_log(&mut tx).await?;
        let rel = sqlx::query("SELECT sha512, size FROM releases WHERE board = $1 AND version = $2")
            .bind(&c.board)
            .bind(&c.version)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| {
                Error::Campaign(format!("no release {}/{} in the registry", c.board, c.version))
            })?;
        let (sha512, size): (String, i64) = (rel.try_get(0)?, rel.try_get(1)?);
        let busy = sqlx::query(&format!(
            "SELECT device_id, campaign FROM ota_jobs WHERE state IN ({}) ORDER BY device_id",
            JobState::open_sql()
        ))
        .fetch_all(&mut *tx)
        .await?;
        let wanted: std::collections::HashSet<&String> = devices.iter().collect();
        for r in &busy {
            let (d, camp): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            if wanted.contains(&d) {
                return Err(Error::Campaign(format!(
                    "device `{d}` already has an open job in campaign {camp}"
                )));
            }
        }
        let waves = c.waves.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        sqlx::query(&format!(
            "INSERT INTO ota_campaigns ({CAMPAIGN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', -1, NULL, $9, $9)"
        ))
        .bind(&c.id)
        .bind(&c.board)
        .bind(&c.version)
        .bind(&sha512)
        .bind(&c.devices)
        .bind(&waves)
        .bind(c.abort_bp)
        .bind(c.offer_ttl)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let mut head = self.log_head(&mut tx).await?;
        let detail = serde_json::json!({
            "board": c.board, "version": c.version, "sha512": sha512, "devices": c.devices,
            "waves": waves, "abort_bp": c.abort_bp, "offer_ttl": c.offer_ttl, "jobs": devices.len(),
        });
        let at = now_ms / 1000;
        let entry =
            LogEntry { at, event: "ota-campaign", device_id: &c.id, serial: "", detail: detail.to_string() };
        self.append_log(&mut tx, &mut head, entry).await?;
        for (i, d) in devices.iter().enumerate() {
            let wave = wave_of(i, devices.len(), &c.waves) as i64;
            sqlx::query(&format!(
                "INSERT INTO ota_jobs ({JOB_COLUMNS}, created_at) VALUES ($1, $2, $3, 'pending', NULL, 0, $4, NULL, $5, $5)"
            ))
            .bind(&c.id)
            .bind(d)
            .bind(wave)
            .bind(size)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let detail =
                serde_json::json!({ "campaign": c.id, "wave": wave, "board": c.board, "version": c.version });
            let entry =
                LogEntry { at, event: "ota-job", device_id: d, serial: "", detail: detail.to_string() };
            self.append_log(&mut tx, &mut head, entry).await?;
        }
        tx.commit().await?;
        self.campaign(&c.id).await?.ok_or_else(|| Error::CorruptRegistry("campaign vanished".into()))
    }

    /// Every campaign, newest first.
    pub async fn campaigns(&self) -> Result<Vec<Campaign>> {
        let rows = sqlx::query(&format!(
            "SELECT {CAMPAIGN_COLUMNS} FROM ota_campaigns ORDER BY created_at DESC, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(campaign).collect()
    }

    /// The running campaigns.
    pub async fn running_campaigns(&self) -> Result<Vec<Campaign>> {
        let rows = sqlx::query(&format!(
            "SELECT {CAMPAIGN_COLUMNS} FROM ota_campaigns WHERE state = 'running' ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(campaign).collect()
    }

    /// Campaign `id`.
    pub async fn campaign(&self, id: &str) -> Result<Option<Campaign>> {
        let row = sqlx::query(&format!("SELECT {CAMPAIGN_COLUMNS} FROM ota_campaigns WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(campaign).transpose()
    }

    /// Campaign `id`'s jobs, by wave and device.
    pub async fn ota_jobs(&self, id: &str) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM ota_jobs WHERE campaign = $1 ORDER BY wave, device_id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job).collect()
    }

    /// `device`'s open job (offered or later, not final), its release's SHA-512 (hex) and
    /// version, if it has one: what the chunk server answers for.
    pub async fn open_ota_job(&self, device: &str) -> Result<Option<(Job, String, String)>> {
        let cols = JOB_COLUMNS.split(", ").map(|c| format!("j.{c}")).collect::<Vec<_>>().join(", ");
        let row = sqlx::query(&format!(
            "SELECT {cols}, c.sha512, c.version FROM ota_jobs j JOIN ota_campaigns c ON c.id = j.campaign \
             WHERE j.device_id = $1 AND j.state IN ({}) AND j.state <> 'pending' ORDER BY j.created_at DESC LIMIT 1",
            JobState::open_sql()
        ))
        .bind(device)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some((job(&r)?, r.try_get(9)?, r.try_get(10)?))),
            None => Ok(None),
        }
    }

    /// Moves `device`'s job in `campaign` to `state` (with `reason` and, if given, the progress
    /// offset), only forward and never out of a final state; to the state it is in only with
    /// progress into a later tenth of the image (checked in the statement: reports handled at
    /// once cannot each move it). Returns the job as it now is, or
    /// `None` if it did not move.
    pub async fn move_ota_job(
        &self,
        campaign: &str,
        device: &str,
        state: JobState,
        reason: Option<&str>,
        progress: Option<i64>,
        now_ms: i64,
    ) -> Result<Option<Job>> {
        let done = sqlx::query(&format!(
            "UPDATE ota_jobs SET state = $1, reason = $2, progress = COALESCE($3, progress), updated_at = $4 \
             WHERE campaign = $5 AND device_id = $6 AND state IN ({}) \
             AND (state <> $1 OR COALESCE($3, -1) * 10 / NULLIF(size, 0) > progress * 10 / NULLIF(size, 0))",
            quoted(state.states_before().into_iter())
        ))
        .bind(state.as_str())
        .bind(reason)
        .bind(progress)
        .bind(now_ms)
        .bind(campaign)
        .bind(device)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM ota_jobs WHERE campaign = $1 AND device_id = $2"
        ))
        .bind(campaign)
        .bind(device)
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(job(&row)?))
    }

    /// Claims a pending job for its offer: `queued`, with no command yet. False if it was not
    /// pending (another node claimed it). The claim comes before the offer is put in the
    /// command queue, so that a device which gets the offer at once finds its job open when it
    /// asks for the first chunk or reports; and two nodes never both queue it.
    pub async fn claim_ota_job(&self, campaign: &str, device: &str, now_ms: i64) -> Result<bool> {
        self.update_job(
            "UPDATE ota_jobs SET state = 'queued', command_id = NULL, updated_at = $1 \
             WHERE campaign = $2 AND device_id = $3 AND state = 'pending'",
            now_ms,
            campaign,
            device,
        )
        .await
    }

    /// A claimed job's offer was queued as command `command_id` (the job may have moved on
    /// already: the device may have reported before this). False if it had a command already.
    pub async fn ota_job_offer_queued(&self, campaign: &str, device: &str, command_id: i64) -> Result<bool> {
        self.update_job(
            "UPDATE ota_jobs SET command_id = $1 WHERE campaign = $2 AND device_id = $3 AND command_id IS NULL",
            command_id,
            campaign,
            device,
        )
        .await
    }

    /// A claimed job whose offer could not be queued: `pending` again (offered at a later
    /// step). False if it was not claimed without a command.
    pub async fn unclaim_ota_job(&self, campaign: &str, device: &str, now_ms: i64) -> Result<bool> {
        self.update_job(
            "UPDATE ota_jobs SET state = 'pending', updated_at = $1 \
             WHERE campaign = $2 AND device_id = $3 AND state = 'queued' AND command_id IS NULL",
            now_ms,
            campaign,
            device,
        )
        .await
    }

    /// One guarded UPDATE of `device`'s job in `campaign` (`$1` is `value`, `$2` the campaign,
    /// `$3` the device): true if it changed the row.
    async fn update_job(&self, sql: &str, value: i64, campaign: &str, device: &str) -> Result<bool> {
        let done = sqlx::query(sql).bind(value).bind(campaign).bind(device).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Moves campaign `id` from wave `from` to wave `to`; false if another node did first.
    pub async fn advance_campaign(&self, id: &str, from: i64, to: i64, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE ota_campaigns SET wave = $1, updated_at = $2 WHERE id = $3 AND wave = $4 AND state = 'running'",
        )
        .bind(to)
        .bind(now_ms)
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends running campaign `id` as `state` (`completed` or `aborted`, with `reason`); its jobs
    /// still `pending` become `cancelled`. False if it was not running.
    pub async fn finish_campaign(
        &self,
        id: &str,
        state: &str,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE ota_campaigns SET state = $1, reason = $2, updated_at = $3 WHERE id = $4 AND state = 'running'",
        )
        .bind(state)
        .bind(reason)
        .bind(now_ms)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE ota_jobs SET state = 'cancelled', updated_at = $1 WHERE campaign = $2 AND state = 'pending'")
            .bind(now_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Settles what the broker decides: a job claimed for its offer but without a command
    /// after [`CLAIM_TIMEOUT_MS`] is `pending` again; a `queued` job whose offer was delivered (or
    /// acknowledged) is `offered`; one whose offer expired or was dropped is `failed`
    /// (`expired`); an open job (offered or later) without news for `stall_ms` is `failed`
    /// (`stalled`). Returns the jobs that moved.
    pub async fn settle_ota_jobs(&self, now_ms: i64, stall_ms: i64) -> Result<Vec<Job>> {
        // A claim without a command after CLAIM_TIMEOUT_MS: the node that claimed it stopped
        // before it queued the offer (or recorded it): offered again.
        sqlx::query(
            "UPDATE ota_jobs SET state = 'pending', updated_at = $1 \
             WHERE state = 'queued' AND command_id IS NULL AND updated_at < $2",
        )
        .bind(now_ms)
        .bind(now_ms - CLAIM_TIMEOUT_MS)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(
            "SELECT j.campaign, j.device_id, c.status FROM ota_jobs j JOIN commands c ON c.id = j.command_id \
             WHERE j.state = 'queued' AND c.status <> 'queued'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut moved = Vec::new();
        for r in &rows {
            let (camp, dev, status): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let (state, reason) = match status.as_str() {
                "delivered" | "acknowledged" => (JobState::Offered, None),
                _ => (JobState::Failed, Some("expired")),
            };
            if let Some(j) = self.move_ota_job(&camp, &dev, state, reason, None, now_ms).await? {
                moved.push(j);
            }
        }
        let rows = sqlx::query(
            "SELECT campaign, device_id FROM ota_jobs \
             WHERE state IN ('offered', 'downloading', 'verified', 'rebooted') AND updated_at < $1",
        )
        .bind(now_ms - stall_ms)
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            let (camp, dev): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            let stalled = sqlx::query(
                "UPDATE ota_jobs SET state = 'failed', reason = 'stalled', updated_at = $1 \
                 WHERE campaign = $2 AND device_id = $3 AND state IN ('offered', 'downloading', 'verified', 'rebooted') \
                 AND updated_at < $4",
            )
            .bind(now_ms)
            .bind(&camp)
            .bind(&dev)
            .bind(now_ms - stall_ms)
            .execute(&self.pool)
            .await?;
            if stalled.rows_affected() == 1 {
                let row = sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM ota_jobs WHERE campaign = $1 AND device_id = $2"
                ))
                .bind(&camp)
                .bind(&dev)
                .fetch_one(&self.pool)
                .await?;
                moved.push(job(&row)?);
            }
        }
        Ok(moved)
    }
}

/// `verify-log`'s check of firmware campaigns: each `ota_campaigns` row against its
/// `ota-campaign` entry (release, digest, selector, waves, threshold, time-to-live), each
/// `ota_jobs` row against its `ota-job` entry (campaign, device, wave), and entries whose rows
/// are gone. A job added to a campaign, or a campaign pointed at another release, outside the
/// station is reported.
pub(crate) async fn verify_campaigns(
    pool: &sqlx::AnyPool,
    logged: &std::collections::HashMap<String, serde_json::Value>,
    logged_jobs: &std::collections::HashMap<(String, String), i64>,
) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let rows = sqlx::query(&format!("SELECT {CAMPAIGN_COLUMNS} FROM ota_campaigns ORDER BY id"))
        .fetch_all(pool)
        .await?;
    let mut present = std::collections::HashSet::new();
    for r in &rows {
        let c = campaign(r)?;
        present.insert(c.id.clone());
        let Some(d) = logged.get(&c.id) else {
            bad.push(format!("campaign {} has no ota-campaign entry in the log", c.id));
            continue;
        };
        let waves = c.waves.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let same = d["board"] == c.board.as_str()
            && d["version"] == c.version.as_str()
            && d["sha512"] == c.sha512.as_str()
            && d["devices"] == c.devices.as_str()
            && d["waves"] == waves.as_str()
            && d["abort_bp"] == c.abort_bp
            && d["offer_ttl"] == c.offer_ttl;
        if !same {
            bad.push(format!(
                "campaign {} differs from what the log recorded (release, digest, devices, waves, threshold or TTL)",
                c.id
            ));
        }
    }
    let mut gone: Vec<_> = logged.keys().filter(|k| !present.contains(*k)).collect();
    gone.sort();
    for id in gone {
        bad.push(format!("campaign {id} was recorded per the log but is missing from the registry"));
    }
    let jobs = sqlx::query("SELECT campaign, device_id, wave FROM ota_jobs ORDER BY campaign, device_id")
        .fetch_all(pool)
        .await?;
    let mut present = std::collections::HashSet::new();
    for r in &jobs {
        let (camp, dev, wave): (String, String, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        match logged_jobs.get(&(camp.clone(), dev.clone())) {
            None => bad.push(format!("the job of {dev} in campaign {camp} has no ota-job entry in the log")),
            Some(w) if *w != wave => {
                bad.push(format!("the job of {dev} in campaign {camp} is in wave {wave}; the log says {w}"))
            }
            Some(_) => {}
        }
        present.insert((camp, dev));
    }
    let mut gone: Vec<_> = logged_jobs.keys().filter(|k| !present.contains(*k)).collect();
    gone.sort();
    for (camp, dev) in gone {
        bad.push(format!("the job of {dev} in campaign {camp} was recorded per the log but is missing"));
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_split_devices_by_cumulative_percentages() {
        let waves = [1, 10, 100];
        let of: Vec<usize> = (0..50).map(|i| wave_of(i, 50, &waves)).collect();
        assert_eq!(of.iter().filter(|w| **w == 0).count(), 1);
        assert_eq!(of.iter().filter(|w| **w == 1).count(), 4);
        assert_eq!(of.iter().filter(|w| **w == 2).count(), 45);
        assert!(of.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(wave_of(0, 1, &waves), 0);
        assert_eq!(wave_of(3, 4, &[50, 100]), 1);
    }

    #[test]
    fn states_move_only_forward() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert!(JobState::Downloading.states_before().contains(&"offered"));
        assert!(!JobState::Offered.states_before().contains(&"downloading"));
        assert!(!JobState::Failed.states_before().contains(&"confirmed"));
    }
}
