//! Firmware updates, broker side (docs/spec/ota.md, "Delivery over MQTT" and "Campaigns"): the
//! chunk server that answers a device's `ota/get` for its own open job's release only
//! ([`serve`]), the device's status reports that move its job, the campaign runner that offers
//! waves through the command queue and stops a failing campaign ([`runner`]), and the blob
//! directory the images come from ([`blobs`]).
//!
//! Invariants: a chunk is sent only to the session of the device whose open job names the
//! release; the job table is the only source of "offered" (the chunk server reads it, a service
//! cannot queue an offer, `auth`); every job change is published on `status/devices/<id>/ota`.

pub(crate) mod blobs;
pub(crate) mod runner;
pub(crate) mod serve;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_registry::{Job, JobState, Registry};
use rumqttc::mqttbytes::QoS;
use tracing::{debug, warn};

use crate::clock::now_millis;
use crate::cluster::bus::Origin;
use crate::fabric::Fabric;
use crate::message::Message;
use crate::observe::metrics::Metrics;
use crate::router::RetainBudget;
use blobs::Blobs;
use wire::Tag;

/// The limits the chunk server and the runner work to (from the configuration).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `ota_max_chunk`.
    pub(crate) max_chunk: usize,
    /// `ota_bytes_per_sec`.
    pub(crate) bytes_per_sec: u64,
    /// `ota_stall_secs`.
    pub(crate) stall: Duration,
    /// `ota_poll_ms`.
    pub(crate) poll: Duration,
}

/// The firmware-update service; clone freely.
#[derive(Debug, Clone)]
pub(crate) struct Ota {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    blobs: Arc<Blobs>,
    fabric: Fabric,
    metrics: Metrics,
    limits: Limits,
}

/// What the chunk server may send a device.
#[derive(Debug, Clone)]
pub(crate) enum Offered {
    /// Its open job's release: the tag and the image.
    Job { tag: Tag, image: Bytes },
    /// Its open job's release, whose image cannot be served now (not in this node's blob
    /// directory nor yet in the cluster's object store, or refused): status `3`, ask later.
    Unavailable { tag: Tag },
    /// No open job: status `1`.
    Nothing,
    /// The registry could not be read: status `3`, ask later (a busy pool must not end a
    /// device's job).
    Retry,
}

impl Ota {
    /// The service over `registry` and the images in `blob_dir`.
    pub(crate) fn new(
        registry: Registry,
        blob_dir: std::path::PathBuf,
        fabric: Fabric,
        metrics: Metrics,
        limits: Limits,
    ) -> Self {
        let blobs = Arc::new(Blobs::new(blob_dir, fabric.jetstream()));
        Self { inner: Arc::new(Inner { registry, blobs, fabric, metrics, limits }) }
    }

