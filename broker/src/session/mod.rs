//! A connection in phases: the TLS handshake and admission ([`admit`]), CONNECT binding
//! ([`connect`]), then the MQTT session ([`handler`]) until the client leaves, the broker cuts it
//! ([`table`]: revocation, takeover) or the broker stops. [`conn`] owns the stream and its
//! buffers.
//!
//! Two tasks: one for the phases up to admission, and one, spawned at admission, for the live
//! session. A task's future is as large as its largest await point plus whatever the compiler
//! cannot overlap with it; in one task the session carried the admission phases' room for its
//! whole life (4.2 KiB of future, of which the session loop is 1.7 KiB). The admission task's
//! memory is reused by the next connection's.

pub(crate) mod admit;
pub(crate) mod conn;
pub(crate) mod connect;
pub(crate) mod handler;
pub(crate) mod park;
pub(crate) mod rate;
pub(crate) mod table;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use tokio_util::task::TaskTracker;

use crate::events::{Event, Kind};
use crate::listener::{ConnectionSlot, PreAdmission, PreAdmissionSlot};
use crate::outcome::Refusal;
use crate::outcome::{CloseCounter, CloseReason};
use crate::Shared;
use conn::Conn;
use table::{Kick, LiveSession};

pub(crate) type Tls = TlsStream<TcpStream>;

/// A TCP connection the listener let in.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) sock: TcpStream,
    pub(crate) peer: SocketAddr,
    /// Unique for the broker's life (router and session-table key).
    pub(crate) conn_id: u64,
    /// Its place in the source address's pre-admission share, given back at admission (`None`
    /// behind a PROXY-protocol balancer: taken once the header names the client).
    pub(crate) pre_admission: Option<PreAdmissionSlot>,
    /// The per-source table, for that.
    pub(crate) sources: Arc<PreAdmission>,
    /// Its place under `max_connections`, held until the connection ends.
    pub(crate) slot: ConnectionSlot,
    /// Where the live session's task is spawned (the broker waits for it at shutdown).
    pub(crate) tracker: TaskTracker,
}

/// The log limiter of refused PROXY headers, one per process (`log_interval_secs`).
fn proxy_log(shared: &Shared) -> &'static std::sync::Mutex<crate::log_limit::LogLimiter> {
    static LOG: std::sync::OnceLock<std::sync::Mutex<crate::log_limit::LogLimiter>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| std::sync::Mutex::new(crate::log_limit::LogLimiter::new(shared.config.log_interval())))
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(shared: Arc<Shared>, accepted: Accepted) {
    let Accepted { mut sock, peer, conn_id, pre_admission, sources, slot, tracker } = accepted;
    let (peer, pre_admission) = match pre_admission {
        Some(p) => (peer, p),
        None => {
            // A balancer sends its header as it connects: a peer that does not, holds no
            // connection slot for long (and never more than `proxy::MAX_HEADER` bytes).
            let deadline = shared.config.handshake_timeout().min(crate::proxy::HEADER_DEADLINE);
            let refused = |why: String| {
                // Rate-limited: anyone who reaches the port can make these.
                if let Some(skipped) = proxy_log(&shared).lock().unwrap_or_else(|p| p.into_inner()).allow() {
                    info!(%peer, reason = Refusal::ProxyHeader.label(), skipped, "connection refused: {why}");
                }
                shared.refused(Refusal::ProxyHeader, peer, None);
            };
            let client = match tokio::time::timeout(deadline, crate::proxy::read(&mut sock)).await {
                Ok(Ok(crate::proxy::Header::Proxied(client))) => client,
                Ok(Ok(crate::proxy::Header::Local)) => peer,
                Ok(Err(e)) => return refused(format!("no valid PROXY v2 header: {e}")),
                Err(_) => return refused(format!("no PROXY v2 header within {} s", deadline.as_secs_f64())),
            };
            match sources
                .enter(crate::listener::Source::of(client.ip()), shared.config.max_pre_admission_per_source)
            {
                Some(p) => (client, p),
                None => {
                    debug!(peer = %client, "connection refused: too many unauthenticated connections from this address");
                    return crate::listener::source_limited(&shared);
                }
            }
        }
    };
    // Boxed: the handshake and the registry query are big futures that are never live together
    // with the session loop, and a connection task should not carry them for its whole life.
    let admit::Admission { tls, cert, verdict: admission } =
        match Box::pin(admit::gate(&shared, sock, peer)).await {
            Ok(a) => a,
            Err(Some(refusal)) => return shared.refused(refusal, peer, None),
            Err(None) => return,
        };
    let mut conn = Conn::new(tls, shared.config.max_packet_size, shared.config.write_timeout());
    let bound = match connect::bind(&shared, &mut conn, admission).await {
        Ok(bound) => bound,
        Err((refused, connect)) => {
            return refused.finish(&shared, &mut conn, peer, &cert, connect.as_ref()).await
        }
    };
    drop(cert);
    drop(pre_admission);

    let id = bound.id;
    let kick = Kick::under(&shared.shutdown);
    let info = table::SessionInfo::new(peer, crate::now_millis());
    let live = LiveSession {
        conn_id,
        serial: id.serial.clone(),
        not_after: id.not_after,
        kick: kick.clone(),
        info: info.clone(),
    };
    let key = id.session_key();
    if let Some(old) = shared.sessions.register(&key, live) {
        info!(device = %id.id, "a new connection replaces the live session of this device");
        old.cut(CloseReason::Takeover);
    }
    // A revocation that landed between the admission query and registration is cut by
    // `register` (the feed reported it already) or by the feed (it reports it later).
    // In a cluster, a later session of the device on another node cuts this one.
    let _claim = match &shared.cluster {
        Some(cluster) => {
            let (kick, device) = (kick.clone(), id.id.clone());
            cluster
                .claim(&key, move || {
                    info!(%device, "a session on another node replaces this one");
                    kick.cut(CloseReason::Takeover);
                })
                .await
        }
        None => None,
    };
    shared.metrics.accepted();
    let admitted = Event::new(Kind::Admitted, "ok", peer).of(id.id.as_str(), id.serial.to_hex());
    shared.events.record(admitted);
    shared.metrics.sessions_live.inc();
    info!(%peer, device = %id.id, role = id.role.as_str(), serial = %id.serial, "session admitted");
    let live = Live {
        shared,
        conn,
        id,
        info,
        conn_id,
        keep_alive: bound.keep_alive,
        clean: bound.clean,
        kick,
        claim: _claim,
        slot,
    };
    tracker.spawn(live.run());
}

