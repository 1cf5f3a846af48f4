//! The OpenAPI 3.1 document, generated from the handlers' annotations. `openapi.yaml` at the
//! repository root is this document; a test fails when they differ.
//!
//! Each resource file has its own `ApiDoc`; a new resource adds one line to `spec()`.

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Arbiter",
        description = "Pairwise preference prediction: upload arena datasets, fine-tune LoRA adapters on a frozen \
                       quantized Llama-family base, follow jobs, predict A/B/tie probabilities. Errors are \
                       always `{\"error\": {\"code\", \"message\", ...}}`."
    ),
    components(schemas(super::error::ErrorBody))
)]
struct Base;

/// The whole document.
pub fn spec() -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    doc.merge(super::datasets::ApiDoc::openapi());
    doc.merge(super::jobs::ApiDoc::openapi());
    doc.merge(super::health::ApiDoc::openapi());
    doc.merge(super::predict::ApiDoc::openapi());
    doc.merge(super::adapters::ApiDoc::openapi());
    doc.merge(super::workers::ApiDoc::openapi());
    // Other resources: doc.merge(super::predict::ApiDoc::openapi()); ...
    doc
}

/// The document as YAML, as committed in `openapi.yaml`.
pub fn yaml() -> Result<String, String> {
    spec().to_yaml().map_err(|e| e.to_string())
}