    pub(crate) fn limits(&self) -> Limits {
        self.inner.limits
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// What `device` may fetch now: its open job's release (offered or later, not final).
    pub(crate) async fn offered(&self, device: &str) -> Offered {
        let (found, size) = match self.inner.registry.open_ota_job(device).await {
            Ok(Some((job, sha512, _))) => (sha512, u64::try_from(job.size).unwrap_or(0)),
            Ok(_) => return Offered::Nothing,
            Err(e) => {
                warn!(%device, error = %e, "cannot read the device's update job");
                return Offered::Retry;
            }
        };
        let Some(tag) = tag_of(&found) else { return Offered::Nothing };
        match self.inner.blobs.image(&found, size).await {
            Ok(image) => Offered::Job { tag, image },
            Err(e) => {
                self.inner.metrics.ota_refused.with_label_values(&["image_unavailable"]).inc();
                if e.is_news() {
                    warn!(%device, error = %e, "firmware image unavailable");
                } else {
                    debug!(%device, error = %e, "firmware image unavailable");
                }
                Offered::Unavailable { tag }
            }
        }
    }

    /// A device's report on `devices/<id>/ota/status`: moves its open job if the report names
    /// its release and a state a device may say, and publishes the change. Runs on its own
    /// task: the session does not wait for the registry.
    pub(crate) fn report(&self, device: &str, payload: &[u8]) {
        let Some(report) = Report::parse(payload) else {
            debug!(%device, "unreadable update status report");
            return;
        };
        let (ota, device) = (self.clone(), device.to_owned());
        tokio::spawn(async move {
            // The report was acknowledged (and stored): a registry that fails for a moment
            // (a busy pool, a failover) must not lose it, or a `confirmed` job would stall.
            for pause in [250, 500, 1000, 0] {
                match ota.record(&device, &report).await {
                    Ok(()) => return,
                    Err(e) if pause == 0 => warn!(%device, error = %e, "cannot record the update status"),
                    Err(e) => debug!(%device, error = %e, "cannot record the update status yet; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        });
    }

    /// Moves `device`'s open job as `report` says (only forward; a repeat is a no-op) and
    /// announces the move.
    async fn record(&self, device: &str, report: &Report) -> Result<(), fleet_registry::Error> {
        let reg = &self.inner.registry;
        let Some((job, sha512, version)) = reg.open_ota_job(device).await? else { return Ok(()) };
        if !sha512.starts_with(&report.release) {
            debug!(%device, release = %report.release, "status report for a release not offered");
            return Ok(());
        }
        let Some(offset) = recorded_progress(&job, report.state, report.offset) else {
            debug!(%device, "update status report without news: not recorded");
            return Ok(());
        };
        let reason =
            (report.state == JobState::Failed).then_some(report.reason.as_deref().unwrap_or("unknown"));
        if let Some(moved) =
            reg.move_ota_job(&job.campaign, device, report.state, reason, offset, now_millis()).await?
        {
            self.announce(&moved, &sha512, &version).await;
        }
        Ok(())
    }

    /// Publishes a job's state on `status/devices/<id>/ota` (here and on every node) and counts
    /// it.
    pub(crate) async fn announce(&self, job: &Job, sha512: &str, version: &str) {
        self.inner.metrics.ota_jobs.with_label_values(&[job.state.as_str()]).inc();
        let mut body = serde_json::json!({
            "campaign": job.campaign, "device": job.device_id, "release": sha512.get(..16).unwrap_or(""),
            "version": version, "state": job.state.as_str(), "offset": job.progress, "size": job.size,
            "wave": job.wave, "at": now_millis(),
        });
        if let Some(r) = &job.reason {
            body["reason"] = serde_json::Value::from(r.as_str());
        }
        let topic = format!(
            "{}/{}/{}/{}",
            fleet_topic::level::STATUS,
            fleet_topic::level::DEVICES,
            job.device_id,
            fleet_topic::level::OTA
        );
        let p = Message::new(topic, QoS::AtLeastOnce, body.to_string());
        let _ = self.inner.fabric.publish_everywhere(&p, RetainBudget::Clients, Origin::Broker).await;
    }
}

/// How many status reports of one session may reach the registry: a burst of
/// [`ReportBudget::BURST`], then one per [`ReportBudget::EVERY`]. A device says about a dozen
/// per update (the start, every 10 %, then three states); without it, one device publishing
/// reports at the session's message rate (`max_publish_rate`, 20,000/s) made as many registry
/// reads a second, on the pool the admission of every client waits for.
#[derive(Debug)]
pub(crate) struct ReportBudget {
    tokens: u32,
    at: tokio::time::Instant,
}

impl ReportBudget {
    /// Reports taken at once.
    pub(crate) const BURST: u32 = 16;
    /// One more report per this.
    pub(crate) const EVERY: Duration = Duration::from_secs(1);

    pub(crate) fn new(now: tokio::time::Instant) -> Self {
        Self { tokens: Self::BURST, at: now }
    }

    /// True if a report at `now` may move the job.
    pub(crate) fn admit(&mut self, now: tokio::time::Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_millis() / Self::EVERY.as_millis();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(Self::BURST);
            self.at += Self::EVERY * earned.min(Self::BURST);
            if self.tokens == Self::BURST {
                self.at = now;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Whether a report saying `state` at `offset` moves `job`, and the progress to keep: a new
/// state does (the registry keeps it forward); the same state only with progress into a later
/// tenth of the image (the device reports every 10 %). An offset beyond the image is not kept.
/// Otherwise a device repeating `downloading` made a registry write and a QoS 1 broadcast on
/// `status/devices/<id>/ota` per report, and could move its progress backwards or past the end.
fn recorded_progress(job: &Job, state: JobState, offset: Option<i64>) -> Option<Option<i64>> {
    let offset = offset.filter(|o| (0..=job.size).contains(o));
    if state != job.state {
        return Some(offset);
    }
    let tenth = |o: i64| o.saturating_mul(10) / job.size.max(1);
    match offset {
        Some(o) if tenth(o) > tenth(job.progress) => Some(Some(o)),
        _ => None,
    }
}

/// The tag of an image whose SHA-512 is `sha512` (hex).
fn tag_of(sha512: &str) -> Option<Tag> {
    let bytes = hex::decode(sha512.get(..16)?).ok()?;
    bytes.try_into().ok()
}

/// A device's status report (docs/spec/ota.md, "Status reports").
#[derive(Debug, PartialEq, Eq)]
struct Report {
    /// The release tag, 16 lowercase hex.
    release: String,
    state: JobState,
    offset: Option<i64>,
    reason: Option<String>,
}

impl Report {
    fn parse(payload: &[u8]) -> Option<Report> {
        let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let release = v.get("release")?.as_str()?.to_ascii_lowercase();
        if release.len() != 16 || !release.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let state = JobState::parse(v.get("state")?.as_str()?).filter(|s| s.device_may_report())?;
        let offset = v.get("offset").and_then(serde_json::Value::as_i64).filter(|o| *o >= 0);
        // A reason is a label (docs/spec/ota.md): anything else is not stored.
        let reason = v
            .get("reason")
            .and_then(serde_json::Value::as_str)
            .filter(|r| (1..=32).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .map(str::to_owned);
        Some(Report { release, state, offset, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_reports_reaches_the_registry_at_one_a_second_after_a_burst() {
        let t0 = tokio::time::Instant::now();
        let mut b = ReportBudget::new(t0);
        let first = (0..20_000).filter(|_| b.admit(t0)).count();
        assert_eq!(first, ReportBudget::BURST as usize);
        assert!(!b.admit(t0 + Duration::from_millis(999)));
        assert!(b.admit(t0 + Duration::from_secs(1)));
        assert!(!b.admit(t0 + Duration::from_millis(1500)));
        // A quiet device has its burst again.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.admit(later)).count(), ReportBudget::BURST as usize);
    }

    #[test]
    fn repeated_reports_move_a_job_only_by_a_tenth_and_never_past_the_image() {
        let job = Job {
            campaign: "ota-5f0c2a9e3d1b7a64".into(),
            device_id: "dev-1".into(),
            wave: 0,
            state: JobState::Downloading,
            reason: None,
            progress: 20_000,
            size: 100_000,
            command_id: Some(1),
            updated_at: 0,
        };
        // The same state: a flood of well-formed `downloading` reports records nothing...
        assert_eq!(recorded_progress(&job, JobState::Downloading, Some(20_000)), None);
        assert_eq!(recorded_progress(&job, JobState::Downloading, Some(29_999)), None);
        assert_eq!(recorded_progress(&job, JobState::Downloading, Some(1_000)), None);
        assert_eq!(recorded_progress(&job, JobState::Downloading, None), None);
        // ...nor past the image; the next tenth is recorded.
        assert_eq!(recorded_progress(&job, JobState::Downloading, Some(1 << 40)), None);
        assert_eq!(recorded_progress(&job, JobState::Downloading, Some(30_000)), Some(Some(30_000)));
        // A new state always (the registry keeps it forward), an impossible offset dropped.
        assert_eq!(recorded_progress(&job, JobState::Verified, Some(100_000)), Some(Some(100_000)));
        assert_eq!(recorded_progress(&job, JobState::Failed, Some(1 << 40)), Some(None));
    }

    #[test]
    fn reports_are_read_only_with_a_tag_and_a_state_a_device_may_say() {
        let r = Report::parse(
            br#"{"release":"3fa9aa1de80d0643","version":"1.2.0","state":"downloading","offset":65536,"size":262144}"#,
        );
        assert_eq!(
            r,
            Some(Report {
                release: "3fa9aa1de80d0643".into(),
                state: JobState::Downloading,
                offset: Some(65536),
                reason: None
            })
        );
        let failed =
            Report::parse(br#"{"release":"3fa9aa1de80d0643","state":"failed","reason":"bad_signature"}"#);
        assert_eq!(failed.and_then(|r| r.reason).as_deref(), Some("bad_signature"));
        let markup = Report::parse(br#"{"release":"3fa9aa1de80d0643","state":"failed","reason":"<b>x</b>"}"#);
        assert_eq!(markup.map(|r| r.reason), Some(None));
        for bad in [
            &br#"{"release":"3fa9","state":"downloading"}"#[..],
            br#"{"release":"3fa9aa1de80d0643","state":"offered"}"#,
            br#"{"release":"3fa9aa1de80d0643","state":"queued"}"#,
            br#"{"release":"3fa9aa1de80d0643","state":"cancelled"}"#,
            br#"{"release":"3fa9aa1de80d0643"}"#,
            b"not json",
        ] {
            assert_eq!(Report::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            tag_of(&"3fa9aa1de80d0643".repeat(8)),
            Some([0x3f, 0xa9, 0xaa, 0x1d, 0xe8, 0x0d, 0x06, 0x43])
        );
    }
}
