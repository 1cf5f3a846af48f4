//! The shared artifact store: nodes with data directories of their own (as on different
//! machines) and one database share datasets, checkpoints and adapters through it. One worker
//! trains from a dataset uploaded to the API node, is stopped after a checkpoint, a second
//! worker resumes from that checkpoint, and the API node serves the adapter's files it never
//! wrote. Runs against a real S3-compatible server on loopback (`s3::`, moto's server at
//! `ARBITER_TEST_S3_ENDPOINT`, started by scripts/test.sh) and against object_store's local
//! file-system backend (`file::`). That the files were fetched, not read where another node
//! wrote them, shows in where they land: under the reading node's own data directory.

mod common;

use std::sync::{Arc, Once};
use std::time::Duration;

use arbiter::store::artifacts::{ArtifactError, Artifacts};
use common::trainer::ScriptedTrainer;
use common::{spawn, TestApp};

const WAIT: Duration = Duration::from_secs(30);

/// Where the shared store lives.
enum Shared {
    S3 { endpoint: String },
    File,
}

impl Shared {
    /// The S3-compatible server for tests; skipped with a message when unset, unless
    /// `ARBITER_TEST_REQUIRE_S3` (set by scripts/test.sh) or `CI` is set.
    fn s3() -> Option<Shared> {
        match std::env::var("ARBITER_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => Some(Shared::S3 { endpoint }),
            _ => {
                let required = ["ARBITER_TEST_REQUIRE_S3", "CI"].iter().any(|v| std::env::var_os(v).is_some());
                assert!(!required, "ARBITER_TEST_S3_ENDPOINT is not set but S3 tests are required here");
                eprintln!(
                    "SKIPPED: this test needs an S3-compatible server; set ARBITER_TEST_S3_ENDPOINT \
                     (scripts/s3-test-server.sh starts one)"
                );
                None
            }
        }
    }

    /// A fresh, empty store: a new bucket on the S3 server, or a new directory.
    async fn fresh(&self, keep: &tempfile::TempDir) -> String {
        match self {
            Shared::S3 { endpoint } => {
                static ENV: Once = Once::new();
                ENV.call_once(|| {
                    // The S3 client's settings for every app of this test binary (one server).
                    for (k, v) in [
                        ("AWS_ENDPOINT", endpoint.as_str()),
                        ("AWS_ALLOW_HTTP", "true"),
                        ("AWS_ACCESS_KEY_ID", "test"),
                        ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_REGION", "us-east-1"),
                    ] {
                        std::env::set_var(k, v);
                    }
                });
                let bucket = format!("arbiter-{}", uuid::Uuid::new_v4().simple());
                let res = reqwest::Client::new().put(format!("{endpoint}/{bucket}")).send().await.expect("create bucket");
                assert!(res.status().is_success(), "create bucket: {}", res.status());
                format!("s3://{bucket}/artifacts")
            }
            Shared::File => format!("file://{}", keep.path().display()),
        }
    }
}

/// One `#[tokio::test]` per store kind for each `async fn case(shared: Shared)`.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod s3 {
            $(#[tokio::test]
            async fn $case() {
                if let Some(shared) = super::Shared::s3() {
                    super::$case(shared).await
                }
            })*
        }
        mod file {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Shared::File).await
            })*
        }
    };
}

on_both_stores!(nodes_with_separate_data_directories_share_datasets_checkpoints_and_adapters);

async fn job_of(app: &TestApp, rows: usize) -> (String, String) {
    let ds = app.create_dataset(rows).await;
    let job = app.create_job(&ds).await;
    (ds, job["id"].as_str().unwrap().to_string())
}

