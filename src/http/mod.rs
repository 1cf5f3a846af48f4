//! HTTP: the axum router, shared state, the error type and one file per resource, each with
//! its own `router()` and OpenAPI fragment (`ApiDoc`), merged here and in `openapi.rs`.

pub mod adapters;
pub mod auth;
pub mod dashboard;
pub mod datasets;
pub mod error;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod predict;
pub mod serve;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::StatusCode;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::field::Empty;

use crate::store::artifacts::Artifacts;
use crate::store::files::DataDir;
use crate::store::Store;

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Longest time a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Rows per dataset upload.
    pub max_dataset_rows: usize,
    /// Characters per prompt or response (a dataset cell, a predict field).
    pub max_text_chars: usize,
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub dirs: DataDir,
    /// The shared artifact store, if any: what this node writes is published there, what it
    /// lacks is fetched from there.
    pub artifacts: Artifacts,
    pub limits: Limits,
    /// Base model for jobs that name none; `/readyz` checks that it exists.
    pub default_model: PathBuf,
    /// Shown on queued jobs when no runner in this process can take them.
    pub queued_reason: Option<Arc<str>>,
    pub metrics: Arc<metrics::Metrics>,
    /// Attempts a new job gets before a lost lease fails it.
    pub max_attempts: i64,
    /// A worker seen within this many milliseconds counts as live (the lease length).
    pub worker_ttl_ms: i64,
    /// Cancelled on shutdown; long-lived responses (event streams) end with it.
    pub shutdown: CancellationToken,
    /// The inference engine and the prediction limits.
    pub predictor: predict::Predictor,
    /// API keys and scopes.
    pub auth: auth::Auth,
    /// The only directory a job's `base_model` may name a file or directory in.
    pub models_dir: PathBuf,
}

/// The whole application: routes first, then layers (so the layers see every route). Each
/// resource asks for its API key scope with a route layer (an unknown path stays a 404);
/// health, metrics and the dashboard page are open.
pub fn router(state: AppState) -> Router {
    use crate::store::Scope;
    let admin = axum::middleware::from_fn_with_state((state.auth.clone(), Scope::Admin), auth::require);
    let predict = axum::middleware::from_fn_with_state((state.auth.clone(), Scope::Predict), auth::require);
    let routes = Router::new()
        .merge(datasets::router().route_layer(admin.clone()))
        .merge(jobs::router().route_layer(admin.clone()))
        .merge(adapters::router().route_layer(admin.clone()))
        .merge(workers::router().route_layer(admin))
        .merge(predict::router().route_layer(predict))
        .merge(health::router())
        .merge(dashboard::router())
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed);

    routes
        .layer(axum::middleware::from_fn_with_state(state.metrics.clone(), metrics::track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = path.as_deref().unwrap_or("unmatched"),
                        uri = %req.uri(),
                        status = Empty,
                    )
                })
                .on_response(|res: &axum::response::Response, latency: Duration, span: &tracing::Span| {
                    span.record("status", res.status().as_u16());
                    tracing::debug!(latency_ms = latency.as_millis() as u64, "response");
                }),
        )
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.limits.request_timeout))
        .layer(axum::middleware::map_response(timeout_as_json))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// The timeout layer answers 408 with an empty body; give it the JSON error shape.
async fn timeout_as_json(res: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse;
    if res.status() == StatusCode::REQUEST_TIMEOUT && !res.headers().contains_key(axum::http::header::CONTENT_TYPE) {
        return error::ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", "the request took too long and was abandoned")
            .into_response();
    }
    res
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds).
pub(crate) fn timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A stored JSON document, or null when it does not parse (never fails a read).
pub(crate) fn json_doc(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

/// The cursor pagination parameters shared by list endpoints.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Page size, 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// The id of the last item of the previous page (`next_cursor`).
    pub after: Option<String>,
}

/// The answer to a list whose `after` cursor names no `what`.
pub fn invalid_cursor(what: &str, after: &str) -> error::ApiError {
    error::ApiError::unprocessable(
        "invalid_cursor",
        format!("after names no {what} ({after:?}); it may have been deleted since the last page: list again from the start"),
    )
    .with_field("after")
}

impl Page {
    pub fn limit(&self) -> Result<i64, error::ApiError> {
        match self.limit {
            None => Ok(20),
            Some(n) if (1..=100).contains(&n) => Ok(n),
            Some(n) => Err(error::ApiError::unprocessable("invalid_query", format!("limit must be between 1 and 100, got {n}"))
                .with_field("limit")),
        }
    }
}
