//! Queue semantics across workers sharing one database: no double claims, expired leases go
//! back to the queue with the next attempt (resuming from the last checkpoint), attempts run
//! out, and a graceful shutdown gives the running job back.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arbiter::store::now_ms;
use common::trainer::ScriptedTrainer;
use common::{spawn, TestApp};

const WAIT: Duration = Duration::from_secs(30);

/// Creates a dataset and `n` queued jobs through an app with no worker.
async fn queued_jobs(app: &TestApp, n: usize) -> Vec<String> {
    let ds = app.create_dataset(4).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(app.create_job(&ds).await["id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn two_runners_on_one_database_never_claim_the_same_job() {
    let api = spawn().flag("--no-worker").start().await;
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

#[tokio::test]
async fn an_expired_lease_is_claimed_again_as_attempt_two_and_resumes() {
    let api = spawn().flag("--no-worker").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);

    // A worker claims the job, writes a checkpoint at step 2, and dies: no more heartbeats.
    let claimed = api.store.claim_job("doomed-worker", now_ms(), 300).await.unwrap().expect("claimed");
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

#[tokio::test]
async fn a_job_fails_once_its_attempts_are_spent() {
    let api = spawn().flag("--no-worker").arg("--max-attempts", "1").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    api.store.claim_job("doomed-worker", now_ms(), 200).await.unwrap().expect("claimed");
    // Any runner reaps; this one has no trainer, so it claims nothing itself.
    let _reaper = spawn().same_data_as(&api).start().await;
    let job = api.wait_status(&id, "failed", WAIT).await;
    assert_eq!(job["attempt"], 1);
    assert!(job["error"].as_str().unwrap().contains("lease"), "{job}");
}

#[tokio::test]
async fn heartbeats_keep_a_long_job_from_being_reaped() {
    // Lease 300 ms, heartbeat 100 ms, the job runs well past one lease.
    let trainer = Arc::new(ScriptedTrainer::new(12, Duration::from_millis(100)));
    let app = spawn().arg("--lease-ms", "300").trainer(trainer.clone()).start().await;
    let id = queued_jobs(&app, 1).await.remove(0);
    let job = app.wait_status(&id, "succeeded", WAIT).await;
    assert_eq!(job["attempt"], 1, "never reaped: {job}");
    assert_eq!(trainer.seen().len(), 1);
}

#[tokio::test]
async fn graceful_shutdown_gives_the_running_job_back() {
    let trainer = Arc::new(ScriptedTrainer::new(10_000, Duration::from_millis(20)));
    let app = spawn().trainer(trainer).start().await;
    let id = queued_jobs(&app, 1).await.remove(0);
    app.wait_job(&id, WAIT, |j| j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(1)).await;
    let (url, _dir) = (app.database_url(), app.dir.clone());
    app.shutdown().await;
    let store = arbiter::store::Store::connect(&url).await.unwrap();
    let job = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(job.status, "queued", "released, not left running");
    assert_eq!(job.lock_by, None);
    let events = store.list_events(&id, 0, 1000).await.unwrap();
    assert!(events.iter().any(|e| e.message.contains("back in the queue")));
}

#[tokio::test]
async fn a_standalone_worker_process_runs_jobs_queued_through_the_api() {
    let api = spawn().flag("--no-worker").start().await;
    let id = queued_jobs(&api, 1).await.remove(0);
    let job = api.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
    assert!(job["status_reason"].as_str().unwrap().contains("--no-worker"), "{job}");

    // `arbiter worker` against the same data directory and database.
    let dir = api.data_dir().display().to_string();
    let settings = <arbiter::config::Settings as clap::Parser>::try_parse_from([
        "arbiter", "worker", "--data-dir", &dir, "--poll-ms", "20", "--heartbeat-ms", "100", "--worker-id", "standalone",
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
