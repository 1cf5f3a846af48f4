//! Queue semantics across workers sharing one database: no double claims, expired leases go
//! back to the queue with the next attempt (resuming from the last checkpoint), attempts run
//! out, and a graceful shutdown gives the running job back. Every case runs twice, on SQLite
//! (`sqlite::`) and on Postgres (`postgres::`, a fresh database on the server named by
//! `ARBITER_TEST_POSTGRES_URL`).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arbiter::store::{now_ms, Release, Store, WorkerDevice};
use common::trainer::ScriptedTrainer;
use common::{spawn, Db, TestApp};

const WAIT: Duration = Duration::from_secs(30);

/// One `#[tokio::test]` per backend for each `async fn case(db: Db)`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Db::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $case() {
                if let Some(db) = super::Db::postgres() {
                    super::$case(db).await
                }
            })*
        }
    };
}

on_both_backends!(
    two_runners_on_one_database_never_claim_the_same_job,
    concurrent_claims_from_separate_pools_hand_out_each_job_once,
    an_expired_lease_is_claimed_again_as_attempt_two_and_resumes,
    a_job_fails_once_its_attempts_are_spent,
    heartbeats_keep_a_long_job_from_being_reaped,
    graceful_shutdown_gives_the_running_job_back,
    attempts_given_back_at_a_shutdown_do_not_count,
    an_attempt_retried_after_a_passing_failure_counts_and_waits,
    expired_leases_are_reaped_by_api_nodes_and_by_busy_workers,
    a_standalone_worker_process_runs_jobs_queued_through_the_api,
    a_lost_lease_changes_nothing_for_the_old_worker,
    claims_go_only_to_workers_whose_device_meets_the_job,
    a_worker_advertises_its_device_and_leaves_jobs_it_cannot_run_queued,
    worker_registrations_are_listed_while_fresh_and_forgotten_when_silent,
    events_written_from_several_pools_are_read_once_each_in_order,
);

/// A worker device that can run any job without requirements.
fn any_device() -> WorkerDevice {
    WorkerDevice { kind: "cpu".into(), name: "cpu".into(), memory_bytes: Some(1 << 34) }
}

/// Creates a dataset and `n` queued jobs through an app with no worker.
async fn queued_jobs(app: &TestApp, n: usize) -> Vec<String> {
    let ds = app.create_dataset(4).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(app.create_job(&ds).await["id"].as_str().unwrap().to_string());
    }
    ids
}

async fn two_runners_on_one_database_never_claim_the_same_job(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let ids = queued_jobs(&api, 40).await;

    let t1 = Arc::new(ScriptedTrainer::new(1, Duration::from_millis(2)));
    let t2 = Arc::new(ScriptedTrainer::new(1, Duration::from_millis(2)));
    let w1 = spawn().same_data_as(&api).arg("--worker-id", "w1").arg("--poll-ms", "10").trainer(t1.clone()).start().await;
    let w2 = spawn().same_data_as(&api).arg("--worker-id", "w2").arg("--poll-ms", "10").trainer(t2.clone()).start().await;

    for id in &ids {
        let job = api.wait_status(id, "succeeded", WAIT).await;
        assert_eq!(job["attempt"], 1, "claimed once: {job}");
    }
    let (s1, s2) = (t1.seen(), t2.seen());
    let all: Vec<_> = s1.iter().chain(&s2).map(|s| s.job_id.clone()).collect();
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), ids.len(), "every job trained exactly once ({} + {})", s1.len(), s2.len());
    assert_eq!(unique, ids.iter().cloned().collect::<HashSet<_>>());
    assert!(!s1.is_empty() && !s2.is_empty(), "both workers took jobs ({} / {})", s1.len(), s2.len());
    drop((w1, w2));
}

async fn concurrent_claims_from_separate_pools_hand_out_each_job_once(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let ids = queued_jobs(&api, 60).await;
    // Six claimers, each with its own connection pool (as separate processes would have),
    // claiming as fast as they can until the queue is empty.
    let mut tasks = Vec::new();
    for w in 0..6 {
        let store = Store::connect(&api.database_url()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = store.claim_job(&format!("claimer-{w}"), &any_device(), now_ms(), 60_000).await.unwrap() {
                assert_eq!(job.lock_by.as_deref(), Some(format!("claimer-{w}").as_str()));
                assert_eq!(job.attempt, 1);
                got.push(job.id);
            }
            store.close().await;
            got
        }));
    }
    let mut all = Vec::new();
    let mut per_claimer = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        per_claimer.push(got.len());
        all.extend(got);
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), ids.len(), "no job claimed twice: {per_claimer:?}");
    assert_eq!(unique, ids.iter().cloned().collect::<HashSet<_>>(), "every job claimed");
    let running = api.get_json("/v1/fine-tuning/jobs?status=running&limit=100").await;
    assert_eq!(running["data"].as_array().unwrap().len(), ids.len());
}

