//! The accept loop: never blocks on a handshake (that runs in the connection's own task), caps
//! connections in total and per source address before admission, backs off when accept fails
//! (EMFILE), and stops on shutdown.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::log_limit::LogLimiter;
use crate::metrics::Limit;
use crate::outcome::Refusal;
use crate::{session, Shared};

/// Connections per source address still in the pre-admission phase (TLS handshake + CONNECT):
/// one address cannot hold more than `max_pre_admission_per_source` of the broker's connection
/// slots with sockets that never authenticate.
#[derive(Debug, Default)]
pub(crate) struct PreAdmission {
    inner: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection counted in [`PreAdmission`] until dropped (at admission or when it ends).
#[derive(Debug)]
pub(crate) struct PreAdmissionSlot {
    table: Arc<PreAdmission>,
    ip: IpAddr,
}

impl PreAdmission {
    /// Counts a connection from `ip`, or `None` if `ip` already has `max` in the phase.
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PreAdmissionSlot> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PreAdmissionSlot { table: self.clone(), ip })
    }
}

impl Drop for PreAdmissionSlot {
    fn drop(&mut self) {
        let mut m = self.table.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A connection's place under `max_connections` and in `fleet_connections_open`, from accept
/// until it closes (whichever task holds it then).
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    gauge: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ConnectionSlot {
    fn new(metrics: &crate::Metrics, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics.connections_open.inc();
        Self { gauge: metrics.connections_open.clone(), _permit: permit }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts a connection refused by the per-source pre-admission cap.
pub(crate) fn source_limited(shared: &Shared) {
    shared.metrics.rejected_at_accept(Refusal::SourceLimit);
    shared.metrics.limit(Limit::PerSource);
}

/// Accepts until shutdown, spawning one task per connection on `tracker`.
pub(crate) async fn run(shared: &Arc<Shared>, listener: TcpListener, tracker: &TaskTracker) {
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let pre_admission = Arc::new(PreAdmission::default());
    let mut source_limit_log = LogLimiter::new(shared.config.log_interval());
    let next_conn = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        // Behind a PROXY-protocol balancer the client's address is known only once its header
        // is read, in the connection's task (`session::serve`), which applies the cap then.
        let slot = if shared.config.proxy_protocol {
            None
        } else {
            match pre_admission.enter(peer.ip(), shared.config.max_pre_admission_per_source) {
                Some(s) => Some(s),
                None => {
                    source_limited(shared);
                    if let Some(skipped) = source_limit_log.allow() {
                        warn!(%peer, reason = Refusal::SourceLimit.label(), skipped, "connection refused: too many unauthenticated connections from this address");
                    }
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.rejected_at_accept(Refusal::MaxConnections);
            warn!(%peer, reason = Refusal::MaxConnections.label(), "connection refused: max_connections reached");
            continue;
        };
        let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
        let accepted = session::Accepted {
            sock,
            peer,
            conn_id,
            pre_admission: slot,
            sources: pre_admission.clone(),
            slot: ConnectionSlot::new(&shared.metrics, permit),
            tracker: tracker.clone(),
        };
        tracker.spawn(session::serve(shared.clone(), accepted));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_max_slots_and_gets_them_back() {
        let t = Arc::new(PreAdmission::default());
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let first = t.enter(a, 2).expect("1st");
        let _second = t.enter(a, 2).expect("2nd");
        assert!(t.enter(a, 2).is_none(), "third from the same address");
        assert!(t.enter(b, 2).is_some(), "another address is not affected");
        drop(first);
        assert!(t.enter(a, 2).is_some(), "a slot comes back when its connection moves on");
    }
}
