//! The job runner: claims queued jobs its device can run, holds their lease by heartbeat,
//! drives the `Trainer` on a blocking thread, and records the outcome. Also reaps the jobs of
//! silent workers. A runner with a trainer advertises its device in the `workers` table while
//! it runs.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{field::Empty, Instrument, Span};

use super::observer::{write_reports, JobObserver, StopFlags};
use super::reaper::Reaper;
use super::trainer::{TrainError, TrainOutcome, TrainRequest, Trainer};
use super::device::{self, DeviceError};
use crate::config::{QueueArgs, StoreArgs};
use crate::data::hyper::Hyperparameters;
use crate::data::{split_validation, ArenaRow};
use crate::store::artifacts::{ArtifactError, Artifacts};
use crate::store::files::{self, DataDir, FileError};
use crate::store::{now_ms, CheckpointRecord, JobRecord, JobStatus, NewAdapter, NewEvent, Release, Store, WorkerDevice};

/// Why a job is waiting, shown on `GET /v1/fine-tuning/jobs/{id}` while it is queued and no
/// runner in this process can take it.
pub const NO_TRAINER_REASON: &str =
    "no trainer is available in this build of the service: the job stays queued until a worker with a trainer claims it";

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub worker_id: String,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub poll: Duration,
    /// What this worker runs jobs on; it claims only jobs this device can run.
    pub device: WorkerDevice,
    /// The wait before a job's next attempt after a passing failure, doubled for each further one.
    pub retry_delay: Duration,
}

impl RunnerConfig {
    pub fn from_args(args: &QueueArgs, store: &StoreArgs) -> Result<RunnerConfig, DeviceError> {
        let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
        let device = device::advertised(&store.device, args.device_memory_gb)?;
        Ok(RunnerConfig {
            worker_id,
            lease: args.lease(),
            heartbeat: args.heartbeat(),
            poll: args.poll(),
            device,
            retry_delay: args.retry_delay(),
        })
    }
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

/// Records a status event of a job (a failure to record is logged, not raised).
pub(crate) async fn record_event(store: &Store, job_id: &str, attempt: i64, level: &'static str, message: String) {
    let e = NewEvent { job_id: job_id.to_string(), attempt, level, kind: "status", message, data: None };
    if let Err(err) = store.insert_event(&e, now_ms()).await {
        tracing::warn!(error = %err, job_id, "could not record job event");
    }
}

/// One worker: a loop of claim and train, with a [`Reaper`] on a task beside it.
pub struct Runner {
    store: Store,
    dirs: DataDir,
    artifacts: Artifacts,
    trainer: Option<Arc<dyn Trainer>>,
    config: RunnerConfig,
}

#[derive(Debug, thiserror::Error)]
enum PrepareError {
    /// The job cannot run as submitted (its dataset is gone, its rows are corrupt): it fails.
    #[error("{0}")]
    User(String),
    /// A failure that may pass (the database, the disk, the artifact store): the attempt counts
    /// and the job runs again later.
    #[error("{0}")]
    Passing(String),
}

impl Runner {
    pub fn new(
        store: Store,
        dirs: DataDir,
        artifacts: Artifacts,
        trainer: Option<Arc<dyn Trainer>>,
        config: RunnerConfig,
    ) -> Runner {
        Runner { store, dirs, artifacts, trainer, config }
    }

    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// Runs until `shutdown` is cancelled. Without a trainer it claims nothing (jobs wait, and
    /// say why) but still reaps expired leases.
    pub async fn run(self, shutdown: CancellationToken) {
        let d = &self.config.device;
        tracing::info!(
            worker = %self.config.worker_id,
            trainer = self.trainer.is_some(),
            device = %d.name,
            memory = %d.memory_bytes.map(device::gb).unwrap_or_else(|| "unknown".into()),
            "job runner started"
        );
        if self.trainer.is_none() {
            tracing::warn!("{NO_TRAINER_REASON}");
        }
        let presence_stop = CancellationToken::new();
        let presence = self.trainer.is_some().then(|| {
            tokio::spawn(advertise(
                self.store.clone(),
                self.config.worker_id.clone(),
                self.config.device.clone(),
                self.config.heartbeat,
                presence_stop.clone(),
            ))
        });
        let reaper_stop = shutdown.child_token();
        let reaper = tokio::spawn(Reaper::new(self.store.clone(), self.config.lease, self.config.poll).run(reaper_stop.clone()));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(trainer) = &self.trainer {
                match self.store.claim_job(&self.config.worker_id, &self.config.device, now_ms(), self.lease_ms()).await {
                    Ok(Some(job)) => {
                        self.run_job(trainer.clone(), job, &shutdown).await;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "claiming a job failed"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.config.poll) => {}
            }
        }
        presence_stop.cancel();
        if let Some(p) = presence {
            let _ = p.await;
        }
        reaper_stop.cancel();
        let _ = reaper.await;
        tracing::info!(worker = %self.config.worker_id, "job runner stopped");
    }

