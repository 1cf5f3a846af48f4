//! The `jobs` table and its queue semantics: claim, lease, heartbeat, release, reap.
//! Every update by a worker says `WHERE id = ? AND lock_by = ?`, so a worker that lost its
//! lease changes nothing. Queue statements have one text per backend (`sqlite/*.sql`,
//! `postgres/*.sql`) with the same parameters in the same order.

use sqlx::FromRow;

use super::adapters::{NewAdapter, COLUMNS as ADAPTER_COLUMNS};
use super::job_events::{bind_event, NewEvent, INSERT_EVENT_SQL};
use super::{AdapterRecord, Result, Store, WorkerDevice};

/// Why a worker gives a job back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The worker is shutting down: another one resumes the job at once, and the attempt does
    /// not count against the job's attempts.
    Shutdown,
    /// The attempt failed for a passing reason (the database, the disk, the artifact store): it
    /// counts, and the job runs again from `at` (Unix milliseconds).
    Retry { at: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct JobRecord {
    pub id: String,
    pub status: String,
    pub dataset_id: String,
    pub validation_dataset_id: Option<String>,
    pub validation_fraction: Option<f64>,
    pub base_model: String,
    /// JSON document: `data::hyper::Hyperparameters`.
    pub hyperparameters: String,
    pub name: Option<String>,
    pub suffix: Option<String>,
    pub attempt: i64,
    pub max_attempts: i64,
    /// Attempts given back at a worker's shutdown: they do not count against `max_attempts`.
    pub released_attempts: i64,
    pub run_at: i64,
    pub lock_by: Option<String>,
    pub lock_at: Option<i64>,
    pub lease_expires_at: Option<i64>,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub epoch: Option<f64>,
    /// JSON object: latest metrics (train_loss, eval_log_loss, ...).
    pub metrics: String,
    pub error: Option<String>,
    pub adapter_id: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
    /// `cpu` or `cuda`: only a worker with that device kind claims the job.
    pub required_device: Option<String>,
    /// Only a worker whose device has at least this much memory claims the job.
    pub required_memory_bytes: Option<i64>,
}

impl JobRecord {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub dataset_id: String,
    pub validation_dataset_id: Option<String>,
    pub validation_fraction: Option<f64>,
    pub base_model: String,
    pub hyperparameters: serde_json::Value,
    pub name: Option<String>,
    pub suffix: Option<String>,
    pub max_attempts: i64,
    pub required_device: Option<String>,
    pub required_memory_bytes: Option<i64>,
}

#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(JobRecord),
    AlreadyFinished(JobRecord),
    NotFound,
}

#[derive(Debug, Clone, FromRow)]
pub struct ReapedJob {
    pub id: String,
    pub status: String,
    pub attempt: i64,
    pub max_attempts: i64,
    pub released_attempts: i64,
}

