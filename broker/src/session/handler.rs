//! The MQTT session of an admitted client: one `select!` over the socket, the queue of routed
//! messages, the store's acknowledgements, timers, the kick and the shutdown.
//!
//! A session is split in two: what it is ([`Ctx`]: identity, limits, kick; read-only) and
//! what it holds ([`State`]: the connection, queues, subscriptions). Packet handling borrows the
//! state mutably while the kick and the shutdown are watched through the context, so a stuck
//! write never delays a revocation, a takeover or a shutdown.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::message::Message;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use rumqttc::mqttbytes::QoS;
use tokio::time::{sleep_until, Instant};

use super::conn::{Ack, Conn, IDLE_RELEASE};
use super::park::Parked;
use super::services::Services;
use crate::auth::Identity;
use crate::clock::{now_millis, now_unix};
use crate::commands::Delivery;
use crate::inbox::Inbox;
use crate::observe::log_limit::LogLimiter;
use crate::outcome::CloseReason;
use crate::sessions::{Kick, SessionInfo};
use fleet_registry::Role;

/// Most QoS 1 messages awaiting their store commit before the session stops reading.
const MAX_PENDING_ACKS: usize = 1024;
/// What a v5 CONNACK says of it (Receive Maximum).
pub(crate) const RECEIVE_MAX: u16 = MAX_PENDING_ACKS as u16;
/// Longest single timer for the certificate-expiry check (tokio timers cap at ~2 years).
const EXPIRY_RECHECK: Duration = Duration::from_secs(86_400);

type PendingAck = Pin<Box<dyn Future<Output = (u16, Ack)> + Send>>;

/// What a session is: fixed for its life.
pub(crate) struct Ctx<'a> {
    pub(crate) svc: &'a Services,
    pub(crate) id: Identity,
    pub(crate) conn_id: u64,
    pub(crate) keep_alive: Duration,
    pub(crate) kick: Kick,
    /// The admin API's view of it (counters).
    pub(crate) info: Arc<SessionInfo>,
}

/// What a session holds.
pub(crate) struct State {
    pub(super) conn: Conn,
    /// Deliveries from the router (shared with it through the subscriptions).
    pub(super) inbox: Arc<Inbox>,
    pub(super) pending: FuturesOrdered<PendingAck>,
    /// Filters held, for the subscription cap.
    pub(super) subs: HashSet<String>,
    pub(super) acl_log: LogLimiter,
    pub(super) limit_log: LogLimiter,
    pub(super) next_pkid: u16,
    /// The device's queued commands in flight in this session.
    pub(super) delivery: Delivery,
    /// The router key of this session's subscriptions (a resumed session keeps its first one).
    pub(super) router_id: u64,
    /// Unacknowledged QoS 1 deliveries (a persistent session resends them when it resumes).
    pub(super) in_flight: Vec<Message>,
    /// Most unacknowledged QoS 1 deliveries out at once (`None`: not counted, a 3.1.1 session
    /// that keeps nothing): [`MAX_IN_FLIGHT`], or a v5 client's Receive Maximum if lower.
    pub(super) window: Option<usize>,
    /// A device's or claim session's publish rate (`None`: a service or the issuer).
    pub(super) rate: Option<super::rate::PublishRate>,
    /// A device's firmware chunk server (made at its first `ota/get`).
    pub(super) chunks: Option<crate::ota::serve::ChunkServer>,
    /// A device's budget of update status reports that may move its job.
    pub(super) ota_reports: crate::ota::ReportBudget,
}

/// Most unacknowledged QoS 1 deliveries a persistent session has out before it waits.
const MAX_IN_FLIGHT: usize = 64;

/// A v5 client's Receive Maximum (65,535 when it set none).
fn st_receive_max(conn: &Conn) -> Option<usize> {
    conn.edge().map(|e| usize::from(e.terms.receive_max.unwrap_or(u16::MAX)))
}

/// Runs `f` unless the session is kicked or the broker stops first (`cut` is the session's
/// [`Kick::cut_done`], made once per session: the kick is a child of the shutdown token, so one
/// future watches both).
async fn guarded<T>(
    ctx: &Ctx<'_>,
    cut: &mut Pin<&mut impl Future<Output = ()>>,
    f: impl Future<Output = Result<T, CloseReason>>,
) -> Result<T, CloseReason> {
    tokio::select! {
        biased;
        _ = cut => Err(ctx.kick.end_reason()),
        r = f => r,
    }
}

/// Has a certificate with this notAfter expired? RFC 5280 §4.1.2.5: the validity period
/// includes notAfter, a time in whole seconds, so the certificate is good until the next second.
fn expired(not_after: i64) -> bool {
    now_unix() > not_after
}

/// When the certificate's notAfter has passed, or the next re-check (whichever is first).
fn expiry_check_at(not_after: i64) -> Instant {
    let end_ms = i128::from(not_after.saturating_add(1)) * 1000;
    let left = u64::try_from(end_ms - i128::from(now_millis())).unwrap_or(0);
    Instant::now() + Duration::from_millis(left).min(EXPIRY_RECHECK)
}

