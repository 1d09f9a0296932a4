//! The admin API and operator console: HTTPS on `admin_listen`, with the broker's certificate,
//! the same client-certificate checks as MQTT (chain to the device CA, validity, EKU, CRL) and
//! the registry's verdict, then one more: the identity's role must be `operator`. Devices,
//! services and revoked operators get 403 on every path; a certificate from another CA, or
//! none, does not complete the handshake.
//!
//! Handshakes run in their own tasks (at most `HANDSHAKES` at once and
//! `max_pre_admission_per_source` per address, each with the broker's handshake deadline; more
//! are closed at accept) and hand finished connections to axum through [`AdminListener`], so a
//! slow or silent client never holds up the next one.

mod api;
mod feed;
mod page;
pub(crate) mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use fleet_registry::{Registry, Role, Status};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::auth::{self, Identity};
use crate::listener::PreAdmission;
use crate::Shared;

/// Handshakes in progress at once; more connections wait for a slot.
const HANDSHAKES: usize = 64;

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// The operator, or why the identity may not use the API.
    pub(crate) who: Result<Identity, &'static str>,
}

impl Connected<IncomingStream<'_, AdminListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Verified TLS connections, for axum.
pub(crate) struct AdminListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl axum::serve::Listener for AdminListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop ended (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, who: Err("local") })
    }
}

/// The API's state: the broker, and the registry revocations are written through.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) shared: Arc<Shared>,
    pub(crate) writer: Registry,
    /// This node, as the API names it (its MQTT listen address).
    pub(crate) node: String,
    /// The last issuance-log check: (unix seconds, its JSON).
    pub(crate) log_check: Arc<std::sync::Mutex<Option<(i64, serde_json::Value)>>>,
}

/// Serves the admin API on `listener` until the broker stops.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, node: String) {
    let writer = match &shared.config.admin_database_url {
        Some(url) => match Registry::open_existing(url, shared.config.registry_timeout()).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "admin API off: admin_database_url cannot be opened");
                return;
            }
        },
        None => shared.registry.clone(),
    };
    let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (tx, ready) = mpsc::channel(HANDSHAKES);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(accept_loop(shared.clone(), listener, tx));
    let admin = Admin { shared, writer, node, log_check: Arc::default() };
    let app = api::router(admin).into_make_service_with_connect_info::<Peer>();
    let server =
        axum::serve(AdminListener { ready, local }, app).with_graceful_shutdown(shutdown.cancelled_owned());
    if let Err(e) = server.await {
        warn!(error = %e, "admin API stopped");
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    ready: mpsc::Sender<(TlsStream<TcpStream>, Peer)>,
) {
    let slots = Arc::new(Semaphore::new(HANDSHAKES));
    let sources = Arc::new(PreAdmission::default());
    loop {
        let (sock, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        // Closed at once, not queued: one address may hold `max_pre_admission_per_source`
        // handshakes, all addresses `HANDSHAKES`, so silent sockets cannot lock operators out.
        let Some(source) = sources.enter(addr.ip(), shared.config.max_pre_admission_per_source) else {
            debug!(peer = %addr, "admin connection refused: too many handshakes from this address");
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(peer = %addr, "admin connection refused: too many handshakes");
            continue;
        };
        let (shared, ready) = (shared.clone(), ready.clone());
        tokio::spawn(async move {
            let held = (permit, source);
            let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.load().config.clone());
            let tls = match tokio::time::timeout(shared.config.handshake_timeout(), acceptor.accept(sock))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    // Counted and recorded like the MQTT listener's refusals.
                    let why = crate::tls::refusal(&e);
                    shared.refused(why, addr, None);
                    return info!(peer = %addr, reason = why.label(), error = %e, "admin TLS handshake refused");
                }
                Err(_) => return debug!(peer = %addr, "admin TLS handshake timed out"),
            };
            let who = operator(&shared, &tls).await;
            if let Err(why) = &who {
                info!(peer = %addr, why, "admin API: not an operator");
            }
            drop(held);
            let _ = ready.send((tls, Peer { addr, who })).await;
        });
    }
}

/// Why an operator could not be admitted when the registry could not be asked: the API answers
/// 503 for it (the caller may be an operator), never 403.
pub(crate) const REGISTRY_UNAVAILABLE: &str = "the registry is unavailable";

/// The operator the verified client certificate names, if the registry admits it.
async fn operator(shared: &Shared, tls: &TlsStream<TcpStream>) -> Result<Identity, &'static str> {
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
    let id = auth::identify(cert).map_err(|_| "the certificate names no fleetgate identity")?;
    if id.role != Role::Operator {
        return Err("the certificate is not an operator's");
    }
    match shared.registry.admission(&id.serial).await {
        Err(_) => Err(REGISTRY_UNAVAILABLE),
        Ok(None) => Err("the certificate is not in the registry"),
        Ok(Some(a)) if a.device_id != id.id || a.role != Role::Operator => Err("the registry disagrees"),
        Ok(Some(a)) if a.device_status == Status::Revoked || a.cert_status == Status::Revoked => {
            Err("the certificate is revoked")
        }
        Ok(Some(_)) => Ok(id),
    }
}
