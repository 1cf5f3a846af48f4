//! The dashboard: one HTML page, one script and one stylesheet, embedded in the binary and
//! served at `/`, `/assets/app.js` and `/assets/app.css`. It talks to the public `/v1` API
//! from the browser, like any other client; nothing here reads the store.
//!
//! Caching: every answer carries a strong `ETag` (a hash of the embedded bytes) and honours
//! `If-None-Match` with 304. The page itself is `no-cache` (always revalidated, so a new binary
//! shows its new page at once); it links the assets (by relative URLs, so a path prefix in a proxy works) with `?v=<hash>`, so those are cached
//! for a year as immutable.

use std::sync::LazyLock;

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Scripts, styles and connections from this origin only; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const REVALIDATE: &str = "no-cache";

struct Asset {
    body: Vec<u8>,
    etag: String,
    content_type: &'static str,
    cache_control: &'static str,
}

impl Asset {
    fn new(body: Vec<u8>, content_type: &'static str, cache_control: &'static str) -> Self {
        let etag = format!("\"{}\"", short_hash(&body));
        Self { body, etag, content_type, cache_control }
    }
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

static JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(APP_JS.as_bytes().to_vec(), "text/javascript; charset=utf-8", IMMUTABLE));
static CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(APP_CSS.as_bytes().to_vec(), "text/css; charset=utf-8", IMMUTABLE));
/// The page, with the asset links pinned to the current asset hashes.
static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    let html = INDEX_HTML
        .replace("\"assets/app.js\"", &format!("\"assets/app.js?v={}\"", short_hash(APP_JS.as_bytes())))
        .replace("\"assets/app.css\"", &format!("\"assets/app.css?v={}\"", short_hash(APP_CSS.as_bytes())));
    Asset::new(html.into_bytes(), "text/html; charset=utf-8", REVALIDATE)
});

/// Routes of the dashboard; stateless, so it merges into a router of any state.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route("/assets/app.js", get(|h: HeaderMap| async move { serve(&JS, &h) }))
        .route("/assets/app.css", get(|h: HeaderMap| async move { serve(&CSS, &h) }))
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().trim_start_matches("W/") == asset.etag || t.trim() == "*"));
    let mut headers = HeaderMap::new();
    headers.insert(ETAG, HeaderValue::from_str(&asset.etag).expect("hex etag is a valid header: this is a bug"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(asset.cache_control));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    if asset.content_type.starts_with("text/html") {
        headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    }
    (headers, asset.body.as_slice()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(tag) = if_none_match {
            req = req.header(IF_NONE_MATCH, tag);
        }
        router::<()>().oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
    }

    #[tokio::test]
    async fn serves_page_and_assets_with_types_and_cache_headers() {
        let page = get("/", None).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(page.headers()[CACHE_CONTROL], "no-cache");
        assert!(page.headers().contains_key(CONTENT_SECURITY_POLICY));
        let body = axum::body::to_bytes(page.into_body(), usize::MAX).await.unwrap();
        let html = String::from_utf8(body.to_vec()).unwrap();
        let js_link = format!("\"assets/app.js?v={}\"", short_hash(APP_JS.as_bytes()));
        assert!(html.contains(&js_link), "page links the versioned script");

        for (path, ty) in [("/assets/app.js", "text/javascript"), ("/assets/app.css", "text/css")] {
            let res = get(path, None).await;
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            assert!(res.headers()[CONTENT_TYPE].to_str().unwrap().starts_with(ty), "{path}");
            assert_eq!(res.headers()[CACHE_CONTROL], IMMUTABLE);
        }
    }

    #[tokio::test]
    async fn matching_etag_gets_304() {
        let first = get("/assets/app.css", None).await;
        let tag = first.headers()[ETAG].to_str().unwrap().to_owned();
        let again = get("/assets/app.css", Some(&tag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(axum::body::to_bytes(again.into_body(), usize::MAX).await.unwrap().is_empty());
        let other = get("/assets/app.css", Some("\"0000\"")).await;
        assert_eq!(other.status(), StatusCode::OK);
    }
}
