//! Registry verdicts of active certificates, so an admission needs no database round trip.
//!
//! An entry is used only while the revocation feed's last successful poll is recent
//! (`FEED_FRESH_MS`): if the registry or the feed is down, admissions go back to the database
//! and fail closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use fleet_registry::{DeviceId, Role, SerialNumber};

use crate::clock::now_millis;

/// How long after the feed's last successful poll the cache is trusted.
const FEED_FRESH_MS: i64 = 5_000;
/// Most cached verdicts (about 100 bytes each); the cache starts over when full.
const ADMISSION_CACHE_MAX: usize = 200_000;

/// Registry verdicts for active certificates.
#[derive(Debug, Default)]
pub(crate) struct AdmissionCache {
    entries: Mutex<HashMap<SerialNumber, (DeviceId, Role)>>,
    /// Unix milliseconds of the feed's last successful poll.
    feed_ok_ms: AtomicI64,
}

impl AdmissionCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<SerialNumber, (DeviceId, Role)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The feed polled the registry successfully just now.
    pub(crate) fn feed_ok(&self) {
        self.feed_ok_ms.store(now_millis(), Ordering::Relaxed);
    }

    /// Forgets a revoked certificate.
    pub(crate) fn revoked(&self, serial: &SerialNumber) {
        self.lock().remove(serial);
    }

    pub(crate) fn get(&self, serial: &SerialNumber) -> Option<(DeviceId, Role)> {
        let fresh = now_millis() - self.feed_ok_ms.load(Ordering::Relaxed) < FEED_FRESH_MS;
        if !fresh {
            return None;
        }
        self.lock().get(serial).cloned()
    }

    pub(crate) fn insert(&self, serial: SerialNumber, id: DeviceId, role: Role) {
        let mut m = self.lock();
        if m.len() >= ADMISSION_CACHE_MAX {
            m.clear();
        }
        m.insert(serial, (id, role));
    }
}
