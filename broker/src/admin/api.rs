//! The admin API's routes (`docs/spec/admin-api.md`, `broker/src/admin/openapi.json`). Every
//! answer is JSON; every error is `{"error": {"code", "message"}}` with a 4xx (bad input,
//! unknown device, not an operator) or a 503 (the registry could not be asked), never a 500.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleet_registry::{DeviceId, DeviceQuery, RevocationReason, Role, Status};
use serde_json::{json, Value};
use tracing::info;

use super::error::{ApiCode, ApiError};
use super::extract::Op;
use super::state::Admin;
use super::views::{self, Query as Ask};
use crate::clock::{now_millis, now_unix};
use crate::observe::events::{Kind, MINUTES};
use crate::outcome::Refusal;

/// Largest request body (a revocation's JSON), bytes.
const MAX_BODY: usize = 4096;
/// The OpenAPI document the tests validate answers against.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

type ApiResult = Result<Response, ApiError>;

pub(crate) async fn not_found(_: Op) -> ApiError {
    ApiError::new(ApiCode::NotFound, "no such path")
}

pub(crate) async fn openapi(_: Op) -> Response {
    ([(CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn int_param(
    q: &HashMap<String, String>,
    name: &str,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<i64>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
            ApiError::bad(format!("{name} must be an integer in {}..={}", range.start(), range.end()))
        }),
    }
}

fn device_id(id: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(id).map_err(|_| ApiError::bad(format!("{id:?} is not a device id ([a-z0-9._-], 1-64)")))
}

/// The issuance-log check, at most once a minute (it reads the whole log).
async fn log_status(admin: &Admin) -> Value {
    let now = now_unix();
    if let Some((at, v)) = admin.log_check.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        if now - at < 60 {
            return v.clone();
        }
    }
    let v = match admin.writer.verify_log().await {
        Ok(r) => json!({
            "ok": r.disagreements.is_empty(), "entries": r.entries, "head": r.head,
            "disagreements": r.disagreements.len(), "checked_at": now,
        }),
        Err(e) => json!({ "ok": false, "error": e.to_string(), "checked_at": now }),
    };
    *admin.log_check.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, v.clone()));
    v
}

/// The registry's revocations, up to date (the new ones since the last call read); the guard is
/// held while the caller compares them with the CRL (no await meanwhile).
async fn revocations(
    admin: &Admin,
) -> Result<std::sync::MutexGuard<'_, super::state::Revocations>, ApiError> {
    let lock = || admin.revocations.lock().unwrap_or_else(|p| p.into_inner());
    let after = lock().after;
    let new = admin.registry.revocations_since(after).await.map_err(ApiError::registry)?;
    let mut seen = lock();
    // Two summaries at once read the same range: keep each revocation once.
    for r in new {
        if r.seq > seen.after {
            seen.after = r.seq;
            seen.all.push(r);
        }
    }
    Ok(seen)
}

/// Whether the loaded CRL lists every revocation the registry holds: a broker or tool that
/// reads only the CRL admits a device whose revocation it lacks.
async fn crl_health(admin: &Admin, now: i64) -> Result<Value, ApiError> {
    let seen = revocations(admin).await?;
    let revoked = &seen.all;
    let tls = admin.gate.tls();
    let listed = |s: &fleet_registry::SerialNumber| {
        tls.crl_serials.as_ref().is_some_and(|crl| {
            // DER INTEGER content: a leading zero when the top bit is set.
            let b = s.as_bytes();
            crl.contains(b)
                || (b.first().is_some_and(|x| x & 0x80 != 0) && crl.contains(&[&[0u8][..], b].concat()))
        })
    };
    let missing: Vec<&fleet_registry::RevocationEvent> =
        revoked.iter().filter(|r| !listed(&r.serial)).collect();
    let first: Vec<Value> = missing
        .iter()
        .take(5)
        .map(|r| json!({ "device": r.device_id.as_str(), "serial": r.serial.to_hex() }))
        .collect();
    let fix =
        "sign a new one: the issuer (fleet-provision serve) does within a second, or run fleet-provision crl";
    let (ok, message) = match &tls.crl {
        None if missing.is_empty() => (true, "no CRL is loaded and the registry holds no revocation".to_owned()),
        None => (
            false,
            format!("no CRL is loaded while the registry holds {} revocation(s); {fix}", missing.len()),
        ),
        Some(_) if !missing.is_empty() => (
            false,
            format!(
                "the CRL lacks {} revocation(s) the registry holds (tools and brokers that read only the CRL admit those devices); {fix}",
                missing.len()
            ),
        ),
        Some(c) if c.expired(now) => (false, format!("the CRL is past its next update; {fix}")),
        Some(c) => (true, format!("lists all {} revocation(s) in the registry", c.revoked.min(revoked.len()))),
    };
    Ok(json!({ "ok": ok, "missing": missing.len(), "first_missing": first, "message": message }))
}

