//! What a session does with each packet its client sends: PUBLISH (rate, topic limits, ACL,
//! the CSR and certificate stamps, then the fabric and the store, or the command queue),
//! SUBSCRIBE, UNSUBSCRIBE, PUBACK of a delivery, PINGREQ.

use fleet_registry::{Role, Telemetry};
use rumqttc::mqttbytes::v4::{Packet, Unsubscribe};

use crate::message::{Message, SubOpts};
use rumqttc::mqttbytes::QoS;
use tokio::time::Instant;
use tracing::warn;

use super::conn::{Ack, Inbound};
use super::handler::{Ctx, State};
use super::v5::Version;
use super::wire::{PubRefusal, SubResult};
use crate::auth::{self, Topic, TopicFilter};
use crate::clock::now_millis;
use crate::cluster::bus::Origin;
use crate::commands::Accepted;
use crate::observe::metrics::{AclAction, Limit};
use crate::outcome::CloseReason;
use crate::router::split_shared;
use crate::router::RetainBudget;
use fleet_topic::Addressed;

/// `devices/<id>/` + these: a device's chunk request and status report (docs/spec/ota.md).
const OTA_GET: &str = "ota/get";
const OTA_STATUS: &str = "ota/status";

impl State {
    /// Counts a cap hit and logs it (rate-limited per session).
    pub(super) fn limit_hit(&mut self, ctx: &Ctx<'_>, limit: Limit, what: &str) {
        ctx.svc.observe.metrics().limit(limit);
        if let Some(skipped) = self.limit_log.allow() {
            warn!(device = %ctx.id.id, limit = limit.label(), what, skipped, "limit reached");
        }
    }

    /// Counts an ACL refusal and logs it (rate-limited per session).
    fn acl_denied(&mut self, ctx: &Ctx<'_>, action: AclAction, what: &str) {
        ctx.svc.observe.metrics().acl_denied(action);
        if let Some(skipped) = self.acl_log.allow() {
            match action {
                AclAction::Publish => {
                    warn!(device = %ctx.id.id, topic = what, skipped, "publish refused by ACL")
                }
                AclAction::Subscribe => {
                    warn!(device = %ctx.id.id, filter = what, skipped, "subscribe refused by ACL")
                }
            }
        }
    }

    pub(super) async fn handle_packet(&mut self, ctx: &Ctx<'_>, inbound: Inbound) -> Result<(), CloseReason> {
        let packet = match inbound {
            Inbound::Publish(m) => return self.publish(ctx, m).await,
            Inbound::Subscribe { pkid, filters } => return self.subscribe(ctx, pkid, filters).await,
            Inbound::Packet(p) => p,
        };
        match packet {
            Packet::Unsubscribe(u) => self.unsubscribe(ctx, u).await,
            Packet::PingReq => self.conn.send(Packet::PingResp).await,
            Packet::Disconnect => Err(CloseReason::ClientGone),
            Packet::PubAck(a) => {
                self.in_flight.retain(|p| p.pkid != a.pkid);
                if self.delivery.acked(ctx.svc.ingest.commands().writer(), &ctx.id.id, a.pkid).await {
                    self.send_commands(ctx).await?;
                }
                Ok(())
            }
            Packet::Connect(_) => Err(CloseReason::SecondConnect),
            _ => Err(CloseReason::UnexpectedPacket),
        }
    }

