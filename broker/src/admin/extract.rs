//! The admin API's extractor: who may make a request ([`Op`]): the operator of the connection, asked of the gate again at
//! every request (a revocation since the handshake, an expired CRL, a registry that now
//! disagrees: refused, and the connection closed after the answer), and, for a request that
//! changes state, proof that it came from the console or an API client and not from a page on
//! another origin that the operator's browser opened ([`same_origin_json`]).
//!
//! A browser presents the operator's client certificate to every request for the broker's
//! origin, whoever's page made it. Pages of other origins can send only "simple" requests
//! without a CORS preflight (which this API never answers): no custom header, a body typed
//! `text/plain`, `application/x-www-form-urlencoded` or `multipart/form-data`. So a
//! state-changing request must carry `X-Fleetgate-Request` and `Content-Type: application/json`,
//! and, when the browser says where it comes from (`Origin`, `Sec-Fetch-Site`), come from the
//! broker's own origin. curl and other API clients send neither `Origin` nor `Sec-Fetch-Site`.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::CONNECTION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use fleet_registry::Role;

use super::error::{ApiCode, ApiError};
use super::state::{Admin, Caller};
use crate::auth::Identity;
use crate::observe::metrics::AdminDenial;
use crate::outcome::Refusal;

/// The header a state-changing request must carry (any value; the console sends `1`).
pub(crate) const REQUEST_HEADER: &str = "x-fleetgate-request";

/// The operator making the request.
pub(crate) struct Op(pub(crate) Identity, pub(crate) std::net::SocketAddr);

impl FromRequestParts<Admin> for Op {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, admin: &Admin) -> Result<Self, Response> {
        let Some(caller) = parts.extensions.get::<Arc<Caller>>().cloned() else {
            return Err(ApiError::new(ApiCode::Forbidden, "no client identity").into_response());
        };
        let metrics = admin.observe.metrics();
        // The same rules as at the handshake (and as MQTT's), at every request.
        match admin.gate.admit(&caller.cert).await {
            Ok(id) if id.role == Role::Operator => {}
            verdict => {
                let refusal = verdict.err().unwrap_or(Refusal::WrongRole);
                admin.gate.refused(refusal, caller.addr, Some(&caller.cert));
                metrics.admin_denied(AdminDenial::Refused);
                tracing::info!(peer = %caller.addr, operator = %caller.id.id, reason = refusal.label(), "admin request refused: closing the connection");
                let mut answer = ApiError::refused(refusal).into_response();
                // hyper closes the connection after an answer that says so.
                answer.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                return Err(answer);
            }
        }
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            if let Err(denial) = same_origin_json(&parts.headers) {
                metrics.admin_denied(denial);
                tracing::warn!(peer = %caller.addr, operator = %caller.id.id, reason = denial.label(), "admin request refused: not a same-origin JSON request (cross-site request forgery?)");
                let message = match denial {
                    AdminDenial::CrossOrigin => "a request from another origin may not change anything",
                    AdminDenial::RequestHeader => {
                        "a request that changes anything needs the X-Fleetgate-Request header"
                    }
                    _ => "a request that changes anything must be Content-Type: application/json",
                };
                return Err(ApiError::new(ApiCode::Forbidden, message).into_response());
            }
        }
        Ok(Op(caller.id.clone(), caller.addr))
    }
}

/// Whether a state-changing request may proceed: from the broker's own origin (or from a
/// client that names none), with the request header, as JSON.
pub(crate) fn same_origin_json(h: &HeaderMap) -> Result<(), AdminDenial> {
    // A value that is not visible ASCII matches nothing.
    let text = |name: &str| h.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    if let Some(site) = text("sec-fetch-site") {
        // `none` is a navigation the user made (typed, bookmarked): never a POST of a page.
        if site != "same-origin" {
            return Err(AdminDenial::CrossOrigin);
        }
    }
    if let Some(origin) = text("origin") {
        let host = text("host").ok_or(AdminDenial::CrossOrigin)?;
        if !origin.strip_prefix("https://").is_some_and(|o| o.eq_ignore_ascii_case(host)) {
            return Err(AdminDenial::CrossOrigin);
        }
    }
    if h.get(REQUEST_HEADER).is_none_or(|v| v.is_empty()) {
        return Err(AdminDenial::RequestHeader);
    }
    let json = text("content-type")
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(AdminDenial::ContentType);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_same_origin_json_with_the_header_passes() {
        let ok = [("content-type", "application/json; charset=utf-8"), (REQUEST_HEADER, "1")];
        assert_eq!(same_origin_json(&headers(&ok)), Ok(()), "an API client (curl)");
        let console = [
            ("content-type", "application/json"),
            (REQUEST_HEADER, "1"),
            ("host", "broker.example:8443"),
            ("origin", "https://broker.example:8443"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(same_origin_json(&headers(&console)), Ok(()), "the console");
        let json = ("content-type", "application/json");
        let header = (REQUEST_HEADER, "1");
        let host = ("host", "broker.example:8443");
        let cases: Vec<(Vec<(&'static str, &'static str)>, AdminDenial)> = vec![
            (vec![("content-type", "text/plain"), header], AdminDenial::ContentType),
            (vec![("content-type", "application/x-www-form-urlencoded"), header], AdminDenial::ContentType),
            (vec![("content-type", "multipart/form-data; boundary=x"), header], AdminDenial::ContentType),
            (vec![header], AdminDenial::ContentType),
            (vec![json], AdminDenial::RequestHeader),
            (vec![json, header, ("sec-fetch-site", "cross-site")], AdminDenial::CrossOrigin),
            (vec![json, header, ("sec-fetch-site", "same-site")], AdminDenial::CrossOrigin),
            (vec![json, header, host, ("origin", "https://evil.example")], AdminDenial::CrossOrigin),
            (vec![json, header, host, ("origin", "http://broker.example:8443")], AdminDenial::CrossOrigin),
            (vec![json, header, host, ("origin", "null")], AdminDenial::CrossOrigin),
            (vec![json, header, ("origin", "https://broker.example:8443")], AdminDenial::CrossOrigin),
        ];
        for (bad, want) in cases {
            let bad = &bad[..];
            assert_eq!(same_origin_json(&headers(bad)), Err(want), "{bad:?}");
        }
    }
}