pub(crate) async fn summary(
    _: Op,
    State(admin): State<Admin>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let days = int_param(&q, "expiring_within_days", 30, 0..=3650)?;
    let minutes = int_param(&q, "minutes", 15, 1..=MINUTES)?;
    let now = now_unix();
    let mut devices = json!({ "active": 0, "revoked": 0 });
    for (s, n) in admin.registry.status_counts(Role::Device).await.map_err(ApiError::registry)? {
        devices[s.as_str()] = n.into();
    }
    let (count, first) =
        admin.registry.expiring(now + days * 86_400, 20).await.map_err(ApiError::registry)?;
    let first: Vec<Value> = first
        .iter()
        .map(|e| json!({ "device": e.device_id.as_str(), "serial": e.serial.to_hex(), "not_after": e.not_after }))
        .collect();
    let views = admin.views.gather(&Ask { minutes, ..Ask::default() }).await;
    let (mut admitted, mut refused, mut closed) = (0u64, BTreeMap::new(), BTreeMap::new());
    for (kind, reason, n) in views.iter().flat_map(|v| v.counts.iter()) {
        match kind {
            Kind::Admitted => admitted += n,
            Kind::Refused => *refused.entry(reason.clone()).or_insert(0u64) += n,
            Kind::Closed => *closed.entry(reason.clone()).or_insert(0u64) += n,
        }
    }
    let nodes: Vec<Value> =
        views.iter().map(|v| json!({ "node": v.node, "sessions_live": v.sessions_live })).collect();
    let crl = admin.gate.tls().crl.as_ref().map(|c| {
        json!({
            "number": c.number, "revoked": c.revoked, "age_seconds": now - c.this_update,
            "next_update_seconds": c.next_update.map(|n| n - now), "expired": c.expired(now),
        })
    });
    let reasons: serde_json::Map<String, Value> =
        Refusal::ALL.iter().map(|r| (r.label().to_owned(), Value::from(r.explain()))).collect();
    Ok(Json(json!({
        "node": admin.node(),
        "organisation": admin.organisation(),
        "generated_at": now,
        "devices": devices,
        "sessions_live": views.iter().map(|v| v.sessions_live).sum::<u64>(),
        "nodes": nodes,
        "window_minutes": minutes,
        "admitted": admitted,
        "refused": refused,
        "closed": closed,
        "expiring": { "within_days": days, "count": count, "first": first },
        "issuance_log": log_status(&admin).await,
        "crl": crl,
        "crl_health": crl_health(&admin, now).await?,
        "refusal_reasons": reasons,
    }))
    .into_response())
}

pub(crate) async fn devices(
    _: Op,
    State(admin): State<Admin>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let limit = int_param(&q, "limit", 50, 1..=500)?;
    let status = match q.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| ApiError::bad("status must be active or revoked"))?),
    };
    let role = match q.get("role").map(String::as_str) {
        None | Some("") => Some(Role::Device),
        Some("any") => None,
        Some(r) => Some(Role::parse(r).ok_or_else(|| ApiError::bad(format!("unknown role {r:?}")))?),
    };
    let expiring_before = match q.get("expiring_within_days") {
        None => None,
        Some(_) => Some(now_unix() + int_param(&q, "expiring_within_days", 0, 0..=3650)? * 86_400),
    };
    let prefix = q.get("prefix").cloned();
    if prefix.as_ref().is_some_and(|p| p.len() > 64) {
        return Err(ApiError::bad("prefix is longer than an id"));
    }
    let query = DeviceQuery {
        status,
        role,
        prefix,
        expiring_before,
        after: q.get("after").cloned(),
        limit: limit + 1,
    };
    let mut rows = admin.registry.device_page(&query).await.map_err(ApiError::registry)?;
    let next = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.device.device_id.to_string())
    });
    let ids: Vec<String> = rows.iter().map(|r| r.device.device_id.to_string()).collect();
    let q = Ask { minutes: 1, devices: ids, detail: false };
    let seen = Seen::of(admin.views.gather(&q).await);
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            let d = &r.device;
            let id = d.device_id.as_str();
            json!({
                "device": id, "role": d.role.as_str(), "status": d.status.as_str(),
                "created_at": d.created_at, "revoked_at": d.revoked_at, "not_after": r.not_after,
                "online": seen.online.contains(id), "last_seen_ms": seen.last_seen(id),
                "messages_per_minute": seen.rate(id), "open_commands": r.open_commands,
            })
        })
        .collect();
    Ok(Json(json!({ "devices": list, "next": next.flatten() })).into_response())
}