    async fn publish(&mut self, ctx: &Ctx<'_>, mut p: Message) -> Result<(), CloseReason> {
        let svc = ctx.svc;
        svc.observe.metrics().messages_received.inc();
        ctx.info.received();
        if let Some(rate) = &mut self.rate {
            let wait = rate.take(p.size(), Instant::now());
            if !wait.is_zero() {
                // Over its rate: handled (and acknowledged) once back within it; nothing is
                // read meanwhile. The caller races this against the kick.
                self.limit_hit(ctx, Limit::PublishRate, &p.topic);
                tokio::time::sleep(wait).await;
            }
        }
        if !svc.topic_within(&p.topic) {
            self.limit_hit(ctx, Limit::Topic, &p.topic);
            return Err(CloseReason::TopicLimit);
        }
        // Parsed once here; a topic that is not one (a wildcard, NUL) is denied like any other.
        // So is a v5 Response Topic that does not lead back to the publisher.
        let parsed = Topic::parse(&p.topic);
        let response = p.props.as_ref().and_then(|props| props.response_topic.as_deref());
        let denied = match response {
            _ if !parsed.is_ok_and(|t| auth::may_publish(&ctx.id, t)) => Some(p.topic.clone()),
            // The broker answers a command there itself: only where data goes.
            Some(r)
                if !Topic::parse(r).is_ok_and(|t| {
                    let commanded = match parsed.map(Topic::addressed) {
                        Ok(Addressed::Command { device, .. }) => Some(device),
                        _ => None,
                    };
                    auth::may_be_answered_on(&ctx.id, t)
                        && commanded.is_none_or(|d| auth::broker_may_answer_on(Some(d), t))
                }) =>
            {
                Some(format!("{} (response topic {r})", p.topic))
            }
            _ => None,
        };
        if let Some(what) = denied {
            self.acl_denied(ctx, AclAction::Publish, &what);
            // QoS 0 has no acknowledgement to withhold. A v5 client's QoS 1 gets a PUBACK that
            // says "not authorised"; a 3.1.1 client (no way to say it) is cut off.
            return match (p.qos, self.conn.version()) {
                (QoS::AtMostOnce, _) => Ok(()),
                (QoS::AtLeastOnce, Version::V5) => {
                    let (pkid, ack) = (p.pkid, Ack::Refused(PubRefusal::NotAuthorized));
                    self.pending.push_back(Box::pin(async move { (pkid, ack) }));
                    Ok(())
                }
                _ => Err(CloseReason::AclDenied),
            };
        }
        if p.qos == QoS::ExactlyOnce {
            return Err(CloseReason::Qos2Unsupported);
        }
        if p.retain && crate::commands::parse(&p.topic).is_some() {
            // Commands are never retained (docs/spec/commands.md): a retained copy would reach
            // the device on every SUBSCRIBE, after the command expired or was acknowledged.
            // The flag is stripped; the command itself is queued (QoS 1) or routed (QoS 0).
            p.retain = false;
            self.limit_hit(ctx, Limit::CommandRetained, &p.topic);
        }
        // Valid: may_publish accepted it.
        let topic = parsed.map_err(|_| CloseReason::AclDenied)?;
        let mut ota_report = false;
        if ctx.id.role == Role::Device {
            match topic.addressed() {
                // A chunk request: answered here, never routed or stored (docs/spec/ota.md).
                Addressed::DeviceData { rest: OTA_GET, .. } => return self.chunk_request(ctx, p).await,
                // A status report: moves the device's job once the fabric accepted the
                // publish (below), and is stored and routed as any.
                Addressed::DeviceData { rest: OTA_STATUS, .. } => ota_report = true,
                _ => {}
            }
        }
        if auth::is_active_announcement(&ctx.id, topic) {
            // The broker, not the device, says which certificate the session runs on.
            p.payload = ctx.id.serial.to_hex().into();
        } else if auth::is_csr(&ctx.id, topic) {
            // One identity's CSRs are rationed (broker-wide, so reconnecting does not help): a
            // flood from one stolen key must not take the issuer from the fleet. A claim's
            // burst covers a batch booting at once.
            let (key, burst) = match ctx.id.role {
                Role::Claim => (format!("claim:{}", ctx.id.id), svc.config.max_sessions_per_claim),
                _ => (format!("device:{}", ctx.id.id), 3),
            };
            let every = svc.config.csr_interval_secs.duration();
            if !svc.csr_rate.take(&key, burst, every, tokio::time::Instant::now()) {
                self.limit_hit(ctx, Limit::CsrRate, &p.topic);
                if p.qos == QoS::AtLeastOnce {
                    let pkid = p.pkid;
                    let ack = Ack::Refused(PubRefusal::QuotaExceeded);
                    self.pending.push_back(Box::pin(async move { (pkid, ack) }));
                }
                return Ok(());
            }
            // ... and which certificate asks for a new one (the issuer checks it is the asker's).
            // Never retained: a retained CSR would be decided again at every issuer reconnect.
            p.payload = auth::stamp_csr(&ctx.id, &p.payload).into();
            p.retain = false;
        }
        if ctx.id.role == Role::Service
            && p.qos == QoS::AtLeastOnce
            && crate::commands::parse(&p.topic).is_some()
        {
            return self.command(ctx, p).await;
        }
        // Routed first (subscribers get copies, here and on the other nodes), then the publish
        // itself moves to the store.
        let budget = RetainBudget::of(ctx.id.role);
        // Marked as this session's: its own subscriptions with No Local skip it.
        p.from_conn = Some(self.router_id);
        if let Err(refused) = svc.fabric.publish(&p, budget, Origin::Client(&ctx.id)).await {
            self.limit_hit(ctx, refused.limit(), &p.topic);
            return Err(refused.close_reason());
        }
        if ota_report {
            if self.ota_reports.admit(tokio::time::Instant::now()) {
                svc.ota.report(ctx.id.id.as_str(), &p.payload);
            } else {
                // Stored and routed as any message, but it moves nothing: each would cost a
                // registry read (and maybe a write and a broadcast).
                svc.ota.metrics().ota_refused.with_label_values(&["report_rate"]).inc();
            }
        }
        let (pkid, qos) = (p.pkid, p.qos);
        // Devices' telemetry is stored; services' commands are only routed.
        if ctx.id.role == Role::Device {
            let row = Telemetry {
                device_id: ctx.id.id.clone(),
                topic: p.topic,
                payload: p.payload,
                qos: qos as u8,
                received_at: now_millis(),
                properties: p.props.as_ref().map(|props| props.to_json()),
            };
            if qos == QoS::AtLeastOnce {
                let done = svc.ingest.store().submit(row, pkid).await;
                self.pending.push_back(Box::pin(async move {
                    (pkid, if done.await.unwrap_or(false) { Ack::Done } else { Ack::Failed })
                }));
            } else {
                svc.ingest.store().submit_nowait(row).await;
            }
        } else if qos == QoS::AtLeastOnce {
            self.pending.push_back(Box::pin(async move { (pkid, Ack::Done) }));
        }
        Ok(())
    }

