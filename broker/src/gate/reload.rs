//! The gate's TLS material while the broker runs: rebuilt when its files change (never to an
//! older CRL, never to a CRL whose signature fails: the loaded configuration stays), and the
//! gauges that follow it (CRL age and number, certificate expiry).

use std::sync::Arc;

use tracing::{error, info};

use super::Gate;
use crate::clock::now_unix;
use crate::observe::metrics::Reload;
use crate::tls;

impl Gate {
    /// Rebuilds the TLS configuration if its files changed since the last attempt that
    /// failed (`last_failed`, kept by the caller between calls).
    pub(crate) fn reload_if_changed(&self, last_failed: &mut Option<Vec<Option<std::time::SystemTime>>>) {
        // Picks up a CRL that appeared after start (`revoke` writes HOME/crl.pem); a CRL file
        // that was there at start and is gone is an error, never "no CRL".
        let mut paths = self.tls_paths.clone();
        if paths.crl.is_none() {
            paths.crl = self.config.crl_path();
        }
        let fp = paths.fingerprint();
        if fp != self.tls.load().fingerprint && Some(&fp) != last_failed.as_ref() {
            let outcome = self.reload(&paths);
            self.observe.metrics().reload(outcome);
            *last_failed = (outcome != Reload::Loaded).then_some(fp);
        }
    }

    fn reload(&self, paths: &tls::TlsPaths) -> Reload {
        match tls::build(paths) {
            Ok(state) if tls::crl_replayed(self.tls.load().crl.as_ref(), state.crl.as_ref()) => {
                let number = |c: Option<&tls::CrlInfo>| c.and_then(|c| c.number).unwrap_or(0);
                error!(
                    loaded = number(self.tls.load().crl.as_ref()),
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
                self.tls.store(Arc::new(state));
                Reload::Loaded
            }
            Err(e) => {
                error!(error = %e, "TLS reload refused; keeping the previous configuration");
                Reload::Rejected
            }
        }
    }

    /// Sets the CRL and certificate-expiry gauges from the TLS state in force.
    pub(crate) fn update_gauges(&self) {
        let now = now_unix();
        let state = self.tls.load();
        let m = self.observe.metrics();
        m.crl_number.set(
            state.crl.as_ref().and_then(|c| c.number).map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        );
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
}
