//! The admin API and operator console: HTTPS on `admin_listen`, admitted by the same gate as
//! MQTT ([`crate::session::admit::gate`]: handshake with its deadline, the certificate's
//! identity, the CRL policy, the revocation feed, the admission cache and the registry), then
//! one more rule: the identity's role must be `operator`.
//!
//! - **Before TLS**: handshakes in progress are capped (`admin_handshakes`), each source (IPv6:
//!   a /64) to `max_pre_admission_per_source` and to its fair share ([`FairShare`]), so silent
//!   sockets from a few addresses cannot lock operators out.
//! - **After TLS**: an identity the gate refuses, or one that is not an operator's, gets one
//!   answer (403, or 503 when the broker cannot decide) and the connection is closed: only an
//!   operator keeps a connection. Operators' connections are capped per certificate and per
//!   source.
//! - **While open**: every request asks the gate again ([`auth::Op`]); the revocation feed cuts
//!   an operator's connections as it cuts MQTT sessions (they are attached to the session
//!   table by serial); a request's headers must come within `admin_header_timeout_secs`, and a
//!   connection that moves no byte for `admin_idle_timeout_secs` is closed.
//! - **State changes** need a same-origin JSON request with the `X-Fleetgate-Request` header
//!   ([`auth`]), so a page on another origin cannot use the operator's browser.

mod api;
mod auth;
mod feed;
mod page;
pub(crate) mod views;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use fleet_registry::{Registry, Role};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth::Identity;
use crate::listener::{FairShare, FairSlot, Source, Tally};
use crate::metrics::AdminDenial;
use crate::outcome::Refusal;
use crate::session::admit::{self, Admission};
use crate::session::table::Kick;
use crate::session::Tls;
use crate::Shared;

/// Who is on the other end of an admitted admin connection (an extension of every request).
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) addr: SocketAddr,
    /// The operator, as the gate admitted it at the handshake.
    pub(crate) id: Identity,
    /// The certificate, for the gate's check at every request.
    pub(crate) cert: Vec<u8>,
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
    /// Live event streams, in all and per operator.
    pub(crate) streams: Arc<feed::Streams>,
    /// The registry's revocations read so far, for the CRL health check (read incrementally).
    pub(crate) revocations: Arc<std::sync::Mutex<api::Revocations>>,
}

impl Admin {
    /// The organisation the console names: `org_name`, else the client CA's O, else none.
    pub(crate) fn organisation(&self) -> Option<String> {
        self.shared.config.org_name.clone().or_else(|| self.shared.tls.load().client_ca_org.clone())
    }
}

/// The listener's caps.
#[derive(Debug, Default)]
struct Caps {
    handshakes: Arc<FairShare>,
    sources: Arc<Tally<Source>>,
    identities: Arc<Tally<String>>,
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
    let admin = Admin {
        shared: shared.clone(),
        writer,
        node,
        log_check: Arc::default(),
        streams: Arc::default(),
        revocations: Arc::default(),
    };
    let router = api::router(admin);
    let caps = Arc::new(Caps::default());
    let next_conn = AtomicU64::new(1);
    loop {
        let (sock, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        // Closed at once, not queued: a source holds at most its share of the handshake slots.
        let source = Source::of(addr.ip());
        let config = &shared.config;
        let Some(slot) =
            caps.handshakes.enter(source, config.max_pre_admission_per_source, config.admin_handshakes)
        else {
            shared.metrics.admin_denied(AdminDenial::HandshakeShare);
            debug!(peer = %addr, "admin connection refused: this address holds its share of the handshakes");
            continue;
        };
        let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(shared.clone(), router.clone(), caps.clone(), sock, addr, slot, conn_id));
    }
}

