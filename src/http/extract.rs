//! Our extractors: like axum's, but every rejection is an `ApiError` with the JSON shape and a
//! message that names the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

/// A JSON request body. Syntax errors are 400 `invalid_json` with line and column; a body that
/// is JSON but not the expected shape (unknown field, wrong type) is 422 `invalid_request`
/// naming the field.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let ct = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime: Option<mime::Mime> = ct.parse().ok();
        let is_json = mime.as_ref().is_some_and(|m| {
            m.type_() == mime::APPLICATION && (m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON))
        });
        if !is_json {
            return Err(ApiError::unsupported_media_type(format!(
                "expected a JSON body with Content-Type: application/json, got {:?}",
                if ct.is_empty() { "nothing" } else { ct }
            )));
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// Reads the whole body within the configured limit (413 beyond it).
pub async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.limits.max_body_bytes)
        } else {
            ApiError::bad_request("invalid_body", format!("the request body could not be read: {}", r.body_text()))
        }
    })
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            return Err(json_error(e.into_inner(), Some(path)));
        }
    };
    de.end().map_err(|e| json_error(e, None))?;
    Ok(value)
}

fn json_error(inner: serde_json::Error, path: Option<String>) -> ApiError {
    match inner.classify() {
        serde_json::error::Category::Data => {
            let err = ApiError::unprocessable("invalid_request", strip_position(&inner.to_string()));
            match path {
                Some(p) if !p.is_empty() && p != "." => err.with_field(p),
                _ => err,
            }
        }
        _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {inner}"))
            .with("line", inner.line())
            .with("column", inner.column()),
    }
}

/// serde_json appends " at line L column C" to data errors; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Query parameters; a bad one is 422 `invalid_query`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|r| ApiError::unprocessable("invalid_query", r.body_text()))
    }
}

/// A multipart form body, and the mapping of its read errors: 413 past the body limit, else
/// 400 `invalid_multipart`.
pub async fn multipart(
    req: Request,
    state: &AppState,
) -> Result<(axum::extract::Multipart, impl Fn(axum::extract::multipart::MultipartError) -> ApiError + Copy), ApiError> {
    let limit = state.limits.max_body_bytes;
    let read_error = move |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request("invalid_multipart", format!("the multipart body could not be read: {}", e.body_text()))
        }
    };
    let form = axum::extract::Multipart::from_request(req, state)
        .await
        .map_err(|r| ApiError::bad_request("invalid_multipart", r.body_text()))?;
    Ok((form, read_error))
}