async fn nodes_with_separate_data_directories_share_datasets_checkpoints_and_adapters(shared: Shared) {
    let keep = tempfile::tempdir().unwrap();
    let store_url = shared.fresh(&keep).await;
    let api = spawn().flag("--no-worker").arg("--artifact-store", &store_url).start().await;
    let (ds, id) = job_of(&api, 8).await;

    // Worker one (its own data directory) trains until past its second checkpoint, then stops
    // gracefully: the job goes back to the queue. The best checkpoint is the first (step 2).
    let slow = Arc::new(ScriptedTrainer { best_at: Some(2), ..ScriptedTrainer::new(10_000, Duration::from_millis(20)) });
    let one = spawn().same_database_as(&api).arg("--artifact-store", &store_url).trainer(slow.clone()).start().await;
    assert_ne!(one.data_dir(), api.data_dir());
    api.wait_job(&id, WAIT, |j| j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(5)).await;
    assert!(one.data_dir().join("datasets").join(format!("{ds}.jsonl")).is_file(), "fetched into worker one's directory");
    one.shutdown().await;
    assert_eq!(slow.seen()[0].train_rows + slow.seen()[0].validation_rows, 8, "worker one read the rows from the store");
    let job = api.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
    assert_eq!(job["status"], "queued", "{job}");

    // Worker two, a third data directory, resumes from worker one's last checkpoint, and fetches
    // the best one too (its trainer fails without it).
    let fast = Arc::new(ScriptedTrainer { best_at: Some(2), ..ScriptedTrainer::new(200, Duration::from_millis(1)) });
    let two = spawn().same_database_as(&api).arg("--artifact-store", &store_url).trainer(fast.clone()).start().await;
    let done = api.wait_status(&id, "succeeded", WAIT).await;
    let seen = fast.seen();
    assert_eq!(seen.len(), 1);
    let resumed = seen[0].resume_from.clone().expect("resumed from a checkpoint");
    assert!(resumed.starts_with(two.data_dir()), "fetched into worker two's directory: {}", resumed.display());
    let step: u64 = resumed.file_name().unwrap().to_str().unwrap().strip_prefix("step-").unwrap().parse().unwrap();
    assert!(step >= 4, "{step}");
    let state = std::fs::read_to_string(resumed.join("state.json")).expect("the checkpoint's files came along");
    assert_eq!(state, serde_json::json!({ "step": step, "best": [2, { "log_loss": 0.5 }] }).to_string());
    assert!(two.data_dir().join("jobs").join(&id).join("checkpoints").join("step-2").join("state.json").is_file(), "the best came along");
    let newest: Vec<_> = api.get_json(&format!("/v1/fine-tuning/jobs/{id}/checkpoints")).await["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["attempt"] == 1)
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(newest.first(), Some(&step), "the newest checkpoint of attempt one");

    // The API node describes the adapter, which only worker two wrote, from a listing of the
    // store (nothing downloaded), then serves its files.
    let adapter_id = done["adapter_id"].as_str().unwrap();
    assert!(!api.data_dir().join("adapters").join(adapter_id).exists());
    let adapter = api.get_json(&format!("/v1/adapters/{adapter_id}")).await;
    assert_eq!(adapter["files"], serde_json::json!(["adapter_config.json"]));
    assert_eq!(adapter["temperature"], 1.0, "no arbiter.json: served with the defaults");
    assert!(!api.data_dir().join("adapters").join(adapter_id).exists(), "described without a download");
    let res = api.get(&format!("/v1/adapters/{adapter_id}/files/adapter_config.json")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "{\"peft_type\":\"LORA\"}");
    two.shutdown().await;

    // Deleting the adapter removes the shared copy too.
    let res = api.client.delete(api.url(&format!("/v1/adapters/{adapter_id}"))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let later = tempfile::tempdir().unwrap();
    let elsewhere = Artifacts::open(Some(&store_url), later.path()).unwrap();
    let gone = elsewhere.adapter_dir(adapter_id, "/unused").await;
    assert!(matches!(gone, Err(ArtifactError::Missing(_))), "{gone:?}");

    // Deleting the dataset removes the shared copy too.
    let fresh = tempfile::tempdir().unwrap();
    let elsewhere = Artifacts::open(Some(&store_url), fresh.path()).unwrap();
    elsewhere.dataset_file(&ds, "/unused").await.expect("shared before the delete");
    let res = api.client.delete(api.url(&format!("/v1/datasets/{ds}"))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let later = tempfile::tempdir().unwrap();
    let elsewhere = Artifacts::open(Some(&store_url), later.path()).unwrap();
    assert!(matches!(elsewhere.dataset_file(&ds, "/unused").await, Err(ArtifactError::Missing(_))));
}
