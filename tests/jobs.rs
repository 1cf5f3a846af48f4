//! `/v1/fine-tuning/jobs` through HTTP: submit, list, get, cancel, events (paged and SSE),
//! checkpoints, and a scripted trainer driving a job to `succeeded`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::trainer::ScriptedTrainer;
use common::{error_of, spawn, spawn_app, TestApp};
use futures::StreamExt;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn submit_get_list_and_cancel_without_a_trainer() {
    let app = spawn_app().await;
    let ds = app.create_dataset(5).await;
    let job = app.create_job(&ds).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["dataset_id"], ds.as_str());
    assert_eq!(job["attempt"], 0);
    assert_eq!(job["progress"]["step"], 0);
    assert_eq!(job["hyperparameters"]["batch_size"], 2);
    assert_eq!(job["hyperparameters"]["lora"]["r"], 16, "defaults filled in");
    assert_eq!(job["validation_fraction"], 0.1);
    assert!(
        job["status_reason"].as_str().unwrap().contains("no trainer"),
        "a queued job says why it waits: {job}"
    );
    let id = job["id"].as_str().unwrap();

    // Still queued a moment later: nothing pretends to train.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = app.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
    assert_eq!(got["status"], "queued");
    assert!(got["created_at"].is_string() && got["started_at"].is_null());

    let second = app.create_job(&ds).await;
    let list = app.get_json("/v1/fine-tuning/jobs").await;
    let ids: Vec<_> = list["data"].as_array().unwrap().iter().map(|j| j["id"].clone()).collect();
    assert_eq!(ids, [second["id"].clone(), job["id"].clone()], "newest first");

    let res = app.client.post(app.url(&format!("/v1/fine-tuning/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let cancelled: Value = res.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_string());

    let queued = app.get_json("/v1/fine-tuning/jobs?status=queued").await;
    assert_eq!(queued["data"].as_array().unwrap().len(), 1);
    assert_eq!(queued["data"][0]["id"], second["id"]);
    let done = app.get_json("/v1/fine-tuning/jobs?status=cancelled").await;
    assert_eq!(done["data"][0]["id"], id);

    let events = app.events(id).await;
    let messages: Vec<_> = events.iter().map(|e| e["message"].as_str().unwrap().to_string()).collect();
    assert!(messages.iter().any(|m| m.contains("queued")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("cancelled")), "{messages:?}");
}

#[tokio::test]
async fn cursor_pagination_walks_every_job_once() {
    let app = spawn_app().await;
    let ds = app.create_dataset(3).await;
    let mut made = Vec::new();
    for _ in 0..7 {
        made.push(app.create_job(&ds).await["id"].as_str().unwrap().to_string());
    }
    made.reverse();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/fine-tuning/jobs?limit=3&after={a}"),
            None => "/v1/fine-tuning/jobs?limit=3".to_string(),
        };
        let page = app.get_json(&q).await;
        seen.extend(page["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()));
        if page["has_more"] == false {
            break;
        }
        after = Some(page["next_cursor"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, made);
    let err = error_of(app.get("/v1/fine-tuning/jobs?status=bogus").await, 422).await;
    assert_eq!(err["field"], "status");
    let err = error_of(app.get("/v1/fine-tuning/jobs?limit=0").await, 422).await;
    assert_eq!(err["field"], "limit");
    let err = error_of(app.get("/v1/fine-tuning/jobs?after=no-such-job").await, 422).await;
    assert_eq!((err["code"].as_str(), err["field"].as_str()), (Some("invalid_cursor"), Some("after")));
}

#[tokio::test]
async fn scripted_trainer_drives_a_job_to_succeeded() {
    let trainer = Arc::new(ScriptedTrainer::new(6, Duration::from_millis(30)));
    let app = spawn().trainer(trainer.clone()).start().await;
    let ds = app.create_dataset(20).await;
    let res = app
        .post_json(
            "/v1/fine-tuning/jobs",
            &json!({ "dataset_id": ds, "validation_fraction": 0.25, "suffix": "demo", "hyperparameters": { "epochs": 1 } }),
        )
        .await;
    assert_eq!(res.status(), 201);
    let job: Value = res.json().await.unwrap();
    let id = job["id"].as_str().unwrap();

    // Progress is visible while it runs.
    let running = app.wait_job(id, WAIT, |j| j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(1)).await;
    assert_eq!(running["attempt"], 1);
    assert_eq!(running["progress"]["total_steps"], 6);
    assert!(running["started_at"].is_string());
    assert!(running["status_reason"].is_null());

    let done = app.wait_status(id, "succeeded", WAIT).await;
    assert_eq!(done["progress"]["step"], 6);
    assert_eq!(done["progress"]["epoch"], 1.0);
    assert!(done["metrics"]["train_loss"].as_f64().unwrap() > 0.0);
    assert_eq!(done["metrics"]["eval_accuracy"], 0.5);
    assert!(done["finished_at"].is_string());
    let adapter_id = done["adapter_id"].as_str().expect("adapter registered");

    // The trainer got the split rows.
    let seen = trainer.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].train_rows, seen[0].validation_rows), (15, 5));
    assert_eq!(seen[0].resume_from, None);

    // Events: one per step, evals, checkpoints, and the outcome.
    let events = app.events(id).await;
    let of = |t: &str| events.iter().filter(|e| e["type"] == t).count();
    assert_eq!(of("train_step"), 6);
    assert_eq!(of("eval"), 3);
    assert_eq!(of("checkpoint"), 3);
    let step3 = events.iter().find(|e| e["type"] == "train_step" && e["data"]["step"] == 3).unwrap();
    assert!(step3["data"]["loss"].as_f64().is_some());
    assert!(events.last().unwrap()["message"].as_str().unwrap().contains("succeeded"));
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first");

    let cps = app.get_json(&format!("/v1/fine-tuning/jobs/{id}/checkpoints")).await;
    let steps: Vec<_> = cps["data"].as_array().unwrap().iter().map(|c| c["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [6, 4, 2], "newest first");

    // The adapter is stored under the data directory and registered.
    let adapter = app.store.get_adapter(adapter_id).await.unwrap().expect("adapter row");
    assert_eq!(adapter.job_id.as_deref(), Some(id));
    assert!(adapter.name.contains(":demo:"), "{}", adapter.name);
    let dir = app.data_dir().join("adapters").join(adapter_id);
    assert_eq!(std::path::PathBuf::from(&adapter.path), dir);
    assert!(dir.join("adapter_config.json").is_file());
    assert_eq!(app.store.find_adapter(&adapter.name).await.unwrap().unwrap().id, adapter_id);

    // Finished jobs cannot be cancelled.
    let err = error_of(app.client.post(app.url(&format!("/v1/fine-tuning/jobs/{id}/cancel"))).send().await.unwrap(), 409).await;
    assert_eq!(err["code"], "job_finished");
    app.assert_up().await;
}

#[tokio::test]
async fn trainer_failure_fails_the_job_with_its_message() {
    let mut t = ScriptedTrainer::new(2, Duration::from_millis(5));
    t.fail_with = Some("loss became NaN at step 2".into());
    let app = spawn().trainer(Arc::new(t)).start().await;
    let ds = app.create_dataset(4).await;
    let id = app.create_job(&ds).await["id"].as_str().unwrap().to_string();
    let job = app.wait_status(&id, "failed", WAIT).await;
    assert_eq!(job["error"], "loss became NaN at step 2");
}

/// Makes `dir` unusable as a directory (a file takes its place), or usable again.
fn block_dir(dir: &std::path::Path, blocked: bool) {
    if blocked {
        std::fs::remove_dir_all(dir).ok();
        std::fs::write(dir, b"in the way").unwrap();
    } else {
        std::fs::remove_file(dir).unwrap();
        std::fs::create_dir_all(dir).unwrap();
    }
}

async fn wait_event(app: &TestApp, id: &str, needle: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(e) = app.events(id).await.into_iter().find(|e| e["message"].as_str().unwrap_or("").contains(needle)) {
            return e;
        }
        assert!(std::time::Instant::now() < deadline, "no event with {needle:?} in {:#?}", app.events(id).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_job_that_cannot_start_for_a_passing_reason_runs_again_later() {
    // The job directory cannot be created (the disk, not the job, is at fault): the attempt counts,
    // the job waits its delay in the queue, and once the disk is fixed the next attempt succeeds.
    let trainer = Arc::new(ScriptedTrainer::new(2, Duration::from_millis(5)));
    let app = spawn().trainer(trainer.clone()).arg("--retry-delay-ms", "400").start().await;
    let jobs_dir = app.data_dir().join("jobs");
    block_dir(&jobs_dir, true);
    let ds = app.create_dataset(4).await;
    let id = app.create_job(&ds).await["id"].as_str().unwrap().to_string();
    let retry = wait_event(&app, &id, "could not start").await;
    let message = retry["message"].as_str().unwrap();
    assert_eq!(retry["level"], "warn");
    assert!(message.starts_with("attempt 1 could not start: cannot create the job directory"), "{message}");
    assert!(message.ends_with("the job runs again in 0.4 s (1 of 3 attempts used)"), "{message}");
    let job = app.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
    assert!(job["status"] == "queued" || job["status"] == "running", "{job}");
    assert!(trainer.seen().is_empty(), "the trainer never ran");

    block_dir(&jobs_dir, false);
    let done = app.wait_status(&id, "succeeded", WAIT).await;
    let attempt = done["attempt"].as_i64().unwrap();
    assert!(attempt >= 2, "{done}");
    assert_eq!(trainer.seen().len(), 1, "one attempt trained");
    assert_eq!(trainer.seen()[0].attempt, attempt);
    app.assert_up().await;
}

#[tokio::test]
async fn a_job_failing_for_a_passing_reason_fails_once_its_attempts_are_spent() {
    let trainer = Arc::new(ScriptedTrainer::new(2, Duration::from_millis(5)));
    let app = spawn().trainer(trainer.clone()).arg("--retry-delay-ms", "100").arg("--max-attempts", "2").start().await;
    block_dir(&app.data_dir().join("jobs"), true);
    let ds = app.create_dataset(4).await;
    let id = app.create_job(&ds).await["id"].as_str().unwrap().to_string();
    let job = app.wait_status(&id, "failed", WAIT).await;
    let error = job["error"].as_str().unwrap();
    assert!(error.starts_with("attempt 2 could not start: cannot create the job directory"), "{error}");
    assert!(error.ends_with("no attempts left (2 allowed)"), "{error}");
    assert_eq!(job["attempt"], 2);
    let levels: Vec<_> = app.events(&id).await.iter().filter(|e| e["level"] != "info").map(|e| e["level"].clone()).collect();
    assert_eq!(levels, ["warn", "error"], "one retry, then the failure");
    assert!(trainer.seen().is_empty());
}

#[tokio::test]
async fn a_trained_adapter_that_cannot_be_stored_is_stored_by_the_next_attempt() {
    // The shared artifact store refuses the adapter (a file where its folder goes): the run is not
    // thrown away; the next attempt resumes from the last step's checkpoint and stores it.
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().display());
    let trainer = Arc::new(ScriptedTrainer::new(4, Duration::from_millis(5)));
    let app = spawn().trainer(trainer.clone()).arg("--artifact-store", &url).arg("--retry-delay-ms", "400").start().await;
    let adapters = shared.path().join("adapters");
    std::fs::create_dir_all(shared.path()).unwrap();
    std::fs::write(&adapters, b"in the way").unwrap();
    let ds = app.create_dataset(4).await;
    let id = app.create_job(&ds).await["id"].as_str().unwrap().to_string();
    let retry = wait_event(&app, &id, "could not be stored").await;
    assert!(retry["message"].as_str().unwrap().contains("the job runs again in 0.4 s (1 of 3 attempts used)"), "{retry}");
    block_dir(&adapters, false);
    let done = app.wait_status(&id, "succeeded", WAIT).await;
    let seen = trainer.seen();
    let last = seen.last().unwrap();
    assert_eq!(seen[0].resume_from, None);
    assert!(last.resume_from.as_ref().is_some_and(|d| d.ends_with("step-4")), "{:?}", last.resume_from);
    let adapter_id = done["adapter_id"].as_str().unwrap();
    assert!(shared.path().join("adapters").join(adapter_id).join("adapter_config.json").is_file());
    // the refused copy did not stay behind in the data directory
    let local: Vec<_> = std::fs::read_dir(app.data_dir().join("adapters")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(local, [adapter_id]);
}

#[tokio::test]
async fn a_checkpoint_that_cannot_be_resumed_is_set_aside_for_the_one_before() {
    // A job given back at a shutdown whose newest checkpoint turns out unreadable: the next
    // attempt reports it, the runner sets it aside, and the attempt after resumes from the
    // checkpoint before it.
    let slow = Arc::new(ScriptedTrainer::new(10_000, Duration::from_millis(20)));
    let one = spawn().trainer(slow).start().await;
    let ds = one.create_dataset(4).await;
    let id = one.create_job(&ds).await["id"].as_str().unwrap().to_string();
    one.wait_job(&id, WAIT, |j| j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(5)).await;
    let (dir, url) = (one.dir.clone(), one.database_url());
    let checkpoints = one.data_dir().join("jobs").join(&id).join("checkpoints");
    one.shutdown().await;
    let newest = (1..10_000).rev().step_by(1).find(|s| checkpoints.join(format!("step-{s}")).is_dir()).expect("a checkpoint");
    std::fs::write(checkpoints.join(format!("step-{newest}")).join("state.json"), b"{half a wri").unwrap();

    let fast = Arc::new(ScriptedTrainer::new(newest + 4, Duration::from_millis(1)));
    // the same data directory and database (a restart)
    let two = spawn().in_dir(dir).database_url(url).trainer(fast.clone()).start().await;
    let done = two.wait_status(&id, "succeeded", WAIT).await;
    let resumed: Vec<_> = fast.seen().iter().map(|s| s.resume_from.as_ref().map(|d| d.file_name().unwrap().to_string_lossy().into_owned())).collect();
    assert_eq!(resumed, [Some(format!("step-{newest}")), Some(format!("step-{}", newest - 2))]);
    let set_aside = wait_event(&two, &id, "it is set aside").await;
    assert!(set_aside["message"].as_str().unwrap().contains(&format!("could not resume from the checkpoint of step {newest} (its state:")), "{set_aside}");
    assert!(set_aside["message"].as_str().unwrap().contains("the job runs again in 0.0 s"), "{set_aside}");
    let listed = two.get_json(&format!("/v1/fine-tuning/jobs/{id}/checkpoints")).await;
    // attempt one's row is set aside; attempt three wrote that step again
    let rows: Vec<(i64, bool)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["step"] == newest)
        .map(|c| (c["attempt"].as_i64().unwrap(), c["file_missing"].as_bool().unwrap()))
        .collect();
    assert_eq!(rows, [(3, false), (1, true)]);
    assert_eq!(done["attempt"], 3, "given back, set aside, then done");
}

#[tokio::test]
async fn cancelling_a_running_job_stops_the_trainer_within_seconds() {
    let trainer = Arc::new(ScriptedTrainer::new(10_000, Duration::from_millis(20)));
    let app = spawn().trainer(trainer.clone()).start().await;
    let ds = app.create_dataset(4).await;
    let id = app.create_job(&ds).await["id"].as_str().unwrap().to_string();
    app.wait_job(&id, WAIT, |j| j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(2)).await;
    let res = app.client.post(app.url(&format!("/v1/fine-tuning/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let cancelled_at = std::time::Instant::now();
    // The trainer stops: no new step events a short while later.
    let stopped = async {
        loop {
            let events = app.events(&id).await;
            if events.iter().any(|e| e["message"].as_str().unwrap_or("").contains("stopped: the job was cancelled")) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let events = tokio::time::timeout(Duration::from_secs(5), stopped).await.expect("the runner stops within 5 s");
    assert!(cancelled_at.elapsed() < Duration::from_secs(5));
    // the trainer ran on until it noticed, but none of its reports is written after the cancel
    let cancel = events.iter().position(|e| e["message"].as_str().unwrap_or("").starts_with("cancel")).expect("the cancel event");
    let after: Vec<_> = events[cancel..].iter().filter(|e| e["type"] == "train_step" || e["type"] == "checkpoint").collect();
    assert!(after.is_empty(), "reports after the cancel: {after:?}");
    let job = app.get_json(&format!("/v1/fine-tuning/jobs/{id}")).await;
    assert_eq!(job["status"], "cancelled");
    let err = error_of(app.client.post(app.url(&format!("/v1/fine-tuning/jobs/{id}/cancel"))).send().await.unwrap(), 409).await;
    assert_eq!(err["status"], "cancelled");
}

#[tokio::test]
async fn events_stream_as_server_sent_events_until_the_end() {
    let trainer = Arc::new(ScriptedTrainer::new(4, Duration::from_millis(30)));
    let app = spawn().trainer(trainer).start().await;
    let ds = app.create_dataset(4).await;
    let id = app.create_job(&ds).await["id"].as_str().unwrap().to_string();
    for (path, accept) in [
        (format!("/v1/fine-tuning/jobs/{id}/events/stream"), "*/*"),
        (format!("/v1/fine-tuning/jobs/{id}/events"), "text/event-stream"),
    ] {
        let res = app.client.get(app.url(&path)).header("accept", accept).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let mut body = String::new();
        let mut stream = res.bytes_stream();
        let read = async {
            while let Some(chunk) = stream.next().await {
                body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                if body.contains("event: end") {
                    break;
                }
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("stream ends after the job");
        assert_eq!(body.matches("event: train_step").count(), 4, "{body}");
        assert!(body.contains("\"status\":\"succeeded\""), "{body}");
    }
}

#[tokio::test]
async fn unknown_dataset_is_404_naming_the_field() {
    let app = spawn_app().await;
    let err = error_of(app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": "nope" })).await, 404).await;
    assert_eq!(err["field"], "dataset_id");
    let ds = app.create_dataset(3).await;
    let res = app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "validation_dataset_id": "gone" })).await;
    let err = error_of(res, 404).await;
    assert_eq!(err["field"], "validation_dataset_id");
    app.assert_up().await;
}

#[tokio::test]
async fn invalid_hyperparameters_are_422_naming_the_field() {
    let app = spawn_app().await;
    let ds = app.create_dataset(3).await;
    let res = app
        .post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "hyperparameters": { "lora": { "r": 0 } } }))
        .await;
    let err = error_of(res, 422).await;
    assert_eq!(err["code"], "invalid_hyperparameters");
    assert_eq!(err["field"], "hyperparameters.lora.r");

    let res = app
        .post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "hyperparameters": { "learning_rate": -1 } }))
        .await;
    assert_eq!(error_of(res, 422).await["field"], "hyperparameters.learning_rate");

    // Wrong type and unknown fields are named too.
    let res = app
        .post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "hyperparameters": { "batch_size": "eight" } }))
        .await;
    assert_eq!(error_of(res, 422).await["field"], "hyperparameters.batch_size");
    let res = app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "hyperparameters": { "epochz": 1 } })).await;
    let err = error_of(res, 422).await;
    assert!(err["message"].as_str().unwrap().contains("epochz"), "{err}");

    let list = app.get_json("/v1/fine-tuning/jobs").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing was created");
    app.assert_up().await;
}

