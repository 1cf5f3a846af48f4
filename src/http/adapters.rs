//! `/v1/adapters`: trained adapters (newest first), one adapter, and its files in the PEFT
//! layout for download (a fixed list of names: nothing else under the directory is reachable).

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::{json_doc, timestamp, AppState};
use crate::ml::adapter::{AdapterMeta, CONFIG_FILE, META_FILE, WEIGHTS_FILE};
use crate::store::artifacts::ArtifactError;
use crate::store::AdapterRecord;

#[derive(OpenApi)]
#[openapi(
    paths(list_adapters, get_adapter, get_adapter_file),
    components(schemas(Adapter, AdapterList)),
    tags((name = "adapters", description = "Trained adapters and their files"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/adapters", get(list_adapters))
        .route("/v1/adapters/{id}", get(get_adapter))
        .route("/v1/adapters/{id}/files/{name}", get(get_adapter_file))
}

/// The files that may be downloaded, with their content types.
const FILES: [(&str, &str); 3] =
    [(CONFIG_FILE, "application/json"), (WEIGHTS_FILE, "application/octet-stream"), (META_FILE, "application/json")];

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Adapter {
    pub id: String,
    pub name: String,
    /// The fine-tuning job that produced it, if any.
    pub job_id: Option<String>,
    pub base_model: String,
    /// Final metrics of the training run.
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Loaded in the predictor now.
    pub hot: bool,
    /// Calibration temperature (present on a single adapter's page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Token budget it was trained with (present on a single adapter's page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Downloadable files present (present on a single adapter's page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdapterList {
    pub data: Vec<Adapter>,
}

fn to_api(r: AdapterRecord, hot: &[String]) -> Adapter {
    Adapter {
        hot: hot.contains(&r.id),
        id: r.id,
        name: r.name,
        job_id: r.job_id,
        base_model: r.base_model,
        metrics: json_doc(&r.metrics),
        created_at: timestamp(r.created_at),
        temperature: None,
        max_length: None,
        files: None,
    }
}

async fn find(state: &AppState, id: &str) -> Result<AdapterRecord, ApiError> {
    state.store.find_adapter(id).await?.ok_or_else(|| ApiError::not_found("adapter", id))
}

/// The adapter's directory on this node (fetched from the shared artifact store if need be).
async fn adapter_dir(state: &AppState, r: &AdapterRecord) -> Result<PathBuf, ApiError> {
    match state.artifacts.adapter_dir(&r.id, &r.path).await {
        Ok(dir) => Ok(dir),
        Err(ArtifactError::Missing(_)) => Err(ApiError::not_found("adapter files of", &r.id)),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Adapters, newest first.
#[utoipa::path(
    get,
    path = "/v1/adapters",
    tag = "adapters",
    responses((status = 200, description = "Every adapter, newest first", body = AdapterList))
)]
pub async fn list_adapters(State(state): State<AppState>) -> Result<axum::Json<AdapterList>, ApiError> {
    let hot = state.predictor.engine.hot_adapters();
    let data = state.store.list_adapters().await?.into_iter().map(|r| to_api(r, &hot)).collect();
    Ok(axum::Json(AdapterList { data }))
}

/// One adapter, by id or name.
#[utoipa::path(
    get,
    path = "/v1/adapters/{id}",
    tag = "adapters",
    params(("id" = String, Path, description = "Adapter id or name")),
    responses(
        (status = 200, description = "The adapter", body = Adapter),
        (status = 404, description = "No such adapter", body = ErrorBody),
    )
)]
pub async fn get_adapter(State(state): State<AppState>, Path(id): Path<String>) -> Result<axum::Json<Adapter>, ApiError> {
    let r = find(&state, &id).await?;
    let dir = adapter_dir(&state, &r).await?;
    let mut a = to_api(r, &state.predictor.engine.hot_adapters());
    let mut files = Vec::new();
    for (name, _) in FILES {
        if tokio::fs::metadata(dir.join(name)).await.is_ok_and(|m| m.is_file()) {
            files.push(name.to_string());
        }
    }
    if let Ok(text) = tokio::fs::read_to_string(dir.join(META_FILE)).await {
        if let Ok(meta) = serde_json::from_str::<AdapterMeta>(&text) {
            a.temperature = Some(meta.temperature);
            a.max_length = Some(meta.max_length);
        }
    }
    a.files = Some(files);
    Ok(axum::Json(a))
}

/// Download one of the adapter's files: `adapter_config.json`, `adapter_model.safetensors`
/// or `arbiter.json`.
#[utoipa::path(
    get,
    path = "/v1/adapters/{id}/files/{name}",
    tag = "adapters",
    params(
        ("id" = String, Path, description = "Adapter id or name"),
        ("name" = String, Path, description = "adapter_config.json, adapter_model.safetensors or arbiter.json"),
    ),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream"),
        (status = 404, description = "No such adapter or file", body = ErrorBody),
    )
)]
pub async fn get_adapter_file(State(state): State<AppState>, Path((id, name)): Path<(String, String)>) -> Result<Response, ApiError> {
    // the name must be one of the fixed list: never joined to a path as given
    let Some((file, content_type)) = FILES.iter().find(|(f, _)| *f == name) else {
        return Err(ApiError::not_found("adapter file", &name)
            .with("allowed", FILES.iter().map(|(f, _)| *f).collect::<Vec<_>>()));
    };
    let r = find(&state, &id).await?;
    let path = adapter_dir(&state, &r).await?.join(file);
    let f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ApiError::not_found("adapter file", file)),
        Err(e) => return Err(ApiError::internal(format!("opening {}: {e}", path.display()))),
    };
    let len = f.metadata().await.map_err(|e| ApiError::internal(format!("reading {}: {e}", path.display())))?.len();
    let body = Body::from_stream(file_chunks(f));
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{file}\""))
        .map_err(|e| ApiError::internal(format!("header: {e}")))?;
    Ok((
        [
            (CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (CONTENT_LENGTH, HeaderValue::from(len)),
            (CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// A file as a stream of 64 KiB chunks (weights can be large: never read whole).
fn file_chunks(f: tokio::fs::File) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(Some(f), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
