//! `/v1/datasets` through HTTP: the real arena sample, the three upload forms, list/get/delete,
//! and every kind of bad input (each answered 4xx with the JSON error shape, server still up).

mod common;

use common::{error_of, sample_csv_path, small_csv, spawn, spawn_app, HEADER};
use serde_json::Value;

// Counts of ../shared/data/arena-sample.csv, obtained independently with Python's csv module:
// 999 rows; one row (id 57180984) has `[null]` for both responses and is dropped; the 998 kept
// rows have winner_model_a 352, winner_model_b 352, winner_tie 294.
const SAMPLE_ROWS: i64 = 998;
const SAMPLE_DROPPED: i64 = 1;
const SAMPLE_LABELS: [i64; 3] = [352, 352, 294];

fn assert_sample_counts(d: &Value) {
    assert_eq!(d["rows"], SAMPLE_ROWS);
    assert_eq!(d["dropped_rows"], SAMPLE_DROPPED);
    assert_eq!(d["label_counts"]["winner_model_a"], SAMPLE_LABELS[0]);
    assert_eq!(d["label_counts"]["winner_model_b"], SAMPLE_LABELS[1]);
    assert_eq!(d["label_counts"]["winner_tie"], SAMPLE_LABELS[2]);
}

#[tokio::test]
async fn real_sample_upload_reports_true_counts_and_is_stored() {
    let app = spawn_app().await;
    let bytes = std::fs::read(sample_csv_path()).expect("the arena sample is next to the repository");
    let res = app.upload_file("arena-sample.csv", bytes).await;
    assert_eq!(res.status(), 201);
    let d: Value = res.json().await.unwrap();
    assert_sample_counts(&d);
    assert_eq!(d["name"], "arena-sample.csv");
    assert_eq!(d["format"], "csv");
    assert!(d["created_at"].as_str().unwrap().ends_with('Z'));

    let id = d["id"].as_str().unwrap();
    let got = app.get_json(&format!("/v1/datasets/{id}")).await;
    assert_sample_counts(&got);
    // Stored as JSONL of ArenaRow, one line per kept row.
    let stored = std::fs::read_to_string(app.data_dir().join("datasets").join(format!("{id}.jsonl"))).unwrap();
    assert_eq!(stored.lines().count() as i64, SAMPLE_ROWS);
    let first: Value = serde_json::from_str(stored.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "30192");
    assert_eq!(first["prompt"].as_array().unwrap().len(), 2, "JSON list cells become turns");
}

#[tokio::test]
async fn raw_csv_body_upload() {
    let app = spawn_app().await;
    let bytes = std::fs::read(sample_csv_path()).unwrap();
    let res = app.post_raw("/v1/datasets?name=sample", "text/csv; charset=utf-8", bytes).await;
    assert_eq!(res.status(), 201);
    let d: Value = res.json().await.unwrap();
    assert_sample_counts(&d);
    assert_eq!(d["name"], "sample");
}

#[tokio::test]
async fn jsonl_upload() {
    let app = spawn_app().await;
    let lines = [
        r#"{"id":"1","prompt":"[\"hi\"]","response_a":"[\"a\"]","response_b":"[\"b\"]","winner_model_a":1,"winner_model_b":0,"winner_tie":0}"#,
        r#"{"id":"2","prompt":"[\"yo\"]","response_a":"[\"a\"]","response_b":"[\"b\"]","winner_model_a":0,"winner_model_b":0,"winner_tie":1}"#,
    ];
    let res = app.post_raw("/v1/datasets", "application/x-ndjson", lines.join("\n")).await;
    assert_eq!(res.status(), 201);
    let d: Value = res.json().await.unwrap();
    assert_eq!(d["format"], "jsonl");
    assert_eq!(d["rows"], 2);
    assert_eq!(d["label_counts"]["winner_model_a"], 1);
    assert_eq!(d["label_counts"]["winner_tie"], 1);
    let res = app.post_raw("/v1/datasets", "application/jsonl", lines.join("\n")).await;
    assert_eq!(res.status(), 201);

    // undeclared JSON lines behind a byte order mark are still JSON lines
    let bom = format!("\u{feff}{}", lines.join("\n"));
    let res = app.post_raw("/v1/datasets", "application/octet-stream", bom.clone()).await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.json::<Value>().await.unwrap()["format"], "jsonl");
    let part = reqwest::multipart::Part::bytes(bom.into_bytes()).file_name("data.json");
    let res = app.client.post(app.url("/v1/datasets")).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let d: Value = res.json().await.unwrap();
    assert_eq!((d["format"].as_str(), d["rows"].as_i64()), (Some("jsonl"), Some(2)));
    // the list in each string was read as a CSV cell is
    let id = d["id"].as_str().unwrap();
    let stored = std::fs::read_to_string(app.data_dir().join("datasets").join(format!("{id}.jsonl"))).unwrap();
    assert!(stored.contains("[\"hi\"]") && !stored.contains("\\\"hi"), "{stored}");
}