#[tokio::test]
async fn an_adapter_name_is_held_by_one_unfinished_job_at_a_time() {
    let app = spawn_app().await;
    let ds = app.create_dataset(3).await;
    let body = json!({ "dataset_id": ds, "name": "arena-v1" });
    let res = app.post_json("/v1/fine-tuning/jobs", &body).await;
    assert_eq!(res.status(), 201);
    let first: Value = res.json().await.unwrap();
    let err = error_of(app.post_json("/v1/fine-tuning/jobs", &body).await, 409).await;
    assert_eq!((err["code"].as_str(), err["field"].as_str()), (Some("name_taken"), Some("name")), "{err}");
    let other = app.post_json("/v1/fine-tuning/jobs", &json!({ "dataset_id": ds, "name": "arena-v2" })).await;
    assert_eq!(other.status(), 201, "another name is free");
    // once the first job is cancelled the name is free again
    let id = first["id"].as_str().unwrap();
    let res = app.client.post(app.url(&format!("/v1/fine-tuning/jobs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(app.post_json("/v1/fine-tuning/jobs", &body).await.status(), 201);
    let all = app.get_json("/v1/fine-tuning/jobs").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3, "nothing else was stored");
    app.assert_up().await;
}

#[tokio::test]
async fn other_invalid_job_bodies() {
    let app = spawn_app().await;
    let ds = app.create_dataset(3).await;
    for (body, field) in [
        (json!({ "dataset_id": ds, "validation_fraction": 1.0 }), "validation_fraction"),
        (json!({ "dataset_id": ds, "validation_fraction": 0.2, "validation_dataset_id": ds }), "validation_fraction"),
        (json!({ "dataset_id": ds, "base_model": "/no/such/model.gguf" }), "base_model"),
        (json!({ "dataset_id": ds, "name": "has spaces" }), "name"),
        (json!({ "dataset_id": ds, "colour": "blue" }), ""),
    ] {
        let err = error_of(app.post_json("/v1/fine-tuning/jobs", &body).await, 422).await;
        if !field.is_empty() {
            assert_eq!(err["field"], field, "{body}");
        }
    }
    let res = app.post_raw("/v1/fine-tuning/jobs", "application/json", "{\"dataset_id\": ").await;
    let err = error_of(res, 400).await;
    assert_eq!(err["code"], "invalid_json");
    let res = app.post_raw("/v1/fine-tuning/jobs", "text/plain", "dataset_id=x").await;
    assert_eq!(error_of(res, 415).await["code"], "unsupported_media_type");
    let err = error_of(app.get("/v1/fine-tuning/jobs/nope").await, 404).await;
    assert_eq!(err["code"], "not_found");
    let err = error_of(app.client.post(app.url("/v1/fine-tuning/jobs/nope/cancel")).send().await.unwrap(), 404).await;
    assert_eq!(err["code"], "not_found");
    app.assert_up().await;
}
