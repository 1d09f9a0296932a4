//! The admission gate: the one front door of both listeners (MQTT and the admin API), one rule
//! set. The TLS handshake's outcome, the identity in the certificate, the registry's verdict:
//! each step either yields what the next needs or a [`Refusal`]. [`Gate::pass`] runs them in
//! order; MQTT then binds CONNECT to the identity, the admin listener requires role `operator`
//! (and asks [`Gate::admit`] again at every request). Every refusal is counted and recorded
//! here ([`Gate::refused`]).
//!
//! The registry is asked once per certificate: verdicts of active certificates are kept in an
//! [`AdmissionCache`] fed by the revocation feed ([`cache`]). A revocation is therefore refused
//! from the moment the feed sees it (at once on PostgreSQL NOTIFY, within `revocation_poll_ms`
//! on SQLite), and a session admitted just before is cut by the feed ([`crate::sessions`]).
//!
//! The gate owns the TLS state (hot-swapped on reload, [`reload`]), the admission cache and
//! the reader admissions are asked of ([`lookup`]).

mod cache;
mod lookup;
mod reload;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use fleet_registry::{SerialNumber, Status};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::auth::{self, Identity};
use crate::clock::now_unix;
use crate::config::{Config, CrlPolicy};
use crate::fabric::Fabric;
use crate::observe::events::{Event, Kind};
use crate::observe::Observe;
use crate::outcome::Refusal;
use crate::sessions::Sessions;
use crate::tls::{self, Tls, TlsPaths, TlsState};
use cache::AdmissionCache;
pub(crate) use lookup::Lookups;

/// The admission gate.
#[derive(Debug)]
pub(crate) struct Gate {
    config: Arc<Config>,
    /// The TLS files found at start (a CRL that appears later is picked up too).
    tls_paths: TlsPaths,
    tls: ArcSwap<TlsState>,
    /// The registry's verdicts, batched ([`lookup`]).
    lookups: Lookups,
    admissions: AdmissionCache,
    /// Serials the revocation feed reported (`is_revoked`).
    sessions: Arc<Sessions>,
    /// Whether the node can route and store now.
    fabric: Fabric,
    observe: Observe,
    shutdown: CancellationToken,
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

/// What the gate is built from.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) config: Arc<Config>,
    pub(crate) tls_paths: TlsPaths,
    pub(crate) tls: TlsState,
    pub(crate) lookups: Lookups,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) fabric: Fabric,
    pub(crate) observe: Observe,
    pub(crate) shutdown: CancellationToken,
}

impl Gate {
    /// A gate with an empty admission cache.
    pub(crate) fn new(p: Parts) -> Self {
        Self {
            config: p.config,
            tls_paths: p.tls_paths,
            tls: ArcSwap::from_pointee(p.tls),
            lookups: p.lookups,
            admissions: AdmissionCache::default(),
            sessions: p.sessions,
            fabric: p.fabric,
            observe: p.observe,
            shutdown: p.shutdown,
        }
    }

    /// The TLS state in force (certificate, client CA, CRL).
    pub(crate) fn tls(&self) -> Guard<Arc<TlsState>> {
        self.tls.load()
    }

    /// The revocation feed polled the registry successfully just now.
    pub(crate) fn feed_ok(&self) {
        self.admissions.feed_ok();
    }

    /// Forgets the cached verdict of a revoked certificate.
    pub(crate) fn forget(&self, serial: &SerialNumber) {
        self.admissions.revoked(serial);
    }

    /// The TLS handshake, with its deadline. `Err(None)`: the broker is stopping. The stream is
    /// returned boxed and this future is awaited boxed: an `async fn` keeps a slot for every
    /// value it moves (the handshake future, the stream it yields, the connection holding it),
    /// and a connection task that carries all three for its whole life costs ~2 KiB more per
    /// idle session.
    async fn handshake(&self, sock: TcpStream, peer: SocketAddr) -> Result<Box<Tls>, Option<Refusal>> {
        let _ = sock.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.load().config.clone());
        tokio::select! {
            r = timeout(self.config.handshake_timeout(), acceptor.accept(sock)) => match r {
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
            _ = self.shutdown.cancelled() => Err(None),
        }
    }

    /// The handshake within its deadline, the client certificate, then [`Gate::admit`].
    /// `Err(Some)`: no TLS session (nothing to answer on); `Err(None)`: the broker is stopping.
    /// Each step's future is boxed (see [`Gate::handshake`]).
    pub(crate) async fn pass(&self, sock: TcpStream, peer: SocketAddr) -> Result<Admission, Option<Refusal>> {
        let tls = Box::pin(self.handshake(sock, peer)).await?;
        let cert = peer_certificate(&tls).map_err(Some)?;
        let verdict = Box::pin(self.admit(&cert)).await;
        Ok(Admission { tls, cert, verdict })
    }

    /// The identity in `cert`, if the CRL policy, the revocation feed and the registry admit it.
    pub(crate) async fn admit(&self, cert: &[u8]) -> Result<Identity, Refusal> {
        let id = auth::identify(cert).map_err(|e| e.refusal())?;
        let crl_expired = self.tls.load().crl.as_ref().is_some_and(|c| c.expired(now_unix()));
        if crl_expired && self.config.crl_policy == CrlPolicy::FailClosed {
            return Err(Refusal::CrlExpired);
        }
        if !self.fabric.connected() {
            return Err(Refusal::ClusterUnavailable);
        }
        if self.sessions.is_revoked(&id.serial) {
            return Err(Refusal::Revoked);
        }
        let metrics = self.observe.metrics();
        if let Some((device_id, role)) = self.admissions.get(&id.serial) {
            metrics.admission_cache(true);
            return if device_id == id.id && role == id.role { Ok(id) } else { Err(Refusal::BadIdentity) };
        }
        metrics.admission_cache(false);
        match self.lookups.admission(&id.serial).await {
            // Logged by the reader, once per failed read.
            Err(()) => Err(Refusal::RegistryUnavailable),
            Ok(None) => Err(Refusal::UnknownDevice),
            Ok(Some(a)) if a.device_id != id.id || a.role != id.role => Err(Refusal::BadIdentity),
            Ok(Some(a)) if a.device_status == Status::Revoked || a.cert_status == Status::Revoked => {
                Err(Refusal::Revoked)
            }
            Ok(Some(a)) => {
                self.admissions.insert(id.serial.clone(), a.device_id, a.role);
                Ok(id)
            }
        }
    }

    /// A connection refused: counted, and recorded with the identity its certificate names.
    pub(crate) fn refused(&self, why: Refusal, peer: SocketAddr, cert: Option<&[u8]>) {
        self.observe.metrics().refused(why);
        let mut e = Event::new(Kind::Refused, why.label(), peer);
        if let Some(der) = cert {
            match auth::identify(der) {
                Ok(id) => e = e.of(id.id.as_str(), id.serial.to_hex()),
                Err(_) => e.serial = Some(serial_hex(der)).filter(|s| !s.is_empty()),
            }
        }
        self.observe.events().record(e);
    }
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

/// The serial of a certificate as hex, for the log line of a refused one ("" if unreadable).
pub(crate) fn serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| SerialNumber::from_bytes(c.raw_serial()))
        .map(|s| s.to_hex())
        .unwrap_or_default()
}