    /// A device's `ota/get`: the chunk (or a refusal) to this session only, now or paced.
    async fn chunk_request(&mut self, ctx: &Ctx<'_>, p: Message) -> Result<(), CloseReason> {
        let svc = ctx.svc;
        let server = self
            .chunks
            .get_or_insert_with(|| crate::ota::serve::ChunkServer::new(svc.ota.limits().bytes_per_sec));
        let now = server
            .answer(&svc.ota, ctx.id.id.as_str(), &p.payload, &self.inbox, svc.config.max_packet_size)
            .await;
        if p.qos == QoS::AtLeastOnce {
            let pkid = p.pkid;
            self.pending.push_back(Box::pin(async move { (pkid, Ack::Done) }));
        }
        if let Some(m) = now {
            if self.conn.send_message(m).await? {
                ctx.info.sent();
            }
        }
        Ok(())
    }

    /// A service's QoS 1 command: stored (then routed, to wake the device's session) or refused
    /// with a status; acknowledged either way unless the registry is down. Handed to the
    /// command writer in order, stored while the session reads on (up to its window of pending
    /// acknowledgements), acknowledged in order.
    async fn command(&mut self, ctx: &Ctx<'_>, p: Message) -> Result<(), CloseReason> {
        let svc = ctx.svc;
        let pkid = p.pkid;
        let accepted = svc.ingest.commands().accept(&ctx.id, &p).await;
        let (fabric, id) = (svc.fabric.clone(), ctx.id.clone());
        self.pending.push_back(Box::pin(async move {
            let ack = match accepted.await {
                Accepted::Queued => {
                    // Never retained (refused before), so no retained-message cap refuses it.
                    let _ = fabric.publish_everywhere(&p, RetainBudget::Clients, Origin::Client(&id)).await;
                    Ack::Done
                }
                Accepted::Refused => Ack::Done,
                Accepted::Unavailable => Ack::Failed,
            };
            (pkid, ack)
        }));
        Ok(())
    }

    async fn subscribe(
        &mut self,
        ctx: &Ctx<'_>,
        pkid: u16,
        filters: Vec<(String, QoS, SubOpts)>,
    ) -> Result<(), CloseReason> {
        let svc = ctx.svc;
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for (path, qos, opts) in &filters {
            let full =
                !self.subs.contains(path) && self.subs.len() >= svc.config.max_subscriptions_per_session;
            // `$share/<group>/<filter>`: the checks apply to the filter inside.
            let (group, filter) = match split_shared(path) {
                None => (None, path.as_str()),
                Some(Ok((group, inner))) => (Some(group), inner),
                Some(Err(())) => {
                    codes.push(SubResult::Invalid);
                    continue;
                }
            };
            let shared = group.is_some();
            let within = match group {
                None => svc.topic_within(filter),
                Some(group) => svc.share_within(group, filter),
            };
            if !within {
                self.limit_hit(ctx, Limit::Topic, path);
                codes.push(SubResult::Invalid);
            } else if shared && opts.no_local {
                // MQTT 5 §3.8.3.1: No Local on a shared subscription is a protocol error.
                codes.push(SubResult::Invalid);
            } else if !TopicFilter::parse(filter).is_ok_and(|f| auth::may_subscribe(&ctx.id, f)) {
                self.acl_denied(ctx, AclAction::Subscribe, path);
                codes.push(SubResult::NotAuthorized);
            } else if full {
                self.limit_hit(ctx, Limit::Subscriptions, path);
                codes.push(SubResult::Quota);
            } else {
                let qos = if *qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce };
                let first = self.subs.insert(path.clone());
                let inbox = self.inbox.clone();
                let kept = svc.fabric.subscribe(self.router_id, path, qos, *opts, inbox, first).await;
                // Retain Handling: 0 always, 1 only for a new subscription, 2 never.
                if opts.retain_handling == 0 || (opts.retain_handling == 1 && first) {
                    retained.extend(kept.into_iter().map(|m| (m, opts.id)));
                }
                codes.push(SubResult::Granted(qos));
            }
        }
        self.conn.send_suback(pkid, &codes).await?;
        for (mut p, id) in retained {
            p.qos = QoS::AtMostOnce;
            p.retain = true;
            p.sub_ids = id.into_iter().collect();
            ctx.info.sent();
            self.conn.send_message(p).await?;
        }
        // Subscribed to its commands: the queue is delivered from now on (and what waits, now).
        self.start_commands_if_subscribed(ctx).await
    }

    async fn unsubscribe(&mut self, ctx: &Ctx<'_>, u: Unsubscribe) -> Result<(), CloseReason> {
        for f in &u.topics {
            let held = self.subs.remove(f);
            ctx.svc.fabric.unsubscribe(self.router_id, f, held);
        }
        self.conn.send_unsuback(u.pkid, u.topics.len()).await
    }
}