async fn an_expired_lease_is_claimed_again_as_attempt_two_and_resumes(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);

    // A worker claims the job, writes a checkpoint at step 2, and dies: no more heartbeats.
    let claimed = api.store.claim_job("doomed-worker", &any_device(), now_ms(), 300).await.unwrap().expect("claimed");
    assert_eq!(claimed.id, id);
    assert_eq!(claimed.attempt, 1);
    let ckpt = api.data_dir().join("jobs").join(&id).join("checkpoints").join("step-2");
    std::fs::create_dir_all(&ckpt).unwrap();
    api.store.insert_checkpoint(&id, 1, 2, &ckpt.to_string_lossy(), None, now_ms()).await.unwrap();

    let trainer = Arc::new(ScriptedTrainer::new(4, Duration::from_millis(10)));
    let _worker = spawn().same_data_as(&api).trainer(trainer.clone()).start().await;
    let job = api.wait_status(&id, "succeeded", WAIT).await;
    assert_eq!(job["attempt"], 2);

    let seen = trainer.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].attempt, 2);
    assert_eq!(seen[0].resume_from.as_deref(), Some(ckpt.as_path()), "resumes from the last checkpoint");
    let events = api.events(&id).await;
    let steps: Vec<_> = events.iter().filter(|e| e["type"] == "train_step").map(|e| e["data"]["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [3, 4], "only the steps after the checkpoint ran again");
    assert!(events.iter().any(|e| e["message"].as_str().unwrap().contains("lease of attempt 1 expired")));
}

async fn a_job_fails_once_its_attempts_are_spent(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").arg("--max-attempts", "1").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    api.store.claim_job("doomed-worker", &any_device(), now_ms(), 200).await.unwrap().expect("claimed");
    // Any runner reaps; this one has no trainer, so it claims nothing itself.
    let _reaper = spawn().same_data_as(&api).start().await;
    let job = api.wait_status(&id, "failed", WAIT).await;
    assert_eq!(job["attempt"], 1);
    assert!(job["error"].as_str().unwrap().contains("lease"), "{job}");
}

async fn heartbeats_keep_a_long_job_from_being_reaped(db: Db) {
    // Lease 300 ms, heartbeat 100 ms, the job runs well past one lease.
    let trainer = Arc::new(ScriptedTrainer::new(12, Duration::from_millis(100)));
    let app = spawn().on(&db).arg("--lease-ms", "300").trainer(trainer.clone()).start().await;
    let id = queued_jobs(&app, 1).await.remove(0);
    let job = app.wait_status(&id, "succeeded", WAIT).await;
    assert_eq!(job["attempt"], 1, "never reaped: {job}");
    assert_eq!(trainer.seen().len(), 1);
}

async fn graceful_shutdown_gives_the_running_job_back(db: Db) {
    let trainer = Arc::new(ScriptedTrainer::new(10_000, Duration::from_millis(20)));
    let app = spawn().on(&db).trainer(trainer).start().await;
    let id = queued_jobs(&app, 1).await.remove(0);
    app.wait_job(&id, WAIT, |j| j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(1)).await;
    let (url, _dir) = (app.database_url(), app.dir.clone());
    app.shutdown().await;
    let store = Store::connect(&url).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, "queued", "released, not left running");
    assert_eq!(job.lock_by, None);
    let events = store.list_events(&id, 0, 1000).await.unwrap();
    assert!(events.iter().any(|e| e.message.contains("back in the queue")));
}

