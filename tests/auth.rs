//! API keys through the real server: 401 without or with a bad key, 403 with the wrong scope,
//! keys from `ARBITER_API_KEYS` and from `arbiter keys create`, the loopback rule when no key
//! exists, and keys kept out of the logs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use arbiter::config::{Command as Cmd, Settings};
use clap::Parser;
use common::{error_of, small_csv, spawn, spawn_app, TestApp};
use serde_json::json;

const ADMIN: &str = "admin-key-0123456789abcdef";
const PREDICT: &str = "predict-key-0123456789abcdef";

async fn with_keys() -> TestApp {
    spawn().arg("--api-keys", &format!("admin:{ADMIN},predict:{PREDICT}")).start().await
}

async fn get_with(app: &TestApp, path: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url(path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn no_key_is_401_with_a_bearer_challenge_on_every_api_route() {
    let app = with_keys().await;
    for (method, path) in [
        ("GET", "/v1/datasets"),
        ("POST", "/v1/datasets"),
        ("GET", "/v1/fine-tuning/jobs"),
        ("POST", "/v1/fine-tuning/jobs"),
        ("GET", "/v1/adapters"),
        ("GET", "/v1/adapters/x/files/adapter_config.json"),
        ("POST", "/v1/predict"),
        ("POST", "/predict"),
        ("POST", "/v1/predict/file"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = app.client.request(m, app.url(path)).header("content-type", "application/json").body("{}").send().await.unwrap();
        let challenge = res.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
        let err = error_of(res, 401).await;
        assert_eq!(err["code"], "missing_api_key", "{method} {path}");
        assert!(challenge.is_some_and(|c| c.starts_with("Bearer ")), "{method} {path}");
    }
    // Open routes stay open; an unknown path is still a 404, not a 401.
    for path in ["/healthz", "/readyz", "/metrics", "/", "/assets/app.js"] {
        assert_ne!(app.get(path).await.status(), 401, "{path}");
    }
    assert_eq!(error_of(app.get("/v1/nothing-here").await, 404).await["code"], "route_not_found");
    app.assert_up().await;
}

#[tokio::test]
async fn invalid_malformed_and_forged_keys_are_401() {
    let app = with_keys().await;
    let forged_stored = format!("arb_0123456789abcdef_{}", "0".repeat(64));
    for (auth, code) in [
        ("Bearer wrong-key-0123456789abcdef".to_string(), "invalid_api_key"),
        (format!("Bearer {ADMIN}x"), "invalid_api_key"),
        (format!("Bearer {}", &ADMIN[..ADMIN.len() - 1]), "invalid_api_key"),
        (format!("Bearer {}", ADMIN.to_uppercase()), "invalid_api_key"),
        (format!("Bearer {forged_stored}"), "invalid_api_key"),
        (format!("Basic {ADMIN}"), "invalid_authorization"),
        (ADMIN.to_string(), "invalid_authorization"),
        ("Bearer ".to_string(), "invalid_authorization"),
        ("Bearer".to_string(), "invalid_authorization"),
    ] {
        let err = error_of(get_with(&app, "/v1/datasets", Some(&auth)).await, 401).await;
        assert_eq!(err["code"], code, "{auth:?}");
        let text = err.to_string();
        assert!(!text.contains(ADMIN) && !text.contains("wrong-key"), "the key is echoed: {text}");
        app.assert_up().await;
    }
    // A header that is not visible ASCII.
    let res = app.client.get(app.url("/v1/datasets")).header("authorization", reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap()).send().await.unwrap();
    assert_eq!(error_of(res, 401).await["code"], "invalid_authorization");
    // The scheme is case-insensitive.
    assert_eq!(get_with(&app, "/v1/datasets", Some(&format!("bearer {ADMIN}"))).await.status(), 200);
    app.assert_up().await;
}

#[tokio::test]
async fn scopes_admin_everything_predict_only_prediction() {
    let app = with_keys().await;
    let admin = format!("Bearer {ADMIN}");
    let predict = format!("Bearer {PREDICT}");
    let res = app.client.post(app.url("/v1/datasets")).header("authorization", &admin).header("content-type", "text/csv").body(small_csv(6)).send().await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(get_with(&app, "/v1/datasets", Some(&admin)).await.status(), 200);
    assert_eq!(get_with(&app, "/v1/adapters", Some(&admin)).await.status(), 200);

    for path in ["/v1/datasets", "/v1/fine-tuning/jobs", "/v1/adapters"] {
        let res = get_with(&app, path, Some(&predict)).await;
        let challenge = res.headers().get("www-authenticate").unwrap().to_str().unwrap().to_string();
        let err = error_of(res, 403).await;
        assert_eq!((err["code"].clone(), err["required_scope"].clone()), (json!("insufficient_scope"), json!("admin")), "{path}");
        assert!(challenge.contains("insufficient_scope"));
    }
    let res = app.client.post(app.url("/v1/datasets")).header("authorization", &predict).header("content-type", "text/csv").body(small_csv(6)).send().await.unwrap();
    assert_eq!(error_of(res, 403).await["code"], "insufficient_scope");

    // Both scopes reach prediction: past auth, this server has no adapter (404).
    for key in [&predict, &admin] {
        let body = json!({ "pairs": [{ "prompt": "p", "response_a": "a", "response_b": "b" }] });
        let res = app.client.post(app.url("/v1/predict")).header("authorization", key).json(&body).send().await.unwrap();
        assert_eq!(error_of(res, 404).await["code"], "adapter_not_found");
    }
    app.assert_up().await;
}

fn hex_sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Runs the `arbiter` binary; returns (status, stdout, stderr).
fn arbiter(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_arbiter")).args(args).output().expect("run arbiter");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn keys_created_on_the_command_line_are_shared_and_revocable() {
    let a = spawn_app().await;
    assert_eq!(a.get("/v1/datasets").await.status(), 200, "no key yet: open on loopback");
    let data = a.data_dir().display().to_string();
    let (ok, stdout, stderr) = arbiter(&["keys", "create", "--scope", "predict", "--name", "ci", "--data-dir", &data]);
    assert!(ok, "{stderr}");
    let key = stdout.trim().to_string();
    assert!(key.starts_with("arb_") && key.len() > 60, "{stdout}");
    let id = key[4..20].to_string();
    assert!(stderr.contains(&id) && !stderr.contains(&key), "the key is printed on stdout only: {stderr}");

    // The database holds a hash, never the key. (Searched from another process: opening and
    // closing the database file here would drop this process's SQLite locks.)
    let found = Command::new("grep")
        .args(["-c", "-F", "-a", &key, "arbiter.db", "arbiter.db-wal"])
        .current_dir(a.data_dir())
        .output()
        .unwrap();
    let counts = String::from_utf8_lossy(&found.stdout);
    assert!(counts.lines().count() == 2 && counts.lines().all(|l| l.ends_with(":0")), "the key is stored in clear: {counts}");
    let stored = a.store.get_api_key(&id).await.unwrap().expect("stored");
    assert_eq!(stored.key_hash, hex_sha256(&key));
    let (ok, listing, _) = arbiter(&["keys", "list", "--data-dir", &data]);
    assert!(ok && listing.contains(&id) && listing.contains("predict") && !listing.contains(&key[21..]), "{listing}");

    // Two API nodes on the same database both honour it; with a key in the database the
    // API is closed to callers without one even though no key was configured.
    let b = spawn().same_data_as(&a).start().await;
    for app in [&a, &b] {
        assert_eq!(error_of(get_with(app, "/v1/datasets", None).await, 401).await["code"], "missing_api_key");
        let res = app.client.post(app.url("/v1/predict")).bearer_auth(&key).json(&json!({ "pairs": [] })).send().await.unwrap();
        assert_eq!(error_of(res, 422).await["field"], "pairs", "past auth, the body is checked");
        assert_eq!(error_of(get_with(app, "/v1/datasets", Some(&format!("Bearer {key}"))).await, 403).await["code"], "insufficient_scope");
    }
    let (ok, _, stderr) = arbiter(&["keys", "revoke", &id, "--data-dir", &data]);
    assert!(ok, "{stderr}");
    let res = a.client.post(a.url("/v1/predict")).bearer_auth(&key).json(&json!({ "pairs": [] })).send().await.unwrap();
    assert_eq!(error_of(res, 401).await["code"], "invalid_api_key");
    let (ok, _, stderr) = arbiter(&["keys", "revoke", &id, "--data-dir", &data]);
    assert!(!ok && stderr.contains("no unrevoked key"), "{stderr}");
    let (ok, _, stderr) = arbiter(&["keys", "create", "--scope", "root", "--data-dir", &data]);
    assert!(!ok && stderr.contains("root"), "{stderr}");
    a.assert_up().await;
}

#[tokio::test]
async fn an_open_server_closes_as_soon_as_a_key_is_created() {
    let app = spawn_app().await;
    assert_eq!(app.get("/v1/datasets").await.status(), 200, "no keys, loopback: open");
    let (id, key) = arbiter::store::api_keys::generate_key();
    app.store.insert_api_key(&id, arbiter::store::Scope::Admin, &key, None, 0).await.unwrap();
    assert_eq!(error_of(app.get("/v1/datasets").await, 401).await["code"], "missing_api_key");
    assert_eq!(get_with(&app, "/v1/datasets", Some(&format!("Bearer {key}"))).await.status(), 200);
}

#[tokio::test]
async fn an_open_server_answers_only_this_machine_s_clients_and_pages() {
    let app = spawn_app().await;
    let port = app.addr.port();
    let with = |name: &'static str, value: String| {
        let req = app.client.post(app.url("/v1/datasets")).header("content-type", "text/csv").header(name, value);
        async move { req.body("id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n1,p,a,b,1,0,0\n").send().await.unwrap() }
    };
    // a page elsewhere posting to the local port, or a name rebound to 127.0.0.1
    for (name, value) in [
        ("origin", "https://evil.example".to_string()),
        ("origin", "null".to_string()),
        ("host", format!("evil.example:{port}")),
        ("host", format!("localhost.evil.example:{port}")),
    ] {
        let err = error_of(with(name, value.clone()).await, 403).await;
        assert_eq!(err["code"], "foreign_origin", "{name}: {value}");
    }
    assert!(app.get_json("/v1/datasets").await["data"].as_array().unwrap().is_empty(), "nothing was stored");
    // the dashboard's own page, and local clients by any loopback name
    for (name, value) in [
        ("origin", format!("http://127.0.0.1:{port}")),
        ("origin", format!("http://localhost:{port}")),
        ("host", format!("localhost:{port}")),
        ("host", format!("[::1]:{port}")),
    ] {
        assert_eq!(with(name, value.clone()).await.status(), 201, "{name}: {value}");
    }
    // with a key, the key decides
    let (id, key) = arbiter::store::api_keys::generate_key();
    app.store.insert_api_key(&id, arbiter::store::Scope::Admin, &key, None, 0).await.unwrap();
    let res = app.client.get(app.url("/v1/datasets")).header("host", "arbiter.example").bearer_auth(&key).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

async fn build(args: &[&str]) -> anyhow::Result<arbiter::App> {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut argv = vec!["arbiter", "serve", "--model", "/nonexistent/model.gguf"];
    let data = dir.display().to_string();
    argv.extend(["--data-dir", &data]);
    argv.extend(args);
    let Cmd::Serve(a) = Settings::try_parse_from(argv).unwrap().command else { unreachable!() };
    arbiter::App::build(a, None).await
}

#[tokio::test]
async fn without_keys_only_loopback_addresses_are_allowed() {
    let err = build(&["--addr", "0.0.0.0:0"]).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("refusing to listen on 0.0.0.0:0 without API keys"), "{text}");
    let err = build(&["--addr", "[::]:0"]).await.err().expect("refused");
    assert!(format!("{err:#}").contains("without API keys"));
    // With a key it listens anywhere; on loopback it may run open.
    let app = build(&["--addr", "0.0.0.0:0", "--api-keys", &format!("admin:{ADMIN}")]).await.expect("builds with a key");
    assert!(app.local_addr().unwrap().ip().is_unspecified());
    build(&["--addr", "127.0.0.1:0"]).await.expect("open on loopback");
    // A bad key list stops the start, without quoting the key.
    let err = build(&["--api-keys", "admin:short"]).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("ARBITER_API_KEYS entry 1") && !text.contains("short"), "{text}");
    let err = build(&["--api-keys", "superuser:0123456789abcdef0123"]).await.err().expect("refused");
    assert!(!format!("{err:#}").contains("0123456789abcdef0123"));
}

#[tokio::test]
async fn keys_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::write(&model, b"x").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["serve", "--addr", "127.0.0.1:0", "--no-worker", "--data-dir"])
        .arg(dir.path())
        .arg("--model")
        .arg(&model)
        .env("ARBITER_API_KEYS", format!("admin:{ADMIN},predict:{PREDICT}"))
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the server starts");
        log.push_str(&line);
        log.push('\n');
        if let Some(i) = line.find("addr=") {
            if line.contains("arbiter listening") {
                let rest = &line[i + 5..];
                break rest.split_whitespace().next().unwrap().to_string();
            }
        }
    };
    let client = reqwest::Client::new();
    for auth in [format!("Bearer {ADMIN}"), format!("Bearer {PREDICT}"), "Bearer not-a-key-but-secret-ish".to_string()] {
        for path in ["/v1/datasets", "/v1/predict", "/v1/adapters/nope"] {
            let _ = client.get(format!("http://{addr}{path}")).header("authorization", &auth).send().await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(log.contains("/v1/datasets"), "requests are logged at trace level:\n{log}");
    for secret in [ADMIN, PREDICT, "not-a-key-but-secret-ish"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}
