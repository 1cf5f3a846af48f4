//! `/v1/datasets`: upload (multipart, raw CSV or JSONL), list, get, delete.
//!
//! An upload is parsed and validated completely before anything is stored; the rows are then
//! written atomically as JSONL under the data directory and the row is inserted. Any failure on
//! the way leaves nothing behind.

use axum::extract::{Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{self, read_body, Query};
use super::{timestamp, AppState, Page};
use crate::data::arena::{self, DatasetError, ParsedDataset};
use crate::store::datasets::DeleteDataset;
use crate::store::{files, now_ms, DatasetRecord, NewDataset};

#[derive(OpenApi)]
#[openapi(
    paths(create_dataset, list_datasets, get_dataset, delete_dataset),
    tags((name = "datasets", description = "Arena datasets: upload, validate, list"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/datasets", get(list_datasets).post(create_dataset))
        .route("/v1/datasets/{id}", get(get_dataset).delete(delete_dataset))
}

/// Class counts of the kept rows, by one-hot column.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LabelCounts {
    pub winner_model_a: i64,
    pub winner_model_b: i64,
    pub winner_tie: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Dataset {
    pub id: String,
    /// The uploaded file name, or the `name` query parameter.
    pub name: Option<String>,
    /// `csv` or `jsonl`: how it was uploaded.
    pub format: String,
    /// Rows kept.
    pub rows: i64,
    /// Rows dropped because both responses were empty.
    pub dropped_rows: i64,
    pub label_counts: LabelCounts,
    /// Size of the stored rows in bytes.
    pub bytes: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl From<DatasetRecord> for Dataset {
    fn from(r: DatasetRecord) -> Dataset {
        Dataset {
            id: r.id,
            name: r.name,
            format: r.format,
            rows: r.row_count,
            dropped_rows: r.dropped_rows,
            label_counts: LabelCounts { winner_model_a: r.count_a, winner_model_b: r.count_b, winner_tie: r.count_tie },
            bytes: r.bytes,
            created_at: timestamp(r.created_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetList {
    pub data: Vec<Dataset>,
    pub has_more: bool,
    /// Pass as `after` for the next page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadParams {
    /// A name for the dataset (defaults to the uploaded file name): 1 to 200 characters, no
    /// control characters, no slash or backslash.
    pub name: Option<String>,
}

/// The multipart form: one file field.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The arena CSV or JSONL file.
    #[schema(format = Binary, value_type = String)]
    file: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Csv,
    Jsonl,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }

    fn from_mime(essence: &str) -> Option<Option<Format>> {
        match essence {
            "text/csv" | "application/csv" => Some(Some(Format::Csv)),
            "application/x-ndjson" | "application/jsonl" | "application/json-lines" | "application/x-jsonlines"
            | "application/jsonlines" => Some(Some(Format::Jsonl)),
            // Decided by the content.
            "text/plain" | "application/octet-stream" | "" => Some(None),
            _ => None,
        }
    }

    fn from_file_name(name: &str) -> Option<Format> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Some(Format::Csv)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Some(Format::Jsonl)
        } else {
            None
        }
    }

    /// JSON lines start with `{` (after a byte order mark, if any); anything else is read as CSV.
    fn sniff(bytes: &[u8]) -> Format {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(bytes);
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Format::Jsonl,
            _ => Format::Csv,
        }
    }
}

fn mime_essence(ct: &str) -> String {
    ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Upload a dataset.
///
/// The body is an arena CSV (`text/csv`), JSON lines with the same fields
/// (`application/x-ndjson`, `application/jsonl`) or a multipart form with a `file` field. The
/// whole file is validated before anything is stored; invalid files get 422 with the first
/// errors (row number, column, reason).
#[utoipa::path(
    post,
    path = "/v1/datasets",
    tag = "datasets",
    params(UploadParams),
    request_body(content(
        (String = "text/csv"),
        (String = "application/x-ndjson"),
        (String = "application/jsonl"),
        (UploadForm = "multipart/form-data"),
    )),
    responses(
        (status = 201, description = "Stored", body = Dataset),
        (status = 400, description = "Malformed multipart body", body = ErrorBody),
        (status = 413, description = "Body over the size limit, or more rows than the limit per dataset", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Not a valid arena dataset", body = ErrorBody),
    )
)]
pub async fn create_dataset(
    State(state): State<AppState>,
    Query(params): Query<UploadParams>,
    req: Request,
) -> Result<impl IntoResponse, ApiError> {
    let ct = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let essence = mime_essence(&ct);
    let (bytes, declared, file_name) = if essence == "multipart/form-data" {
        read_multipart(req, &state).await?
    } else {
        let Some(declared) = Format::from_mime(&essence) else {
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Type {essence:?} is not accepted: send text/csv, application/x-ndjson, \
                 application/jsonl or multipart/form-data with a `file` field"
            )));
        };
        (read_body(req, &state).await?.to_vec(), declared, None)
    };

    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::unprocessable("empty_file", "the uploaded file is empty"));
    }
    if let Err(e) = std::str::from_utf8(&bytes) {
        let offset = e.valid_up_to();
        let line = bytes[..offset].iter().filter(|&&b| b == b'\n').count() + 1;
        return Err(ApiError::unprocessable(
            "invalid_encoding",
            format!("the file is not UTF-8 text: invalid byte at line {line} (byte offset {offset})"),
        )
        .with("line", line)
        .with("byte_offset", offset));
    }
    let format = declared.or_else(|| file_name.as_deref().and_then(Format::from_file_name)).unwrap_or_else(|| Format::sniff(&bytes));

    let limits = arena::ParseLimits { max_rows: state.limits.max_dataset_rows, max_text_chars: state.limits.max_text_chars };
    let parsed = tokio::task::spawn_blocking(move || match format {
        Format::Csv => arena::parse_csv_limited(&bytes, &limits),
        Format::Jsonl => arena::parse_jsonl_limited(&bytes, &limits),
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| dataset_error(e, format))?;

    if !parsed.labelled {
        return Err(ApiError::unprocessable(
            "missing_column",
            "the file has no winner_model_a, winner_model_b, winner_tie columns: training data needs labels",
        )
        .with("column", "winner_model_a")
        .with("row", 1));
    }
    if parsed.rows.is_empty() {
        return Err(ApiError::unprocessable(
            "no_rows",
            format!("no rows left to train on ({} dropped because both responses were empty)", parsed.dropped_rows()),
        ));
    }
    if let Some(n) = &params.name {
        check_dataset_name(n)?;
    }
    // A multipart file name is the client's path: only its last component is kept.
    let file_name = file_name.map(|f| f.rsplit(['/', '\\']).next().unwrap_or("").chars().take(200).collect::<String>()).filter(|f| check_dataset_name(f).is_ok());
    let name = params.name.or(file_name);
    let record = store_dataset(&state, parsed, format, name).await?;
    Ok((StatusCode::CREATED, axum::Json(Dataset::from(record))))
}