async fn attempts_given_back_at_a_shutdown_do_not_count(db: Db) {
    // Two attempts allowed; the job is given back twice (shutdowns), then loses one lease: it
    // goes back to the queue, and only a second lost lease fails it.
    let api = spawn().on(&db).flag("--no-worker").arg("--max-attempts", "2").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    let store = &api.store;
    let t0 = now_ms();
    for (k, worker) in ["one", "two"].into_iter().enumerate() {
        let job = store.claim_job(worker, &any_device(), t0 + k as i64, 60_000).await.unwrap().expect("claimed");
        assert_eq!(job.attempt, k as i64 + 1);
        assert!(store.release_job(&id, worker, t0 + k as i64, Release::Shutdown).await.unwrap(), "given back");
    }
    let third = store.claim_job("three", &any_device(), t0 + 10, 100).await.unwrap().expect("claimed");
    assert_eq!((third.attempt, third.released_attempts), (3, 2));
    let reaped = store.reap_expired_jobs(t0 + 500).await.unwrap();
    assert_eq!((reaped[0].status.as_str(), reaped[0].attempt), ("queued", 3), "one lost lease of two allowed");

    store.claim_job("four", &any_device(), t0 + 600, 100).await.unwrap().expect("claimed again");
    let reaped = store.reap_expired_jobs(t0 + 1_000).await.unwrap();
    assert_eq!((reaped[0].status.as_str(), reaped[0].attempt), ("failed", 4), "the second lost lease");
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert!(job.error.unwrap().contains("2 lost leases allowed"));
}

async fn an_attempt_retried_after_a_passing_failure_counts_and_waits(db: Db) {
    // A job given back after a passing failure counts the attempt (unlike a shutdown) and is not
    // claimed again before the time it was given.
    let api = spawn().on(&db).flag("--no-worker").arg("--max-attempts", "2").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    let store = &api.store;
    let t0 = now_ms();
    store.claim_job("one", &any_device(), t0, 60_000).await.unwrap().expect("claimed");
    assert!(store.release_job(&id, "one", t0, Release::Retry { at: t0 + 5_000 }).await.unwrap());
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!((job.status.as_str(), job.released_attempts, job.run_at), ("queued", 0, t0 + 5_000));
    assert!(store.claim_job("two", &any_device(), t0 + 4_999, 60_000).await.unwrap().is_none(), "not before its time");
    let again = store.claim_job("two", &any_device(), t0 + 5_000, 100).await.unwrap().expect("claimed at its time");
    assert_eq!((again.attempt, again.released_attempts), (2, 0));
    // that was the last attempt: a lost lease now fails the job
    let reaped = store.reap_expired_jobs(t0 + 6_000).await.unwrap();
    assert_eq!((reaped[0].status.as_str(), reaped[0].attempt), ("failed", 2));
}

async fn expired_leases_are_reaped_by_api_nodes_and_by_busy_workers(db: Db) {
    // An API node without a worker: the lease of a worker that died goes back to the queue.
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let ids = queued_jobs(&api, 3).await;
    api.store.claim_job("dead-one", &any_device(), now_ms(), 200).await.unwrap().expect("claimed");
    let job = api.wait_status(&ids[0], "queued", WAIT).await;
    assert_eq!(job["attempt"], 1, "{job}");

    // A worker busy with a long job meanwhile reaps another dead worker's lease.
    let trainer = Arc::new(ScriptedTrainer::new(10_000, Duration::from_millis(20)));
    let busy = spawn().same_data_as(&api).trainer(trainer).start().await;
    // it takes the oldest queued job (the reaped one is queued again as of its reaping)
    let training = api.wait_job(&ids[1], WAIT, |j| j["status"] == "running").await;
    api.shutdown().await;
    let other = busy.store.claim_job("dead-two", &any_device(), now_ms(), 200).await.unwrap().expect("claimed");
    let reaped = busy.wait_job(&other.id, WAIT, |j| j["status"] == "queued").await;
    assert_eq!(reaped["attempt"], 1);
    let training = busy.get_json(&format!("/v1/fine-tuning/jobs/{}", training["id"].as_str().unwrap())).await;
    assert_eq!(training["status"], "running", "still training: {training}");
}

