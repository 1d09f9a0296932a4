//! The campaign runner (docs/spec/ota.md, "Campaigns"): every `ota_poll_ms` it settles what
//! the broker decides about jobs (offered when the offer was delivered, `expired`, `stalled`),
//! then for each running campaign: stops it once the failed share of the jobs offered so far
//! passes its threshold; starts the next wave once every job of the waves so far is final; and
//! puts the offers of the current wave's pending jobs into the command queue (sender
//! `ota:<campaign>`, `devices/<id>/commands/ota/offer/ttl=<secs>`, payload the 268-byte
//! manifest), so that a sleeping device gets its offer when it wakes.
//!
//! Every move is a guarded statement (`advance_campaign`, `claim_ota_job`, `finish_campaign`),
//! so several nodes running this loop over one registry offer each job once. A job is claimed
//! (`queued`) before its offer goes into the queue: a connected device gets the offer at once
//! and asks for chunks, which are served for open jobs only.

use fleet_registry::{Campaign, CommandOutcome, DeviceId, JobState};
use rumqttc::mqttbytes::QoS;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Ota;
use crate::clock::now_millis;
use crate::cluster::bus::Origin;
use crate::commands::writer::{Change, Writer};
use crate::message::Message;
use crate::router::RetainBudget;

/// The offer command's name: `devices/<id>/commands/ota/offer`.
pub(crate) const OFFER: &str = "ota/offer";

/// Runs until `shutdown`.
pub(crate) async fn run(ota: Ota, writer: Writer, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(ota.limits().poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = step(&ota, &writer).await {
            warn!(error = %e, "campaign runner: registry error; trying again");
        }
    }
}

async fn step(ota: &Ota, writer: &Writer) -> Result<(), fleet_registry::Error> {
    let reg = &ota.inner.registry;
    let now = now_millis();
    let stall = i64::try_from(ota.limits().stall.as_millis()).unwrap_or(i64::MAX);
    for job in reg.settle_ota_jobs(now, stall).await? {
        if let Some(c) = reg.campaign(&job.campaign).await? {
            ota.announce(&job, &c.sha512, &c.version).await;
        }
    }
    for c in reg.running_campaigns().await? {
        campaign(ota, writer, &c).await?;
    }
    Ok(())
}

/// One running campaign's step.
async fn campaign(ota: &Ota, writer: &Writer, c: &Campaign) -> Result<(), fleet_registry::Error> {
    let reg = &ota.inner.registry;
    let metrics = &ota.inner.metrics;
    let now = now_millis();
    let jobs = reg.ota_jobs(&c.id).await?;
    if let Some(size) = jobs.first().and_then(|j| u64::try_from(j.size).ok()) {
        // A cluster member with the image in its blob directory shares it with the others
        // (on its own task: the runner does not wait for the object store).
        ota.inner.blobs.share(&c.sha512, size);
    }
    let started: Vec<_> = jobs.iter().filter(|j| j.wave <= c.wave).collect();
    let failed =
        started.iter().filter(|j| matches!(j.state, JobState::Failed | JobState::RolledBack)).count();
    if !started.is_empty() && (failed as i64) * 10_000 > c.abort_bp * started.len() as i64 {
        let reason = format!(
            "{failed} of {} jobs failed or rolled back, more than {}.{:02}%",
            started.len(),
            c.abort_bp / 100,
            c.abort_bp % 100
        );
        if reg.finish_campaign(&c.id, "aborted", Some(&reason), now).await? {
            metrics.ota_campaigns.with_label_values(&["aborted"]).inc();
            warn!(campaign = %c.id, wave = c.wave, %reason, "campaign aborted");
        }
        return Ok(());
    }
    let mut wave = c.wave;
    if started.iter().all(|j| j.state.is_final()) {
        let next = wave + 1;
        if next as usize >= c.waves.len() {
            if reg.finish_campaign(&c.id, "completed", None, now).await? {
                metrics.ota_campaigns.with_label_values(&["completed"]).inc();
                info!(campaign = %c.id, "campaign completed");
            }
            return Ok(());
        }
        if !reg.advance_campaign(&c.id, wave, next, now).await? {
            return Ok(()); // another node moved it
        }
        metrics.ota_campaigns.with_label_values(&["wave_started"]).inc();
        info!(campaign = %c.id, wave = next, "campaign wave started");
        wave = next;
    }
    let pending: Vec<_> = jobs.iter().filter(|j| j.wave <= wave && j.state == JobState::Pending).collect();
    if pending.is_empty() {
        return Ok(());
    }
    let Some(release) = reg.release(&c.board, &c.version).await? else {
        let reason = format!("release {}/{} is gone from the registry", c.board, c.version);
        if reg.finish_campaign(&c.id, "aborted", Some(&reason), now).await? {
            metrics.ota_campaigns.with_label_values(&["aborted"]).inc();
        }
        return Ok(());
    };
    let manifest = release.release.manifest;
    let ttl_ms = c.offer_ttl.saturating_mul(1000);
    for job in pending {
        let Ok(device) = DeviceId::parse(&job.device_id) else { continue };
        if !reg.claim_ota_job(&c.id, &job.device_id, now_millis()).await? {
            continue; // another node offers it
        }
        // Announced before the offer goes out: the device's own reports may follow at once.
        let mut claimed = job.clone();
        claimed.state = JobState::Queued;
        ota.announce(&claimed, &c.sha512, &c.version).await;
        let change = Change::Enqueue {
            device: device.clone(),
            name: OFFER.to_owned(),
            payload: manifest.clone(),
            sender: format!("ota:{}", c.id),
            now: now_millis(),
            ttl_ms,
            reply: None,
        };
        match writer.apply(vec![change]).await.as_deref() {
            Some([CommandOutcome::Enqueued { id, .. }]) => {
                // The offer is in the queue: its id must reach the job, or the claim would be
                // taken back after CLAIM_TIMEOUT_MS and a second offer queued.
                for pause in [250, 500, 1000, 0] {
                    match reg.ota_job_offer_queued(&c.id, &job.device_id, *id).await {
                        Ok(_) => break,
                        Err(e) if pause == 0 => {
                            warn!(campaign = %c.id, device = %job.device_id, error = %e, "offer queued but not recorded on its job")
                        }
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(pause)).await,
                    }
                }
                // Wake the device's session, wherever it is: it reads its queue.
                let topic = fleet_topic::command(device.as_str(), OFFER).to_string();
                let p = Message::new(topic, QoS::AtLeastOnce, manifest.clone());
                let _ = ota.inner.fabric.publish_everywhere(&p, RetainBudget::Clients, Origin::Broker).await;
            }
            Some([CommandOutcome::NotAddressable { .. }]) => {
                if let Some(moved) = reg
                    .move_ota_job(
                        &c.id,
                        &job.device_id,
                        JobState::Failed,
                        Some("revoked"),
                        None,
                        now_millis(),
                    )
                    .await?
                {
                    ota.announce(&moved, &c.sha512, &c.version).await;
                }
            }
            _ => {
                warn!(campaign = %c.id, device = %job.device_id, "offer not queued; trying again");
                reg.unclaim_ota_job(&c.id, &job.device_id, now_millis()).await?;
            }
        }
    }
    Ok(())
}