/// A dataset name is a label (it never names a file): 1 to 200 characters, no control
/// characters, no path separators.
fn check_dataset_name(name: &str) -> Result<(), ApiError> {
    let bad = name.trim().is_empty()
        || name.chars().count() > 200
        || name.chars().any(|c| c.is_control() || c == '/' || c == '\\')
        || name == "."
        || name == "..";
    if bad {
        return Err(ApiError::unprocessable(
            "invalid_query",
            "name must be 1 to 200 characters without control characters, '/' or '\\'",
        )
        .with_field("name"));
    }
    Ok(())
}

async fn read_multipart(req: Request, state: &AppState) -> Result<(Vec<u8>, Option<Format>, Option<String>), ApiError> {
    let (mut multipart, multipart_error) = extract::multipart(req, state).await?;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let is_file = field.name() == Some("file") || field.file_name().is_some();
        if !is_file {
            continue;
        }
        let file_name = field.file_name().map(str::to_string);
        let declared = field
            .content_type()
            .and_then(|ct| Format::from_mime(&mime_essence(ct)))
            .flatten()
            .or_else(|| file_name.as_deref().and_then(Format::from_file_name));
        let bytes = field.bytes().await.map_err(multipart_error)?;
        return Ok((bytes.to_vec(), declared, file_name));
    }
    Err(ApiError::unprocessable("missing_file", "the multipart form has no `file` field").with_field("file"))
}

fn dataset_error(e: DatasetError, format: Format) -> ApiError {
    let what = match format {
        Format::Csv => "CSV",
        Format::Jsonl => "JSONL",
    };
    let rows = e.row_errors();
    let err = match &e {
        DatasetError::Empty => ApiError::unprocessable("empty_file", format!("the uploaded file has no data rows: {e}")),
        DatasetError::NotUtf8 { byte_offset, row } => {
            ApiError::unprocessable("invalid_encoding", format!("the file is not UTF-8 text: {e}"))
                .with("byte_offset", byte_offset)
                .with("row", row)
        }
        DatasetError::Unreadable { row, .. } => {
            ApiError::unprocessable("unreadable_file", format!("not a readable arena {what} file: {e}")).with("row", row)
        }
        DatasetError::MissingColumns(cols) => ApiError::unprocessable("missing_column", format!("{e}"))
            .with("column", cols.first())
            .with("row", 1),
        DatasetError::TooManyRows { limit, row } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_rows",
            format!("the file has more than {limit} data rows, the limit per dataset; split it"),
        )
        .with("limit", limit)
        .with("row", row),
        DatasetError::TextTooLong { row, column, limit } => {
            ApiError::unprocessable("text_too_long", format!("{e}")).with("row", row).with("column", column).with("limit", limit)
        }
        DatasetError::Rows { errors, total } => {
            let mut err = ApiError::unprocessable("invalid_rows", format!("{total} invalid row(s); the first: {e}"))
                .with("total_errors", total);
            if let Some(first) = errors.first() {
                err = err.with("row", first.row);
                if let Some(col) = &first.column {
                    err = err.with("column", col);
                }
            }
            err
        }
    };
    err.with("format", format.as_str()).with("errors", rows)
}

