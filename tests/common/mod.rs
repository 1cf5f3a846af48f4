//! Test harness: the real server on port 0 with a fresh temporary data directory and database
//! (a SQLite file, or a fresh database on the Postgres server named by
//! `ARBITER_TEST_POSTGRES_URL`), a reqwest client, and helpers. Tracing is set up once and
//! silent (set `TEST_LOG=1` to see it).
#![allow(dead_code)]

pub mod trainer;

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use arbiter::config::{Command, Settings};
use arbiter::jobs::Trainer;
use arbiter::store::Store;
use clap::Parser;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

static TRACING: Once = Once::new();

/// Which database a test app runs on.
#[derive(Debug, Clone)]
pub enum Db {
    /// A SQLite file in the app's temporary data directory.
    Sqlite,
    /// A fresh database on the Postgres server at this URL.
    Postgres(String),
}

impl Db {
    /// The Postgres server for tests, from `ARBITER_TEST_POSTGRES_URL`. Without it the test is
    /// skipped with a message, unless `ARBITER_TEST_REQUIRE_POSTGRES` (set by scripts/test.sh)
    /// or `CI` is set: then a missing server is a failure, never a silent pass.
    pub fn postgres() -> Option<Db> {
        match std::env::var("ARBITER_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Db::Postgres(url)),
            _ => {
                let required = ["ARBITER_TEST_REQUIRE_POSTGRES", "CI"].iter().any(|v| std::env::var_os(v).is_some());
                assert!(
                    !required,
                    "ARBITER_TEST_POSTGRES_URL is not set but Postgres tests are required here \
                     (scripts/test.sh starts a server and sets it)"
                );
                eprintln!(
                    "SKIPPED: this test needs PostgreSQL; set ARBITER_TEST_POSTGRES_URL \
                     (or run scripts/test.sh, which starts a throwaway server)"
                );
                None
            }
        }
    }

    /// The database of apps that do not choose one: SQLite, or Postgres when
    /// `ARBITER_TEST_DATABASE=postgres` (to run any HTTP test file against Postgres).
    pub fn default_for_tests() -> Db {
        match std::env::var("ARBITER_TEST_DATABASE").as_deref() {
            Ok("postgres") => match std::env::var("ARBITER_TEST_POSTGRES_URL") {
                Ok(url) if !url.is_empty() => Db::Postgres(url),
                _ => panic!("ARBITER_TEST_DATABASE=postgres needs ARBITER_TEST_POSTGRES_URL"),
            },
            Ok("sqlite") | Err(_) => Db::Sqlite,
            Ok(other) => panic!("ARBITER_TEST_DATABASE={other:?}: use sqlite or postgres"),
        }
    }

    /// A database URL for a new app: a file in `dir` for SQLite; for Postgres a newly created,
    /// empty database on the server.
    pub async fn fresh_url(&self, dir: &std::path::Path) -> String {
        match self {
            Db::Sqlite => format!("sqlite://{}", dir.join("arbiter.db").display()),
            Db::Postgres(server) => {
                use sqlx::Connection;
                let name = format!("arbiter_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(server).await.expect("connect to the test Postgres server");
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create test database");
                conn.close().await.expect("close");
                let mut url = reqwest::Url::parse(server).expect("ARBITER_TEST_POSTGRES_URL is a URL");
                url.set_path(&format!("/{name}"));
                url.to_string()
            }
        }
    }
}

fn init_tracing() {
    TRACING.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        } else {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::sink).try_init();
        }
    });
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    /// The same database the server uses, for queue tests that play a second worker.
    pub store: Store,
    pub dir: Arc<TempDir>,
    database_url: String,
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A server to start: extra flags, a trainer, a data directory shared with another app.
pub struct Spawn {
    args: Vec<String>,
    trainer: Option<Arc<dyn Trainer>>,
    dir: Option<Arc<TempDir>>,
    db: Db,
    database_url: Option<String>,
}

pub fn spawn() -> Spawn {
    Spawn { args: Vec::new(), trainer: None, dir: None, db: Db::default_for_tests(), database_url: None }
}

pub async fn spawn_app() -> TestApp {
    spawn().start().await
}