    fn lease_ms(&self) -> i64 {
        self.config.lease.as_millis().min(i64::MAX as u128) as i64
    }

    async fn event(&self, job_id: &str, attempt: i64, level: &'static str, message: String) {
        record_event(&self.store, job_id, attempt, level, message).await
    }

    #[tracing::instrument(skip_all, fields(job_id = %job.id, attempt = job.attempt, worker = %self.config.worker_id, outcome = Empty))]
    async fn run_job(&self, trainer: Arc<dyn Trainer>, job: JobRecord, shutdown: &CancellationToken) {
        let worker = self.config.worker_id.clone();
        let started = if job.released_attempts == 0 {
            format!("attempt {} of {} started on worker {worker}", job.attempt, job.max_attempts)
        } else {
            format!(
                "attempt {} started on worker {worker} ({} given back at a shutdown do not count: {} of {})",
                job.attempt,
                job.released_attempts,
                job.attempt - job.released_attempts,
                job.max_attempts
            )
        };
        self.event(&job.id, job.attempt, "info", started).await;

        // The lease is renewed from the start: fetching a large dataset or checkpoint from the
        // artifact store may take longer than one lease.
        let flags = Arc::new(StopFlags::default());
        let beat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(
            heartbeat(
                self.store.clone(),
                job.id.clone(),
                worker.clone(),
                self.config.heartbeat,
                self.lease_ms(),
                flags.clone(),
                beat_stop.clone(),
            )
            .instrument(Span::current()),
        );
        let prepared = self.prepare(&job).await;
        let (request, resumed) = match prepared {
            Ok(r) => r,
            Err(e) => {
                beat_stop.cancel();
                let _ = heartbeat.await;
                tracing::warn!(error = %e, "job cannot start");
                match e {
                    PrepareError::User(message) => self.fail(&job, &message).await,
                    PrepareError::Passing(message) => self.retry_later(&job, &format!("could not start: {message}"), true).await,
                }
                return;
            }
        };
        if let Some(from) = &request.resume_from {
            self.event(&job.id, job.attempt, "info", format!("resuming from checkpoint {}", from.display())).await;
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(
            write_reports(
                self.store.clone(),
                self.artifacts.clone(),
                job.id.clone(),
                worker.clone(),
                job.attempt,
                flags.clone(),
                rx,
            )
                .instrument(Span::current()),
        );

        let observer = JobObserver { tx, flags: flags.clone(), shutdown: shutdown.clone() };
        let span = Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            trainer.train(request, &observer)
        })
        .await;
        // The observer (and its sender) is dropped with the closure: the writer drains and ends.
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "report writer task failed");
        }
        // the lease is renewed until the outcome is recorded: storing the adapter in the shared
        // store may take a while
        let lost = flags.lease_lost.load(Ordering::Relaxed);
        match result {
            Ok(Ok(outcome)) if !lost => self.succeed(&job, outcome).await,
            Ok(Ok(_)) | Ok(Err(TrainError::Stopped)) if lost => {
                Span::current().record("outcome", "lease_lost");
                let why = match self.store.get_job(&job.id).await {
                    Ok(Some(j)) if j.status() == JobStatus::Cancelled => "the job was cancelled",
                    _ => "the lease was lost",
                };
                self.event(&job.id, job.attempt, "warn", format!("attempt {} stopped: {why}", job.attempt)).await;
            }
            Ok(Ok(_)) | Ok(Err(TrainError::Stopped)) => {
                // Shutdown: give the job back so that another worker resumes it.
                Span::current().record("outcome", "released");
                match self.store.release_job(&job.id, &worker, now_ms(), Release::Shutdown).await {
                    Ok(true) => {
                        self.event(
                            &job.id,
                            job.attempt,
                            "warn",
                            "worker shutting down: job back in the queue, it resumes from its last checkpoint".into(),
                        )
                        .await
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "could not release job"),
                }
            }
            Ok(Err(TrainError::Failed(message))) => self.fail(&job, &message).await,
            Ok(Err(TrainError::Passing(message))) => self.retry_later(&job, &format!("stopped: {message}"), true).await,
            Ok(Err(TrainError::UnusableCheckpoint(why))) => {
                // set aside (as a checkpoint whose files are gone): the next attempt resumes from
                // the one before it, or from the start
                match &resumed {
                    None => self.fail(&job, &format!("the trainer reported an unusable checkpoint it was not given: {why}")).await,
                    Some(c) => {
                        if let Err(e) = self.store.flag_checkpoint_path_missing(&job.id, &c.path, now_ms()).await {
                            tracing::error!(error = %e, "could not set the unusable checkpoint aside");
                        }
                        let what = format!("could not resume from the checkpoint of step {} ({why}); it is set aside", c.step);
                        // nothing that waiting mends: at once
                        self.retry_later(&job, &what, false).await
                    }
                }
            }
            Err(join) => {
                tracing::error!(error = %join, "trainer panicked");
                self.fail(&job, "training crashed unexpectedly; the cause is in the server log").await;
                Span::current().record("outcome", "crashed");
            }
        }
        beat_stop.cancel();
        let _ = heartbeat.await;
    }

    /// Fails the job for good with `message`, shown to the user.
    async fn fail(&self, job: &JobRecord, message: &str) {
        Span::current().record("outcome", "failed");
        match self.store.fail_job(&job.id, &self.config.worker_id, message, now_ms()).await {
            Ok(true) => self.event(&job.id, job.attempt, "error", format!("failed: {message}")).await,
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "could not mark job failed"),
        }
    }

    /// After a failure a later attempt may not meet (`what` happened to this attempt): the
    /// attempt counts, and the job goes back to the queue to run again, after a delay that
    /// doubles with each attempt when `wait` (the database, the disk or the store may need
    /// time), else at once; out of attempts, it fails. If even the database cannot be reached,
    /// the lease lapses and the reaper requeues the job.
    async fn retry_later(&self, job: &JobRecord, what: &str, wait: bool) {
        let counted = job.attempt - job.released_attempts;
        if counted >= job.max_attempts {
            let allowed = job.max_attempts;
            return self.fail(job, &format!("attempt {} {what}; no attempts left ({allowed} allowed)", job.attempt)).await;
        }
        Span::current().record("outcome", "retried");
        let delay = if wait { retry_delay(self.config.retry_delay, counted) } else { Duration::ZERO };
        let now = now_ms();
        let at = now.saturating_add(delay.as_millis().min(i64::MAX as u128) as i64);
        match self.store.release_job(&job.id, &self.config.worker_id, now, Release::Retry { at }).await {
            Ok(true) => {
                let message = format!(
                    "attempt {} {what}; the job runs again in {:.1} s ({counted} of {} attempts used)",
                    job.attempt,
                    delay.as_secs_f64(),
                    job.max_attempts
                );
                self.event(&job.id, job.attempt, "warn", message).await
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "could not give the job back; its lease will lapse"),
        }
    }

    /// Loads the rows, splits validation, finds the checkpoint to resume from (and returns its
    /// row too).
    async fn prepare(&self, job: &JobRecord) -> Result<(TrainRequest, Option<CheckpointRecord>), PrepareError> {
        let hyperparameters: Hyperparameters = serde_json::from_str(&job.hyperparameters)
            .map_err(|e| PrepareError::User(format!("stored hyperparameters are unreadable: {e}")))?;
        let train = self.load_rows(&job.dataset_id).await?;
        let (train_rows, validation_rows) = match (&job.validation_dataset_id, job.validation_fraction) {
            (Some(v), _) => (train, self.load_rows(v).await?),
            (None, Some(f)) => split_validation(train, f, hyperparameters.seed),
            (None, None) => (train, Vec::new()),
        };
        if train_rows.is_empty() {
            return Err(PrepareError::User("no training rows left after the validation split".into()));
        }
        let work_dir = self.dirs.job_dir(&job.id);
        tokio::fs::create_dir_all(&work_dir)
            .await
            .map_err(|e| PrepareError::Passing(format!("cannot create the job directory: {e}")))?;
        // Not knowing the checkpoints is no reason to start from scratch: the attempt is retried.
        let checkpoints: Vec<CheckpointRecord> = match self.store.list_checkpoints(&job.id).await {
            // rows flagged at start-up as having lost their files are skipped
            Ok(list) => list.into_iter().filter(|c| c.file_missing_at.is_none()).collect(),
            Err(e) => return Err(PrepareError::Passing(format!("cannot list the job's checkpoints: {e}"))),
        };
        let resumed = self.fetch_first(&job.id, checkpoints.iter(), "could not fetch a checkpoint; trying an older one").await;
        // The adapter is the best checkpoint by validation loss: the trainer reads it from this
        // node's directory at the end, so an older one written elsewhere comes along now.
        if let Some((from, dir)) = &resumed {
            let best = crate::ml::train::checkpoint_best_step(dir).and_then(|b| i64::try_from(b).ok());
            if let Some(best) = best.filter(|b| *b != from.step) {
                let rows = checkpoints.iter().filter(|c| c.step == best);
                if self.fetch_first(&job.id, rows, "could not fetch the best checkpoint").await.is_none() {
                    tracing::warn!(step = best, "the best checkpoint is nowhere to be found; the final weights will be used");
                }
            }
        }
        let (from, resume_from) = resumed.map(|(c, dir)| (c.clone(), dir)).unzip();
        let request = TrainRequest {
            job_id: job.id.clone(),
            attempt: job.attempt,
            base_model: PathBuf::from(&job.base_model),
            hyperparameters,
            train_rows,
            validation_rows,
            work_dir,
            resume_from,
        };
        Ok((request, from))
    }

    /// The first of `rows` whose files this node has or can fetch from the shared store, and
    /// its local directory.
    async fn fetch_first<'c>(
        &self,
        job_id: &str,
        rows: impl Iterator<Item = &'c CheckpointRecord>,
        failed: &str,
    ) -> Option<(&'c CheckpointRecord, PathBuf)> {
        for c in rows {
            match self.artifacts.checkpoint_dir(job_id, &c.path).await {
                Ok(Some(dir)) => return Some((c, dir)),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, step = c.step, "{failed}"),
            }
        }
        None
    }

    async fn load_rows(&self, dataset_id: &str) -> Result<Vec<ArenaRow>, PrepareError> {
        let rec = match self.store.get_dataset(dataset_id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err(PrepareError::User(format!("dataset {dataset_id} no longer exists"))),
            Err(e) => return Err(PrepareError::Passing(format!("cannot read dataset {dataset_id}: {e}"))),
        };
        let unreadable = |e: &dyn std::fmt::Display, passing: bool| {
            tracing::error!(error = %e, "dataset file unavailable");
            let message = format!("the rows of dataset {dataset_id} cannot be read");
            if passing {
                PrepareError::Passing(message)
            } else {
                PrepareError::User(message)
            }
        };
        let path = self.artifacts.dataset_file(&rec.id, &rec.path).await.map_err(|e| {
            // in neither place: it will not reappear
            let passing = !matches!(e, ArtifactError::Missing(_));
            unreadable(&e, passing)
        })?;
        tokio::task::spawn_blocking(move || files::read_rows(&path))
            .await
            .map_err(|e| PrepareError::User(format!("reading dataset {dataset_id} failed: {e}")))?
            .map_err(|e| {
                // a file gone or corrupt stays so; other I/O errors may pass
                let passing = matches!(&e, FileError::Io { source, .. } if source.kind() != std::io::ErrorKind::NotFound);
                unreadable(&e, passing)
            })
    }

    /// Removes an adapter directory no row will name, here and in the shared store.
    async fn discard(&self, dir: &std::path::Path) {
        if let Err(e) = self.artifacts.unpublish(dir).await {
            tracing::warn!(error = %e, "could not remove the shared copy of a discarded adapter");
        }
        let _ = tokio::fs::remove_dir_all(dir).await;
    }

    async fn succeed(&self, job: &JobRecord, outcome: TrainOutcome) {
        let worker = &self.config.worker_id;
        let adapter_id = uuid::Uuid::now_v7().to_string();
        let dest = self.dirs.adapter_dir(&adapter_id);
        let from = outcome.adapter_dir.clone();
        let to = dest.clone();
        let moved = tokio::task::spawn_blocking(move || files::move_dir(&from, &to)).await;
        let stored = match moved {
            Ok(Ok(())) => self.artifacts.publish(&dest).await.map_err(|e| format!("{e}")),
            other => Err(format!("{other:?}")),
        };
        if let Err(moved) = stored {
            // The next attempt resumes from the last checkpoint, which the last step wrote.
            tracing::error!(error = %moved, "could not store the adapter");
            self.discard(&dest).await;
            self.retry_later(job, "trained, but its adapter could not be stored (the cause is in the server log)", true).await;
            return;
        }
        let base_name = job.name.clone().unwrap_or_else(|| {
            let stem = std::path::Path::new(&job.base_model)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "base".into());
            let suffix = job.suffix.as_deref().map(|s| format!(":{s}")).unwrap_or_default();
            // the id's last characters: its first ones are a timestamp, shared by the jobs of a minute
            format!("ft:{stem}{suffix}:{}", &job.id[job.id.len().saturating_sub(8)..])
        });
        let mut adapter = NewAdapter {
            id: adapter_id.clone(),
            name: base_name.clone(),
            job_id: Some(job.id.clone()),
            base_model: job.base_model.clone(),
            path: dest.to_string_lossy().into_owned(),
            metrics: outcome.metrics.clone(),
        };
        let final_metrics = json!({ "final": outcome.metrics });
        let mut result = self.store.succeed_job(&job.id, worker, &adapter, &final_metrics, now_ms()).await;
        if matches!(&result, Err(e) if e.is_unique_violation()) {
            adapter.name = format!("{base_name}-{}", &adapter_id[adapter_id.len() - 8..]);
            result = self.store.succeed_job(&job.id, worker, &adapter, &final_metrics, now_ms()).await;
        }
        match result {
            Ok(Some(a)) => {
                Span::current().record("outcome", "succeeded");
                tracing::info!(adapter_id = %a.id, "job succeeded");
                self.event(&job.id, job.attempt, "info", format!("succeeded: adapter {} ({})", a.name, a.id)).await;
            }
            Ok(None) => {
                Span::current().record("outcome", "lease_lost");
                self.discard(&dest).await;
                self.event(&job.id, job.attempt, "warn", "finished after its lease was lost; result discarded".into()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not record the job's success");
                self.discard(&dest).await;
            }
        }
    }
}