async fn a_standalone_worker_process_runs_jobs_queued_through_the_api(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    let job = api.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
    assert!(job["status_reason"].as_str().unwrap().contains("--no-worker"), "{job}");

    // `arbiter worker` against the same data directory and database.
    let (dir, url) = (api.data_dir().display().to_string(), api.database_url());
    let settings = <arbiter::config::Settings as clap::Parser>::try_parse_from([
        "arbiter", "worker", "--data-dir", &dir, "--database-url", &url, "--poll-ms", "20", "--heartbeat-ms", "100",
        "--worker-id", "standalone",
    ])
    .unwrap();
    let arbiter::config::Command::Worker(args) = settings.command else { panic!("worker expected") };
    let trainer = Arc::new(ScriptedTrainer::new(3, Duration::from_millis(10)));
    let token = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(arbiter::run_worker(args, Some(trainer.clone()), token.clone()));

    let done = api.wait_status(&id, "succeeded", WAIT).await;
    assert_eq!(done["progress"]["step"], 3);
    assert_eq!(trainer.seen().len(), 1);
    token.cancel();
    tokio::time::timeout(WAIT, worker).await.expect("worker stops").unwrap().unwrap();
    let events = api.events(&id).await;
    assert!(events.iter().any(|e| e["message"].as_str().unwrap().contains("on worker standalone")));
}

async fn a_lost_lease_changes_nothing_for_the_old_worker(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    let store = &api.store;
    let t0 = now_ms();
    let first = store.claim_job("old", &any_device(), t0, 100).await.unwrap().expect("claimed");
    assert_eq!((first.attempt, first.status.as_str()), (1, "running"));
    assert!(store.claim_job("other", &any_device(), t0, 100).await.unwrap().is_none(), "a running job is not claimable");
    assert!(store.heartbeat_job(&id, "old", t0 + 10, 100).await.unwrap(), "the holder renews");
    assert!(!store.heartbeat_job(&id, "stranger", t0 + 10, 100).await.unwrap(), "only the holder renews");

    // Nothing expired yet at t0 + 50 (the lease runs to t0 + 110); at t0 + 500 it has.
    assert!(store.reap_expired_jobs(t0 + 50).await.unwrap().is_empty());
    let reaped = store.reap_expired_jobs(t0 + 500).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!((reaped[0].id.as_str(), reaped[0].status.as_str(), reaped[0].attempt), (id.as_str(), "queued", 1));
    assert!(store.reap_expired_jobs(t0 + 600).await.unwrap().is_empty(), "reaped once");

    let second = store.claim_job("new", &any_device(), t0 + 600, 60_000).await.unwrap().expect("claimed again");
    assert_eq!((second.attempt, second.lock_by.as_deref()), (2, Some("new")));
    // The old worker's updates all miss: heartbeat, progress, metrics, failure, release, success.
    let now = t0 + 700;
    assert!(!store.heartbeat_job(&id, "old", now, 100).await.unwrap());
    assert!(!store.update_job_progress(&id, "old", 5, 10, 0.5, &serde_json::json!({"train_loss": 9.0}), now).await.unwrap());
    assert!(!store.merge_job_metrics(&id, "old", &serde_json::json!({"eval_accuracy": 0.0}), now).await.unwrap());
    assert!(!store.fail_job(&id, "old", "stale", now).await.unwrap());
    assert!(!store.release_job(&id, "old", now, Release::Shutdown).await.unwrap());
    let report = arbiter::store::NewEvent { job_id: id.clone(), attempt: 1, level: "info", kind: "log", message: "stale".into(), data: None };
    assert_eq!(store.insert_event_held(&report, "old", now).await.unwrap(), None);
    assert_eq!(store.insert_checkpoint_held(&id, "old", 1, 9, "/stale", None, now).await.unwrap().map(|c| c.id), None);
    assert!(store.insert_event_held(&report, "new", now).await.unwrap().is_some(), "the holder's reports are written");
    assert!(store.insert_checkpoint_held(&id, "new", 2, 9, "/fresh", None, now).await.unwrap().is_some());
    assert!(!store.release_job(&id, "old", now, Release::Retry { at: now }).await.unwrap());
    let adapter = arbiter::store::NewAdapter {
        id: "stale-adapter".into(),
        name: "stale".into(),
        job_id: Some(id.clone()),
        base_model: "m".into(),
        path: "/nowhere".into(),
        metrics: serde_json::json!({}),
    };
    assert!(store.succeed_job(&id, "old", &adapter, &serde_json::json!({}), now).await.unwrap().is_none());
    assert!(store.get_adapter("stale-adapter").await.unwrap().is_none(), "no adapter row from a stale success");

    // The new holder's progress and metrics merge (JSON merge patch on both backends).
    assert!(store.update_job_progress(&id, "new", 3, 10, 0.3, &serde_json::json!({"train_loss": 0.7, "nested": {"a": 1, "b": 2}}), now).await.unwrap());
    assert!(store.merge_job_metrics(&id, "new", &serde_json::json!({"eval_accuracy": 0.5, "nested": {"b": null, "c": 3}}), now).await.unwrap());
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!((job.step, job.total_steps, job.epoch), (3, Some(10), Some(0.3)));
    let metrics: serde_json::Value = serde_json::from_str(&job.metrics).unwrap();
    assert_eq!(metrics, serde_json::json!({"train_loss": 0.7, "eval_accuracy": 0.5, "nested": {"a": 1, "c": 3}}));
    let adapter = arbiter::store::NewAdapter { id: "fresh-adapter".into(), name: "fresh".into(), ..adapter };
    let rec = store.succeed_job(&id, "new", &adapter, &serde_json::json!({"final": {"log_loss": 0.9}}), now).await.unwrap();
    assert_eq!(rec.expect("succeeded").id, "fresh-adapter");
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!((job.status.as_str(), job.adapter_id.as_deref(), job.lock_by.as_deref()), ("succeeded", Some("fresh-adapter"), None));
    let metrics: serde_json::Value = serde_json::from_str(&job.metrics).unwrap();
    assert_eq!(metrics["final"]["log_loss"], 0.9);
    assert_eq!(metrics["train_loss"], 0.7, "earlier metrics kept");
}

