//! `/healthz`, `/readyz`, `/metrics`, and the JSON shape of routing errors.

mod common;

use common::{error_of, spawn, spawn_app};

#[tokio::test]
async fn healthz_answers() {
    let app = spawn_app().await;
    let body = app.get_json("/healthz").await;
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn readyz_checks_database_and_model() {
    let app = spawn_app().await;
    assert_eq!(app.get_json("/readyz").await["status"], "ready");

    let missing = spawn().arg("--model", "/no/such/model.gguf").start().await;
    let err = error_of(missing.get("/readyz").await, 503).await;
    assert_eq!(err["code"], "not_ready");
    assert_eq!(err["checks"]["database"], "ok");
    assert_eq!(err["checks"]["model"], "missing");
    missing.assert_up().await;
}

#[tokio::test]
async fn metrics_expose_requests_latency_queue_depth_and_jobs_by_status() {
    let app = spawn_app().await;
    let ds = app.create_dataset(3).await;
    app.create_job(&ds).await;
    app.create_job(&ds).await;
    app.get("/healthz").await;
    let res = app.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = res.text().await.unwrap();
    assert!(text.contains("arbiter_queue_depth 2"), "{text}");
    assert!(text.contains("arbiter_jobs{status=\"queued\"} 2"), "{text}");
    assert!(text.contains("arbiter_jobs{status=\"succeeded\"} 0"), "{text}");
    assert!(
        text.contains("arbiter_http_requests_total{method=\"POST\",path=\"/v1/fine-tuning/jobs\",status=\"201\"} 2"),
        "{text}"
    );
    assert!(text.contains("arbiter_http_request_duration_seconds_count{method=\"GET\",path=\"/healthz\"} 1"), "{text}");
    assert!(text.contains("le=\"+Inf\""));

    // made-up methods are counted under one label, however many there are
    for k in 0..5 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{k}").as_bytes()).unwrap();
        app.client.request(method, app.url("/healthz")).send().await.unwrap();
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(!text.contains("MADEUP"), "{text}");
    assert!(text.contains("arbiter_http_request_duration_seconds_count{method=\"OTHER\",path=\"/healthz\"} 5"), "{text}");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_the_json_error_shape() {
    let app = spawn_app().await;
    let err = error_of(app.get("/v1/nothing-here").await, 404).await;
    assert_eq!(err["code"], "route_not_found");
    let err = error_of(app.client.put(app.url("/v1/datasets")).send().await.unwrap(), 405).await;
    assert_eq!(err["code"], "method_not_allowed");
    app.assert_up().await;
}

#[tokio::test]
async fn dashboard_is_served() {
    let app = spawn_app().await;
    let res = app.get("/").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
}
