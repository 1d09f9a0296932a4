//! The admin listener: connections through the same gate as MQTT ([`Gate::pass`]), then role
//! `operator`; handshakes capped per source and shared fairly ([`FairShare`]), operators'
//! connections capped per source and per certificate, each served with hyper's header and idle
//! timeouts and attached to the session table by serial (the revocation feed cuts it).
//!
//! [`Gate::pass`]: crate::gate::Gate::pass

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fleet_registry::Role;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info};

use super::error::{ApiCode, ApiError};
use super::state::{Admin, Caller};
use crate::caps::{FairShare, FairSlot, Source, Tally};
use crate::config::Config;
use crate::gate::Admission;
use crate::observe::metrics::AdminDenial;
use crate::outcome::Refusal;
use crate::sessions::Kick;
use crate::tls::Tls;

/// The listener's caps.
#[derive(Debug, Default)]
struct Caps {
    handshakes: Arc<FairShare>,
    sources: Arc<Tally<Source>>,
    identities: Arc<Tally<String>>,
}

/// Accepts admin connections on `listener` until the broker stops, serving `router` to the
/// operators among them.
pub(crate) async fn run(admin: Admin, router: axum::Router, listener: TcpListener) {
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
            _ = admin.shutdown.cancelled() => return,
        };
        // Closed at once, not queued: a source holds at most its share of the handshake slots.
        let source = Source::of(addr.ip());
        let config = &admin.config;
        let Some(slot) =
            caps.handshakes.enter(source, config.max_pre_admission_per_source, config.admin_handshakes)
        else {
            admin.observe.metrics().admin_denied(AdminDenial::HandshakeShare);
            debug!(peer = %addr, "admin connection refused: this address holds its share of the handshakes");
            continue;
        };
        let conn_id = next_conn.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(admin.clone(), router.clone(), caps.clone(), sock, addr, slot, conn_id));
    }
}

/// One admin connection: the gate, the role, the caps, then HTTP until it ends or is cut.
async fn connection(
    admin: Admin,
    router: axum::Router,
    caps: Arc<Caps>,
    sock: TcpStream,
    addr: SocketAddr,
    slot: FairSlot,
    conn_id: u64,
) {
    let metrics = admin.observe.metrics();
    let Admission { tls, cert, verdict } = match Box::pin(admin.gate.pass(sock, addr)).await {
        Ok(a) => a,
        // Counted as MQTT's are, but not recorded as events: browsers open spare connections
        // and close them unused (`peer_closed`), which would fill the console's own feed.
        Err(Some(refusal)) => {
            metrics.refused(refusal);
            return debug!(peer = %addr, reason = refusal.label(), "admin TLS handshake refused");
        }
        Err(None) => return,
    };
    // Until the one answer is written, a refused client keeps its handshake slot.
    let id = match verdict {
        Ok(id) if id.role == Role::Operator => id,
        Ok(id) => {
            admin.gate.refused(Refusal::WrongRole, addr, Some(&cert));
            metrics.admin_denied(AdminDenial::NotOperator);
            info!(peer = %addr, who = %id.id, role = id.role.as_str(), "admin API: not an operator");
            let message = format!("the certificate is a {}'s: operators only", id.role.as_str());
            return answer_once(&admin, tls, ApiError::new(ApiCode::Forbidden, message)).await;
        }
        Err(refusal) => {
            admin.gate.refused(refusal, addr, Some(&cert));
            metrics.admin_denied(AdminDenial::Refused);
            info!(peer = %addr, reason = refusal.label(), "admin API: certificate refused");
            return answer_once(&admin, tls, ApiError::refused(refusal)).await;
        }
    };
    drop(slot);
    let config = &admin.config;
    let Some(_by_source) = caps.sources.enter(Source::of(addr.ip()), config.admin_max_connections_per_source)
    else {
        metrics.admin_denied(AdminDenial::SourceLimit);
        let message = "too many admin connections from this address";
        return answer_once(&admin, tls, ApiError::new(ApiCode::TooManyConnections, message)).await;
    };
    let Some(_by_identity) =
        caps.identities.enter(id.id.to_string(), config.admin_max_connections_per_identity)
    else {
        metrics.admin_denied(AdminDenial::IdentityLimit);
        let message = "too many admin connections of this operator";
        return answer_once(&admin, tls, ApiError::new(ApiCode::TooManyConnections, message)).await;
    };
    let kick = Kick::under(&admin.shutdown);
    let serial = id.serial.clone();
    admin.sessions.attach(&serial, conn_id, &kick);
    metrics.admin_connections.inc();
    let caller = Arc::new(Caller { addr, id, cert });
    serve_http(&admin.config, router, tls, caller, &kick).await;
    metrics.admin_connections.dec();
    admin.sessions.detach(&serial, conn_id);
    if kick.reason().is_some() {
        info!(peer = %addr, %serial, "admin connection cut: its certificate was revoked");
    }
}

/// HTTP/1.1 on an operator's connection until the client leaves, the header or idle timeout
/// passes, or `kick` cuts it (revocation, shutdown).
async fn serve_http(config: &Config, router: axum::Router, tls: Box<Tls>, caller: Arc<Caller>, kick: &Kick) {
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
        .header_read_timeout(config.admin_header_timeout())
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let idle = config.admin_idle_timeout();
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

/// One answer on a connection that will not be served, then close_notify; what the client
/// sent meanwhile (its request) is read and dropped for a moment, so that closing with unread
/// bytes does not reset the connection before the client read the answer.
async fn answer_once(admin: &Admin, mut tls: Box<Tls>, error: ApiError) {
    let (status, body) = (error.code.status(), error.body().to_string());
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
    if !matches!(tokio::time::timeout(admin.config.write_timeout(), write).await, Ok(Ok(()))) {
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