/// What the nodes' answers say about the devices asked about: online where, last seen when,
/// sending how fast.
struct Seen {
    now_ms: i64,
    online: HashSet<String>,
    activity: HashMap<String, views::Activity>,
    ended: HashMap<String, i64>,
}

impl Seen {
    fn of(views: Vec<views::NodeView>) -> Self {
        let mut s = Seen {
            now_ms: now_millis(),
            online: HashSet::new(),
            activity: HashMap::new(),
            ended: HashMap::new(),
        };
        for v in views {
            s.online.extend(v.online);
            for a in v.activity {
                s.activity.insert(a.device.clone(), a);
            }
            for (d, at) in v.last_seen {
                let e = s.ended.entry(d).or_insert(at);
                *e = (*e).max(at);
            }
        }
        s
    }

    /// Now when online; else when its last session ended on a node that answered (none: not
    /// since those nodes started).
    fn last_seen(&self, id: &str) -> Option<i64> {
        if self.online.contains(id) {
            Some(self.now_ms)
        } else {
            self.ended.get(id).copied()
        }
    }

    /// Messages per minute over its live session; none when offline.
    fn rate(&self, id: &str) -> Option<f64> {
        self.activity.get(id).map(|a| a.per_minute(self.now_ms))
    }
}

pub(crate) async fn device(_: Op, State(admin): State<Admin>, Path(id): Path<String>) -> ApiResult {
    let id = device_id(&id)?;
    let registry = &admin.registry;
    let Some(d) = registry.device(&id).await.map_err(ApiError::registry)? else {
        return Err(ApiError::new(ApiCode::UnknownDevice, format!("no device {id}")));
    };
    let certs: Vec<Value> = registry
        .certificates_of(&id)
        .await
        .map_err(ApiError::registry)?
        .iter()
        .map(|c| {
            json!({
                "serial": c.serial.to_hex(), "status": c.status.as_str(), "not_before": c.not_before,
                "not_after": c.not_after, "issued_at": c.issued_at, "key_source": c.key_source,
                "revoked_at": c.revoked_at, "revocation_reason": c.revocation_reason,
            })
        })
        .collect();
    let commands: Vec<Value> = registry
        .commands_of(&id, 10)
        .await
        .map_err(ApiError::registry)?
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "status": c.status.as_str(), "created_at_ms": c.created_at,
                "expires_at_ms": c.expires_at, "sender": c.sender,
            })
        })
        .collect();
    let q = Ask { minutes: 1, devices: vec![id.to_string()], detail: true };
    let mut views = admin.views.gather(&q).await;
    let session = views.iter().flat_map(|v| v.sessions.iter()).next().cloned();
    let mut events: Vec<Value> = views.iter_mut().flat_map(|v| std::mem::take(&mut v.events)).collect();
    let seen = Seen::of(views);
    events.sort_by_key(|e| std::cmp::Reverse(e["at_ms"].as_i64().unwrap_or(0)));
    events.truncate(20);
    let refusals: Vec<Value> =
        events.iter().filter(|e| e["kind"] == "refused").map(|e| e["reason"].clone()).take(10).collect();
    Ok(Json(json!({
        "device": d.device_id.as_str(), "role": d.role.as_str(), "status": d.status.as_str(),
        "created_at": d.created_at, "revoked_at": d.revoked_at, "certificates": certs,
        "session": session, "events": events,
        "last_refusals": refusals,
        "last_seen_ms": seen.last_seen(id.as_str()), "messages_per_minute": seen.rate(id.as_str()),
        "commands": commands,
    }))
    .into_response())
}

