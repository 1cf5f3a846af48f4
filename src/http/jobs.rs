//! `/v1/fine-tuning/jobs`: submit, list, get, cancel, events (paged and as Server-Sent
//! Events), checkpoints. Names follow the OpenAI fine-tuning API.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::header::ACCEPT;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{Json, Query};
use super::{json_doc, timestamp, AppState, Page};
use crate::data::hyper::Hyperparameters;
use crate::store::jobs::InsertJob;
use crate::jobs::device;
use crate::store::{
    now_ms, CancelOutcome, CheckpointRecord, EventRecord, JobRecord, JobStatus, NewEvent, NewJob, WorkerRecord,
};

#[derive(OpenApi)]
#[openapi(
    paths(create_job, list_jobs, get_job, cancel_job, list_events, stream_events, list_checkpoints),
    tags((name = "fine-tuning", description = "Fine-tuning jobs: submit, follow, cancel"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/fine-tuning/jobs", get(list_jobs).post(create_job))
        .route("/v1/fine-tuning/jobs/{id}", get(get_job))
        .route("/v1/fine-tuning/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/fine-tuning/jobs/{id}/events", get(list_events))
        .route("/v1/fine-tuning/jobs/{id}/events/stream", get(stream_events))
        .route("/v1/fine-tuning/jobs/{id}/checkpoints", get(list_checkpoints))
}

pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.1;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The training dataset.
    pub dataset_id: String,
    /// A separate validation dataset (instead of `validation_fraction`).
    pub validation_dataset_id: Option<String>,
    /// Share of the training rows held out for validation, in (0, 1); 0.1 when neither this nor
    /// `validation_dataset_id` is given.
    pub validation_fraction: Option<f64>,
    /// A base model in the server's models directory (GGUF file or Hugging Face directory), by
    /// path relative to that directory or as a full path; the server default when absent.
    pub base_model: Option<String>,
    /// Training settings; every field has the notebook's value as default.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    /// Name of the resulting adapter (unique); generated when absent.
    pub name: Option<String>,
    /// A short tag put in the generated adapter name.
    pub suffix: Option<String>,
    /// What a worker needs to run the job; any worker when absent.
    pub resources: Option<Resources>,
}

/// Requirements on the worker that runs a job: only a worker whose advertised device matches
/// claims it (`GET /v1/workers` lists what live workers advertise).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `cpu` or `cuda`; any when absent.
    pub device: Option<String>,
    /// Least device memory (RAM for cpu), in GB (2^30 bytes).
    pub min_memory_gb: Option<f64>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Resources {
    fn validate(&self) -> Result<(Option<String>, Option<i64>), ApiError> {
        let device = match self.device.as_deref() {
            None => None,
            Some(d @ ("cpu" | "cuda")) => Some(d.to_string()),
            Some(d) => {
                return Err(ApiError::unprocessable("invalid_request", format!("resources.device must be cpu or cuda, got {d:?}"))
                    .with_field("resources.device"))
            }
        };
        let memory = match self.min_memory_gb {
            None => None,
            Some(gb) if gb.is_finite() && gb > 0.0 && gb < 1e6 => Some((gb * GIB).ceil() as i64),
            Some(gb) => {
                return Err(ApiError::unprocessable(
                    "invalid_request",
                    format!("resources.min_memory_gb must be a positive number of GB, got {gb}"),
                )
                .with_field("resources.min_memory_gb"))
            }
        };
        Ok((device, memory))
    }

    fn of(r: &JobRecord) -> Option<Resources> {
        if r.required_device.is_none() && r.required_memory_bytes.is_none() {
            return None;
        }
        Some(Resources { device: r.required_device.clone(), min_memory_gb: r.required_memory_bytes.map(|b| b as f64 / GIB) })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: i64,
    /// Optimizer steps in the whole run, once known.
    pub total_steps: Option<i64>,
    /// Fractional epoch (1.5 = halfway through the second epoch).
    pub epoch: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    /// queued, running, succeeded, failed or cancelled.
    pub status: String,
    /// Why a queued job is not running, when known.
    pub status_reason: Option<String>,
    pub dataset_id: String,
    pub validation_dataset_id: Option<String>,
    pub validation_fraction: Option<f64>,
    pub base_model: String,
    pub hyperparameters: Hyperparameters,
    pub name: Option<String>,
    pub suffix: Option<String>,
    /// What the worker that runs it needs, if anything.
    pub resources: Option<Resources>,
    pub progress: Progress,
    /// Latest metrics: train_loss, learning_rate, eval_log_loss, eval_accuracy, ...
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    /// The attempt running or last run (a lost lease starts a new attempt).
    pub attempt: i64,
    pub max_attempts: i64,
    /// What went wrong, for failed jobs.
    pub error: Option<String>,
    /// The trained adapter, for succeeded jobs.
    pub adapter_id: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// Live workers, fetched only when a queued job on the page has requirements (to say when no
/// live worker meets them).
async fn live_workers_for(state: &AppState, jobs: &[JobRecord]) -> Option<Vec<WorkerRecord>> {
    let needed = jobs
        .iter()
        .any(|j| j.status() == JobStatus::Queued && (j.required_device.is_some() || j.required_memory_bytes.is_some()));
    if !needed {
        return None;
    }
    match state.store.list_workers(now_ms() - state.worker_ttl_ms).await {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "could not list workers");
            None
        }
    }
}