/// Keeps this worker's registration (device, memory, last seen) fresh every `every` until
/// stopped, then removes it.
async fn advertise(store: Store, worker: String, device: WorkerDevice, every: Duration, stop: CancellationToken) {
    let started = now_ms();
    loop {
        if let Err(e) = store.register_worker(&worker, &device, started, now_ms()).await {
            tracing::warn!(error = %e, "could not advertise this worker");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Err(e) = store.remove_worker(&worker).await {
        tracing::warn!(error = %e, "could not remove this worker's registration");
    }
}

/// Renews the lease every `every` until stopped; on a lost lease (reaped, cancelled) raises the
/// flag the trainer polls. Store errors are retried until the lease would have expired.
async fn heartbeat(
    store: Store,
    job_id: String,
    worker: String,
    every: Duration,
    lease_ms: i64,
    flags: Arc<StopFlags>,
    stop: CancellationToken,
) {
    let mut last_ok = now_ms();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = now_ms();
        match store.heartbeat_job(&job_id, &worker, now, lease_ms).await {
            Ok(true) => last_ok = now,
            Ok(false) => {
                tracing::warn!("lease lost (job cancelled or reclaimed); stopping the trainer");
                flags.lease_lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                if now - last_ok >= lease_ms {
                    flags.lease_lost.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// The wait before the next attempt once `counted` attempts have been used: `first`, doubled for
/// each attempt after the first.
fn retry_delay(first: Duration, counted: i64) -> Duration {
    let doublings = u32::try_from(counted.saturating_sub(1)).unwrap_or(0).min(16);
    first.saturating_mul(1 << doublings)
}