/// One admin connection: the gate, the role, the caps, then HTTP until it ends or is cut.
async fn connection(
    shared: Arc<Shared>,
    router: axum::Router,
    caps: Arc<Caps>,
    sock: TcpStream,
    addr: SocketAddr,
    slot: FairSlot,
    conn_id: u64,
) {
    let Admission { tls, cert, verdict } = match Box::pin(admit::gate(&shared, sock, addr)).await {
        Ok(a) => a,
        // Counted as MQTT's are, but not recorded as events: browsers open spare connections
        // and close them unused (`peer_closed`), which would fill the console's own feed.
        Err(Some(refusal)) => {
            shared.metrics.refused(refusal);
            return debug!(peer = %addr, reason = refusal.label(), "admin TLS handshake refused");
        }
        Err(None) => return,
    };
    // Until the one answer is written, a refused client keeps its handshake slot.
    let id = match verdict {
        Ok(id) if id.role == Role::Operator => id,
        Ok(id) => {
            shared.refused(Refusal::WrongRole, addr, Some(&cert));
            shared.metrics.admin_denied(AdminDenial::NotOperator);
            info!(peer = %addr, who = %id.id, role = id.role.as_str(), "admin API: not an operator");
            let message = format!("the certificate is a {}'s: operators only", id.role.as_str());
            return answer_once(&shared, tls, StatusCode::FORBIDDEN, "forbidden", &message).await;
        }
        Err(refusal) => {
            shared.refused(refusal, addr, Some(&cert));
            shared.metrics.admin_denied(AdminDenial::Refused);
            info!(peer = %addr, reason = refusal.label(), "admin API: certificate refused");
            let (status, code) = refused_status(refusal);
            return answer_once(&shared, tls, status, code, &refused_message(refusal)).await;
        }
    };
    drop(slot);
    let config = &shared.config;
    let Some(_by_source) = caps.sources.enter(Source::of(addr.ip()), config.admin_max_connections_per_source)
    else {
        shared.metrics.admin_denied(AdminDenial::SourceLimit);
        let message = "too many admin connections from this address";
        return answer_once(&shared, tls, StatusCode::TOO_MANY_REQUESTS, "too_many_connections", message)
            .await;
    };
    let Some(_by_identity) =
        caps.identities.enter(id.id.to_string(), config.admin_max_connections_per_identity)
    else {
        shared.metrics.admin_denied(AdminDenial::IdentityLimit);
        let message = "too many admin connections of this operator";
        return answer_once(&shared, tls, StatusCode::TOO_MANY_REQUESTS, "too_many_connections", message)
            .await;
    };
    let kick = Kick::under(&shared.shutdown);
    let serial = id.serial.clone();
    shared.sessions.attach(&serial, conn_id, &kick);
    shared.metrics.admin_connections.inc();
    let caller = Arc::new(Caller { addr, id, cert });
    serve_http(&shared, router, tls, caller, &kick).await;
    shared.metrics.admin_connections.dec();
    shared.sessions.detach(&serial, conn_id);
    if kick.reason().is_some() {
        info!(peer = %addr, %serial, "admin connection cut: its certificate was revoked");
    }
}

/// HTTP/1.1 on an operator's connection until the client leaves, the header or idle timeout
/// passes, or `kick` cuts it (revocation, shutdown).
async fn serve_http(shared: &Shared, router: axum::Router, tls: Box<Tls>, caller: Arc<Caller>, kick: &Kick) {
    let (start, peer) = (Instant::now(), caller.addr);
    let moved = Arc::new(AtomicU64::new(0));
    let io = Watched { io: tls, start, moved: moved.clone() };
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(caller.clone());
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.admin_header_timeout())
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let idle = shared.config.admin_idle_timeout();
    loop {
        let quiet = start.elapsed().saturating_sub(Duration::from_millis(moved.load(Ordering::Relaxed)));
        if quiet >= idle {
            debug!(%peer, "admin connection idle: closed");
            return;
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "admin connection ended");
                }
                return;
            }
            _ = kick.cut_done() => return,
            _ = tokio::time::sleep(idle.saturating_sub(quiet)) => {}
        }
    }
}

/// The status and code of an answer to a refused certificate: 503 where MQTT says "server
/// unavailable" (the broker cannot decide now), 403 otherwise.
pub(crate) fn refused_status(refusal: Refusal) -> (StatusCode, &'static str) {
    if refusal == Refusal::RegistryUnavailable {
        // As every other endpoint says it when the registry cannot be asked.
        return (StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable");
    }
    match refusal.connack() {
        rumqttc::mqttbytes::v4::ConnectReturnCode::ServiceUnavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        _ => (StatusCode::FORBIDDEN, "forbidden"),
    }
}

/// The message of that answer.
pub(crate) fn refused_message(refusal: Refusal) -> String {
    format!("certificate refused ({}): operators with a valid certificate only", refusal.label())
}

/// One answer on a connection that will not be served, then close_notify; what the client
/// sent meanwhile (its request) is read and dropped for a moment, so that closing with unread
/// bytes does not reset the connection before the client read the answer.
async fn answer_once(shared: &Shared, mut tls: Box<Tls>, status: StatusCode, code: &str, message: &str) {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let write = async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body.as_bytes()).await?;
        tls.shutdown().await
    };
    if !matches!(tokio::time::timeout(shared.config.write_timeout(), write).await, Ok(Ok(()))) {
        return;
    }
    let linger = async {
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
            match tls.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
}

/// A connection's stream, noting when it last moved a byte either way (milliseconds since
/// `start`): the idle timeout's clock. A client that stops reading moves nothing, so its
/// connection ends too.
struct Watched {
    io: Box<Tls>,
    start: Instant,
    moved: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
