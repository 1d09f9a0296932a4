//! What the broker watches while it runs: the registry's revocation feed (cut sessions, forget
//! cached verdicts, discard kept sessions, clear retained messages), other nodes' revocation
//! announcements, and the TLS files (reloaded by the gate without touching live sessions, never
//! to an older CRL).

use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{DeviceId, Registry, RevocationFeed, SerialNumber, Status};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::now_unix;
use crate::fabric::Fabric;
use crate::gate::Gate;
use crate::observe::metrics::EXPIRY_LABELS;
use crate::observe::Observe;
use crate::outcome::BusRefusal;
use crate::session::park::Parking;
use crate::sessions::Sessions;

/// Bounds of the certificate-expiry buckets of live sessions (labels: `EXPIRY_LABELS`).
const EXPIRY_DAYS: [i64; 5] = [1, 7, 30, 90, 365];

/// The watcher's services.
#[derive(Debug)]
pub(crate) struct Watch {
    pub(crate) gate: Arc<Gate>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) parking: Parking,
    pub(crate) fabric: Fabric,
    pub(crate) registry: Registry,
    pub(crate) observe: Observe,
    /// `revocation_poll_ms`.
    pub(crate) revocation_poll: Duration,
    /// `reload_poll_ms`.
    pub(crate) reload_poll_ms: u64,
    pub(crate) shutdown: CancellationToken,
}

impl Watch {
    /// Cuts the sessions of every revocation the feed reports, until shutdown.
    pub(crate) async fn revocations(self: Arc<Self>, mut feed: RevocationFeed) {
        let poll = self.revocation_poll;
        let mut registry_down = false;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = feed.changed(poll) => {}
            }
            match feed.next_batch().await {
                Ok(events) => {
                    for ev in events {
                        self.observe.metrics().revocations_seen.inc();
                        self.revoked(&ev.device_id, &ev.serial);
                        self.fabric.announce_revocation(&ev.device_id, &ev.serial).await;
                    }
                    self.gate.feed_ok();
                    if registry_down {
                        info!("registry reachable again: revocation watch resumed");
                        registry_down = false;
                    }
                }
                Err(e) => {
                    if !registry_down {
                        warn!(error = %e, "revocation poll failed: registry unavailable; retrying");
                        registry_down = true;
                    }
                }
            }
        }
    }

    /// A certificate was revoked: forget its cached verdict, cut its session, discard the
    /// persistent sessions it parked, clear its device's retained messages. Idempotent (the registry
    /// feed and other nodes may both report it).
    pub(crate) fn revoked(&self, device: &DeviceId, serial: &SerialNumber) {
        self.gate.forget(serial);
        if self.sessions.kick_serial(device, serial) {
            info!(%device, %serial, "revoked: cutting live session");
        }
        // After `kick_serial` recorded the serial: a session parking concurrently sees the mark.
        let parked = self.parking.revoked(serial);
        if parked > 0 {
            info!(%device, %serial, parked, "revoked: kept persistent sessions discarded");
        }
        let cleared = self.fabric.clear_retained(device.as_str());
        if cleared > 0 {
            info!(%device, cleared, "revoked: retained messages cleared");
        }
    }

    /// Applies the revocations other cluster nodes announce, until shutdown, each once the
    /// registry confirms it: an announcement is a hint to look now (PostgreSQL notifications may
    /// lag), never a verdict, so a forged one cannot lock a device out. While the registry cannot
    /// be asked the announcement is applied (fail closed: no device is admitted then either,
    /// unless cached).
    pub(crate) async fn cluster_revocations(self: Arc<Self>) {
        let (task, mut announced) = match self.fabric.announcements().await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                return error!(error = %e, "cluster revocation subscription failed; the registry feed alone cuts sessions")
            }
        };
        loop {
            let (device, serial) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = announced.recv() => match r { Some(r) => r, None => break },
            };
            self.observe.metrics().cluster_revocations_received.inc();
            let confirmed = match self.registry.admission(&serial).await {
                Ok(Some(a)) => {
                    a.device_id == device
                        && (a.cert_status == Status::Revoked || a.device_status == Status::Revoked)
                }
                Ok(None) => false,
                Err(_) => true,
            };
            if confirmed {
                self.revoked(&device, &serial);
            } else {
                self.observe.metrics().bus_refused(BusRefusal::Unconfirmed);
                warn!(%device, %serial, "cluster revocation announcement not confirmed by the registry: ignored");
            }
        }
        task.abort();
    }

    /// Reloads TLS material when its files change; refreshes the expiry gauges.
    pub(crate) async fn files(self: Arc<Self>) {
        let every = Duration::from_millis(self.reload_poll_ms);
        let mut last_failed = None;
        let mut turn: u64 = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            // A walk over the session table: every ~5 s is enough for a gauge counted in days.
            if turn.is_multiple_of((5_000 / self.reload_poll_ms.max(1)).max(1)) {
                self.update_expiry_buckets();
            }
            turn = turn.wrapping_add(1);
            self.gate.reload_if_changed(&mut last_failed);
            self.gate.update_gauges();
        }
    }

    /// Counts the live sessions by how soon their certificates expire (the devices to rotate).
    pub(crate) fn update_expiry_buckets(&self) {
        let bounds = EXPIRY_DAYS.map(|d| d * 86_400);
        let counts = self.sessions.expiry_buckets(now_unix(), &bounds);
        for (label, n) in EXPIRY_LABELS.iter().zip(counts) {
            self.observe.metrics().sessions_cert_expiry.with_label_values(&[label]).set(n);
        }
    }
}