/// Why `insert_job` refused.
#[derive(Debug)]
pub enum InsertJob {
    Inserted(JobRecord),
    /// The training or validation dataset does not exist (any more); the field that names it.
    MissingDataset(&'static str),
}

impl Store {
    /// Inserts a queued job and its first event (`created`) in one transaction, so a job never
    /// exists without it; the dataset check and the job's insert are one statement, so a
    /// dataset deleted concurrently cannot leave a job pointing at nothing (SQLite serialises
    /// the two; on Postgres the check holds the datasets' rows `FOR SHARE`, which the delete
    /// waits for, see [`Store::delete_dataset`]). No other writer can add events to the job
    /// before it commits, so the events' id order needs no lock here.
    pub async fn insert_job(&self, j: &NewJob, created: &NewEvent, now: i64) -> Result<InsertJob> {
        let lock = self.sql("", " FOR SHARE");
        let sql = format!(
            "INSERT INTO jobs (id, status, dataset_id, validation_dataset_id, validation_fraction, base_model, \
                               hyperparameters, name, suffix, max_attempts, run_at, created_at, updated_at, \
                               required_device, required_memory_bytes) \
             SELECT $1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10, $11, $12 \
             WHERE EXISTS (SELECT 1 FROM datasets WHERE id = $2{lock}) \
               AND ($3 IS NULL OR EXISTS (SELECT 1 FROM datasets WHERE id = $3{lock})) \
             RETURNING *"
        );
        let hyperparameters = serde_json::to_string(&j.hyperparameters)?;
        let data = created.data_json()?;
        let inserted = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let job = sqlx::query_as::<_, JobRecord>(&sql)
                .bind(&j.id)
                .bind(&j.dataset_id)
                .bind(&j.validation_dataset_id)
                .bind(j.validation_fraction)
                .bind(&j.base_model)
                .bind(&hyperparameters)
                .bind(&j.name)
                .bind(&j.suffix)
                .bind(j.max_attempts)
                .bind(now)
                .bind(&j.required_device)
                .bind(j.required_memory_bytes)
                .fetch_optional(&mut *tx)
                .await?;
            if job.is_some() {
                let _: (i64,) = bind_event!(sqlx::query_as(INSERT_EVENT_SQL), created, &data, now).fetch_one(&mut *tx).await?;
            }
            tx.commit().await?;
            job
        });
        if let Some(job) = inserted {
            return Ok(InsertJob::Inserted(job));
        }
        if self.get_dataset(&j.dataset_id).await?.is_none() {
            return Ok(InsertJob::MissingDataset("dataset_id"));
        }
        Ok(InsertJob::MissingDataset("validation_dataset_id"))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        Ok(with_pool!(self, pool => sqlx::query_as::<_, JobRecord>("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await)?)
    }

    /// Newest first, optionally one status; `after` is the id of the last job of the previous
    /// page.
    pub async fn list_jobs(&self, status: Option<JobStatus>, after: Option<&str>, limit: i64) -> Result<Vec<JobRecord>> {
        // Insertion order: SQLite's rowid, Postgres's `seq`.
        let order = self.sql("rowid", "seq");
        let sql = format!(
            "SELECT * FROM jobs \
             WHERE ($1 IS NULL OR status = $1) \
               AND ($2 IS NULL OR {order} < (SELECT {order} FROM jobs WHERE id = $2)) \
             ORDER BY {order} DESC LIMIT $3"
        );
        Ok(with_pool!(self, pool => sqlx::query_as::<_, JobRecord>(&sql)
            .bind(status.map(JobStatus::as_str))
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }

    pub async fn cancel_job(&self, id: &str, now: i64) -> Result<CancelOutcome> {
        let sql = self.sql(include_str!("sqlite/cancel_job.sql"), include_str!("postgres/cancel_job.sql"));
        let cancelled =
            with_pool!(self, pool => sqlx::query_as::<_, JobRecord>(sql).bind(id).bind(now).fetch_optional(pool).await)?;
        if let Some(job) = cancelled {
            return Ok(CancelOutcome::Cancelled(job));
        }
        Ok(match self.get_job(id).await? {
            Some(job) => CancelOutcome::AlreadyFinished(job),
            None => CancelOutcome::NotFound,
        })
    }

    /// Claims the oldest runnable job that `device` can run for `worker`, with a lease of
    /// `lease_ms`.
    pub async fn claim_job(
        &self,
        worker: &str,
        device: &WorkerDevice,
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<JobRecord>> {
        let sql = self.sql(include_str!("sqlite/claim_job.sql"), include_str!("postgres/claim_job.sql"));
        Ok(with_pool!(self, pool => sqlx::query_as::<_, JobRecord>(sql)
            .bind(worker)
            .bind(now)
            .bind(now + lease_ms)
            .bind(&device.kind)
            .bind(device.memory_bytes)
            .fetch_optional(pool)
            .await)?)
    }

    /// Renews the lease; false when it was lost (reaped, cancelled, claimed by another worker).
    pub async fn heartbeat_job(&self, id: &str, worker: &str, now: i64, lease_ms: i64) -> Result<bool> {
        let sql = self.sql(include_str!("sqlite/heartbeat_job.sql"), include_str!("postgres/heartbeat_job.sql"));
        let done = with_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(worker)
            .bind(now + lease_ms)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Requeues (or fails, out of attempts) the running jobs whose lease expired before `now`.
    pub async fn reap_expired_jobs(&self, now: i64) -> Result<Vec<ReapedJob>> {
        let sql = self.sql(include_str!("sqlite/reap_expired.sql"), include_str!("postgres/reap_expired.sql"));
        Ok(with_pool!(self, pool => sqlx::query_as::<_, ReapedJob>(sql).bind(now).fetch_all(pool).await)?)
    }

    pub async fn update_job_progress(
        &self,
        id: &str,
        worker: &str,
        step: i64,
        total_steps: i64,
        epoch: f64,
        metrics: &serde_json::Value,
        now: i64,
    ) -> Result<bool> {
        let sql = self.sql(include_str!("sqlite/update_progress.sql"), include_str!("postgres/update_progress.sql"));
        let metrics = serde_json::to_string(metrics)?;
        let done = with_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(worker)
            .bind(step)
            .bind(total_steps)
            .bind(epoch)
            .bind(&metrics)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Merges `metrics` into the job's latest metrics (no progress change).
    pub async fn merge_job_metrics(&self, id: &str, worker: &str, metrics: &serde_json::Value, now: i64) -> Result<bool> {
        let sql = "UPDATE jobs SET metrics = json_patch(metrics, $3), updated_at = $4 \
                   WHERE id = $1 AND lock_by = $2 AND status = 'running'";
        let metrics = serde_json::to_string(metrics)?;
        let done = with_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(worker)
            .bind(&metrics)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Worker `worker` gives job `id` back to the queue (false when it no longer holds it).
    pub async fn release_job(&self, id: &str, worker: &str, now: i64, release: Release) -> Result<bool> {
        let sql = self.sql(include_str!("sqlite/release_job.sql"), include_str!("postgres/release_job.sql"));
        let (given_back, run_at) = match release {
            Release::Shutdown => (1_i64, now),
            Release::Retry { at } => (0, at),
        };
        let done = with_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(worker)
            .bind(now)
            .bind(given_back)
            .bind(run_at)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    pub async fn fail_job(&self, id: &str, worker: &str, error: &str, now: i64) -> Result<bool> {
        let sql = self.sql(include_str!("sqlite/fail_job.sql"), include_str!("postgres/fail_job.sql"));
        let done = with_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(worker)
            .bind(error)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Registers the adapter and marks the job succeeded, in one transaction: both or neither
    /// (None when the worker no longer holds the job).
    pub async fn succeed_job(
        &self,
        id: &str,
        worker: &str,
        adapter: &NewAdapter,
        metrics: &serde_json::Value,
        now: i64,
    ) -> Result<Option<AdapterRecord>> {
        let succeed = self.sql(include_str!("sqlite/succeed_job.sql"), include_str!("postgres/succeed_job.sql"));
        let insert = format!(
            "INSERT INTO adapters ({ADAPTER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {ADAPTER_COLUMNS}"
        );
        let metrics = serde_json::to_string(metrics)?;
        let adapter_metrics = serde_json::to_string(&adapter.metrics)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query(succeed)
                .bind(id)
                .bind(worker)
                .bind(&adapter.id)
                .bind(&metrics)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(None);
            }
            let rec = sqlx::query_as::<_, AdapterRecord>(&insert)
                .bind(&adapter.id)
                .bind(&adapter.name)
                .bind(&adapter.job_id)
                .bind(&adapter.base_model)
                .bind(&adapter.path)
                .bind(&adapter_metrics)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(rec))
        })
    }

    /// Whether a queued or running job will make an adapter named `name`.
    pub async fn name_pending(&self, name: &str) -> Result<bool> {
        let sql = "SELECT COUNT(*) FROM jobs WHERE name = $1 AND status IN ('queued', 'running')";
        let n: i64 = with_pool!(self, pool => sqlx::query_scalar(sql).bind(name).fetch_one(pool).await)?;
        Ok(n > 0)
    }

    /// Number of jobs per status (statuses without jobs are absent).
    pub async fn count_jobs_by_status(&self) -> Result<Vec<(String, i64)>> {
        let sql = "SELECT status, COUNT(*) FROM jobs GROUP BY status";
        Ok(with_pool!(self, pool => sqlx::query_as::<_, (String, i64)>(sql).fetch_all(pool).await)?)
    }
}
