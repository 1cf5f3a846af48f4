//! `/v1/predict` (and `/predict`, the same): A/B/tie probabilities of prompt/response pairs
//! from a chosen adapter; `/v1/predict/file`: an arena test CSV in, a submission CSV out.
//!
//! The handler resolves the adapter (id or name) through the store, then on the blocking pool
//! loads it into the engine's cache if it is cold and tokenizes the pairs (so the engine
//! thread only runs forward passes), submits the rows to the engine and awaits its answer.
//! Probabilities are the softmax of the adapter's calibrated logits (its temperature, or its
//! response-length model stacked on the logits, computed from the texts as sent); `symmetric` also scores every pair with A and B swapped and averages the two with the A/B
//! probabilities swapped back, so the answer is exactly symmetric.
//!
//! `/predict` also takes a TEI-style body `{"inputs": [[prompt, response_a, response_b], ...]}`
//! and answers TEI-style `[[{"label", "score"}, ...], ...]` (labels sorted by score).

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{parse_json, read_body, Json, Query};
use super::AppState;
use crate::data::{ArenaRow, Label};
use crate::ml::{calibrate, classifier};
use crate::ml::serve::{Engine, LoadedAdapter, ServeError};
use crate::store::artifacts::ArtifactError;
use crate::store::AdapterRecord;

#[derive(OpenApi)]
#[openapi(
    paths(predict, predict_compat, predict_file),
    components(schemas(PredictRequest, Pair, Text, PredictResponse, Prediction, Usage, AdapterRef, TeiRequest, TeiScore)),
    tags((name = "predict", description = "A/B/tie probabilities from a trained adapter"))
)]
pub struct ApiDoc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/predict", post(predict_compat))
        .route("/v1/predict/file", post(predict_file))
}

/// Limits of the prediction endpoints.
#[derive(Debug, Clone)]
pub struct PredictLimits {
    /// Pairs per request (a symmetric pair counts once).
    pub max_pairs: usize,
    /// Largest token budget per pair a request may ask for (and the cap on an adapter's own).
    pub max_length: usize,
    /// Rows of a CSV sent to `/v1/predict/file`.
    pub max_file_rows: usize,
    /// Rows the engine's queue holds (a symmetric pair is two).
    pub queue_rows: usize,
    /// Characters of one prompt or response (its turns together).
    pub max_text_chars: usize,
    /// Adapter used when a request names none; else the newest adapter.
    pub default_adapter: Option<String>,
}

/// The prediction side of the application state.
#[derive(Clone)]
pub struct Predictor {
    pub engine: Engine,
    pub limits: Arc<PredictLimits>,
}

/// A text field: one string or a list of turns (`null` turns count as empty).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Text {
    One(String),
    Turns(Vec<Option<String>>),
}

