//! Scale-out across processes: one API node (the real `arbiter serve --no-worker` binary) and
//! four worker processes sharing one database and data directory, 40 jobs. Every job is
//! trained to completion exactly once, and a worker killed with SIGKILL in the middle of a job
//! has that job reclaimed by another worker after its lease expires, resuming from the last
//! checkpoint. Runs on Postgres (the scale-out backend) and on SQLite.
//!
//! The worker processes are this test binary itself, started again to run only the ignored
//! `worker_process` entry point below: `arbiter::run_worker` with the scripted test trainer,
//! which journals every start and finish to a file shared by all processes. The test trainer
//! never enters the production binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::trainer::ScriptedTrainer;
use common::{small_csv, Db};
use serde_json::{json, Value};

const JOBS: usize = 40;
const WORKERS: usize = 4;
/// Steps per job and the pause per step of the scripted trainer (a job takes ~0.6 s).
const STEPS: u64 = 10;
const STEP_MS: u64 = 60;
const LEASE_MS: &str = "3000";
const WAIT: Duration = Duration::from_secs(180);

/// Set in the environment of the worker processes: the worker's arguments (JSON list), its
/// label, and the journal file.
const ROLE_ARGS: &str = "ARBITER_TEST_WORKER_ARGS";
const ROLE_LABEL: &str = "ARBITER_TEST_WORKER_LABEL";
const ROLE_JOURNAL: &str = "ARBITER_TEST_WORKER_JOURNAL";

/// Entry point of the worker processes (ignored in normal runs; without the role variables it
/// does nothing). Runs `arbiter worker` with the scripted trainer until SIGTERM.
#[test]
#[ignore = "entry point of the worker processes started by the multi-process tests"]
fn worker_process() {
    let (Ok(args), Ok(label), Ok(journal)) =
        (std::env::var(ROLE_ARGS), std::env::var(ROLE_LABEL), std::env::var(ROLE_JOURNAL))
    else {
        return;
    };
    arbiter::init_tracing();
    let args: Vec<String> = serde_json::from_str(&args).expect("worker arguments");
    let settings = <arbiter::config::Settings as clap::Parser>::try_parse_from(
        ["arbiter", "worker"].into_iter().map(String::from).chain(args),
    )
    .expect("worker settings parse");
    let arbiter::config::Command::Worker(args) = settings.command else { panic!("worker expected") };
    let mut trainer = ScriptedTrainer::new(STEPS, Duration::from_millis(STEP_MS));
    trainer.journal = Some((PathBuf::from(journal), label));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            arbiter::shutdown_signal().await;
            t.cancel();
        });
        arbiter::run_worker(args, Some(Arc::new(trainer)), token).await.expect("worker runs");
    });
}

