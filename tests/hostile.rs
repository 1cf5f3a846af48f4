//! The hostile input catalogue: one test per kind of bad input, each through the real server.
//! Every case gets its 4xx with the JSON error shape naming what was wrong, and the server
//! still answers `/healthz` afterwards. (Missing, invalid and forged keys: `tests/auth.rs`.)

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{error_of, small_csv, spawn, spawn_app, HEADER};
use serde_json::{json, Value};

fn pair() -> Value {
    json!({ "prompt": "2+2?", "response_a": "4", "response_b": "5" })
}

#[tokio::test]
async fn oversized_bodies_are_413_on_every_upload_route() {
    let app = spawn().arg("--max-body-bytes", "4096").start().await;
    let big_csv = small_csv(200);
    assert!(big_csv.len() > 4096);
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", big_csv.clone()).await, 413).await;
    assert_eq!(err["code"], "payload_too_large");
    assert_eq!(err["limit_bytes"], 4096);
    app.assert_up().await;

    let err = error_of(app.upload_file("big.csv", big_csv.clone().into_bytes()).await, 413).await;
    assert_eq!(err["code"], "payload_too_large");
    app.assert_up().await;

    let pairs: Vec<Value> = (0..60).map(|_| json!({ "prompt": "x".repeat(100), "response_a": "a", "response_b": "b" })).collect();
    let err = error_of(app.post_json("/v1/predict", &json!({ "pairs": pairs })).await, 413).await;
    assert_eq!(err["code"], "payload_too_large");
    app.assert_up().await;

    let err = error_of(app.post_raw("/v1/predict/file", "text/csv", big_csv).await, 413).await;
    assert_eq!(err["code"], "payload_too_large");
    app.assert_up().await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_without_a_stack_overflow() {
    let app = spawn_app().await;
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));

    let body = format!(r#"{{"pairs": [{{"id": {deep}, "prompt": "p", "response_a": "a", "response_b": "b"}}]}}"#);
    let err = error_of(app.post_raw("/v1/predict", "application/json", body).await, 400).await;
    assert_eq!(err["code"], "invalid_json");
    assert!(err["message"].as_str().unwrap().contains("recursion limit"), "{err}");
    app.assert_up().await;

    // Where the schema has no room for nesting, the first wrong level is the answer.
    let body = format!(r#"{{"dataset_id": "x", "hyperparameters": {deep}}}"#);
    let err = error_of(app.post_raw("/v1/fine-tuning/jobs", "application/json", body).await, 422).await;
    assert_eq!((err["code"].clone(), err["field"].clone()), (json!("invalid_request"), json!("hyperparameters[0]")), "{err}");
    let body = format!(r#"{{"inputs": [[{deep}, "a", "b"]]}}"#);
    let err = error_of(app.post_raw("/predict", "application/json", body).await, 400).await;
    assert_eq!(err["code"], "invalid_json");
    app.assert_up().await;

    // A JSON lines dataset: the deep line is a row error on its line.
    let good = r#"{"id": "1", "prompt": "p", "response_a": "a", "response_b": "b", "label": "winner_tie"}"#;
    let body = format!("{good}\n{{\"id\": \"2\", \"prompt\": {deep}}}\n");
    let err = error_of(app.post_raw("/v1/datasets", "application/x-ndjson", body).await, 422).await;
    assert_eq!(err["code"], "invalid_rows");
    assert_eq!(err["row"], 2);
    app.assert_up().await;

    // Deep nesting inside a CSV cell that must hold a JSON list.
    let csv = format!("{HEADER}\n1,m,m,\"{deep}\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n");
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", csv).await, 422).await;
    assert_eq!((err["row"].clone(), err["column"].clone()), (json!(2), json!("prompt")), "{err}");
    app.assert_up().await;
}

#[tokio::test]
async fn huge_cells_and_texts_are_refused_naming_row_and_column() {
    let app = spawn().arg("--max-text-chars", "1000").start().await;
    let huge = "é".repeat(1001);
    let csv = format!("{HEADER}\n1,m,m,\"[\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n2,m,m,\"[\"\"q\"\"]\",\"{huge}\",b,0,1,0\n");
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", csv).await, 422).await;
    assert_eq!(err["code"], "text_too_long");
    assert_eq!((err["row"].clone(), err["column"].clone(), err["limit"].clone()), (json!(3), json!("response_a"), json!(1000)));
    app.assert_up().await;

    // Exactly at the limit (in characters, not bytes) is fine.
    let at_limit = "é".repeat(1000);
    let csv = format!("{HEADER}\n1,m,m,q,{at_limit},b,1,0,0\n");
    assert_eq!(app.post_raw("/v1/datasets", "text/csv", csv).await.status(), 201);

    let jsonl = format!("{}\n", json!({ "id": 1, "prompt": ["a", huge], "response_a": "a", "response_b": "b", "label": "winner_tie" }));
    let err = error_of(app.post_raw("/v1/datasets", "application/x-ndjson", jsonl).await, 422).await;
    assert_eq!((err["row"].clone(), err["column"].clone()), (json!(1), json!("prompt")));
    app.assert_up().await;

    // More turns than the limit has characters (each turn counts at least one), on line 2.
    let good = json!({ "id": 1, "prompt": "q", "response_a": "a", "response_b": "b", "label": "winner_tie" });
    let many = json!({ "id": 2, "prompt": "q", "response_a": "a", "response_b": vec![""; 1001], "label": "winner_tie" });
    let err = error_of(app.post_raw("/v1/datasets", "application/x-ndjson", format!("{good}\n{many}\n")).await, 422).await;
    assert_eq!(err["code"], "text_too_long");
    assert_eq!((err["row"].clone(), err["column"].clone()), (json!(2), json!("response_b")));
    let at_limit = json!({ "id": 2, "prompt": "q", "response_a": "a", "response_b": vec![""; 1000], "label": "winner_tie" });
    assert_eq!(app.post_raw("/v1/datasets", "application/x-ndjson", format!("{good}\n{at_limit}\n")).await.status(), 201);

    let body = json!({ "pairs": [pair(), { "prompt": "p", "response_a": "a", "response_b": [huge] }] });
    let err = error_of(app.post_json("/v1/predict", &body).await, 422).await;
    assert_eq!(err["code"], "text_too_long");
    assert_eq!(err["field"], "pairs[1].response_b");
    let body = json!({ "inputs": [["p", huge, "b"]] });
    let err = error_of(app.post_json("/predict", &body).await, 422).await;
    assert_eq!(err["field"], "inputs[0][1]");
    app.assert_up().await;
}

#[tokio::test]
async fn too_many_rows_is_413_with_the_limit() {
    let app = spawn().arg("--max-dataset-rows", "10").start().await;
    assert_eq!(app.post_raw("/v1/datasets", "text/csv", small_csv(10)).await.status(), 201);
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", small_csv(11)).await, 413).await;
    assert_eq!((err["code"].clone(), err["limit"].clone(), err["row"].clone()), (json!("too_many_rows"), json!(10), json!(12)));
    let jsonl: String = (0..11)
        .map(|i| format!("{}\n", json!({ "id": i, "prompt": "p", "response_a": "a", "response_b": "b", "label": "winner_tie" })))
        .collect();
    let err = error_of(app.post_raw("/v1/datasets", "application/x-ndjson", jsonl).await, 413).await;
    assert_eq!(err["code"], "too_many_rows");
    app.assert_up().await;
}

#[tokio::test]
async fn invalid_utf8_is_refused_with_its_position() {
    let app = spawn_app().await;
    let mut csv = format!("{HEADER}\n1,m,m,q,a,b,1,0,0\n").into_bytes();
    csv.extend_from_slice(b"2,m,m,q,\xff\xfe,b,0,1,0\n");
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", csv).await, 422).await;
    assert_eq!(err["code"], "invalid_encoding");
    assert_eq!(err["line"], 3);
    app.assert_up().await;

    let body = b"{\"pairs\": [{\"prompt\": \"\xc3\x28\", \"response_a\": \"a\", \"response_b\": \"b\"}]}".to_vec();
    let err = error_of(app.post_raw("/v1/predict", "application/json", body).await, 400).await;
    assert_eq!(err["code"], "invalid_json");
    assert_eq!(err["line"], 1);
    app.assert_up().await;

    let body = b"id,prompt,response_a,response_b\n1,\xff,a,b\n".to_vec();
    let err = error_of(app.post_raw("/v1/predict/file", "text/csv", body).await, 422).await;
    assert_eq!(err["row"], 2);
    app.assert_up().await;
}

#[tokio::test]
async fn formula_ids_are_refused_as_csv_injection() {
    let app = spawn_app().await;
    for id in ["=HYPERLINK(\"\"http://x\"\")", "@SUM(A1)", "+1+cmd", "-2+3", "=1"] {
        let csv = format!("{HEADER}\n1,m,m,q,a,b,1,0,0\n\"{id}\",m,m,q,a,b,0,1,0\n");
        let err = error_of(app.post_raw("/v1/datasets", "text/csv", csv).await, 422).await;
        assert_eq!((err["row"].clone(), err["column"].clone()), (json!(3), json!("id")), "{id}: {err}");
        assert!(err["message"].as_str().unwrap().contains("CSV injection"), "{err}");
    }
    let jsonl = format!("{}\n", json!({ "id": "=cmd|' /C calc'!A0", "prompt": "p", "response_a": "a", "response_b": "b", "label": "winner_tie" }));
    let err = error_of(app.post_raw("/v1/datasets", "application/x-ndjson", jsonl).await, 422).await;
    assert_eq!(err["column"], "id");
    let err = error_of(app.post_raw("/v1/predict/file", "text/csv", "id,prompt,response_a,response_b\n@x,p,a,b\n").await, 422).await;
    assert_eq!((err["row"].clone(), err["column"].clone()), (json!(2), json!("id")));
    // Negative numbers and ids with such characters later on are ordinary ids.
    let csv = format!("{HEADER}\n-5,m,m,q,a,b,1,0,0\na=b+c,m,m,q,a,b,0,1,0\n");
    assert_eq!(app.post_raw("/v1/datasets", "text/csv", csv).await.status(), 201);
    // A control character in an id.
    let csv = format!("{HEADER}\n\"a\u{7}b\",m,m,q,a,b,1,0,0\n");
    let err = error_of(app.post_raw("/v1/datasets", "text/csv", csv).await, 422).await;
    assert_eq!(err["column"], "id");
    app.assert_up().await;
}

#[tokio::test]
async fn negative_nan_and_huge_hyperparameters_name_their_field() {
    let app = spawn_app().await;
    let ds = app.create_dataset(6).await;
    let cases: Vec<(String, u16, &str)> = vec![
        (r#"{"learning_rate": -1}"#.into(), 422, "hyperparameters.learning_rate"),
        (r#"{"learning_rate": 0}"#.into(), 422, "hyperparameters.learning_rate"),
        (r#"{"epochs": -1}"#.into(), 422, "hyperparameters.epochs"),
        (r#"{"batch_size": 1e20}"#.into(), 422, "hyperparameters.batch_size"),
        (r#"{"epochs": 18446744073709551616}"#.into(), 422, "hyperparameters.epochs"),
        (r#"{"max_length": 4294967296}"#.into(), 422, "hyperparameters.max_length"),
        (r#"{"lora": {"r": 100000}}"#.into(), 422, "hyperparameters.lora.r"),
        (r#"{"lora": {"alpha": 1e300}}"#.into(), 422, "hyperparameters.lora.alpha"),
        (r#"{"lora": {"dropout": -0.5}}"#.into(), 422, "hyperparameters.lora.dropout"),
        (r#"{"class_weights": [1, -1, 1]}"#.into(), 422, "hyperparameters.class_weights"),
        (r#"{"warmup_steps": 99999999999}"#.into(), 422, "hyperparameters.warmup_steps"),
        (r#"{"checkpointed_layers": 4}"#.into(), 422, "hyperparameters.checkpointed_layers"),
        (r#"{"gradient_checkpointing": true, "checkpointed_layers": 0}"#.into(), 422, "hyperparameters.checkpointed_layers"),
        (r#"{"gradient_checkpointing": true, "checkpointed_layers": -2}"#.into(), 422, "hyperparameters.checkpointed_layers"),
        (r#"{"gradient_checkpointing": true, "mlp_checkpointed_layers": 8}"#.into(), 422, "hyperparameters.mlp_checkpointed_layers"),
        (r#"{"gradient_checkpointing": true, "checkpointed_layers": 0, "mlp_checkpointed_layers": 0}"#.into(), 422, "hyperparameters.mlp_checkpointed_layers"),
        (r#"{"gradient_checkpointing": true, "mlp_offload": true}"#.into(), 422, "hyperparameters.mlp_offload"),
        (r#"{"mlp_offload": "yes"}"#.into(), 422, "hyperparameters.mlp_offload"),
    ];
    for (hp, status, field) in cases {
        let body = format!(r#"{{"dataset_id": "{ds}", "hyperparameters": {hp}}}"#);
        let err = error_of(app.post_raw("/v1/fine-tuning/jobs", "application/json", body).await, status).await;
        assert_eq!(err["field"], field, "{hp}: {err}");
        app.assert_up().await;
    }
    // NaN, Infinity and numbers beyond f64 are not JSON: 400 with the position.
    for hp in [r#"{"learning_rate": NaN}"#, r#"{"learning_rate": Infinity}"#, r#"{"learning_rate": 1e999}"#] {
        let body = format!(r#"{{"dataset_id": "{ds}", "hyperparameters": {hp}}}"#);
        let err = error_of(app.post_raw("/v1/fine-tuning/jobs", "application/json", body).await, 400).await;
        assert_eq!(err["code"], "invalid_json", "{hp}");
        assert!(err["column"].as_u64().unwrap() > 0);
    }
    let err = error_of(app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "validation_fraction": -0.1 })).await, 422).await;
    assert_eq!(err["field"], "validation_fraction");
    let err = error_of(app.post_json("/v1/predict", &json!({ "pairs": [pair()], "max_length": -5 })).await, 422).await;
    assert_eq!(err["field"], "max_length");
    let err = error_of(app.post_json("/v1/predict", &json!({ "pairs": [pair()], "max_length": 1u64 << 40 })).await, 422).await;
    assert_eq!(err["field"], "max_length");
    // No job was stored by any of these.
    assert_eq!(app.get_json("/v1/fine-tuning/jobs").await["data"].as_array().unwrap().len(), 0);
    app.assert_up().await;
}

#[tokio::test]
async fn path_traversal_in_names_never_reaches_the_file_system() {
    let app = spawn_app().await;
    let ds = app.create_dataset(6).await;
    for name in ["../../etc/passwd", "a/b", "..", "a\\b", "x\u{0}y"] {
        let err = error_of(app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "name": name })).await, 422).await;
        assert_eq!(err["field"], "name", "{name:?}");
        let err = error_of(app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "suffix": name })).await, 422).await;
        assert_eq!(err["field"], "suffix", "{name:?}");
    }
    // base_model: only inside the models directory (here the test's data directory).
    let outside = tempfile::tempdir().unwrap();
    let outside_model = outside.path().join("model.gguf");
    std::fs::write(&outside_model, b"gguf").unwrap();
    let link = app.data_dir().join("escape");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    for m in [
        "../../../../etc/passwd".to_string(),
        "/etc/passwd".to_string(),
        outside_model.display().to_string(),
        "escape/model.gguf".to_string(),
        "model.gguf/../../x".to_string(),
        "no-such-model.gguf".to_string(),
    ] {
        let err = error_of(app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "base_model": m })).await, 422).await;
        assert_eq!(err["field"], "base_model", "{m}");
        assert!(!err["message"].as_str().unwrap().contains(&app.data_dir().display().to_string()), "no server path in {err}");
    }
    // A model inside the directory, by relative name, is accepted.
    let res = app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "base_model": "model.gguf" })).await;
    assert_eq!(res.status(), 201);
    let job: Value = res.json().await.unwrap();
    assert!(job["base_model"].as_str().unwrap().ends_with("/model.gguf"));

    // Dataset names are labels: separators and control characters are refused; a multipart
    // file name keeps only its last component.
    for name in ["../../x", "a/b", "..", "a%00b"] {
        let res = app.client.post(app.url("/v1/datasets")).query(&[("name", name.replace("%00", "\0"))]).header("content-type", "text/csv").body(small_csv(3)).send().await.unwrap();
        let err = error_of(res, 422).await;
        assert_eq!(err["field"], "name", "{name}");
    }
    let res = app.upload_file("../../../evil.csv", small_csv(3).into_bytes()).await;
    assert_eq!(res.status(), 201);
    let d: Value = res.json().await.unwrap();
    assert_eq!(d["name"], "evil.csv");

    // Adapter downloads: only the fixed file names, however they are encoded.
    for name in ["..%2F..%2Farbiter.db", "%2E%2E", "arbiter.db", "adapter_config.json%00"] {
        let res = app.get(&format!("/v1/adapters/00000000-0000-0000-0000-000000000000/files/{name}")).await;
        let err = error_of(res, 404).await;
        assert!(err["code"] == "not_found" || err["code"] == "route_not_found", "{name}: {err}");
    }
    let res = app.get("/v1/adapters/..%2F..%2Fjobs/files/adapter_config.json").await;
    assert_eq!(error_of(res, 404).await["code"], "not_found");
    app.assert_up().await;
}

#[tokio::test]
async fn wrong_content_types_are_415() {
    let app = spawn_app().await;
    for (path, ct, body) in [
        ("/v1/predict", "text/plain", json!({ "pairs": [pair()] }).to_string()),
        ("/v1/predict", "application/x-www-form-urlencoded", "pairs=1".to_string()),
        ("/predict", "text/csv", "a,b".to_string()),
        ("/v1/fine-tuning/jobs", "text/xml", "<job/>".to_string()),
        ("/v1/datasets", "application/xml", "<rows/>".to_string()),
        ("/v1/datasets", "image/png", "\u{89}PNG".to_string()),
    ] {
        let err = error_of(app.post_raw(path, ct, body).await, 415).await;
        assert_eq!(err["code"], "unsupported_media_type", "{path} {ct}");
        app.assert_up().await;
    }
    // No content type at all on a JSON route.
    let res = app.client.post(app.url("/v1/fine-tuning/jobs")).body("{}").send().await.unwrap();
    assert_eq!(error_of(res, 415).await["code"], "unsupported_media_type");
    // Multipart without a boundary.
    let err = error_of(app.post_raw("/v1/datasets", "multipart/form-data", "x").await, 400).await;
    assert_eq!(err["code"], "invalid_multipart");
    app.assert_up().await;
}

/// Reads from a raw connection until it closes or `limit` passes; returns what came and when
/// it closed.
fn read_until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), Some(start.elapsed())),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_are_served_meanwhile() {
    let app = spawn().arg("--header-timeout-secs", "1").arg("--request-timeout-secs", "1").start().await;
    let addr = app.addr;

    // Headers trickled (and never finished): the connection is closed after the deadline.
    let slow_headers = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
        let start = Instant::now();
        let mut closed = None;
        while start.elapsed() < Duration::from_secs(6) {
            if s.write_all(b"X-Slow: 1\r\n").is_err() {
                closed = Some(start.elapsed());
                break;
            }
            let (_, c) = read_until_closed(&mut s, Duration::from_millis(300));
            if c.is_some() {
                closed = Some(start.elapsed());
                break;
            }
        }
        closed
    });
    // A connection that sends nothing, and one that sends only the start of the HTTP/2
    // preface: both closed after the deadline too.
    let silent: Vec<_> = [&b""[..], &b"PRI * HTTP"[..]]
        .into_iter()
        .map(|first| {
            tokio::task::spawn_blocking(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(first).unwrap();
                read_until_closed(&mut s, Duration::from_secs(6)).1
            })
        })
        .collect();
    // A body that never arrives: 408 after the request timeout.
    let slow_body = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /v1/datasets HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/csv\r\nContent-Length: 100000\r\n\r\nid,").unwrap();
        read_until_closed(&mut s, Duration::from_secs(6))
    });
    // Meanwhile the server answers others at once.
    for _ in 0..5 {
        let t = Instant::now();
        app.assert_up().await;
        assert!(t.elapsed() < Duration::from_millis(500), "healthz took {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = slow_headers.await.unwrap().expect("the trickling connection is closed");
    assert!(closed < Duration::from_secs(4), "closed after {closed:?}");
    for (what, c) in ["silent", "partial preface"].into_iter().zip(silent) {
        let closed = c.await.unwrap().unwrap_or_else(|| panic!("the {what} connection is closed"));
        assert!(closed < Duration::from_secs(4), "{what}: closed after {closed:?}");
    }
    let (answer, _) = slow_body.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    app.assert_up().await;
}