impl Text {
    fn turns(self) -> Vec<String> {
        match self {
            Text::One(s) => vec![s],
            Text::Turns(v) => v.into_iter().map(Option::unwrap_or_default).collect(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    /// Echoed back; the pair's position when absent.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub id: Option<serde_json::Value>,
    pub prompt: Text,
    pub response_a: Text,
    pub response_b: Text,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// Adapter id or name; the server's default (or the newest adapter) when absent.
    #[serde(default)]
    pub adapter: Option<String>,
    pub pairs: Vec<Pair>,
    /// Also score every pair with A and B swapped and average.
    #[serde(default)]
    pub symmetric: bool,
    /// Token budget per pair (balanced truncation); the adapter's training length when absent.
    #[serde(default)]
    pub max_length: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdapterRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    #[schema(value_type = Object)]
    pub id: serde_json::Value,
    pub winner_model_a: f32,
    pub winner_model_b: f32,
    pub winner_tie: f32,
    /// The pair was longer than the token budget and was cut.
    pub truncated: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Tokens scored (both directions when symmetric).
    pub tokens: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PredictResponse {
    pub adapter: AdapterRef,
    pub predictions: Vec<Prediction>,
    pub usage: Usage,
}

/// TEI-style body of `/predict`: each input is `[prompt, response_a, response_b]`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TeiRequest {
    pub inputs: TeiInputs,
    #[serde(default)]
    pub adapter: Option<String>,
    /// Scores are the calibrated logits instead of probabilities (with `symmetric`, the
    /// logarithms of the averaged probabilities); their softmax is the probabilities.
    #[serde(default)]
    pub raw_scores: bool,
    /// Accepted for compatibility: long inputs are always truncated.
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub symmetric: bool,
}

/// `inputs`: a list of inputs, or one input. A list whose every element is itself a list of three
/// texts is a batch, even when those could be read as the turns of one input (a batch is tried
/// first); one input of three-turn texts is sent as a batch of one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TeiInputs {
    Many(Vec<[Text; 3]>),
    One([Text; 3]),
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TeiScore {
    pub label: String,
    pub score: f32,
}

/// An `ApiError`, with `Retry-After` when the client should come back.
pub struct Rejection {
    error: ApiError,
    retry_after_s: Option<u64>,
}

impl From<ApiError> for Rejection {
    fn from(error: ApiError) -> Rejection {
        Rejection { error, retry_after_s: None }
    }
}

impl From<crate::store::StoreError> for Rejection {
    fn from(e: crate::store::StoreError) -> Rejection {
        ApiError::from(e).into()
    }
}

impl From<ServeError> for Rejection {
    fn from(e: ServeError) -> Rejection {
        let (error, retry) = match &e {
            ServeError::Overloaded { retry_after_s } => (
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", "the predictor's queue is full; retry later"),
                Some(*retry_after_s),
            ),
            ServeError::BaseModel => (
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "model_unavailable", "the adapter's base model cannot be loaded"),
                Some(30),
            ),
            ServeError::Unavailable => (
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "predictor_unavailable", "the predictor is not running"),
                Some(30),
            ),
            ServeError::Adapter { key } => (
                ApiError::conflict("adapter_unusable", format!("adapter {key} cannot be loaded for its base model"))
                    .with_field("adapter"),
                None,
            ),
            ServeError::Input(m) => (ApiError::unprocessable("invalid_request", m.clone()), None),
            ServeError::Internal => (ApiError::internal("inference failed (cause logged by the engine)"), None),
        };
        Rejection { error, retry_after_s: retry }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut res = self.error.into_response();
        if let Some(s) = self.retry_after_s {
            res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

fn predictor(state: &AppState) -> &Predictor {
    &state.predictor
}

/// Resolve the adapter a request names (or the default) to its stored record.
async fn resolve_adapter(state: &AppState, name: Option<&str>) -> Result<AdapterRecord, Rejection> {
    let limits = &predictor(state).limits;
    let wanted = name.map(str::to_string).or_else(|| limits.default_adapter.clone());
    match wanted {
        Some(n) => {
            if n.trim().is_empty() {
                return Err(ApiError::unprocessable("invalid_request", "adapter must not be empty").with_field("adapter").into());
            }
            state.store.find_adapter(&n).await?.ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "adapter_not_found", format!("no adapter with id or name {n:?}"))
                    .with_field("adapter")
                    .into()
            })
        }
        None => state.store.list_adapters().await?.into_iter().next().ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "adapter_not_found", "no adapter is registered yet; train one first")
                .with_field("adapter")
                .into()
        }),
    }
}

/// Pairs to score, already validated.
struct Scoring {
    rows: Vec<ArenaRow>,
    symmetric: bool,
    max_length: Option<usize>,
}

/// What the engine gave back, per pair.
struct Scored {
    adapter: Arc<LoadedAdapter>,
    /// Logits per pair and, when symmetric, of the swapped pair.
    logits: Vec<([f32; 3], Option<[f32; 3]>)>,
    /// Each pair's response-length features (of the texts as sent, before any clipping).
    lengths: Vec<[f64; 3]>,
    truncated: Vec<bool>,
    tokens: usize,
}

impl Scored {
    fn probabilities(&self) -> Vec<[f32; 3]> {
        self.logits.iter().zip(&self.lengths).map(|((p, q), f)| self.pair_probabilities(p, q.as_ref(), f)).collect()
    }

    /// One pair's probabilities from its logits as sent, `p`, and with A and B swapped, `q`
    /// (scored symmetrically).
    fn pair_probabilities(&self, p: &[f32; 3], q: Option<&[f32; 3]>, f: &[f64; 3]) -> [f32; 3] {
        let meta = &self.adapter.meta;
        let softmax = |l: &[f32; 3], f: [f64; 3]| classifier::softmax3(&meta.calibrated_logits(l, &f), 1.0);
        let p = softmax(p, *f);
        match q {
            Some(q) => classifier::symmetric(p, softmax(q, calibrate::mirrored(*f))),
            None => p,
        }
    }

