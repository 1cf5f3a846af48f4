//! `/v1/adapters`: trained adapters (newest first), one adapter, and its files in the PEFT
//! layout for download (a fixed list of names: nothing else under the directory is reachable);
//! adapters trained elsewhere (PEFT in Python) imported by upload; deleting one.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::{json_doc, timestamp, AppState};
use super::jobs::{check_name, resolve_base_model};
use crate::ml::adapter::{AdapterMeta, CONFIG_FILE, META_FILE, WEIGHTS_FILE};
use crate::ml::serve::ServeError;
use crate::store::artifacts::ArtifactError;
use crate::store::{now_ms, AdapterRecord, NewAdapter};

#[derive(OpenApi)]
#[openapi(
    paths(list_adapters, import_adapter, get_adapter, delete_adapter, get_adapter_file),
    components(schemas(Adapter, AdapterList, ImportForm)),
    tags((name = "adapters", description = "Trained and imported adapters, and their files"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/adapters", get(list_adapters).post(import_adapter))
        .route("/v1/adapters/{id}", get(get_adapter).delete(delete_adapter))
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
    // listed and read where they are: with a shared store, nothing is downloaded for this
    let present = match state.artifacts.adapter_file_names(&r.id, &r.path).await {
        Ok(names) => names,
        Err(ArtifactError::Missing(_)) => Vec::new(),
        Err(e) => return Err(ApiError::internal(e)),
    };
    let files: Vec<String> = FILES.iter().map(|(f, _)| f.to_string()).filter(|f| present.contains(f)).collect();
    let meta_bytes = match files.iter().any(|f| f == META_FILE) {
        true => state.artifacts.adapter_file_bytes(&r.id, &r.path, META_FILE).await.map_err(ApiError::internal)?,
        false => None,
    };
    let mut a = to_api(r, &state.predictor.engine.hot_adapters());
    let meta = match meta_bytes {
        Some(bytes) => serde_json::from_slice::<AdapterMeta>(&bytes).ok(),
        // a PEFT adapter: served with the defaults
        None if files.iter().any(|f| f == CONFIG_FILE) => Some(AdapterMeta::without_file(String::new())),
        None => None,
    };
    if let Some(meta) = meta {
        a.temperature = Some(meta.temperature);
        a.max_length = Some(meta.max_length);
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

/// The multipart form of an import: the adapter's files under their PEFT names, and two text
/// fields.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the form for OpenAPI only
pub struct ImportForm {
    /// PEFT's `adapter_config.json` (a LoRA config for sequence classification).
    #[schema(rename = "adapter_config.json", value_type = String, format = Binary)]
    config: Vec<u8>,
    /// PEFT's `adapter_model.safetensors`: the LoRA factors and the `score` head (3 rows).
    #[schema(rename = "adapter_model.safetensors", value_type = String, format = Binary)]
    weights: Vec<u8>,
    /// Arbiter's `arbiter.json` (temperature, token budget, calibration), when the adapter
    /// was exported from Arbiter; without it the temperature is 1 and the budget 1024 tokens.
    #[schema(rename = "arbiter.json", value_type = Option<String>, format = Binary)]
    meta: Option<Vec<u8>>,
    /// Name to predict with (default `peft:` and the end of its id).
    name: Option<String>,
    /// The base model it was trained on, in the server's models directory (default: the
    /// server's default model).
    base_model: Option<String>,
}

/// Where an upload's files are staged until they are checked: a `.tmp` directory, which the
/// start-up reconciliation removes if the process dies meanwhile.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The text fields of an import form.
#[derive(Default)]
struct ImportFields {
    name: Option<String>,
    base_model: Option<String>,
}

/// Streams the form's files into `dir` (synced), and returns its text fields.
async fn receive_import(state: &AppState, req: Request, dir: &std::path::Path) -> Result<ImportFields, ApiError> {
    use tokio::io::AsyncWriteExt;
    let (mut multipart, multipart_error) = super::extract::multipart(req, state).await?;
    let mut fields = ImportFields::default();
    let mut seen: Vec<String> = Vec::new();
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        if seen.contains(&name) {
            return Err(ApiError::unprocessable("invalid_request", format!("the form gives {name} twice")).with_field(name));
        }
        seen.push(name.clone());
        if let Some((file, _)) = FILES.iter().find(|(f, _)| *f == name) {
            let path = dir.join(file);
            let io = |e: std::io::Error| ApiError::internal(format!("writing {}: {e}", path.display()));
            let mut out = tokio::fs::File::create(&path).await.map_err(io)?;
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                out.write_all(&chunk).await.map_err(io)?;
            }
            out.sync_all().await.map_err(io)?;
            continue;
        }
        let text = |field_name: &str, bytes: bytes::Bytes| {
            String::from_utf8(bytes.to_vec()).map(|t| t.trim().to_string()).map_err(|_| {
                ApiError::unprocessable("invalid_request", format!("{field_name} must be UTF-8 text")).with_field(field_name)
            })
        };
        match name.as_str() {
            "name" => fields.name = Some(text("name", field.bytes().await.map_err(multipart_error)?)?),
            "base_model" => fields.base_model = Some(text("base_model", field.bytes().await.map_err(multipart_error)?)?),
            _ => {
                return Err(ApiError::unprocessable(
                    "invalid_request",
                    format!("unknown form field {name:?}: expected {CONFIG_FILE}, {WEIGHTS_FILE}, {META_FILE}, name or base_model"),
                )
                .with_field(name))
            }
        }
    }
    for required in [CONFIG_FILE, WEIGHTS_FILE] {
        if !seen.iter().any(|s| s == required) {
            return Err(ApiError::unprocessable("missing_file", format!("the form has no {required} file")).with_field(required));
        }
    }
    Ok(fields)
}

/// Import an adapter trained elsewhere (PEFT in Python) so that `/v1/predict` can serve it:
/// a multipart form with its `adapter_config.json` and `adapter_model.safetensors` (and
/// Arbiter's `arbiter.json` if it came from here). It is loaded on its base model before it
/// is registered: an adapter that cannot serve that base is refused, saying why.
#[utoipa::path(
    post,
    path = "/v1/adapters",
    tag = "adapters",
    request_body(content = ImportForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Registered", body = Adapter),
        (status = 400, description = "Malformed multipart body", body = ErrorBody),
        (status = 409, description = "Name taken (by an adapter, or by a queued or running job)", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 422, description = "A file missing, or an adapter this base model cannot serve (the error names the file or field)", body = ErrorBody),
        (status = 503, description = "The base model cannot be loaded to check the adapter", body = ErrorBody),
    )
)]
pub async fn import_adapter(State(state): State<AppState>, req: Request) -> Result<(StatusCode, axum::Json<Adapter>), ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    let dest = state.dirs.adapter_dir(&id);
    let staging = Staging(dest.with_file_name(format!("{id}{}", crate::ml::fsutil::TMP_SUFFIX)));
    tokio::fs::create_dir_all(&staging.0).await.map_err(|e| ApiError::internal(format!("staging the upload: {e}")))?;
    let fields = receive_import(&state, req, &staging.0).await?;

    // the id's last characters: its first ones are a timestamp, shared by the uploads of a minute
    let name = fields.name.unwrap_or_else(|| format!("peft:{}", &id[id.len() - 8..]));
    check_name("name", &name, 128)?;
    let taken = || ApiError::conflict("name_taken", format!("an adapter named {name:?} already exists")).with_field("name");
    if state.store.get_adapter_by_name(&name).await?.is_some() {
        return Err(taken());
    }
    if state.store.name_pending(&name).await? {
        return Err(ApiError::conflict("name_taken", format!("a queued or running job already makes an adapter named {name:?}"))
            .with_field("name"));
    }
    let base_model = match fields.base_model.as_deref() {
        None => state.default_model.to_string_lossy().into_owned(),
        Some("") => return Err(ApiError::unprocessable("invalid_request", "base_model must not be empty").with_field("base_model")),
        Some(m) => resolve_base_model(&state.models_dir, m).await?,
    };

    // the files first, on their own; then loaded for real on its base, as a prediction would
    let engine = state.predictor.engine.clone();
    let (dir, base_path) = (staging.0.clone(), PathBuf::from(&base_model));
    let checked = tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        let invalid = |e: crate::ml::MlError, base: Option<&str>| {
            let message = e.to_string();
            // the file the message names first is the one at fault
            let file = FILES
                .iter()
                .filter_map(|(f, _)| message.find(f).map(|at| (at, *f)))
                .min()
                .map_or(WEIGHTS_FILE, |(_, f)| f);
            let message = match base {
                Some(name) => format!("the adapter cannot serve base model {name}: {message}"),
                None => format!("the adapter's files are not usable: {message}"),
            };
            ApiError::unprocessable("adapter_invalid", message).with_field(file)
        };
        crate::ml::adapter::check_files(&dir).map_err(|e| invalid(e, None))?;
        let base = engine.base(&base_path).map_err(|e| match e {
            ServeError::BaseModel => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                "the base model cannot be loaded to check the adapter against it",
            ),
            other => ApiError::internal(format!("{other:?}")),
        })?;
        crate::ml::adapter::load(&dir, &base.llama).map(|_| ()).map_err(|e| invalid(e, Some(&base.name)))
    })
    .await
    .map_err(ApiError::internal)?;
    checked?;

    let place = |e: std::io::Error| ApiError::internal(format!("storing the adapter: {e}"));
    let (from, to) = (staging.0.clone(), dest.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        crate::ml::fsutil::sync_dir(&from).map_err(std::io::Error::other)?;
        std::fs::rename(&from, &to)?;
        to.parent().map_or(Ok(()), |p| crate::ml::fsutil::sync_dir(p).map_err(std::io::Error::other))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(place)?;
    let forget = |dest: PathBuf| async move {
        let _ = tokio::fs::remove_dir_all(&dest).await;
    };
    if let Err(e) = state.artifacts.publish(&dest).await {
        // the files it did write go too
        let _ = state.artifacts.unpublish(&dest).await;
        forget(dest).await;
        return Err(ApiError::internal(format!("publishing the adapter: {e}")));
    }
    let new = NewAdapter {
        id: id.clone(),
        name: name.clone(),
        job_id: None,
        base_model,
        path: dest.to_string_lossy().into_owned(),
        metrics: serde_json::json!({}),
    };
    let record = match state.store.insert_adapter(&new, now_ms()).await {
        Ok(r) => r,
        Err(e) => {
            let _ = state.artifacts.unpublish(&dest).await;
            forget(dest).await;
            return Err(if e.is_unique_violation() { taken() } else { e.into() });
        }
    };
    tracing::info!(adapter_id = %id, %name, "adapter imported");
    let mut a = to_api(record, &[]);
    a.files = Some(FILES.iter().map(|(f, _)| *f).filter(|f| dest.join(f).is_file()).map(str::to_string).collect());
    Ok((StatusCode::CREATED, axum::Json(a)))
}

