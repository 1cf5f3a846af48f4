//! `/v1/workers`: the live workers (seen within one lease) and what each advertises: device
//! kind, device, memory, the job it runs now. Jobs with `resources` go only to workers that
//! meet them.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::error::ApiError;
use super::{timestamp, AppState};
use crate::store::{now_ms, WorkerRecord};

#[derive(OpenApi)]
#[openapi(
    paths(list_workers),
    components(schemas(Worker, WorkerList)),
    tags((name = "workers", description = "Job workers and the devices they advertise"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/workers", get(list_workers))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Worker {
    pub id: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// The device as configured: `cpu`, `cuda:0`, ...
    pub device_name: String,
    /// Memory offered to a job (RAM for cpu), in bytes; absent when unknown.
    pub memory_bytes: Option<i64>,
    /// The job it runs now.
    pub job_id: Option<String>,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub last_seen_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    /// Oldest first.
    pub data: Vec<Worker>,
}

impl From<WorkerRecord> for Worker {
    fn from(w: WorkerRecord) -> Worker {
        Worker {
            id: w.id,
            device: w.device,
            device_name: w.device_name,
            memory_bytes: w.memory_bytes,
            job_id: w.job_id,
            started_at: timestamp(w.started_at),
            last_seen_at: timestamp(w.last_seen_at),
        }
    }
}

/// Live workers, oldest first.
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "workers",
    responses((status = 200, description = "Workers seen within one lease", body = WorkerList))
)]
pub async fn list_workers(State(state): State<AppState>) -> Result<axum::Json<WorkerList>, ApiError> {
    let rows = state.store.list_workers(now_ms() - state.worker_ttl_ms).await?;
    Ok(axum::Json(WorkerList { data: rows.into_iter().map(Worker::from).collect() }))
}