    /// Calibrated logits of each pair (the softmax of each is its probabilities): scored
    /// symmetrically, the logarithms of the averaged probabilities.
    fn calibrated_logits(&self) -> Vec<[f32; 3]> {
        self.logits
            .iter()
            .zip(&self.lengths)
            .map(|((p, q), f)| match q {
                Some(q) => self.pair_probabilities(p, Some(q), f).map(|x| x.max(f32::MIN_POSITIVE).ln()),
                None => self.adapter.meta.calibrated_logits(p, f),
            })
            .collect()
    }
}

fn check_max_length(limits: &PredictLimits, max_length: Option<usize>) -> Result<(), Rejection> {
    match max_length {
        Some(n) if n < 8 || n > limits.max_length => Err(ApiError::unprocessable(
            "invalid_request",
            format!("max_length must be between 8 and {}, got {n}", limits.max_length),
        )
        .with_field("max_length")
        .into()),
        _ => Ok(()),
    }
}

/// Every prompt and response within the text limit; the error names the first one over it.
fn check_texts(limits: &PredictLimits, rows: &[ArenaRow], name: impl Fn(usize, &str) -> String) -> Result<(), Rejection> {
    let max = limits.max_text_chars;
    for (i, r) in rows.iter().enumerate() {
        for (field, turns) in [("prompt", &r.prompt), ("response_a", &r.response_a), ("response_b", &r.response_b)] {
            let bytes: usize = turns.iter().map(String::len).sum();
            if bytes > max && turns.iter().map(|t| t.chars().count()).sum::<usize>() > max {
                return Err(ApiError::unprocessable(
                    "text_too_long",
                    format!("{} is longer than the limit of {max} characters", name(i, field)),
                )
                .with_field(name(i, field))
                .with("limit", max)
                .into());
            }
        }
    }
    Ok(())
}

fn check_pairs(limits: &PredictLimits, n: usize, field: &str) -> Result<(), Rejection> {
    if n == 0 {
        return Err(ApiError::unprocessable("invalid_request", format!("{field} must hold at least one pair")).with_field(field).into());
    }
    if n > limits.max_pairs {
        return Err(ApiError::unprocessable(
            "too_many_pairs",
            format!("{n} pairs exceed the limit of {} per request", limits.max_pairs),
        )
        .with_field(field)
        .with("limit", limits.max_pairs)
        .into());
    }
    Ok(())
}

/// Load the adapter (if cold), tokenize, score.
async fn score(state: &AppState, record: &AdapterRecord, job: Scoring) -> Result<Scored, Rejection> {
    let p = predictor(state).clone();
    let key = record.id.clone();
    let dir = match state.artifacts.adapter_dir(&record.id, &record.path).await {
        Ok(dir) => dir,
        // its files are gone from this node and from the shared store: the same answer as files
        // that are there but cannot be read
        Err(ArtifactError::Missing(_)) => return Err(ServeError::Adapter { key }.into()),
        Err(e) => return Err(ApiError::internal(e).into()),
    };
    let base_path = PathBuf::from(&record.base_model);
    let n = job.rows.len();
    let prepared = tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let adapter = p.engine.adapter(&key, &dir, &base_path)?;
        let cap = p.limits.max_length;
        let max_length = job.max_length.unwrap_or(adapter.meta.max_length).clamp(1, cap);
        // texts are cut at the end by the truncation policy: a text far longer than the token
        // budget is cut first to bound the tokenizer's work (no token spans 64 characters)
        let max_chars = max_length.saturating_mul(MAX_CHARS_PER_TOKEN);
        let mut rows = job.rows;
        let lengths: Vec<[f64; 3]> = rows.iter().map(calibrate::length_features).collect();
        let clipped: Vec<bool> = rows
            .iter_mut()
            .map(|r| {
                let p = clip_turns(&mut r.prompt, max_chars);
                let a = clip_turns(&mut r.response_a, max_chars);
                let b = clip_turns(&mut r.response_b, max_chars);
                p || a || b
            })
            .collect();
        let mut ids = Vec::with_capacity(n * if job.symmetric { 2 } else { 1 });
        let mut truncated = Vec::with_capacity(n);
        for (r, clipped) in rows.iter().zip(clipped) {
            let e = adapter.encode(r, max_length);
            truncated.push(e.truncated || clipped);
            ids.push(e.ids);
        }
        if job.symmetric {
            for r in &rows {
                let e = adapter.encode(&r.swapped(), max_length);
                ids.push(e.ids);
            }
        }
        Ok((adapter, ids, truncated, lengths))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing task failed: {e}")))?;
    let (adapter, ids, truncated, lengths) = prepared?;
    let tokens = ids.iter().map(Vec::len).sum();
    let logits = predictor(state).engine.submit(adapter.clone(), ids)?.await?;
    let logits = if job.symmetric {
        logits[..n].iter().zip(&logits[n..]).map(|(p, q)| (*p, Some(*q))).collect()
    } else {
        logits.into_iter().map(|p| (p, None)).collect()
    };
    Ok(Scored { adapter, logits, lengths, truncated, tokens })
}

