//! The operator console: one page, embedded in the binary (plain HTML, CSS and a small script
//! over the JSON API; no build step).

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;

use super::api::Op;

const PAGE: &str = include_str!("console.html");

/// `GET /`: the console, naming the operator (an id: `[a-z0-9._-]`, nothing to escape).
pub(crate) async fn index(Op(op, _): Op) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page's own inline script and style only; the API on the same origin.
            (
                CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'none'",
            ),
            (CACHE_CONTROL, "no-store"),
        ],
        PAGE.replace("{{operator}}", op.id.as_str()),
    )
}