/// Submits a job with `resources` through the API; returns its id.
async fn job_needing(app: &TestApp, dataset: &str, resources: serde_json::Value) -> String {
    let body = serde_json::json!({ "dataset_id": dataset, "resources": resources });
    let res = app.post_json("/v1/fine-tuning/jobs", &body).await;
    assert_eq!(res.status(), 201, "{body}");
    let job: serde_json::Value = res.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

async fn claims_go_only_to_workers_whose_device_meets_the_job(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let ds = api.create_dataset(4).await;
    let any = job_needing(&api, &ds, serde_json::json!({})).await;
    let cpu = job_needing(&api, &ds, serde_json::json!({ "device": "cpu" })).await;
    let cuda = job_needing(&api, &ds, serde_json::json!({ "device": "cuda" })).await;
    let cuda_40 = job_needing(&api, &ds, serde_json::json!({ "device": "cuda", "min_memory_gb": 40 })).await;
    let any_8 = job_needing(&api, &ds, serde_json::json!({ "min_memory_gb": 8 })).await;
    let job = api.get_json(&format!("/v1/fine-tuning/jobs/{cuda_40}")).await;
    assert_eq!(job["resources"], serde_json::json!({ "device": "cuda", "min_memory_gb": 40.0 }));

    let gb = 1_i64 << 30;
    let device = |kind: &str, memory: Option<i64>| WorkerDevice { kind: kind.into(), name: kind.into(), memory_bytes: memory };
    let store = &api.store;
    let claim_all = async |worker: &str, d: WorkerDevice| {
        let mut got = Vec::new();
        while let Some(job) = store.claim_job(worker, &d, now_ms(), 60_000).await.unwrap() {
            got.push(job.id);
        }
        got
    };
    assert_eq!(claim_all("cpu-4gb", device("cpu", Some(4 * gb))).await, [any, cpu], "oldest first, within its means");
    assert_eq!(claim_all("gpu-unknown", device("cuda", None)).await, [cuda], "memory unknown: no job that needs an amount");
    assert_eq!(claim_all("gpu-24gb", device("cuda", Some(24 * gb))).await, [any_8]);
    assert_eq!(claim_all("gpu-80gb", device("cuda", Some(80 * gb))).await, [cuda_40]);
}

async fn a_worker_advertises_its_device_and_leaves_jobs_it_cannot_run_queued(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let ds = api.create_dataset(4).await;
    for (resources, field) in [
        (serde_json::json!({ "device": "tpu" }), "resources.device"),
        (serde_json::json!({ "min_memory_gb": -1 }), "resources.min_memory_gb"),
    ] {
        let res = api.post_json("/v1/fine-tuning/jobs", &serde_json::json!({ "dataset_id": ds, "resources": resources })).await;
        assert_eq!(common::error_of(res, 422).await["field"], field);
    }
    let gpu_job = job_needing(&api, &ds, serde_json::json!({ "device": "cuda" })).await;
    let plain = api.create_job(&ds).await["id"].as_str().unwrap().to_string();
    let job = api.get_json(&format!("/v1/fine-tuning/jobs/{gpu_job}")).await;
    assert_eq!(
        job["status_reason"], "no live worker can run it: it needs a cuda device; no worker is live",
        "{job}"
    );
    assert_eq!(api.get_json("/v1/workers").await["data"], serde_json::json!([]));

    let trainer = Arc::new(ScriptedTrainer::new(2, Duration::from_millis(10)));
    let worker = spawn()
        .same_data_as(&api)
        .arg("--worker-id", "cpu-worker")
        .arg("--device-memory-gb", "6")
        .trainer(trainer.clone())
        .start()
        .await;
    api.wait_status(&plain, "succeeded", WAIT).await;
    let workers = api.get_json("/v1/workers").await;
    let w = &workers["data"][0];
    assert_eq!(workers["data"].as_array().unwrap().len(), 1, "{workers}");
    assert_eq!((w["id"].as_str(), w["device"].as_str(), w["device_name"].as_str()), (Some("cpu-worker"), Some("cpu"), Some("cpu")));
    assert_eq!(w["memory_bytes"], 6_i64 << 30);

    // The GPU job stays queued, and says why.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = api.get_json(&format!("/v1/fine-tuning/jobs/{gpu_job}")).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(
        job["status_reason"],
        "no live worker can run it: it needs a cuda device; live workers: cpu-worker (cpu, 6.0 GB)"
    );
    assert_eq!(trainer.seen().len(), 1, "only the plain job ran");

    // A worker that stops removes its registration.
    worker.shutdown().await;
    assert_eq!(api.get_json("/v1/workers").await["data"], serde_json::json!([]));
}