/// Characters per token that a text is cut to before tokenizing (far above any tokenizer's).
const MAX_CHARS_PER_TOKEN: usize = 64;

/// Keep the first `max_chars` characters of a text given as turns (joined by a two-character
/// separator); true when something was cut.
fn clip_turns(turns: &mut Vec<String>, max_chars: usize) -> bool {
    let mut left = max_chars;
    for i in 0..turns.len() {
        let t = &mut turns[i];
        if let Some((cut, _)) = t.char_indices().nth(left) {
            t.truncate(cut);
            turns.truncate(i + 1);
            return true;
        }
        left = left.saturating_sub(t.chars().count() + 2);
        if left == 0 && turns[i + 1..].iter().any(|t| !t.is_empty()) {
            turns.truncate(i + 1);
            return true;
        }
    }
    false
}

fn row_of(i: usize, prompt: Text, a: Text, b: Text) -> ArenaRow {
    ArenaRow { id: i.to_string(), prompt: prompt.turns(), response_a: a.turns(), response_b: b.turns(), label: None }
}

/// A decoded `/v1/predict` body checked against the limits: the ids to echo and the rows.
pub fn native_rows(body: &mut PredictRequest, limits: &PredictLimits) -> Result<(Vec<serde_json::Value>, Vec<ArenaRow>), Rejection> {
    check_pairs(limits, body.pairs.len(), "pairs")?;
    check_max_length(limits, body.max_length)?;
    let mut ids = Vec::with_capacity(body.pairs.len());
    let mut rows = Vec::with_capacity(body.pairs.len());
    for (i, p) in std::mem::take(&mut body.pairs).into_iter().enumerate() {
        ids.push(p.id.unwrap_or(serde_json::Value::from(i)));
        rows.push(row_of(i, p.prompt, p.response_a, p.response_b));
    }
    check_texts(limits, &rows, |i, field| format!("pairs[{i}].{field}"))?;
    Ok((ids, rows))
}

/// A decoded `/predict` body: the native shape, or TEI's `{"inputs": ...}`.
pub enum PredictBody {
    Native(PredictRequest),
    Tei(TeiRequest),
}

/// Decodes a `/predict` body: TEI-style when it has `inputs`, else native. Not JSON at all is
/// the 400 with line and column; the wrong shape the 422 naming the field.
pub fn decode_predict_body(bytes: &[u8]) -> Result<PredictBody, ApiError> {
    let tei = match serde_json::from_slice::<Peek>(bytes) {
        Ok(p) => p.inputs.is_some(),
        Err(_) => parse_json::<serde::de::IgnoredAny>(bytes).map(|_| false)?,
    };
    if tei {
        parse_json(bytes).map(PredictBody::Tei)
    } else {
        parse_json(bytes).map(PredictBody::Native)
    }
}

/// A decoded TEI body checked against the limits: its rows, and whether it was one input.
pub fn tei_rows(body: &mut TeiRequest, limits: &PredictLimits) -> Result<(Vec<ArenaRow>, bool), Rejection> {
    let (inputs, single) = match std::mem::replace(&mut body.inputs, TeiInputs::Many(Vec::new())) {
        TeiInputs::One(t) => (vec![t], true),
        TeiInputs::Many(v) => (v, false),
    };
    check_pairs(limits, inputs.len(), "inputs")?;
    let rows: Vec<ArenaRow> = inputs.into_iter().enumerate().map(|(i, [p, a, b])| row_of(i, p, a, b)).collect();
    check_texts(limits, &rows, |i, field| {
        let k = match field {
            "prompt" => 0,
            "response_a" => 1,
            _ => 2,
        };
        format!("inputs[{i}][{k}]")
    })?;
    Ok((rows, single))
}