/// Why a queued job with requirements waits, when no live worker meets them.
fn unmet_requirements(r: &JobRecord, live: &[WorkerRecord]) -> Option<String> {
    if live.iter().any(|w| w.device().can_run(r.required_device.as_deref(), r.required_memory_bytes)) {
        return None;
    }
    let needs = match (&r.required_device, r.required_memory_bytes) {
        (Some(d), Some(m)) => format!("a {d} device with at least {}", device::gb(m)),
        (Some(d), None) => format!("a {d} device"),
        (None, Some(m)) => format!("a device with at least {}", device::gb(m)),
        (None, None) => return None,
    };
    let seen = if live.is_empty() {
        "no worker is live".to_string()
    } else {
        let list: Vec<String> = live
            .iter()
            .map(|w| format!("{} ({}, {})", w.id, w.device_name, w.memory_bytes.map(device::gb).unwrap_or_else(|| "memory unknown".into())))
            .collect();
        format!("live workers: {}", list.join(", "))
    };
    Some(format!("no live worker can run it: it needs {needs}; {seen}"))
}

fn job_view(state: &AppState, r: JobRecord, live: Option<&[WorkerRecord]>) -> Job {
    let status = r.status();
    let status_reason = match status {
        JobStatus::Queued => Some(
            live.and_then(|l| unmet_requirements(&r, l))
                .or_else(|| state.queued_reason.as_deref().map(str::to_string))
                .unwrap_or_else(|| "waiting for a free worker".to_string()),
        ),
        _ => None,
    };
    Job {
        resources: Resources::of(&r),
        status: status.as_str().to_string(),
        status_reason,
        hyperparameters: serde_json::from_str(&r.hyperparameters).unwrap_or_default(),
        progress: Progress { step: r.step, total_steps: r.total_steps, epoch: r.epoch },
        metrics: json_doc(&r.metrics),
        created_at: timestamp(r.created_at),
        started_at: r.started_at.map(timestamp),
        finished_at: r.finished_at.map(timestamp),
        updated_at: timestamp(r.updated_at),
        id: r.id,
        dataset_id: r.dataset_id,
        validation_dataset_id: r.validation_dataset_id,
        validation_fraction: r.validation_fraction,
        base_model: r.base_model,
        name: r.name,
        suffix: r.suffix,
        attempt: r.attempt,
        max_attempts: r.max_attempts,
        error: r.error,
        adapter_id: r.adapter_id,
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub data: Vec<Job>,
    pub has_more: bool,
    /// Pass as `after` for the next page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    /// Increasing; pass the last one as `after`.
    pub id: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub attempt: i64,
    /// info, warn or error.
    pub level: String,
    /// status, log, train_step, eval or checkpoint.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    /// Metric values of train_step, eval and checkpoint events.
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
}

impl From<EventRecord> for JobEvent {
    fn from(e: EventRecord) -> JobEvent {
        JobEvent {
            id: e.id,
            created_at: timestamp(e.created_at),
            attempt: e.attempt,
            level: e.level,
            kind: e.kind,
            message: e.message,
            data: e.data.as_deref().map(json_doc),
        }
    }
}

/// One Server-Sent Event of `/events/stream`, as its fields arrive on the wire.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StreamEvent {
    /// The event id (absent on the final `end` event).
    pub id: Option<String>,
    /// The event type (status, log, train_step, eval, checkpoint), or `end` once the job has
    /// finished.
    pub event: Option<String>,
    /// JSON text: a JobEvent, or `{"status": ...}` on the `end` event.
    pub data: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    /// Oldest first.
    pub data: Vec<JobEvent>,
    pub has_more: bool,
    /// The id of the last event: pass as `after` for the next page.
    pub next_cursor: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub id: String,
    pub step: i64,
    pub attempt: i64,
    /// Evaluation metrics at that step, when an evaluation ran.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The checkpoint's files were found missing at a start-up check, or could not be read back
    /// when a job resumed from them; a resume skips it.
    pub file_missing: bool,
}

