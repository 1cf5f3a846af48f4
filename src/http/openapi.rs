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
    add_security(&mut doc);
    doc
}

/// The bearer API key on every `/v1` route and `/predict`, with their 401 and 403 answers;
/// health, metrics and the dashboard stay open (see `auth.rs`).
fn add_security(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

    let error_response = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
    };
    let components = doc.components.get_or_insert_with(Default::default);
    let mut bearer = Http::new(HttpAuthScheme::Bearer);
    bearer.description = Some(
        "An API key: `admin` scope for datasets, jobs and adapters, `predict` (or `admin`) for prediction. \
         Not needed when the server has no keys (then it listens on loopback only)."
            .into(),
    );
    components.add_security_scheme("api_key", SecurityScheme::Http(bearer));
    components.responses.insert(
        "Unauthorized".into(),
        RefOr::T(error_response("No API key, or not a valid one (unknown, revoked, malformed header)")),
    );
    components
        .responses
        .insert("Forbidden".into(), RefOr::T(error_response("The API key's scope does not allow this route")));

    for (path, item) in doc.paths.paths.iter_mut() {
        if !(path.starts_with("/v1/") || path == "/predict") {
            continue;
        }
        let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for op in ops.into_iter().flatten() {
            op.security = Some(vec![SecurityRequirement::new("api_key", Vec::<String>::new())]);
            op.responses.responses.insert("401".into(), RefOr::Ref(Ref::from_response_name("Unauthorized")));
            op.responses.responses.insert("403".into(), RefOr::Ref(Ref::from_response_name("Forbidden")));
        }
    }
}

/// The document as YAML, as committed in `openapi.yaml`.
pub fn yaml() -> Result<String, String> {
    spec().to_yaml().map_err(|e| e.to_string())
}