async fn predict_native(state: &AppState, mut body: PredictRequest) -> Result<PredictResponse, Rejection> {
    let (ids, rows) = native_rows(&mut body, &predictor(state).limits)?;
    let record = resolve_adapter(state, body.adapter.as_deref()).await?;
    let scored = score(state, &record, Scoring { rows, symmetric: body.symmetric, max_length: body.max_length }).await?;
    let predictions = scored
        .probabilities()
        .into_iter()
        .zip(ids)
        .zip(&scored.truncated)
        .map(|((p, id), t)| Prediction { id, winner_model_a: p[0], winner_model_b: p[1], winner_tie: p[2], truncated: *t })
        .collect();
    Ok(PredictResponse {
        adapter: AdapterRef { id: record.id, name: record.name },
        predictions,
        usage: Usage { tokens: scored.tokens },
    })
}

/// Predict A/B/tie probabilities for prompt/response pairs.
#[utoipa::path(
    post,
    path = "/v1/predict",
    tag = "predict",
    request_body = PredictRequest,
    responses(
        (status = 200, description = "One prediction per pair, in order", body = PredictResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 404, description = "No adapter with that id or name", body = ErrorBody),
        (status = 409, description = "The adapter's files cannot be loaded for its base model", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid (named in `field`), or a text is over the length limit", body = ErrorBody),
        (status = 429, description = "The predictor's queue is full; see Retry-After", body = ErrorBody),
        (status = 503, description = "The base model cannot be loaded; see Retry-After", body = ErrorBody),
    )
)]
pub async fn predict(State(state): State<AppState>, Json(body): Json<PredictRequest>) -> Result<axum::Json<PredictResponse>, Rejection> {
    Ok(axum::Json(predict_native(&state, body).await?))
}

#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    inputs: Option<serde::de::IgnoredAny>,
}

/// `/v1/predict` under its short path; a TEI-style `{"inputs": ...}` body gets a TEI answer.
#[utoipa::path(
    post,
    path = "/predict",
    tag = "predict",
    request_body(content = PredictRequest, description = "The `/v1/predict` body, or a TEI body `{\"inputs\": [[prompt, response_a, response_b], ...]}`"),
    responses(
        (status = 200, description = "As `/v1/predict`; for a TEI body, one list of `{label, score}` per input (sorted by score)", body = PredictResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 404, description = "No adapter with that id or name", body = ErrorBody),
        (status = 409, description = "The adapter's files cannot be loaded for its base model", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing or invalid (named in `field`), or a text is over the length limit", body = ErrorBody),
        (status = 429, description = "The predictor's queue is full; see Retry-After", body = ErrorBody),
        (status = 503, description = "The base model cannot be loaded; see Retry-After", body = ErrorBody),
    )
)]
pub async fn predict_compat(State(state): State<AppState>, req: Request) -> Result<Response, Rejection> {
    let ct = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let json = ct.parse::<mime::Mime>().is_ok_and(|m| m.type_() == mime::APPLICATION && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON)));
    if !json {
        return Err(ApiError::unsupported_media_type(format!(
            "expected a JSON body with Content-Type: application/json, got {:?}",
            if ct.is_empty() { "nothing" } else { &ct }
        ))
        .into());
    }
    let bytes = read_body(req, &state).await?;
    let mut body = match decode_predict_body(&bytes)? {
        PredictBody::Native(body) => return Ok(axum::Json(predict_native(&state, body).await?).into_response()),
        PredictBody::Tei(body) => body,
    };
    let (rows, single) = tei_rows(&mut body, &predictor(&state).limits)?;
    let record = resolve_adapter(&state, body.adapter.as_deref()).await?;
    let scored = score(&state, &record, Scoring { rows, symmetric: body.symmetric, max_length: None }).await?;
    let scores: Vec<[f32; 3]> = if body.raw_scores {
        scored.calibrated_logits()
    } else {
        scored.probabilities()
    };
    let out: Vec<Vec<TeiScore>> = scores
        .into_iter()
        .map(|s| {
            let mut v: Vec<TeiScore> =
                Label::ALL.iter().map(|l| TeiScore { label: l.column().to_string(), score: s[l.index()] }).collect();
            v.sort_by(|a, b| b.score.total_cmp(&a.score));
            v
        })
        .collect();
    if single {
        let first = out.into_iter().next().unwrap_or_default();
        Ok(axum::Json(first).into_response())
    } else {
        Ok(axum::Json(out).into_response())
    }
}