async fn worker_registrations_are_listed_while_fresh_and_forgotten_when_silent(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let store = &api.store;
    let d = any_device();
    // recent times: the node's own reaper forgets only workers silent for ten minutes
    let t = now_ms();
    store.register_worker("old", &d, t - 60_000, t - 59_000).await.unwrap();
    store.register_worker("new", &d, t - 60_000, t - 2_000).await.unwrap();
    // Registering again renews (and may change what it advertises).
    let unknown = WorkerDevice { memory_bytes: None, ..d.clone() };
    store.register_worker("new", &unknown, t - 60_000, t).await.unwrap();
    let live = store.list_workers(t - 30_000).await.unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!((live[0].id.as_str(), live[0].last_seen_at, live[0].memory_bytes), ("new", t, None));
    assert_eq!(live[0].job_id, None);
    assert_eq!(store.forget_workers(t - 30_000).await.unwrap(), 1, "the silent one");
    assert_eq!(store.list_workers(0).await.unwrap().len(), 1);
    store.remove_worker("new").await.unwrap();
    assert!(store.list_workers(0).await.unwrap().is_empty());
}

async fn events_written_from_several_pools_are_read_once_each_in_order(db: Db) {
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    let before = api.store.list_events(&id, 0, 1000).await.unwrap();
    let mut after = before.last().map_or(0, |e| e.id);
    // Four writers, each with its own pool (as separate processes), and a reader following
    // with the `after` cursor the events API uses: no event may be passed over.
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = Store::connect(&api.database_url()).await.unwrap();
        let job_id = id.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..60 {
                let e = arbiter::store::NewEvent {
                    job_id: job_id.clone(),
                    attempt: 1,
                    level: "info",
                    kind: "log",
                    message: format!("writer {w} event {i}"),
                    data: None,
                };
                ids.push(store.insert_event(&e, now_ms()).await.unwrap());
            }
            store.close().await;
            ids
        }));
    }
    let mut read = Vec::new();
    loop {
        let done = writers.iter().all(|w| w.is_finished());
        let page = api.store.list_events(&id, after, 1000).await.unwrap();
        if let Some(last) = page.last() {
            after = last.id;
        }
        read.extend(page.into_iter().map(|e| e.id));
        if done && api.store.list_events(&id, after, 1000).await.unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    written.sort();
    assert!(read.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(read, written, "every event read exactly once");
}

/// Postgres only: a claim skips a job another transaction has locked instead of waiting for it.
#[tokio::test]
async fn postgres_claim_skips_a_locked_job_instead_of_waiting() {
    use sqlx::{Connection, Row};
    let Some(db) = Db::postgres() else { return };
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let ids = queued_jobs(&api, 2).await;
    // Another claimer, mid-claim: the oldest job's row locked in an open transaction.
    let mut conn = sqlx::PgConnection::connect(&api.database_url()).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let locked = sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE").bind(&ids[0]).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(locked.get::<String, _>("id"), ids[0]);

    let device = any_device();
    let claim = api.store.claim_job("w", &device, now_ms(), 60_000);
    let job = tokio::time::timeout(Duration::from_secs(5), claim).await.expect("no waiting on the lock").unwrap();
    assert_eq!(job.expect("the unlocked job").id, ids[1]);
    tx.rollback().await.unwrap();
    let job = api.store.claim_job("w", &any_device(), now_ms(), 60_000).await.unwrap();
    assert_eq!(job.expect("free again").id, ids[0]);
}

#[test]
fn a_lease_shorter_than_two_heartbeats_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    for args in [
        vec!["worker", "--data-dir", &data, "--lease-ms", "1000"],
        vec!["worker", "--data-dir", &data, "--lease-ms", "0"],
        vec!["serve", "--data-dir", &data, "--addr", "127.0.0.1:0", "--lease-ms", "3000", "--heartbeat-ms", "2000"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter")).args(&args).output().expect("run arbiter");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains("must be at least twice --heartbeat-ms"), "{args:?}: {stderr}");
    }
}

#[test]
fn boolean_settings_from_the_environment_take_1_yes_on_and_off() {
    // The settings parse (the lease check after them is what stops the server), whichever
    // spelling the environment uses.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    for (yes, no) in [("1", "0"), ("yes", "no"), ("on", "off"), ("true", "false")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .args(["serve", "--data-dir", &data, "--addr", "127.0.0.1:0", "--lease-ms", "10"])
            .env("ARBITER_NO_WORKER", yes)
            .env("ARBITER_PREDICT_PRELOAD", no)
            .env("ARBITER_PREDICT_BATCHING", no)
            .env("ARBITER_HOST_EMBEDDINGS", yes)
            .output()
            .expect("run arbiter");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("must be at least twice --heartbeat-ms"), "{yes}/{no}: {stderr}");
    }
}