impl From<CheckpointRecord> for Checkpoint {
    fn from(c: CheckpointRecord) -> Checkpoint {
        Checkpoint {
            id: c.id,
            step: c.step,
            attempt: c.attempt,
            metrics: c.metrics.as_deref().map(json_doc),
            created_at: timestamp(c.created_at),
            file_missing: c.file_missing_at.is_some(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointList {
    /// Newest (highest step) first.
    pub data: Vec<Checkpoint>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobListParams {
    /// Page size, 1 to 100 (default 20).
    pub limit: Option<i64>,
    /// The id of the last job of the previous page (`next_cursor`).
    pub after: Option<String>,
    /// Only jobs in this status: queued, running, succeeded, failed or cancelled.
    pub status: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Only events with a greater id (the `next_cursor` of the previous page).
    pub after: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

pub(super) fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), ApiError> {
    let ok_chars = value.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    let ok_start = value.starts_with(|c: char| c.is_ascii_alphanumeric());
    if value.is_empty() || value.len() > max || !ok_chars || !ok_start {
        return Err(ApiError::unprocessable(
            "invalid_request",
            format!("{field} must be 1 to {max} characters of letters, digits, '.', '_', ':' or '-', starting with a letter or digit"),
        )
        .with_field(field));
    }
    Ok(())
}

/// A `base_model` named in a request: a file or directory inside the models directory, given
/// relative to it or as a full path. The name is checked before it touches the file system
/// (no `..`, no NUL), and the resolved path (symbolic links followed) must stay inside.
pub(super) async fn resolve_base_model(models_dir: &std::path::Path, name: &str) -> Result<String, ApiError> {
    use std::path::{Component, Path};
    let invalid = |why: String| ApiError::unprocessable("invalid_request", why).with_field("base_model");
    let path = Path::new(name);
    if name.len() > 4096 || name.contains('\0') || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(invalid("base_model must name a model inside the server's models directory, without `..`".into()));
    }
    let root = tokio::fs::canonicalize(models_dir)
        .await
        .map_err(|_| invalid("this server has no models directory: only its default base model can be used".into()))?;
    let candidate = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    let not_found = || invalid(format!("base_model {name:?} is not a model file or directory in the server's models directory"));
    let resolved = tokio::fs::canonicalize(&candidate).await.map_err(|_| not_found())?;
    if !resolved.starts_with(&root) || resolved == root {
        return Err(not_found());
    }
    Ok(resolved.to_string_lossy().into_owned())
}

/// Submit a fine-tuning job.
#[utoipa::path(
    post,
    path = "/v1/fine-tuning/jobs",
    tag = "fine-tuning",
    request_body = CreateJob,
    responses(
        (status = 201, description = "Queued", body = Job),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "Unknown dataset (the error names the field)", body = ErrorBody),
        (status = 409, description = "Adapter name taken (by an adapter, or by a queued or running job)", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field (named in `field`)", body = ErrorBody),
    )
)]
pub async fn create_job(State(state): State<AppState>, Json(body): Json<CreateJob>) -> Result<Response, ApiError> {
    let validation_fraction = match (&body.validation_dataset_id, body.validation_fraction) {
        (Some(_), Some(_)) => {
            return Err(ApiError::unprocessable(
                "invalid_request",
                "give either validation_dataset_id or validation_fraction, not both",
            )
            .with_field("validation_fraction"))
        }
        (None, Some(f)) if !(f.is_finite() && f > 0.0 && f < 1.0) => {
            return Err(ApiError::unprocessable(
                "invalid_request",
                format!("validation_fraction must be strictly between 0 and 1, got {f}"),
            )
            .with_field("validation_fraction"))
        }
        (None, Some(f)) => Some(f),
        (None, None) => Some(DEFAULT_VALIDATION_FRACTION),
        (Some(_), None) => None,
    };
    let problems = body.hyperparameters.validate();
    if let Some(first) = problems.first() {
        return Err(ApiError::unprocessable("invalid_hyperparameters", format!("{}: {}", first.field, first.reason))
            .with_field(first.field.clone())
            .with("errors", &problems));
    }
    if let Some(name) = &body.name {
        check_name("name", name, 128)?;
        if state.store.get_adapter_by_name(name).await?.is_some() {
            return Err(ApiError::conflict("name_taken", format!("an adapter named {name:?} already exists")).with_field("name"));
        }
    }
    if let Some(suffix) = &body.suffix {
        check_name("suffix", suffix, 40)?;
    }
    let (required_device, required_memory_bytes) = body.resources.clone().unwrap_or_default().validate()?;
    let base_model = match &body.base_model {
        Some(m) if m.trim().is_empty() => {
            return Err(ApiError::unprocessable("invalid_request", "base_model must not be empty").with_field("base_model"))
        }
        Some(m) if *m == state.default_model.to_string_lossy() => m.clone(),
        Some(m) => resolve_base_model(&state.models_dir, m).await?,
        None => state.default_model.to_string_lossy().into_owned(),
    };
    let hyperparameters = serde_json::to_value(&body.hyperparameters).map_err(ApiError::internal)?;
    let new = NewJob {
        id: uuid::Uuid::now_v7().to_string(),
        dataset_id: body.dataset_id.clone(),
        validation_dataset_id: body.validation_dataset_id.clone(),
        validation_fraction,
        base_model,
        hyperparameters,
        name: body.name,
        suffix: body.suffix,
        max_attempts: state.max_attempts,
        required_device,
        required_memory_bytes,
    };
    let created = NewEvent {
        job_id: new.id.clone(),
        attempt: 0,
        level: "info",
        kind: "status",
        message: "job created and queued".into(),
        data: None,
    };
    let inserted = match state.store.insert_job(&new, &created, now_ms()).await {
        // the one unique key a new job can collide on (its id is fresh): a queued or running job
        // already asks for this adapter name
        Err(e) if e.is_unique_violation() => {
            let name = new.name.as_deref().unwrap_or_default();
            return Err(ApiError::conflict("name_taken", format!("a queued or running job already makes an adapter named {name:?}"))
                .with_field("name"));
        }
        other => other?,
    };
    let job = match inserted {
        InsertJob::Inserted(job) => job,
        InsertJob::MissingDataset(field) => {
            let id = if field == "dataset_id" { &body.dataset_id } else { body.validation_dataset_id.as_deref().unwrap_or("") };
            return Err(ApiError::not_found("dataset", id).with_field(field));
        }
    };
    let live = live_workers_for(&state, std::slice::from_ref(&job)).await;
    Ok((StatusCode::CREATED, axum::Json(job_view(&state, job, live.as_deref()))).into_response())
}

/// List jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/fine-tuning/jobs",
    tag = "fine-tuning",
    params(JobListParams),
    responses((status = 200, body = JobList), (status = 422, description = "Bad query parameter", body = ErrorBody))
)]
pub async fn list_jobs(State(state): State<AppState>, Query(q): Query<JobListParams>) -> Result<axum::Json<JobList>, ApiError> {
    let limit = Page { limit: q.limit, after: None }.limit()?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_query",
                format!("status must be one of queued, running, succeeded, failed, cancelled; got {s:?}"),
            )
            .with_field("status")
        })?),
    };
    if let Some(after) = q.after.as_deref() {
        if state.store.get_job(after).await?.is_none() {
            return Err(super::invalid_cursor("job", after));
        }
    }
    let mut rows = state.store.list_jobs(status, q.after.as_deref(), limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if has_more { rows.last().map(|r| r.id.clone()) } else { None };
    let live = live_workers_for(&state, &rows).await;
    let data = rows.into_iter().map(|r| job_view(&state, r, live.as_deref())).collect();
    Ok(axum::Json(JobList { data, has_more, next_cursor }))
}