/// Query parameters of `/v1/predict/file`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    /// Adapter id or name; the default (or newest) when absent.
    pub adapter: Option<String>,
    #[serde(default)]
    pub symmetric: bool,
    pub max_length: Option<usize>,
}

/// Parse an arena CSV (test layout `id,prompt,response_a,response_b`; a labelled file is
/// fine too, its labels are ignored) with the dataset parser, so both endpoints accept and
/// refuse the same files. Rows whose two responses are empty (which a training set drops) are
/// kept and scored with their empty responses: a submission needs every id.
fn parse_test_csv(bytes: &[u8], max_rows: usize, max_text_chars: usize) -> Result<Vec<ArenaRow>, ApiError> {
    use crate::data::arena::{self, DatasetError, ParseLimits};
    // One row over the limit is enough to know the file is too long (answered below).
    let limits = ParseLimits { max_rows: max_rows.saturating_add(1), max_text_chars };
    let parsed = arena::parse_csv_limited(bytes, &limits).map_err(|e| {
        let mut err = ApiError::unprocessable("invalid_csv", format!("not a valid arena CSV: {e}"));
        match &e {
            DatasetError::MissingColumns(cols) => {
                err = err.with("column", cols.first().cloned().unwrap_or_default()).with("columns", cols);
            }
            DatasetError::Rows { errors, .. } => {
                if let Some(first) = errors.first() {
                    err = err.with("row", first.row);
                    if let Some(c) = &first.column {
                        err = err.with("column", c);
                    }
                }
                err = err.with("errors", errors);
            }
            DatasetError::Unreadable { row: Some(r), .. } | DatasetError::NotUtf8 { row: Some(r), .. } => {
                err = err.with("row", r);
            }
            DatasetError::TooManyRows { .. } => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_many_rows",
                    format!("the file has more than {max_rows} rows, the limit; split it"),
                )
                .with("limit", max_rows);
            }
            DatasetError::TextTooLong { row, column, limit } => {
                return ApiError::unprocessable("text_too_long", format!("{e}"))
                    .with("row", row)
                    .with("column", column)
                    .with("limit", limit);
            }
            _ => {}
        }
        err
    })?;
    let rows = parsed.into_all_rows();
    if rows.len() > max_rows {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_rows",
            format!("the file has {} rows, more than the limit of {max_rows}; split it", rows.len()),
        )
        .with("limit", max_rows));
    }
    Ok(rows)
}

