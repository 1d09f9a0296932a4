//! A connection in phases: the TLS handshake and admission ([`crate::gate`]), CONNECT binding
//! ([`connect`]), then the MQTT session ([`handler`]) until the client leaves, the broker cuts it
//! ([`crate::sessions`]: revocation, takeover) or the broker stops. [`conn`] owns the stream and its
//! buffers.
//!
//! Two tasks: one for the phases up to admission, and one, spawned at admission, for the live
//! session. A task's future is as large as its largest await point plus whatever the compiler
//! cannot overlap with it; in one task the session carried the admission phases' room for its
//! whole life (4.2 KiB of future, of which the session loop is 1.7 KiB). The admission task's
//! memory is reused by the next connection's.

pub(crate) mod conn;
pub(crate) mod connect;
pub(crate) mod handler;
mod inbound;
pub(crate) mod park;
pub(crate) mod rate;
pub(crate) mod services;
pub(crate) mod v5;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::auth::Identity;
use crate::caps::Source;
use crate::cluster::claims::ClaimGuard;
use crate::gate::Admission;
use crate::listener::{Accepted, ConnectionSlot};
use crate::outcome::{CloseCounter, CloseReason, Refusal};
use crate::sessions::{Kick, LiveSession, SessionInfo};
use conn::Conn;
use services::Services;

/// The log limiter of refused PROXY headers, one per process (`log_interval_secs`).
fn proxy_log(svc: &Services) -> &'static std::sync::Mutex<crate::observe::log_limit::LogLimiter> {
    static LOG: std::sync::OnceLock<std::sync::Mutex<crate::observe::log_limit::LogLimiter>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        std::sync::Mutex::new(crate::observe::log_limit::LogLimiter::new(svc.config.log_interval()))
    })
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(svc: Arc<Services>, accepted: Accepted) {
    let Accepted { mut sock, peer, conn_id, pre_admission, sources, slot, tracker } = accepted;
    let (peer, pre_admission) = match pre_admission {
        Some(p) => (peer, p),
        None => {
            // A balancer sends its header as it connects: a peer that does not, holds no
            // connection slot for long (and never more than `proxy::MAX_HEADER` bytes).
            let deadline = svc.config.handshake_timeout().min(crate::proxy::HEADER_DEADLINE);
            let refused = |why: String| {
                // Rate-limited: anyone who reaches the port can make these.
                if let Some(skipped) = proxy_log(&svc).lock().unwrap_or_else(|p| p.into_inner()).allow() {
                    info!(%peer, reason = Refusal::ProxyHeader.label(), skipped, "connection refused: {why}");
                }
                svc.gate.refused(Refusal::ProxyHeader, peer, None);
            };
            let client = match tokio::time::timeout(deadline, crate::proxy::read(&mut sock)).await {
                Ok(Ok(crate::proxy::Header::Proxied(client))) => client,
                Ok(Ok(crate::proxy::Header::Local)) => peer,
                Ok(Err(e)) => return refused(format!("no valid PROXY v2 header: {e}")),
                Err(_) => return refused(format!("no PROXY v2 header within {} s", deadline.as_secs_f64())),
            };
            let (per_source, total) = (svc.config.max_pre_admission_per_source, svc.config.max_handshakes);
            match sources.enter(Source::of(client.ip()), per_source, total) {
                Some(p) => (client, p),
                None => {
                    let why = crate::listener::pre_admission_refused(svc.observe.metrics(), &sources, total);
                    debug!(peer = %client, reason = why.label(), "connection refused: {}", crate::listener::pre_admission_text(why));
                    return;
                }
            }
        }
    };
    // Boxed: the handshake and the registry query are big futures that are never live together
    // with the session loop, and a connection task should not carry them for its whole life.
    let Admission { tls, cert, verdict: admission } = match Box::pin(svc.gate.pass(sock, peer)).await {
        Ok(a) => a,
        Err(Some(refusal)) => return svc.gate.refused(refusal, peer, None),
        Err(None) => return,
    };
    let mut conn = Conn::new(tls, svc.config.max_packet_size, svc.config.write_timeout());
    let bound = match connect::bind(&svc, &mut conn, admission).await {
        Ok(bound) => bound,
        Err((refused, connect)) => {
            return refused.finish(&svc, &mut conn, peer, &cert, connect.as_ref()).await
        }
    };
    drop(cert);
    drop(pre_admission);

    let id = bound.id;
    let kick = Kick::under(&svc.shutdown);
    let info = SessionInfo::new(peer, crate::clock::now_millis());
    let live = LiveSession {
        conn_id,
        serial: id.serial.clone(),
        not_after: id.not_after,
        kick: kick.clone(),
        info: info.clone(),
    };
    let key = id.session_key();
    if let Some(old) = svc.sessions.register(&key, live) {
        info!(device = %id.id, "a new connection replaces the live session of this device");
        old.cut(CloseReason::Takeover);
    }
    // A revocation that landed between the admission query and registration is cut by
    // `register` (the feed reported it already) or by the feed (it reports it later).
    // In a cluster, a later session of the device on another node cuts this one.
    let cut = || {
        let (kick, device) = (kick.clone(), id.id.clone());
        move || {
            info!(%device, "a session on another node replaces this one");
            kick.cut(CloseReason::Takeover);
        }
    };
    let claim = svc.fabric.claim(&key, cut).await;
    svc.observe.admitted(peer, id.id.as_str(), id.serial.to_hex());
    info!(%peer, device = %id.id, role = id.role.as_str(), serial = %id.serial, "session admitted");
    let live = Live {
        svc,
        conn,
        id,
        info,
        conn_id,
        keep_alive: bound.keep_alive,
        bound: Terms {
            clean_start: bound.clean_start,
            expiry: bound.expiry,
            expiry_capped: bound.expiry_capped,
            assigned: bound.assigned,
        },
        kick,
        claim,
        slot,
    };
    tracker.spawn(live.run());
}