/// An admitted session, moving to its own task.
struct Live {
    shared: Arc<Shared>,
    conn: Conn,
    id: crate::auth::Identity,
    info: Arc<table::SessionInfo>,
    conn_id: u64,
    keep_alive: Duration,
    /// MQTT clean session (false: keep the session when the client leaves).
    clean: bool,
    kick: Kick,
    /// Held while the session lives (a cluster member listens for takeovers).
    claim: Option<crate::cluster::ClaimGuard>,
    /// Dropped when the session task ends.
    slot: ConnectionSlot,
}

impl Live {
    /// CONNACK, the session loop, then the clean-up.
    async fn run(self) {
        let Live { shared, mut conn, id, info, conn_id, keep_alive, clean, kick, claim, slot } = self;
        let ctx = handler::Ctx { shared: &shared, id, conn_id, keep_alive, kick, info };
        let key = ctx.id.session_key();
        // Clean session: whatever was kept goes. Otherwise the kept session resumes (present),
        // but only on the certificate that parked it: another certificate of the identity (a
        // re-keyed device, or a thief's copy of its old key) starts clean.
        let kept = shared.parked.take(&key);
        let resumed = match kept {
            Some(old) if clean => {
                park::discard(&shared, old, park::Discard::CleanStart);
                None
            }
            Some(old) if old.serial != ctx.id.serial => {
                info!(device = %ctx.id.id, parked_by = %old.serial, serial = %ctx.id.serial,
                    "kept session not resumed: parked by another certificate");
                park::discard(&shared, old, park::Discard::OtherCertificate);
                None
            }
            kept => kept,
        };
        shared.metrics.sessions_parked.set(shared.parked.len() as i64);
        let present = resumed.is_some();
        // Not a `match` scrutinee: the CONNACK's write future would then live (and take room
        // in this task) as long as the session. The loop is not boxed: a box per session costs
        // more than the room it would save.
        let connack = conn.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, present))).await;
        let (end, mut conn, mut state) = match connack {
            Ok(()) => handler::run(&ctx, conn, resumed, !clean).await,
            Err(end) => {
                let state = resumed.unwrap_or_else(|| park::Parked {
                    router_id: conn_id,
                    inbox: std::sync::Arc::new(crate::inbox::Inbox::new(1)),
                    subs: Default::default(),
                    in_flight: Vec::new(),
                    expires: std::time::Instant::now(),
                    serial: ctx.id.serial.clone(),
                    owner: ctx.id.id.to_string(),
                    claim: ctx.id.role == fleet_registry::Role::Claim,
                });
                (end, conn, state)
            }
        };
        let keep = !clean
            // A takeover's new session is already live (and started without this state).
            && !matches!(end, CloseReason::Revoked | CloseReason::CertExpired | CloseReason::Takeover)
            && !shared.shutdown.is_cancelled();
        if keep {
            state.expires =
                std::time::Instant::now() + Duration::from_secs(shared.config.session_expiry_secs);
            park::keep(&shared, key, state);
        } else {
            park::release(&shared, state);
        }
        shared.sessions.remove(&ctx.id.session_key(), conn_id);
        shared.metrics.sessions_live.dec();
        shared.metrics.closed(end);
        let closed = Event::new(Kind::Closed, end.label(), ctx.info.peer)
            .of(ctx.id.id.as_str(), ctx.id.serial.to_hex());
        shared.events.record(closed);
        let (device, reason) = (&ctx.id.id, end.label());
        match end.counter() {
            CloseCounter::Kick if end == CloseReason::WriteTimeout => {
                warn!(%device, reason, "session closed: the peer accepts no data");
            }
            CloseCounter::Kick => info!(%device, serial = %ctx.id.serial, reason, "session cut"),
            CloseCounter::Protocol => info!(%device, reason, "session closed for a protocol violation"),
            CloseCounter::None => debug!(%device, reason, "session ended"),
        }
        conn.close(Duration::from_secs(1)).await;
        drop(claim);
        drop(slot);
    }
}