/// Score an arena test CSV; answer a submission CSV.
#[utoipa::path(
    post,
    path = "/v1/predict/file",
    tag = "predict",
    params(FileParams),
    request_body(content = String, content_type = "text/csv", description = "Arena CSV with `id,prompt,response_a,response_b` (raw, or multipart field `file`)"),
    responses(
        (status = 200, description = "Submission CSV `id,winner_model_a,winner_model_b,winner_tie`", body = String, content_type = "text/csv"),
        (status = 400, description = "Malformed multipart body", body = ErrorBody),
        (status = 404, description = "No adapter with that id or name", body = ErrorBody),
        (status = 409, description = "The adapter's files cannot be loaded for its base model", body = ErrorBody),
        (status = 413, description = "Body over the size limit, or too many rows", body = ErrorBody),
        (status = 422, description = "Not a valid arena CSV (line and column named)", body = ErrorBody),
        (status = 429, description = "The predictor's queue is full; see Retry-After", body = ErrorBody),
        (status = 503, description = "The base model cannot be loaded; see Retry-After", body = ErrorBody),
    )
)]
pub async fn predict_file(State(state): State<AppState>, Query(params): Query<FileParams>, req: Request) -> Result<Response, Rejection> {
    let limits = predictor(&state).limits.clone();
    check_max_length(&limits, params.max_length)?;
    let ct = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes: Bytes = if ct.starts_with("multipart/form-data") {
        let limit = state.limits.max_body_bytes;
        let multipart_error = |e: axum::extract::multipart::MultipartError| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::bad_request("invalid_multipart", e.body_text())
            }
        };
        let mut mp = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
        let mut found = None;
        while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
            if field.name() == Some("file") {
                found = Some(field.bytes().await.map_err(multipart_error)?);
                break;
            }
        }
        found.ok_or_else(|| ApiError::unprocessable("invalid_request", "the multipart body has no `file` field").with_field("file"))?
    } else {
        read_body(req, &state).await?
    };
    let rows = parse_test_csv(&bytes, limits.max_file_rows, limits.max_text_chars)?;
    let record = resolve_adapter(&state, params.adapter.as_deref()).await?;
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    // chunks of the per-request pair limit, two in flight so the engine never waits for the
    // next chunk's tokenization, where the queue holds two (else the second is refused)
    use futures::StreamExt;
    let chunk = limits.max_pairs.max(1);
    let in_flight = (limits.queue_rows / (chunk * if params.symmetric { 2 } else { 1 })).clamp(1, 2);
    let chunks: Vec<Vec<ArenaRow>> = rows.chunks(chunk).map(<[ArenaRow]>::to_vec).collect();
    let results: Vec<Result<Vec<[f32; 3]>, Rejection>> = futures::stream::iter(chunks)
        .map(|chunk| {
            let state = &state;
            let record = &record;
            async move {
                let job = Scoring { rows: chunk, symmetric: params.symmetric, max_length: params.max_length };
                score(state, record, job).await.map(|s| s.probabilities())
            }
        })
        .buffered(in_flight)
        .collect()
        .await;
    let mut out = String::from("id,winner_model_a,winner_model_b,winner_tie\n");
    let mut i = 0;
    for r in results {
        for p in r? {
            let id = ids.get(i).map(String::as_str).unwrap_or("");
            let id = if id.contains([',', '"', '\n', '\r']) { format!("\"{}\"", id.replace('"', "\"\"")) } else { id.to_string() };
            out.push_str(&format!("{id},{},{},{}\n", p[0], p[1], p[2]));
            i += 1;
        }
    }
    Ok((
        [
            (CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8")),
            (CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"submission.csv\"")),
        ],
        out,
    )
        .into_response())
}

impl Predictor {
    /// The engine and limits from the settings. Base models load on first use (the default
    /// one at start with `--predict-preload`).
    pub fn from_args(args: &crate::config::ServeArgs) -> anyhow::Result<Predictor> {
        let p = &args.predict;
        let device = crate::bench::parse_device(&args.store.device)?;
        let format = args.store.base_format;
        let cfg = crate::ml::serve::EngineConfig {
            batch_tokens: p.predict_batch_tokens,
            max_wait: std::time::Duration::from_millis(p.predict_max_wait_ms),
            queue_rows: p.predict_queue_rows,
            adapter_cache: p.predict_adapter_cache,
            base_cache: p.predict_base_cache,
            batching: p.predict_batching,
            graphs: p.predict_graphs,
        };
        let symmetric_rows = 2 * p.predict_max_pairs;
        if p.predict_queue_rows < symmetric_rows {
            anyhow::bail!(
                "--predict-queue-rows ({}) must hold at least one full symmetric request (2 x --predict-max-pairs = {symmetric_rows})",
                p.predict_queue_rows
            );
        }
        let engine = Engine::new(cfg, move |path: &std::path::Path| {
            crate::ml::model::BaseModel::load(path, format, &device)
        })?;
        if p.predict_preload {
            engine.preload(&args.store.model);
        }
        Ok(Predictor {
            engine,
            limits: Arc::new(PredictLimits {
                max_pairs: p.predict_max_pairs.max(1),
                max_length: p.predict_max_length.max(8),
                max_file_rows: p.predict_max_file_rows.max(1),
                queue_rows: p.predict_queue_rows,
                max_text_chars: args.max_text_chars.max(1),
                default_adapter: p.default_adapter.clone(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_clipped_at_the_end() {
        let mut t = vec!["abcdef".to_string(), "ghi".to_string()];
        assert!(!clip_turns(&mut t, 11));
        assert_eq!(t, ["abcdef", "ghi"]);
        assert!(clip_turns(&mut t, 9));
        assert_eq!(t, ["abcdef", "g"]);
        let mut t = vec!["ééééé".to_string()];
        assert!(clip_turns(&mut t, 2));
        assert_eq!(t, ["éé"]);
        let mut t = vec!["ab".to_string(), "cd".to_string()];
        assert!(clip_turns(&mut t, 3));
        assert_eq!(t, ["ab"]);
        let mut t = vec!["ab".to_string(), String::new()];
        assert!(!clip_turns(&mut t, 2));
    }
}