async fn find_job(state: &AppState, id: &str) -> Result<JobRecord, ApiError> {
    state.store.get_job(id).await?.ok_or_else(|| ApiError::not_found("job", id))
}

/// One job: status, progress, latest metrics, timestamps, error, attempt.
#[utoipa::path(
    get,
    path = "/v1/fine-tuning/jobs/{id}",
    tag = "fine-tuning",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody))
)]
pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<axum::Json<Job>, ApiError> {
    let job = find_job(&state, &id).await?;
    let live = live_workers_for(&state, std::slice::from_ref(&job)).await;
    Ok(axum::Json(job_view(&state, job, live.as_deref())))
}

/// Cancel a job. A queued job is cancelled at once; a running one stops within seconds at a
/// safe point. Finished jobs cannot be cancelled (409).
#[utoipa::path(
    post,
    path = "/v1/fine-tuning/jobs/{id}/cancel",
    tag = "fine-tuning",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = Job),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody),
    )
)]
pub async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<axum::Json<Job>, ApiError> {
    match state.store.cancel_job(&id, now_ms()).await? {
        CancelOutcome::Cancelled(job) => {
            let e = NewEvent {
                job_id: job.id.clone(),
                attempt: job.attempt,
                level: "warn",
                kind: "status",
                message: "cancelled by request".into(),
                data: None,
            };
            if let Err(err) = state.store.insert_event(&e, now_ms()).await {
                tracing::warn!(error = %err, "could not record job event");
            }
            Ok(axum::Json(job_view(&state, job, None)))
        }
        CancelOutcome::AlreadyFinished(job) => Err(ApiError::conflict(
            "job_finished",
            format!("job {id} already {}; only queued or running jobs can be cancelled", job.status),
        )
        .with("status", job.status)),
        CancelOutcome::NotFound => Err(ApiError::not_found("job", &id)),
    }
}