async fn store_dataset(
    state: &AppState,
    parsed: ParsedDataset,
    format: Format,
    name: Option<String>,
) -> Result<DatasetRecord, ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    let path = state.dirs.dataset_file(&id);
    let dropped_rows = parsed.dropped_rows() as i64;
    let rows = parsed.rows;
    let write_path = path.clone();
    let bytes = tokio::task::spawn_blocking(move || files::write_rows_atomic(&write_path, &rows).map(|b| (b, rows.len())))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    if let Err(e) = state.artifacts.publish(&path).await {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(ApiError::internal(e));
    }
    let new = NewDataset {
        id,
        name,
        format: format.as_str().into(),
        row_count: bytes.1 as i64,
        dropped_rows,
        label_counts: parsed.label_counts.map(|c| c as i64),
        bytes: bytes.0 as i64,
        path: path.to_string_lossy().into_owned(),
    };
    match state.store.insert_dataset(&new, now_ms()).await {
        Ok(rec) => Ok(rec),
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            Err(e.into())
        }
    }
}

/// List datasets, newest first.
#[utoipa::path(
    get,
    path = "/v1/datasets",
    tag = "datasets",
    params(Page),
    responses(
        (status = 200, body = DatasetList),
        (status = 422, description = "Bad query parameter", body = ErrorBody),
    )
)]
pub async fn list_datasets(State(state): State<AppState>, Query(page): Query<Page>) -> Result<axum::Json<DatasetList>, ApiError> {
    let limit = page.limit()?;
    if let Some(after) = page.after.as_deref() {
        // a cursor whose dataset is gone cannot say where the page starts: an empty page would
        // read as the end of the list
        if state.store.get_dataset(after).await?.is_none() {
            return Err(super::invalid_cursor("dataset", after));
        }
    }
    let mut rows = state.store.list_datasets(page.after.as_deref(), limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if has_more { rows.last().map(|r| r.id.clone()) } else { None };
    Ok(axum::Json(DatasetList { data: rows.into_iter().map(Dataset::from).collect(), has_more, next_cursor }))
}

/// One dataset.
#[utoipa::path(
    get,
    path = "/v1/datasets/{id}",
    tag = "datasets",
    params(("id" = String, Path, description = "Dataset id")),
    responses((status = 200, body = Dataset), (status = 404, body = ErrorBody))
)]
pub async fn get_dataset(State(state): State<AppState>, Path(id): Path<String>) -> Result<axum::Json<Dataset>, ApiError> {
    match state.store.get_dataset(&id).await? {
        Some(rec) => Ok(axum::Json(rec.into())),
        None => Err(ApiError::not_found("dataset", &id)),
    }
}

/// Delete a dataset; refused (409) while a queued or running job uses it.
#[utoipa::path(
    delete,
    path = "/v1/datasets/{id}",
    tag = "datasets",
    params(("id" = String, Path, description = "Dataset id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = ErrorBody),
        (status = 409, description = "A queued or running job uses it", body = ErrorBody),
    )
)]
pub async fn delete_dataset(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    match state.store.delete_dataset(&id).await? {
        DeleteDataset::Deleted(path) => {
            let local = state.dirs.dataset_file(&id);
            if let Err(e) = state.artifacts.unpublish(&local).await {
                tracing::warn!(error = %e, "could not remove the shared copy of the dataset");
            }
            if let Err(e) = tokio::fs::remove_file(&path).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, path, "could not remove dataset file");
                }
            }
            if local != std::path::Path::new(&path) {
                let _ = tokio::fs::remove_file(&local).await;
            }
            Ok(StatusCode::NO_CONTENT)
        }
        DeleteDataset::InUse => Err(ApiError::conflict(
            "dataset_in_use",
            format!("dataset {id} is used by a queued or running job; cancel the job or wait for it to finish"),
        )),
        DeleteDataset::NotFound => Err(ApiError::not_found("dataset", &id)),
    }
}