/// Runs the session until it ends; returns why, the connection to close, and what a persistent
/// session keeps. The CONNACK has been sent. `resumed`: the kept state of a persistent session.
pub(crate) async fn run(
    ctx: &Ctx<'_>,
    conn: Conn,
    resumed: Option<Parked>,
    persistent: bool,
) -> (CloseReason, Conn, Parked) {
    let every = ctx.svc.config.log_interval();
    let (inbox, subs, in_flight, router_id) = match resumed {
        Some(p) => (p.inbox, p.subs, p.in_flight, p.router_id),
        None => (
            Arc::new(Inbox::new(ctx.svc.config.max_queued_messages)),
            HashSet::new(),
            Vec::new(),
            ctx.conn_id,
        ),
    };
    let window = match st_receive_max(&conn) {
        Some(max) => Some(MAX_IN_FLIGHT.min(max)),
        None => persistent.then_some(MAX_IN_FLIGHT),
    };
    let mut st = State {
        conn,
        inbox,
        pending: FuturesOrdered::new(),
        subs,
        acl_log: LogLimiter::new(every),
        limit_log: LogLimiter::new(every),
        next_pkid: in_flight.iter().map(|p| p.pkid).filter(|&k| k < 32_768).max().unwrap_or(0),
        delivery: Delivery::default(),
        router_id,
        window,
        in_flight,
        rate: matches!(ctx.id.role, Role::Device | Role::Claim).then(|| {
            let c = &ctx.svc.config;
            super::rate::PublishRate::new(c.max_publish_rate, c.max_publish_bytes_rate, Instant::now())
        }),
        chunks: None,
        ota_reports: crate::ota::ReportBudget::new(tokio::time::Instant::now()),
    };
    let end = match st.resume(ctx).await {
        Ok(()) => st.select_loop(ctx).await,
        Err(end) => end,
    };
    if end == CloseReason::Shutdown {
        st.finish_pending(ctx).await;
    }
    let kept = Parked {
        router_id: st.router_id,
        inbox: st.inbox,
        subs: st.subs,
        in_flight: st.in_flight,
        expires: Instant::now().into_std(),
        serial: ctx.id.serial.clone(),
        owner: ctx.id.id.to_string(),
        claim: ctx.id.role == Role::Claim,
    };
    (end, st.conn, kept)
}

impl State {
    /// A resumed persistent session: its unacknowledged deliveries again (DUP, same packet
    /// ids), and its queued commands if it kept their subscription.
    async fn resume(&mut self, ctx: &Ctx<'_>) -> Result<(), CloseReason> {
        for p in &mut self.in_flight {
            p.dup = true;
        }
        // One that expired meanwhile, or is now larger than the client takes, is not sent
        // again, so it must not hold a place either.
        let mut unsent = Vec::new();
        for p in self.in_flight.clone() {
            if !self.conn.send_message(p.clone()).await? {
                unsent.push(p.pkid);
            }
        }
        self.in_flight.retain(|p| !unsent.contains(&p.pkid));
        self.start_commands_if_subscribed(ctx).await
    }

    /// Delivery of the queue starts once the device holds a subscription to its commands.
    pub(super) async fn start_commands_if_subscribed(&mut self, ctx: &Ctx<'_>) -> Result<(), CloseReason> {
        let probe = fleet_topic::command(ctx.id.id.as_str(), "x").to_string();
        if ctx.id.role == Role::Device
            && !self.delivery.active
            && self.subs.iter().any(|f| fleet_topic::matches(f, &probe))
        {
            self.delivery.active = true;
            self.send_commands(ctx).await?;
        }
        Ok(())
    }