/// A job's events, oldest first, paged with `after`. With `Accept: text/event-stream` the same
/// as `/events/stream`.
#[utoipa::path(
    get,
    path = "/v1/fine-tuning/jobs/{id}/events",
    tag = "fine-tuning",
    params(("id" = String, Path, description = "Job id"), EventParams),
    responses(
        (status = 200, body = EventList, content_type = "application/json"),
        (status = 404, body = ErrorBody),
        (status = 422, description = "Bad query parameter", body = ErrorBody),
    )
)]
pub async fn list_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let wants_stream =
        headers.get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    if wants_stream {
        return stream_events(State(state), Path(id), Query(q), headers).await;
    }
    find_job(&state, &id).await?;
    let limit = match q.limit {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::unprocessable("invalid_query", format!("limit must be between 1 and 1000, got {n}"))
                .with_field("limit"))
        }
    };
    let mut rows = state.store.list_events(&id, q.after.unwrap_or(0), limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = rows.last().map(|e| e.id).or(q.after);
    Ok(axum::Json(EventList { data: rows.into_iter().map(JobEvent::from).collect(), has_more, next_cursor }).into_response())
}

/// A job's events as Server-Sent Events: every event so far (after `after` or `Last-Event-ID`),
/// then new ones as they happen; a final `end` event once the job has finished.
#[utoipa::path(
    get,
    path = "/v1/fine-tuning/jobs/{id}/events/stream",
    tag = "fine-tuning",
    params(("id" = String, Path, description = "Job id"), EventParams),
    responses(
        (status = 200, description = "Event stream: `id` is the event id, `event` its type, `data` the JobEvent JSON", content_type = "text/event-stream", body = StreamEvent),
        (status = 404, body = ErrorBody),
        (status = 422, description = "Bad query parameter", body = ErrorBody),
    )
)]
pub async fn stream_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    find_job(&state, &id).await?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let after = last_event_id.or(q.after).unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(follow_events(state, id, after, tx));
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response())
}

const STREAM_POLL: Duration = Duration::from_millis(300);

/// Polls the store for new events and feeds them to the stream until the job has finished and
/// everything was sent, the client left, or the server shuts down.
async fn follow_events(state: AppState, id: String, mut after: i64, tx: mpsc::Sender<Result<SseEvent, Infallible>>) {
    let mut quiet_after_end = 0;
    loop {
        let status = match state.store.get_job(&id).await {
            Ok(Some(job)) => job.status(),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "event stream: reading the job failed");
                return;
            }
        };
        let batch = match state.store.list_events(&id, after, 500).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "event stream: reading events failed");
                return;
            }
        };
        let full = batch.len() == 500;
        let empty = batch.is_empty();
        for e in batch {
            after = e.id;
            let view = JobEvent::from(e);
            let kind = view.kind.clone();
            let Ok(sse) = SseEvent::default().id(view.id.to_string()).event(kind).json_data(&view) else { continue };
            if tx.send(Ok(sse)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        if status.is_terminal() && empty {
            // Two quiet polls after the end: the worker's last words are in.
            quiet_after_end += 1;
            if quiet_after_end >= 2 {
                let end = SseEvent::default().event("end").data(format!("{{\"status\":\"{}\"}}", status.as_str()));
                let _ = tx.send(Ok(end)).await;
                return;
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(STREAM_POLL) => {}
        }
    }
}

/// A job's checkpoints, newest first.
#[utoipa::path(
    get,
    path = "/v1/fine-tuning/jobs/{id}/checkpoints",
    tag = "fine-tuning",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = CheckpointList), (status = 404, body = ErrorBody))
)]
pub async fn list_checkpoints(State(state): State<AppState>, Path(id): Path<String>) -> Result<axum::Json<CheckpointList>, ApiError> {
    find_job(&state, &id).await?;
    let list = state.store.list_checkpoints(&id).await?;
    Ok(axum::Json(CheckpointList { data: list.into_iter().map(Checkpoint::from).collect() }))
}
