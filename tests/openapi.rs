//! `openapi.yaml` is generated from the code and must not drift; every path in it is served.
//!
//! To regenerate after changing routes or schemas:
//!     ARBITER_WRITE_OPENAPI=1 cargo test --test openapi

mod common;

use common::spawn_app;

fn committed_path() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml")
}

#[test]
fn committed_openapi_matches_the_code() {
    let generated = arbiter::http::openapi::yaml().expect("the document serialises");
    if std::env::var_os("ARBITER_WRITE_OPENAPI").is_some() {
        std::fs::write(committed_path(), &generated).expect("write openapi.yaml");
        return;
    }
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.yaml differs from the document generated from the code; regenerate it with\n    \
         ARBITER_WRITE_OPENAPI=1 cargo test --test openapi\nand commit the result"
    );
}

#[test]
fn document_is_openapi_3_1() {
    let spec = arbiter::http::openapi::spec();
    let json = serde_json::to_value(&spec).unwrap();
    assert!(json["openapi"].as_str().unwrap().starts_with("3.1"));
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let app = spawn_app().await;
    let spec = serde_json::to_value(arbiter::http::openapi::spec()).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 9, "{:?}", paths.keys());
    for (path, ops) in paths {
        let concrete = path.replace("{id}", "00000000-0000-0000-0000-000000000000");
        for method in ops.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let res = app
                .client
                .request(m, app.url(&concrete))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            let body = res.text().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert!(!body.contains("route_not_found"), "{method} {path} is documented but not routed");
        }
    }
}