/// Delete an adapter, by id or name: its row, its files (in this node's data directory and
/// in the shared store) and its place in the predictor's cache. Jobs that made it keep its id.
#[utoipa::path(
    delete,
    path = "/v1/adapters/{id}",
    tag = "adapters",
    params(("id" = String, Path, description = "Adapter id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such adapter", body = ErrorBody),
    )
)]
pub async fn delete_adapter(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let r = find(&state, &id).await?;
    let Some(r) = state.store.delete_adapter(&r.id).await? else {
        return Err(ApiError::not_found("adapter", &id));
    };
    state.predictor.engine.forget_adapter(&r.id);
    // only a directory this service made (`adapters/ID` under some node's data directory) is
    // removed, here and in the shared store: an adapter registered from elsewhere keeps its files
    let own = state.dirs.adapter_dir(&r.id);
    if PathBuf::from(&r.path).ends_with(std::path::Path::new("adapters").join(&r.id)) {
        if let Err(e) = state.artifacts.unpublish(&own).await {
            tracing::warn!(error = %e, adapter_id = %r.id, "could not remove the shared copy of the adapter");
        }
        if let Err(e) = tokio::fs::remove_dir_all(&own).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, adapter_id = %r.id, "could not remove the adapter's files");
            }
        }
    }
    tracing::info!(adapter_id = %r.id, name = %r.name, "adapter deleted");
    Ok(StatusCode::NO_CONTENT)
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