pub(crate) async fn revoke(
    Op(op, peer): Op,
    State(admin): State<Admin>,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let id = device_id(&id)?;
    // The body within the header deadline too: a client that trickles it holds nothing long.
    let deadline = admin.config.admin_header_timeout();
    let body = match tokio::time::timeout(deadline, to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return Err(ApiError::new(ApiCode::TooLarge, format!("the body is over {MAX_BODY} bytes")))
        }
        Err(_) => return Err(ApiError::bad("the body did not arrive in time")),
    };
    let reasons = || RevocationReason::ALL.map(|r| r.as_str()).join(", ");
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))?;
    let reason = match v.get("reason").and_then(Value::as_str) {
        None => {
            return Err(ApiError::new(
                ApiCode::ReasonRequired,
                format!("a reason is required: one of {}", reasons()),
            ))
        }
        Some(r) => RevocationReason::parse(r).ok_or_else(|| {
            ApiError::new(ApiCode::BadReason, format!("unknown reason {r:?}: one of {}", reasons()))
        })?,
    };
    match admin.registry.device(&id).await.map_err(ApiError::registry)? {
        None => return Err(ApiError::new(ApiCode::UnknownDevice, format!("no device {id}"))),
        Some(d) if d.status == Status::Revoked => {
            return Err(ApiError::new(ApiCode::AlreadyRevoked, format!("{id} is revoked already")))
        }
        Some(d) if d.role != Role::Device => {
            return Err(ApiError::bad(format!("{id} is a {}: revoke it at the station", d.role.as_str())))
        }
        Some(_) => {}
    }
    let by = format!("operator:{}", op.id);
    let serials = admin
        .writer
        .revoke_device_by(&id, reason, Some(&by), now_unix())
        .await
        .map_err(ApiError::registry)?;
    // The feed cuts it within its poll on every node; here, at once.
    let mut cut = false;
    for s in &serials {
        admin.gate.forget(s);
        cut |= admin.sessions.kick_serial(&id, s);
    }
    info!(device = %id, operator = %op.id, %peer, reason = reason.as_str(), cut, "revoked through the admin API");
    Ok(Json(json!({
        "device": id.as_str(), "reason": reason.as_str(), "by": by,
        "revoked_serials": serials.iter().map(|s| s.to_hex()).collect::<Vec<_>>(),
        "session_cut": cut,
        "crl": "refused by every node now (registry); the issuer (fleet-provision serve) signs it into HOME/crl.pem within a second, or run fleet-provision crl at the station",
    }))
    .into_response())
}

/// A campaign as the API shows it, with its jobs counted by state.
fn campaign_json(c: &fleet_registry::Campaign, jobs: &[fleet_registry::Job]) -> Value {
    let mut counts = serde_json::Map::new();
    for s in fleet_registry::JobState::ALL {
        let n = jobs.iter().filter(|j| j.state == s).count();
        if n > 0 {
            counts.insert(s.as_str().to_owned(), json!(n));
        }
    }
    json!({
        "id": c.id, "board": c.board, "version": c.version, "release": c.sha512.get(..16).unwrap_or(""),
        "devices": c.devices, "waves": c.waves, "abort_if_failed_bp": c.abort_bp, "offer_ttl": c.offer_ttl,
        "state": c.state, "wave": c.wave, "reason": c.reason, "created_at_ms": c.created_at,
        "updated_at_ms": c.updated_at, "jobs": jobs.len(), "counts": counts,
    })
}

/// `GET /api/v1/ota/campaigns`: every firmware campaign, newest first, with job counts.
pub(crate) async fn campaigns(_: Op, State(admin): State<Admin>) -> ApiResult {
    let registry = &admin.registry;
    let mut out = Vec::new();
    for c in registry.campaigns().await.map_err(ApiError::registry)? {
        let jobs = registry.ota_jobs(&c.id).await.map_err(ApiError::registry)?;
        out.push(campaign_json(&c, &jobs));
    }
    Ok(Json(json!({ "campaigns": out })).into_response())
}

/// `GET /api/v1/ota/campaigns/{id}`: one campaign and every job.
pub(crate) async fn campaign(_: Op, State(admin): State<Admin>, Path(id): Path<String>) -> ApiResult {
    let ok = id.len() == 20 && id.starts_with("ota-") && id[4..].bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(ApiError::bad(format!("{id:?} is not a campaign id (ota-<16 hex>)")));
    }
    let registry = &admin.registry;
    let Some(c) = registry.campaign(&id).await.map_err(ApiError::registry)? else {
        return Err(ApiError::new(ApiCode::NotFound, format!("no campaign {id}")));
    };
    let jobs = registry.ota_jobs(&id).await.map_err(ApiError::registry)?;
    let list: Vec<Value> = jobs
        .iter()
        .map(|j| {
            json!({
                "device": j.device_id, "wave": j.wave, "state": j.state.as_str(), "reason": j.reason,
                "offset": j.progress, "size": j.size, "updated_at_ms": j.updated_at,
            })
        })
        .collect();
    Ok(Json(json!({ "campaign": campaign_json(&c, &jobs), "jobs": list })).into_response())
}