/// A child process that is killed (SIGKILL) if the test ends without stopping it.
struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait for a clean exit.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(sent.success(), "SIGTERM to {}", self.label);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(start.elapsed() < within, "{} did not stop within {within:?} of SIGTERM; log:\n{}", self.label, self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_process(label: &str, mut cmd: Command, dir: &Path) -> Proc {
    let log = dir.join(format!("{label}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    cmd.stdin(Stdio::null()).stdout(file.try_clone().expect("log file")).stderr(file);
    cmd.env("RUST_LOG", "info,sqlx=warn");
    let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {label}: {e}"));
    Proc { label: label.to_string(), child, log }
}

/// The API node's bound address, from its "arbiter listening" log line.
fn api_address(api: &mut Proc) -> String {
    let start = Instant::now();
    loop {
        let text = api.log_text();
        if let Some(line) = text.lines().find(|l| l.contains("arbiter listening")) {
            let addr = line.split_whitespace().find_map(|w| w.strip_prefix("addr=")).expect("addr= in the log line");
            return addr.to_string();
        }
        if let Some(status) = api.child.try_wait().expect("wait") {
            panic!("the API node exited ({status}) before listening:\n{text}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the API node did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Start { worker: String, job: String, attempt: i64, resume_step: u64 },
    Done { worker: String, job: String, attempt: i64 },
}

fn read_journal(path: &Path) -> Vec<Entry> {
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    BufReader::new(file)
        .lines()
        .map(|l| {
            let l = l.expect("journal line");
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["start", w, j, a, r] => Entry::Start {
                    worker: w.to_string(),
                    job: j.to_string(),
                    attempt: a.parse().unwrap(),
                    resume_step: r.parse().unwrap(),
                },
                ["done", w, j, a] => Entry::Done { worker: w.to_string(), job: j.to_string(), attempt: a.parse().unwrap() },
                _ => panic!("bad journal line {l:?}"),
            }
        })
        .collect()
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    async fn get(&self, path: &str) -> Value {
        let res = self.http.get(format!("{}{path}", self.base)).send().await.expect("request");
        assert_eq!(res.status(), 200, "GET {path}");
        res.json().await.expect("json")
    }

    async fn post(&self, path: &str, content_type: &str, body: String) -> Value {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 201, "POST {path}");
        res.json().await.expect("json")
    }

    async fn jobs(&self, ids: &[String]) -> Vec<Value> {
        let mut out = Vec::new();
        for id in ids {
            out.push(self.get(&format!("/v1/fine-tuning/jobs/{id}")).await);
        }
        out
    }
}

async fn one_api_node_four_workers_forty_jobs_and_a_kill_9(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let url = db.fresh_url(&data).await;
    std::fs::create_dir_all(&data).unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::write(&model, b"stand-in model file").unwrap();
    let journal = dir.path().join("journal.txt");
    let common_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "--database-url".into(),
            url.clone(),
            "--model".into(),
            model.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // The API node: the production binary, no worker in it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arbiter"));
    cmd.arg("serve").args(common_args(&["--no-worker", "--addr", "127.0.0.1:0"]));
    let mut api = start_process("api", cmd, &logs);
    let client = Client {
        base: format!("http://{}", api_address(&mut api)),
        http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
    };

    // 40 jobs queued through the API before any worker exists.
    let dataset = client.post("/v1/datasets", "text/csv", small_csv(6)).await;
    let dataset_id = dataset["id"].as_str().unwrap();
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let body = json!({ "dataset_id": dataset_id, "hyperparameters": { "epochs": 1, "batch_size": 2 } });
        let job = client.post("/v1/fine-tuning/jobs", "application/json", body.to_string()).await;
        assert_eq!(job["status"], "queued");
        ids.push(job["id"].as_str().unwrap().to_string());
    }

    // Four worker processes.
    let exe = std::env::current_exe().expect("test binary");
    let mut workers: Vec<Proc> = (1..=WORKERS)
        .map(|i| {
            let label = format!("w{i}");
            let args = common_args(&[
                "--worker-id", &label, "--lease-ms", LEASE_MS, "--heartbeat-ms", "150", "--poll-ms", "50",
            ]);
            let mut cmd = Command::new(&exe);
            cmd.args(["worker_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
                .env(ROLE_ARGS, serde_json::to_string(&args).unwrap())
                .env(ROLE_LABEL, &label)
                .env(ROLE_JOURNAL, &journal);
            start_process(&label, cmd, &logs)
        })
        .collect();

    // Kill -9 the worker holding a job just past its first checkpoint (step 2), mid-job. The
    // holder comes from the database row (the API does not show lock holders).
    let store = arbiter::store::Store::connect(&url).await.unwrap();
    let started = Instant::now();
    let (victim_job, victim_worker) = loop {
        let running = client.get("/v1/fine-tuning/jobs?status=running&limit=100").await;
        let hit = running["data"].as_array().unwrap().iter().find_map(|j| {
            let step = j["progress"]["step"].as_i64().unwrap_or(0);
            (3..=5).contains(&step).then(|| j["id"].as_str().unwrap().to_string())
        });
        if let Some(job) = hit {
            let row = store.get_job(&job).await.unwrap().unwrap();
            if let (Some(holder), "running") = (row.lock_by, row.status.as_str()) {
                break (job, holder);
            }
        }
        assert!(started.elapsed() < WAIT, "no job reached step 3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim = workers.iter_mut().find(|w| w.label == victim_worker).expect("the holder is one of ours");
    victim.child.kill().expect("SIGKILL");
    let status = victim.child.wait().expect("wait");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "killed by SIGKILL");
    let killed_at = Instant::now();
    // It really died mid-job: the job is still running under its lease, short of the end.
    let row = store.get_job(&victim_job).await.unwrap().unwrap();
    assert_eq!((row.status.as_str(), row.lock_by.as_deref()), ("running", Some(victim_worker.as_str())), "{row:?}");
    assert!(row.step < STEPS as i64, "{row:?}");
    store.close().await;

    // Every job finishes.
    let deadline = Instant::now() + WAIT;
    let finished = loop {
        let jobs = client.jobs(&ids).await;
        if jobs.iter().all(|j| j["status"] == "succeeded") {
            break jobs;
        }
        if Instant::now() > deadline {
            let logs: String = workers.iter().map(|w| format!("--- {}\n{}", w.label, w.log_text())).collect();
            panic!("not every job succeeded: {:#?}\n{logs}", jobs.iter().filter(|j| j["status"] != "succeeded").collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let total = started.elapsed();

    // The database: one success per job; the killed job took a second attempt, no other did.
    for job in &finished {
        let expected = if job["id"] == victim_job.as_str() { 2 } else { 1 };
        assert_eq!(job["attempt"], expected, "{job:#}");
        assert_eq!(job["progress"]["step"], STEPS as i64);
    }
    let adapters = client.get("/v1/adapters").await;
    let adapters = adapters["data"].as_array().unwrap();
    let adapter_jobs: Vec<_> = adapters.iter().map(|a| a["job_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(adapter_jobs.len(), JOBS, "one adapter per job");
    assert_eq!(adapter_jobs.iter().cloned().collect::<HashSet<_>>(), ids.iter().cloned().collect(), "each job's own");

    // The trainers' journal: every job trained to the end exactly once.
    let entries = read_journal(&journal);
    let done: Vec<_> = entries.iter().filter_map(|e| match e { Entry::Done { job, .. } => Some(job.clone()), _ => None }).collect();
    assert_eq!(done.len(), JOBS, "{JOBS} completions, one per job: {entries:#?}");
    assert_eq!(done.iter().cloned().collect::<HashSet<_>>(), ids.iter().cloned().collect(), "each job completed");
    let starts: Vec<_> = entries.iter().filter(|e| matches!(e, Entry::Start { .. })).collect();
    assert_eq!(starts.len(), JOBS + 1, "one start per job, plus the retry of the killed one");
    let victim_runs: Vec<_> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Start { worker, job, attempt, resume_step } if *job == victim_job => {
                Some((worker.clone(), *attempt, *resume_step))
            }
            _ => None,
        })
        .collect();
    assert_eq!(victim_runs.len(), 2, "{victim_runs:?}");
    assert_eq!(victim_runs[0], (victim_worker.clone(), 1, 0));
    let (rescuer, attempt, resume_step) = victim_runs[1].clone();
    assert_ne!(rescuer, victim_worker, "another worker took the job over");
    assert_eq!(attempt, 2);
    assert!(resume_step >= 2, "resumed from a checkpoint, not from scratch (step {resume_step})");
    let victim_done: Vec<_> = entries
        .iter()
        .filter(|e| matches!(e, Entry::Done { job, .. } if *job == victim_job))
        .collect();
    assert_eq!(victim_done, [&Entry::Done { worker: rescuer.clone(), job: victim_job.clone(), attempt: 2 }]);

    // The job's events tell the story: expired lease, resumed from the checkpoint.
    let events = client.get(&format!("/v1/fine-tuning/jobs/{victim_job}/events?limit=1000")).await;
    let messages: Vec<String> =
        events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap().to_string()).collect();
    assert!(messages.iter().any(|m| m.contains("lease of attempt 1 expired")), "{messages:#?}");
    assert!(messages.iter().any(|m| m.contains("resuming from checkpoint")), "{messages:#?}");
    assert!(messages.iter().any(|m| m.contains(&format!("attempt 2 of 3 started on worker {rescuer}"))), "{messages:#?}");

    // Work was spread: every surviving worker finished jobs.
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for e in &entries {
        if let Entry::Done { worker, .. } = e {
            *per_worker.entry(worker.clone()).or_default() += 1;
        }
    }
    for w in workers.iter().filter(|w| w.label != victim_worker) {
        assert!(per_worker.get(&w.label).copied().unwrap_or(0) > 0, "{} finished no job: {per_worker:?}", w.label);
    }
    let backend = match db {
        Db::Sqlite => "sqlite",
        Db::Postgres(_) => "postgres",
    };
    eprintln!(
        "{backend}: {JOBS} jobs on {WORKERS} worker processes done {:.1} s after the workers started; \
         {victim_worker} killed at step {} of {victim_job}, which {rescuer} resumed from step {resume_step}; \
         all done {:.1} s after the kill (lease {LEASE_MS} ms); completions per worker {per_worker:?}",
        total.as_secs_f64(),
        row.step,
        (total - (killed_at - started)).as_secs_f64(),
    );

    // Graceful stop of everything still running.
    for w in workers.iter_mut().filter(|w| w.label != victim_worker) {
        let status = w.terminate(Duration::from_secs(30));
        assert!(status.success(), "{} exits cleanly on SIGTERM ({status}):\n{}", w.label, w.log_text());
    }
    let status = api.terminate(Duration::from_secs(30));
    assert!(status.success(), "the API node exits cleanly on SIGTERM ({status})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_api_node_four_workers_forty_jobs_and_a_kill_9() {
    if let Some(db) = Db::postgres() {
        one_api_node_four_workers_forty_jobs_and_a_kill_9(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_api_node_four_workers_forty_jobs_and_a_kill_9() {
    one_api_node_four_workers_forty_jobs_and_a_kill_9(Db::Sqlite).await;
}
