//! What the broker watches while it runs: the registry's revocation feed (cut sessions, forget
//! cached verdicts, clear retained messages) and the TLS files (reload the certificate, client CA
//! and CRL without touching live sessions, never to an older CRL).

use std::sync::Arc;
use std::time::Duration;

use fleet_registry::{DeviceId, RevocationFeed, SerialNumber, Status};
use tracing::{error, info, warn};

use crate::metrics::{Reload, EXPIRY_LABELS};
use crate::{now_unix, tls, Shared};

/// Cuts the sessions of every revocation the feed reports, until shutdown.
pub(crate) async fn revocations(shared: Arc<Shared>, mut feed: RevocationFeed) {
    let poll = Duration::from_millis(shared.config.revocation_poll_ms);
    let mut registry_down = false;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = feed.changed(poll) => {}
        }
        match feed.next_batch().await {
            Ok(events) => {
                for ev in events {
                    shared.metrics.revocations_seen.inc();
                    revoked(&shared, &ev.device_id, &ev.serial);
                    if let Some(cluster) = &shared.cluster {
                        cluster.announce_revocation(&ev.device_id, &ev.serial).await;
                    }
                }
                shared.admissions.feed_ok();
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
pub(crate) fn revoked(shared: &Shared, device: &DeviceId, serial: &SerialNumber) {
    shared.admissions.revoked(serial);
    if shared.sessions.kick_serial(device, serial) {
        info!(%device, %serial, "revoked: cutting live session");
    }
    // After `kick_serial` recorded the serial: a session parking concurrently sees the mark.
    let parked = crate::session::park::revoked(shared, serial);
    if parked > 0 {
        info!(%device, %serial, parked, "revoked: kept persistent sessions discarded");
    }
    let cleared = shared.router.clear_retained(device.as_str());
    if cleared > 0 {
        info!(%device, cleared, "revoked: retained messages cleared");
    }
}

/// Applies the revocations other cluster nodes announce, until shutdown, each once the
/// registry confirms it: an announcement is a hint to look now (PostgreSQL notifications may
/// lag), never a verdict, so a forged one cannot lock a device out. While the registry cannot
/// be asked the announcement is applied (fail closed: no device is admitted then either,
/// unless cached).
pub(crate) async fn cluster_revocations(shared: Arc<Shared>) {
    let Some(cluster) = &shared.cluster else { return };
    let (task, mut announced) = match cluster.revocations().await {
        Ok(r) => r,
        Err(e) => {
            return error!(error = %e, "cluster revocation subscription failed; the registry feed alone cuts sessions")
        }
    };
    loop {
        let (device, serial) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = announced.recv() => match r { Some(r) => r, None => break },
        };
        shared.metrics.cluster_revocations_received.inc();
        let confirmed = match shared.registry.admission(&serial).await {
            Ok(Some(a)) => {
                a.device_id == device
                    && (a.cert_status == Status::Revoked || a.device_status == Status::Revoked)
            }
            Ok(None) => false,
            Err(_) => true,
        };
        if confirmed {
            revoked(&shared, &device, &serial);
        } else {
            shared.metrics.bus_refused(crate::outcome::BusRefusal::Unconfirmed);
            warn!(%device, %serial, "cluster revocation announcement not confirmed by the registry: ignored");
        }
    }
    task.abort();
}

/// Reloads TLS material when its files change; refreshes the expiry gauges.
pub(crate) async fn files(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.config.reload_poll_ms);
    let mut last_failed = None;
    let mut turn: u64 = 0;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // A walk over the session table: every ~5 s is enough for a gauge counted in days.
        if turn.is_multiple_of((5_000 / shared.config.reload_poll_ms.max(1)).max(1)) {
            update_expiry_buckets(&shared);
        }
        turn = turn.wrapping_add(1);
        // Picks up a CRL that appeared after start (`revoke` writes HOME/crl.pem); a CRL file
        // that was there at start and is gone is an error, never "no CRL".
        let mut paths = shared.tls_paths.clone();
        if paths.crl.is_none() {
            paths.crl = shared.config.crl_path();
        }
        let fp = paths.fingerprint();
        if fp != shared.tls.load().fingerprint && Some(&fp) != last_failed.as_ref() {
            let outcome = reload(&shared, &paths);
            shared.metrics.reload(outcome);
            last_failed = (outcome != Reload::Loaded).then_some(fp);
        }
        update_gauges(&shared);
    }
}

fn reload(shared: &Shared, paths: &tls::TlsPaths) -> Reload {
    match tls::build(paths) {
        Ok(state) if tls::crl_replayed(shared.tls.load().crl.as_ref(), state.crl.as_ref()) => {
            let number = |c: Option<&tls::CrlInfo>| c.and_then(|c| c.number).unwrap_or(0);
            error!(
                loaded = number(shared.tls.load().crl.as_ref()),
                offered = number(state.crl.as_ref()),
                "CRL refused: its number is lower than the loaded CRL's (an old CRL replayed?); keeping the loaded one"
            );
            Reload::Replayed
        }
        Ok(state) => {
            match &state.crl {
                Some(crl) => info!("TLS configuration reloaded; {crl}"),
                None => info!("TLS configuration reloaded; no CRL"),
            }
            shared.tls.store(Arc::new(state));
            Reload::Loaded
        }
        Err(e) => {
            error!(error = %e, "TLS reload refused; keeping the previous configuration");
            Reload::Rejected
        }
    }
}

/// Bounds of the certificate-expiry buckets of live sessions (labels: `EXPIRY_LABELS`).
const EXPIRY_DAYS: [i64; 5] = [1, 7, 30, 90, 365];

/// Counts the live sessions by how soon their certificates expire (the devices to rotate).
pub(crate) fn update_expiry_buckets(shared: &Shared) {
    let bounds = EXPIRY_DAYS.map(|d| d * 86_400);
    let counts = shared.sessions.expiry_buckets(now_unix(), &bounds);
    for (label, n) in EXPIRY_LABELS.iter().zip(counts) {
        shared.metrics.sessions_cert_expiry.with_label_values(&[label]).set(n);
    }
}

/// Sets the CRL and certificate-expiry gauges from the TLS state in force.
pub(crate) fn update_gauges(shared: &Shared) {
    let now = now_unix();
    let state = shared.tls.load();
    let m = &shared.metrics;
    m.crl_number
        .set(state.crl.as_ref().and_then(|c| c.number).map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    match &state.crl {
        Some(crl) => {
            m.crl_age_seconds.set(now - crl.this_update);
            m.crl_next_update_seconds.set(crl.next_update.map_or(i64::MAX, |n| n - now));
            m.crl_expired.set(i64::from(crl.expired(now)));
        }
        None => m.crl_expired.set(0),
    }
    m.cert_expiry_days.with_label_values(&["server"]).set((state.server_not_after - now) / 86_400);
    m.cert_expiry_days.with_label_values(&["client_ca"]).set((state.client_ca_not_after - now) / 86_400);
}