    async fn select_loop(&mut self, ctx: &Ctx<'_>) -> CloseReason {
        // MQTT 3.1.1 §3.1.2.10: the server closes after 1.5 keep-alive periods without a packet.
        let grace = ctx.keep_alive.mul_f64(1.5);
        let mut deadline = Instant::now() + grace;
        let mut idle_at = Instant::now() + IDLE_RELEASE;
        let mut expiry_at = expiry_check_at(ctx.id.not_after);
        // Made once: the kick (and, through it, the shutdown) is watched on every turn.
        let cut = ctx.kick.cut_done();
        tokio::pin!(cut);
        loop {
            // Packets already buffered are handled before reading more.
            match self.conn.parse() {
                Err(end) => return end,
                Ok(Some(p)) => {
                    if !ctx.keep_alive.is_zero() {
                        deadline = Instant::now() + grace;
                    }
                    // Boxed: an idle session should not carry the state of packet handling.
                    let handled = Box::pin(self.handle_packet(ctx, p));
                    match guarded(ctx, &mut cut, handled).await {
                        Ok(()) => continue,
                        Err(end) => return end,
                    }
                }
                Ok(None) => {}
            }
            let mut wake_at = expiry_at;
            if !ctx.keep_alive.is_zero() {
                wake_at = wake_at.min(deadline);
            }
            if self.conn.holds_buffers() {
                wake_at = wake_at.min(idle_at);
            } else {
                // Nothing to release: the next release is due 2 s after the next activity.
                idle_at = idle_at.max(Instant::now() + IDLE_RELEASE);
            }
            tokio::select! {
                biased;
                _ = &mut cut => return ctx.kick.end_reason(),
                // One timer for the certificate's expiry, the keep-alive deadline and the idle
                // buffer release (a session is mostly idle: each timer costs ~100 bytes).
                _ = sleep_until(wake_at) => {
                    let now = Instant::now();
                    if now >= expiry_at {
                        if expired(ctx.id.not_after) {
                            ctx.kick.cut(CloseReason::CertExpired);
                            return CloseReason::CertExpired;
                        }
                        expiry_at = expiry_check_at(ctx.id.not_after);
                    }
                    if !ctx.keep_alive.is_zero() && now >= deadline {
                        return CloseReason::KeepaliveTimeout;
                    }
                    if now >= idle_at {
                        self.conn.release_buffers();
                        self.inbox.release();
                        idle_at = now + IDLE_RELEASE;
                    }
                }
                Some(first) = self.pending.next(), if !self.pending.is_empty() => {
                    // A group commit completes many messages at once: their PUBACKs leave in
                    // one write, in order, stopping at the first that was not stored.
                    let mut acks = vec![first];
                    while let Some(Some(done)) = self.pending.next().now_or_never() {
                        acks.push(done);
                    }
                    if let Err(end) = guarded(ctx, &mut cut, self.conn.send_acks(&acks)).await {
                        return end;
                    }
                }
                more = self.conn.read_more(), if self.pending.len() < MAX_PENDING_ACKS => {
                    if !more {
                        return CloseReason::ClientGone;
                    }
                    idle_at = Instant::now() + IDLE_RELEASE;
                }
                p = self.inbox.next(), if self.window.is_none_or(|w| self.in_flight.len() < w) => {
                    let mut p = *p;
                    if p.expired() {
                        // Expired while it waited (MQTT 5 Message Expiry): never sent, so it
                        // takes no place in the window; a device sending such messages must not
                        // stop a subscriber's deliveries.
                        continue;
                    }
                    if self.delivery.active && p.qos == QoS::AtLeastOnce && self.is_own_command(ctx, &p.topic) {
                        // A queued command was stored for this device: read the queue, in order.
                        self.delivery.wake();
                        if let Err(end) = guarded(ctx, &mut cut, self.send_commands(ctx)).await {
                            return end;
                        }
                        continue;
                    }
                    let counted = p.qos == QoS::AtLeastOnce && self.window.is_some();
                    if p.qos == QoS::AtLeastOnce {
                        // 1..=32767: command packet ids are above (docs/spec/commands.md).
                        self.next_pkid = if self.next_pkid >= 32_767 { 1 } else { self.next_pkid + 1 };
                        p.pkid = self.next_pkid;
                        if counted {
                            self.in_flight.push(p.clone());
                        }
                    }
                    match guarded(ctx, &mut cut, self.conn.send_message(p)).await {
                        Ok(true) => ctx.info.sent(),
                        // Larger than the client takes: dropped (MQTT 5 §3.1.2.11.4), as if
                        // delivered, so no acknowledgement is waited for.
                        Ok(false) => {
                            if counted {
                                self.in_flight.pop();
                            }
                            ctx.svc.observe.metrics().messages_dropped.inc();
                        }
                        Err(end) => return end,
                    }
                }
            }
        }
    }

    /// At shutdown: waits for the commits of the PUBLISHes already taken in and sends their
    /// PUBACKs, so a client sees acknowledged what was stored (and retransmits only what was
    /// not). Bounded by the write timeout: a stuck store or a peer that reads nothing cannot
    /// hold the shutdown.
    async fn finish_pending(&mut self, ctx: &Ctx<'_>) {
        if self.pending.is_empty() {
            return;
        }
        let (pending, conn) = (&mut self.pending, &mut self.conn);
        let finish = async move {
            let mut acks = Vec::with_capacity(pending.len());
            while let Some(done) = pending.next().await {
                acks.push(done);
            }
            conn.send_acks(&acks).await
        };
        let _ = tokio::time::timeout(ctx.svc.config.write_timeout(), finish).await;
    }

    /// A delivery on this device's own `devices/<id>/commands/...`?
    fn is_own_command(&self, ctx: &Ctx<'_>, topic: &str) -> bool {
        ctx.id.role == Role::Device
            && crate::commands::parse(topic).is_some_and(|r| r.is_ok_and(|(d, _, _)| d == ctx.id.id))
    }

    /// Sends the device's queued commands that are due (within the in-flight window).
    pub(super) async fn send_commands(&mut self, ctx: &Ctx<'_>) -> Result<(), CloseReason> {
        for p in self.delivery.due(ctx.svc.ingest.commands().writer(), &ctx.id.id).await {
            ctx.svc.observe.metrics().messages_delivered.inc();
            ctx.info.sent();
            self.conn.send_message(p).await?;
        }
        Ok(())
    }
}
