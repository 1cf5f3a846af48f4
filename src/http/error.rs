//! One error type for every handler: `{"error": {"code", "message", ...details}}` with the
//! right status. 5xx bodies say nothing about the cause; the cause is logged where the error
//! is made.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra members of the error object: `field`, `errors`, `line`, `limit_bytes`, ...
    pub details: Map<String, Value>,
}

/// The error body, for the OpenAPI document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorObject {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_rows`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault (`hyperparameters.lora.r`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The first problems found, each with its row/column or field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<ErrorItem>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: Map::new() }
    }

    /// A 500 whose cause is logged and never shown.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal server error")
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} {id} not found"))
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .with("limit_bytes", limit)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
    }

    /// Adds a member to the error object.
    pub fn with(mut self, key: &str, value: impl Serialize) -> ApiError {
        if let Ok(v) = serde_json::to_value(value) {
            self.details.insert(key.to_string(), v);
        }
        self
    }

    pub fn with_field(self, field: impl Into<String>) -> ApiError {
        self.with("field", field.into())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut obj = Map::new();
        obj.insert("code".into(), Value::String(self.code.into()));
        obj.insert("message".into(), Value::String(self.message));
        if self.status != StatusCode::INTERNAL_SERVER_ERROR {
            for (k, v) in self.details {
                obj.entry(k).or_insert(v);
            }
        }
        let mut body = Map::new();
        body.insert("error".into(), Value::Object(obj));
        (self.status, axum::Json(Value::Object(body))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if e.is_unique_violation() {
            tracing::warn!(error = %e, "unique constraint");
            return ApiError::conflict("conflict", "a resource with that name or id already exists");
        }
        ApiError::internal(e)
    }
}

/// Route fallback: unknown paths get the JSON error shape too.
pub async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "route_not_found", format!("no route for {}", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