#[tokio::test]
async fn list_get_delete() {
    let app = spawn_app().await;
    let a = app.create_dataset(3).await;
    let b = app.create_dataset(4).await;
    let c = app.create_dataset(5).await;
    let page = app.get_json("/v1/datasets?limit=2").await;
    let ids: Vec<_> = page["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, [c.clone(), b.clone()], "newest first");
    assert_eq!(page["has_more"], true);
    let next = app.get_json(&format!("/v1/datasets?limit=2&after={}", page["next_cursor"].as_str().unwrap())).await;
    assert_eq!(next["data"][0]["id"], a.as_str());
    assert_eq!(next["has_more"], false);
    // a cursor whose dataset was deleted meanwhile is an error, not an empty last page
    let d = app.create_dataset(3).await;
    assert_eq!(app.client.delete(app.url(&format!("/v1/datasets/{d}"))).send().await.unwrap().status(), 204);
    let err = error_of(app.get(&format!("/v1/datasets?limit=2&after={d}")).await, 422).await;
    assert_eq!((err["code"].as_str(), err["field"].as_str()), (Some("invalid_cursor"), Some("after")), "{err}");

    let res = app.client.delete(app.url(&format!("/v1/datasets/{a}"))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert!(!app.data_dir().join("datasets").join(format!("{a}.jsonl")).exists(), "rows file removed");
    let err = error_of(app.get(&format!("/v1/datasets/{a}")).await, 404).await;
    assert_eq!(err["code"], "not_found");
    let err = error_of(app.client.delete(app.url(&format!("/v1/datasets/{a}"))).send().await.unwrap(), 404).await;
    assert_eq!(err["code"], "not_found");
}

#[tokio::test]
async fn delete_is_refused_while_a_job_uses_the_dataset() {
    // No trainer: the job stays queued, so it keeps using the dataset.
    let app = spawn_app().await;
    let id = app.create_dataset(6).await;
    let job = app.create_job(&id).await;
    let err = error_of(app.client.delete(app.url(&format!("/v1/datasets/{id}"))).send().await.unwrap(), 409).await;
    assert_eq!(err["code"], "dataset_in_use");
    assert_eq!(app.get(&format!("/v1/datasets/{id}")).await.status(), 200, "still there");
    // Once the job is finished (cancelled) the dataset can go.
    let res = app.client.post(app.url(&format!("/v1/fine-tuning/jobs/{}/cancel", job["id"].as_str().unwrap()))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.delete(app.url(&format!("/v1/datasets/{id}"))).send().await.unwrap();
    assert_eq!(res.status(), 204);
}

/// Asserts a 422 for a CSV upload and that nothing was stored; returns the error object.
async fn rejected_csv(app: &common::TestApp, body: impl Into<reqwest::Body>) -> Value {
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", body).await, 422).await;
    let list = app.get_json("/v1/datasets").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing stored");
    let files = std::fs::read_dir(app.data_dir().join("datasets")).unwrap().count();
    assert_eq!(files, 0, "no file left behind");
    app.assert_up().await;
    err
}

#[tokio::test]
async fn not_csv_text_is_rejected() {
    let app = spawn_app().await;
    let err = rejected_csv(&app, "This is just a paragraph of prose.\nNothing tabular about it at all.\n").await;
    assert!(
        err["code"] == "unreadable_file" || err["code"] == "missing_column",
        "says it is not an arena CSV: {err}"
    );
    assert!(err["message"].as_str().unwrap().len() > 10);
}

#[tokio::test]
async fn not_csv_content_type_is_415() {
    let app = spawn_app().await;
    let err = error_of(app.post_raw("/v1/datasets", "image/png", vec![0x89, b'P', b'N', b'G']).await, 415).await;
    assert_eq!(err["code"], "unsupported_media_type");
    app.assert_up().await;
}

#[tokio::test]
async fn missing_column_is_named() {
    let app = spawn_app().await;
    let csv = small_csv(3).replace(",winner_tie\n", "\n").replace(",0,0,1\n", ",0,0\n");
    let csv = csv
        .lines()
        .map(|l| if l.starts_with("id,") { l.to_string() } else { l.rsplitn(2, ',').nth(1).unwrap().to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let err = rejected_csv(&app, csv).await;
    assert_eq!(err["code"], "missing_column");
    assert_eq!(err["column"], "winner_tie");
    assert!(err["message"].as_str().unwrap().contains("winner_tie"));
}

#[tokio::test]
async fn one_hot_with_zero_ones_names_the_row() {
    let app = spawn_app().await;
    let csv = format!("{HEADER}\n1,m,n,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n2,m,n,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,0,0\n");
    let err = rejected_csv(&app, csv).await;
    assert_eq!(err["code"], "invalid_rows");
    assert_eq!(err["errors"][0]["row"], 3, "header is line 1, so the second data row is row 3: {err}");
}

#[tokio::test]
async fn one_hot_with_two_ones_names_the_row() {
    let app = spawn_app().await;
    let csv = format!("{HEADER}\n1,m,n,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,1,0\n");
    let err = rejected_csv(&app, csv).await;
    assert_eq!(err["code"], "invalid_rows");
    assert_eq!(err["errors"][0]["row"], 2, "{err}");
}

#[tokio::test]
async fn malformed_json_list_names_row_and_column() {
    let app = spawn_app().await;
    let csv = format!("{HEADER}\n1,m,n,\"[\"\"unterminated\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n");
    let err = rejected_csv(&app, csv).await;
    assert_eq!(err["code"], "invalid_rows");
    assert_eq!(err["errors"][0]["row"], 2, "{err}");
    assert_eq!(err["errors"][0]["column"], "prompt", "{err}");
}

#[tokio::test]
async fn empty_file_is_rejected() {
    let app = spawn_app().await;
    let err = rejected_csv(&app, "").await;
    assert_eq!(err["code"], "empty_file");
    let err = error_of(app.upload_file("empty.csv", Vec::new()).await, 422).await;
    assert_eq!(err["code"], "empty_file");
    app.assert_up().await;
}

#[tokio::test]
async fn non_utf8_bytes_are_rejected_with_their_line() {
    let app = spawn_app().await;
    let mut bytes = small_csv(2).into_bytes();
    bytes.extend_from_slice(b"9,m,n,\"[\"\"caf\xe9\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n");
    let err = rejected_csv(&app, bytes).await;
    assert_eq!(err["code"], "invalid_encoding");
    assert_eq!(err["line"], 4);
}

#[tokio::test]
async fn upload_over_the_size_limit_is_413() {
    let app = spawn().arg("--max-body-bytes", "2048").start().await;
    let big = small_csv(200);
    assert!(big.len() > 2048);
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", big.clone()).await, 413).await;
    assert_eq!(err["code"], "payload_too_large");
    assert_eq!(err["limit_bytes"], 2048);
    app.assert_up().await;
    let err = error_of(app.upload_file("big.csv", big.into_bytes()).await, 413).await;
    assert_eq!(err["code"], "payload_too_large");
    app.assert_up().await;
    // A small one still goes through.
    assert_eq!(app.post_raw("/v1/datasets", "text/csv", small_csv(2)).await.status(), 201);
}

#[tokio::test]
async fn unknown_dataset_is_404() {
    let app = spawn_app().await;
    let err = error_of(app.get("/v1/datasets/no-such-id").await, 404).await;
    assert_eq!(err["code"], "not_found");
    assert!(err["message"].as_str().unwrap().contains("no-such-id"));
    app.assert_up().await;
}

#[tokio::test]
async fn multipart_without_a_file_is_422() {
    let app = spawn_app().await;
    let form = reqwest::multipart::Form::new().text("note", "hello");
    let res = app.client.post(app.url("/v1/datasets")).multipart(form).send().await.unwrap();
    let err = error_of(res, 422).await;
    assert_eq!(err["field"], "file");
    app.assert_up().await;
}