impl Spawn {
    pub fn arg(mut self, flag: &str, value: &str) -> Spawn {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    pub fn flag(mut self, flag: &str) -> Spawn {
        self.args.push(flag.to_string());
        self
    }

    pub fn trainer(mut self, t: Arc<dyn Trainer>) -> Spawn {
        self.trainer = Some(t);
        self
    }

    /// Run on this database (default: SQLite).
    pub fn on(mut self, db: &Db) -> Spawn {
        self.db = db.clone();
        self
    }

    /// Share the database of `other`, with a data directory of its own (another machine).
    pub fn same_database_as(mut self, other: &TestApp) -> Spawn {
        self.database_url = Some(other.database_url.clone());
        self
    }

    /// Use the database at `url` (e.g. that of a server that was shut down).
    pub fn database_url(mut self, url: String) -> Spawn {
        self.database_url = Some(url);
        self
    }

    /// Use this data directory (e.g. that of a server that was shut down; with SQLite, its
    /// database too).
    pub fn in_dir(mut self, dir: Arc<TempDir>) -> Spawn {
        self.dir = Some(dir);
        self
    }

    /// Share the data directory and the database of `other`.
    pub fn same_data_as(mut self, other: &TestApp) -> Spawn {
        self.dir = Some(other.dir.clone());
        self.database_url = Some(other.database_url.clone());
        self
    }

    pub async fn start(self) -> TestApp {
        init_tracing();
        let dir = match self.dir {
            Some(d) => d,
            None => Arc::new(tempfile::tempdir().expect("temp dir")),
        };
        let database_url = match self.database_url {
            Some(url) => url,
            None => self.db.fresh_url(dir.path()).await,
        };
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, b"stand-in model file").expect("write model file");
        let mut argv: Vec<String> = vec![
            "arbiter".into(),
            "serve".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.path().display().to_string(),
            "--database-url".into(),
            database_url.clone(),
        ];
        // A model file for readiness, and short leases and polls so that queue tests run in
        // seconds; a test may override any of them.
        let model = model.display().to_string();
        for (flag, value) in [("--model", model.as_str()), ("--lease-ms", "3000"), ("--heartbeat-ms", "100"), ("--poll-ms", "50")] {
            if !self.args.iter().any(|a| a == flag) {
                argv.extend([flag.to_string(), value.to_string()]);
            }
        }
        argv.extend(self.args);
        let settings = Settings::try_parse_from(&argv).expect("test settings parse");
        let Command::Serve(args) = settings.command else { panic!("serve expected") };
        let app = arbiter::App::build(args, self.trainer).await.expect("app builds");
        let addr = app.local_addr().expect("bound address");
        let store = app.store().clone();
        let token = app.shutdown_token();
        let handle = tokio::spawn(app.run());
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        TestApp { addr, client, store, dir, database_url, token, handle: Some(handle) }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops the server the graceful way (as on SIGTERM) and waits for it.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("server stops within 30 s")
                .expect("server task")
                .expect("server exits cleanly");
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert_eq!(res.status(), 200, "GET {path}");
        res.json().await.expect("json")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn upload_file(&self, file_name: &str, bytes: Vec<u8>) -> reqwest::Response {
        let part = reqwest::multipart::Part::bytes(bytes).file_name(file_name.to_string());
        let form = reqwest::multipart::Form::new().part("file", part);
        self.client.post(self.url("/v1/datasets")).multipart(form).send().await.expect("request")
    }

    /// Uploads a small valid CSV and returns the dataset id.
    pub async fn create_dataset(&self, rows: usize) -> String {
        let res = self.post_raw("/v1/datasets", "text/csv", small_csv(rows)).await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.expect("json");
        body["id"].as_str().expect("id").to_string()
    }

    /// Submits a job on `dataset_id` with small hyperparameters; returns the job.
    pub async fn create_job(&self, dataset_id: &str) -> Value {
        let res = self
            .post_json(
                "/v1/fine-tuning/jobs",
                &json!({ "dataset_id": dataset_id, "hyperparameters": { "epochs": 1, "batch_size": 2 } }),
            )
            .await;
        assert_eq!(res.status(), 201);
        res.json().await.expect("json")
    }

    /// Polls the job until `pred` holds or the timeout passes.
    pub async fn wait_job(&self, id: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
            if pred(&job) {
                return job;
            }
            assert!(start.elapsed() < timeout, "job {id} did not reach the expected state in {timeout:?}: {job:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_job(id, timeout, |j| j["status"] == status).await
    }

    /// All events of a job, paging with `after`.
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.get_json(&format!("/v1/fine-tuning/jobs/{id}/events?after={after}&limit=100")).await;
            let data = page["data"].as_array().expect("data").clone();
            all.extend(data);
            if !page["has_more"].as_bool().expect("has_more") {
                return all;
            }
            after = page["next_cursor"].as_i64().expect("cursor");
        }
    }

    /// The server still answers.
    pub async fn assert_up(&self) {
        let res = self.get("/healthz").await;
        assert_eq!(res.status(), 200, "server is still up");
    }
}

/// Asserts the JSON error shape and returns the error object.
pub async fn error_of(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let body: Value = res.json().await.expect("error body is JSON");
    let err = body["error"].clone();
    assert!(err["code"].is_string(), "error.code in {body}");
    assert!(err["message"].is_string(), "error.message in {body}");
    err
}

pub const HEADER: &str = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie";

/// A valid arena CSV of `n` rows, labels cycling A, B, tie.
pub fn small_csv(n: usize) -> String {
    let mut s = String::from(HEADER);
    s.push('\n');
    for i in 0..n {
        let oh = ["1,0,0", "0,1,0", "0,0,1"][i % 3];
        s.push_str(&format!(
            "{i},m1,m2,\"[\"\"question {i}\"\"]\",\"[\"\"answer a {i}\"\"]\",\"[\"\"answer b {i}\"\"]\",{oh}\n"
        ));
    }
    s
}

/// The real arena sample shipped next to the repository.
pub fn sample_csv_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/arena-sample.csv")
}
