//! `/healthz` (process up), `/readyz` (database reachable, default model present) and
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::store::JobStatus;

#[derive(OpenApi)]
#[openapi(paths(healthz, readyz, metrics), tags((name = "operations", description = "Health and metrics")))]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok".into() })
}

/// Ready to serve: the database answers and the default base model file is present.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses((status = 200, body = Health), (status = 503, description = "Not ready; `checks` says what failed", body = ErrorBody))
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let database = match state.store.ping().await {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            "unreachable".to_string()
        }
    };
    let model = if state.default_model.exists() { "ok".to_string() } else { "missing".to_string() };
    if database == "ok" && model == "ok" {
        return axum::Json(Health { status: "ready".into() }).into_response();
    }
    let mut problems = Vec::new();
    if database != "ok" {
        problems.push("the database is unreachable".to_string());
    }
    if model != "ok" {
        problems.push(format!("the default model {} is missing", state.default_model.display()));
    }
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", problems.join("; "))
        .with("checks", json!({ "database": database, "model": model }))
        .into_response()
}

/// Prometheus metrics: requests and latencies by route, queue depth, jobs by status.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = state.store.count_jobs_by_status().await?;
    let count = |s: JobStatus| counts.iter().find(|(k, _)| k == s.as_str()).map(|(_, n)| *n).unwrap_or(0);
    let mut out = String::new();
    out.push_str("# HELP arbiter_queue_depth Jobs waiting in the queue.\n# TYPE arbiter_queue_depth gauge\n");
    out.push_str(&format!("arbiter_queue_depth {}\n", count(JobStatus::Queued)));
    out.push_str("# HELP arbiter_jobs Jobs by status.\n# TYPE arbiter_jobs gauge\n");
    for s in JobStatus::ALL {
        out.push_str(&format!("arbiter_jobs{{status=\"{}\"}} {}\n", s.as_str(), count(s)));
    }
    state.metrics.render(&mut out);
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response())
}