#[tokio::test]
async fn postgres_a_job_submit_and_a_dataset_delete_never_cross() {
    use sqlx::Connection;
    let Some(db) = Db::postgres() else { return };
    let api = spawn().on(&db).flag("--no-worker").start().await;
    let mut conn = sqlx::PgConnection::connect(&api.database_url()).await.unwrap();
    let pending = Duration::from_millis(300);

    // A delete in flight (its transaction open): a job submitted meanwhile waits for it, then
    // finds the dataset gone.
    let ds = api.create_dataset(3).await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM datasets WHERE id = $1 FOR UPDATE").bind(&ds).execute(&mut *tx).await.unwrap();
    sqlx::query("DELETE FROM datasets WHERE id = $1").bind(&ds).execute(&mut *tx).await.unwrap();
    let body = serde_json::json!({ "dataset_id": ds });
    let submit = api.post_json("/v1/fine-tuning/jobs", &body);
    tokio::pin!(submit);
    assert!(tokio::time::timeout(pending, &mut submit).await.is_err(), "the submit waits for the delete");
    tx.commit().await.unwrap();
    let err = common::error_of(submit.await, 404).await;
    assert_eq!(err["field"], "dataset_id");

    // A job insert in flight (the dataset held FOR SHARE as the submit holds it, the job
    // inserted, not committed): a delete waits for it, then sees the job and refuses.
    let ds = api.create_dataset(3).await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM datasets WHERE id = $1 FOR SHARE").bind(&ds).execute(&mut *tx).await.unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, status, dataset_id, base_model, hyperparameters, max_attempts, run_at, created_at, updated_at) \
         VALUES ($1, 'queued', $2, 'model', '{}', 3, 0, 0, 0)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&ds)
    .execute(&mut *tx)
    .await
    .unwrap();
    let delete = api.client.delete(api.url(&format!("/v1/datasets/{ds}"))).send();
    tokio::pin!(delete);
    assert!(tokio::time::timeout(pending, &mut delete).await.is_err(), "the delete waits for the submit");
    tx.commit().await.unwrap();
    let err = common::error_of(delete.await.unwrap(), 409).await;
    assert_eq!(err["code"], "dataset_in_use", "{err}");
}
