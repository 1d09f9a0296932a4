//! Admission: the TLS handshake's outcome, the identity in the certificate, the registry's
//! verdict. Each step either yields what the next needs or a [`Refusal`]. [`gate`] runs them in
//! order and is the one front door of both listeners: MQTT then binds CONNECT to the identity,
//! the admin listener requires role `operator` (and asks [`admit`] again at every request).
//!
//! The registry is asked once per certificate: verdicts of active certificates are kept in an
//! [`AdmissionCache`] fed by the revocation feed. An entry is used only while the feed's last
//! successful poll is recent (`FEED_FRESH_MS`): if the registry or the feed is down, admissions
//! go back to the database and fail closed. A revocation is therefore refused from the moment the
//! feed sees it (at once on PostgreSQL NOTIFY, within `revocation_poll_ms` on SQLite), and a
//! session admitted just before is cut by the feed ([`super::table`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use fleet_registry::{DeviceId, Role, SerialNumber, Status};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::Tls;
use crate::auth::{self, Identity};
use crate::config::CrlPolicy;
use crate::outcome::Refusal;
use crate::{now_millis, now_unix, tls, Shared};

/// How long after the feed's last successful poll the cache is trusted.
const FEED_FRESH_MS: i64 = 5_000;
/// Most cached verdicts (about 100 bytes each); the cache starts over when full.
const ADMISSION_CACHE_MAX: usize = 200_000;

/// Registry verdicts for active certificates, so an admission needs no database round trip.
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

    fn get(&self, serial: &SerialNumber) -> Option<(DeviceId, Role)> {
        let fresh = now_millis() - self.feed_ok_ms.load(Ordering::Relaxed) < FEED_FRESH_MS;
        if !fresh {
            return None;
        }
        self.lock().get(serial).cloned()
    }

    fn insert(&self, serial: SerialNumber, id: DeviceId, role: Role) {
        let mut m = self.lock();
        if m.len() >= ADMISSION_CACHE_MAX {
            m.clear();
        }
        m.insert(serial, (id, role));
    }
}

/// The TLS handshake, with its deadline. `Err(None)`: the broker is stopping. The stream is
/// returned boxed and this future is awaited boxed: an `async fn` keeps a slot for every value
/// it moves (the handshake future, the stream it yields, the connection holding it), and a
/// connection task that carries all three for its whole life costs ~2 KiB more per idle session.
pub(crate) async fn handshake(
    shared: &Shared,
    sock: TcpStream,
    peer: SocketAddr,
) -> Result<Box<Tls>, Option<Refusal>> {
    let _ = sock.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.load().config.clone());
    tokio::select! {
        r = timeout(shared.config.handshake_timeout(), acceptor.accept(sock)) => match r {
            Err(_) => {
                debug!(%peer, "handshake timed out");
                Err(Some(Refusal::HandshakeTimeout))
            }
            Ok(Err(e)) => {
                let why = tls::refusal(&e);
                info!(%peer, reason = why.label(), error = %e, "TLS handshake refused");
                Err(Some(why))
            }
            Ok(Ok(s)) => Ok(Box::new(s)),
        },
        _ = shared.shutdown.cancelled() => Err(None),
    }
}

/// A connection through the TLS handshake, with the gate's verdict on its certificate.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) tls: Box<Tls>,
    /// The client certificate (DER), for the refusal's log line and later re-checks.
    pub(crate) cert: Vec<u8>,
    /// The identity, if the CRL policy, the revocation feed and the registry admit it.
    pub(crate) verdict: Result<Identity, Refusal>,
}

/// The gate: the handshake within its deadline, the client certificate, then [`admit`].
/// `Err(Some)`: no TLS session (nothing to answer on); `Err(None)`: the broker is stopping.
/// Each step's future is boxed (see [`handshake`]).
pub(crate) async fn gate(
    shared: &Shared,
    sock: TcpStream,
    peer: SocketAddr,
) -> Result<Admission, Option<Refusal>> {
    let tls = Box::pin(handshake(shared, sock, peer)).await?;
    let cert = peer_certificate(&tls).map_err(Some)?;
    let verdict = Box::pin(admit(shared, &cert)).await;
    Ok(Admission { tls, cert, verdict })
}

/// The client certificate rustls verified (DER).
pub(crate) fn peer_certificate(tls: &Tls) -> Result<Vec<u8>, Refusal> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or(Refusal::NoCertificate)
}

/// The identity in `cert`, if the CRL policy, the revocation feed and the registry admit it.
pub(crate) async fn admit(shared: &Shared, cert: &[u8]) -> Result<Identity, Refusal> {
    let id = auth::identify(cert).map_err(|e| e.refusal())?;
    let crl_expired = shared.tls.load().crl.as_ref().is_some_and(|c| c.expired(now_unix()));
    if crl_expired && shared.config.crl_policy == CrlPolicy::FailClosed {
        return Err(Refusal::CrlExpired);
    }
    if shared.cluster.as_ref().is_some_and(|c| !c.connected()) {
        return Err(Refusal::ClusterUnavailable);
    }
    if shared.sessions.is_revoked(&id.serial) {
        return Err(Refusal::Revoked);
    }
    if let Some((device_id, role)) = shared.admissions.get(&id.serial) {
        shared.metrics.admission_cache(true);
        return if device_id == id.id && role == id.role { Ok(id) } else { Err(Refusal::BadIdentity) };
    }
    shared.metrics.admission_cache(false);
    match shared.registry.admission(&id.serial).await {
        Err(e) => {
            warn!(error = %e, "registry unavailable during admission");
            Err(Refusal::RegistryUnavailable)
        }
        Ok(None) => Err(Refusal::UnknownDevice),
        Ok(Some(a)) if a.device_id != id.id || a.role != id.role => Err(Refusal::BadIdentity),
        Ok(Some(a)) if a.device_status == Status::Revoked || a.cert_status == Status::Revoked => {
            Err(Refusal::Revoked)
        }
        Ok(Some(a)) => {
            shared.admissions.insert(id.serial.clone(), a.device_id, a.role);
            Ok(id)
        }
    }
}

/// The serial of a certificate as hex, for the log line of a refused one ("" if unreadable).
pub(crate) fn serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| SerialNumber::from_bytes(c.raw_serial()))
        .map(|s| s.to_hex())
        .unwrap_or_default()
}
