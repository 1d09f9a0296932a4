//! The admin API's rejection: every error is `{"error": {"code", "message"}}` with the status
//! its [`ApiCode`] implies, a 4xx (bad input, unknown device, not an operator, over a cap) or a
//! 503 (the registry or the cluster cannot be asked), never a 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::warn;

use crate::outcome::Refusal;

/// What the API answers instead of a result: the `code` of an error answer, each with its
/// status (`docs/spec/admin-api.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiCode {
    /// Not an operator, or a state change that is not a same-origin JSON request (403).
    Forbidden,
    /// The certificate was refused because the broker cannot decide now (503).
    Unavailable,
    /// The registry could not be asked (503).
    RegistryUnavailable,
    /// A parameter or body that does not parse (400).
    BadRequest,
    /// No such path (404).
    NotFound,
    /// No such device (404).
    UnknownDevice,
    /// The device is revoked already (409).
    AlreadyRevoked,
    /// A body over the limit (413).
    TooLarge,
    /// A revocation without a reason (422).
    ReasonRequired,
    /// A revocation reason that is not one of RFC 5280's (422).
    BadReason,
    /// Over the admin connection caps, per source or per operator (429).
    TooManyConnections,
    /// Over the event-stream caps, in all or per operator (429).
    TooManyStreams,
}

impl ApiCode {
    /// The `code` of the answer.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
            Self::RegistryUnavailable => "registry_unavailable",
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::UnknownDevice => "unknown_device",
            Self::AlreadyRevoked => "already_revoked",
            Self::TooLarge => "too_large",
            Self::ReasonRequired => "reason_required",
            Self::BadReason => "bad_reason",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyStreams => "too_many_streams",
        }
    }

    /// The HTTP status it is answered with.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Unavailable | Self::RegistryUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::NotFound | Self::UnknownDevice => StatusCode::NOT_FOUND,
            Self::AlreadyRevoked => StatusCode::CONFLICT,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ReasonRequired | Self::BadReason => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyConnections | Self::TooManyStreams => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The code of the answer to a refused certificate: "unavailable" where MQTT says "server
    /// unavailable" (the broker cannot decide now), "forbidden" otherwise.
    pub(crate) fn of_refusal(refusal: Refusal) -> Self {
        if refusal == Refusal::RegistryUnavailable {
            // As every other endpoint says it when the registry cannot be asked.
            return Self::RegistryUnavailable;
        }
        match refusal.connack() {
            rumqttc::mqttbytes::v4::ConnectReturnCode::ServiceUnavailable => Self::Unavailable,
            _ => Self::Forbidden,
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: ApiCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(code: ApiCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(ApiCode::BadRequest, message)
    }

    pub(crate) fn registry(e: fleet_registry::Error) -> Self {
        warn!(error = %e, "admin API: registry error");
        Self::new(ApiCode::RegistryUnavailable, format!("registry: {e}"))
    }

    /// The answer to a certificate the gate refused.
    pub(crate) fn refused(refusal: Refusal) -> Self {
        let message =
            format!("certificate refused ({}): operators with a valid certificate only", refusal.label());
        Self::new(ApiCode::of_refusal(refusal), message)
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> serde_json::Value {
        json!({ "error": { "code": self.code.label(), "message": self.message } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(self.body())).into_response()
    }
}