/// A session's terms from its CONNECT (see [`connect::Bound`]).
#[derive(Debug, Clone, Copy)]
struct Terms {
    clean_start: bool,
    expiry: Duration,
    expiry_capped: bool,
    assigned: bool,
}

/// An admitted session, moving to its own task.
struct Live {
    svc: Arc<Services>,
    conn: Conn,
    id: Identity,
    info: Arc<SessionInfo>,
    conn_id: u64,
    keep_alive: Duration,
    /// What the CONNECT asked for and got.
    bound: Terms,
    kick: Kick,
    /// Held while the session lives (a cluster member listens for takeovers).
    claim: Option<ClaimGuard>,
    /// Dropped when the session task ends.
    slot: ConnectionSlot,
}

impl Live {
    /// CONNACK, the session loop, then the clean-up.
    async fn run(self) {
        let Live { svc, mut conn, id, info, conn_id, keep_alive, bound, kick, claim, slot } = self;
        let ctx = handler::Ctx { svc: &svc, id, conn_id, keep_alive, kick, info };
        let key = ctx.id.session_key();
        // Clean session: whatever was kept goes. Otherwise the kept session resumes (present),
        // but only on the certificate that parked it: another certificate of the identity (a
        // re-keyed device, or a thief's copy of its old key) starts clean.
        let kept = svc.parking.take(&key);
        let resumed = match kept {
            Some(old) if bound.clean_start => {
                svc.parking.discard(old, crate::outcome::Discard::CleanStart);
                None
            }
            Some(old) if old.serial != ctx.id.serial => {
                info!(device = %ctx.id.id, parked_by = %old.serial, serial = %ctx.id.serial,
                    "kept session not resumed: parked by another certificate");
                svc.parking.discard(old, crate::outcome::Discard::OtherCertificate);
                None
            }
            kept => kept,
        };
        svc.parking.count();
        let present = resumed.is_some();
        // Not a `match` scrutinee: the CONNACK's write future would then live (and take room
        // in this task) as long as the session. The loop is not boxed: a box per session costs
        // more than the room it would save.
        let admitted = v5::Admitted {
            session_present: present,
            session_expiry: bound
                .expiry_capped
                .then(|| u32::try_from(bound.expiry.as_secs()).unwrap_or(u32::MAX)),
            assigned_id: bound.assigned.then(|| key.clone()),
            receive_max: handler::RECEIVE_MAX,
            max_packet: u32::try_from(svc.config.max_packet_size).unwrap_or(u32::MAX),
        };
        let connack = conn.send_connack(admitted).await;
        let persistent = !bound.expiry.is_zero();
        let (end, mut conn, mut state) = match connack {
            Ok(()) => handler::run(&ctx, conn, resumed, persistent).await,
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
        // A v5 client may shorten (or end) its session's expiry in its DISCONNECT; one that
        // connected with none may not give itself one (MQTT 5 §3.14.2.2.2).
        let expiry = match conn.edge().and_then(|e| e.disconnect_expiry) {
            Some(secs) if persistent => bound.expiry.min(Duration::from_secs(u64::from(secs))),
            _ => bound.expiry,
        };
        let keep = !expiry.is_zero()
            // A takeover's new session is already live (and started without this state).
            && !matches!(end, CloseReason::Revoked | CloseReason::CertExpired | CloseReason::Takeover)
            && !svc.shutdown.is_cancelled();
        if keep {
            state.expires = std::time::Instant::now() + expiry;
            svc.parking.keep(key, state);
        } else {
            svc.parking.release(state);
        }
        svc.sessions.remove(&ctx.id.session_key(), conn_id);
        svc.observe.closed(end, ctx.info.peer, ctx.id.id.as_str(), ctx.id.serial.to_hex());
        let (device, reason) = (&ctx.id.id, end.label());
        match end.counter() {
            CloseCounter::Kick if end == CloseReason::WriteTimeout => {
                warn!(%device, reason, "session closed: the peer accepts no data");
            }
            CloseCounter::Kick => info!(%device, serial = %ctx.id.serial, reason, "session cut"),
            CloseCounter::Protocol => info!(%device, reason, "session closed for a protocol violation"),
            CloseCounter::None => debug!(%device, reason, "session ended"),
        }
        conn.say_goodbye(end).await;
        conn.close(Duration::from_secs(1)).await;
        drop(claim);
        drop(slot);
    }
}
