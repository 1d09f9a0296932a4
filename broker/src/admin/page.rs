//! The operator console: one page, its script and its style, embedded in the binary (plain
//! HTML, CSS and a small script over the JSON API; no build step). The script is its own file
//! so that the page's CSP can forbid inline script and event handlers (`script-src 'self'`):
//! markup that reached the page from an API value could not run even if it were parsed.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::response::IntoResponse;

use super::extract::Op;

const PAGE: &str = include_str!("console.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// The console's own script and style, the API on the same origin; nothing inline, no frames,
/// no form submissions.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'";

/// `GET /`: the console, naming the operator (an id: `[a-z0-9._-]`, nothing to escape).
pub(crate) async fn index(Op(op, _): Op) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CACHE_CONTROL, "no-store"),
        ],
        PAGE.replace("{{operator}}", op.id.as_str()),
    )
}

/// `GET /console.js`.
pub(crate) async fn script(_: Op) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CACHE_CONTROL, "no-store"),
        ],
        SCRIPT,
    )
}

/// `GET /console.css`.
pub(crate) async fn style(_: Op) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CACHE_CONTROL, "no-store"),
        ],
        STYLE,
    )
}
