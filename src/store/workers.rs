//! The `workers` table: each running worker advertises its device (cpu or cuda, and the
//! device's memory) and renews `last_seen_at`; jobs may require a device, and `claim_job` hands
//! a worker only jobs it can run.

use sqlx::FromRow;

use super::{Result, Store};

/// What a worker can run jobs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerDevice {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// The device as configured: `cpu`, `cuda:0`, ...
    pub name: String,
    /// Memory the device offers to a job (RAM for cpu), when known. A worker whose memory is
    /// unknown claims no job that requires a least amount.
    pub memory_bytes: Option<i64>,
}

impl WorkerDevice {
    /// Whether a job with these requirements can run here.
    pub fn can_run(&self, required_device: Option<&str>, required_memory_bytes: Option<i64>) -> bool {
        required_device.is_none_or(|d| d == self.kind)
            && required_memory_bytes.is_none_or(|need| self.memory_bytes.is_some_and(|have| have >= need))
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct WorkerRecord {
    pub id: String,
    pub device: String,
    pub device_name: String,
    pub memory_bytes: Option<i64>,
    pub started_at: i64,
    pub last_seen_at: i64,
    /// The job it holds now, if any.
    pub job_id: Option<String>,
}

impl WorkerRecord {
    pub fn device(&self) -> WorkerDevice {
        WorkerDevice { kind: self.device.clone(), name: self.device_name.clone(), memory_bytes: self.memory_bytes }
    }
}

impl Store {
    /// Registers the worker, or renews its registration (`last_seen_at`).
    pub async fn register_worker(&self, id: &str, device: &WorkerDevice, started_at: i64, now: i64) -> Result<()> {
        let sql = "INSERT INTO workers (id, device, device_name, memory_bytes, started_at, last_seen_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) \
                   ON CONFLICT (id) DO UPDATE SET device = excluded.device, device_name = excluded.device_name, \
                   memory_bytes = excluded.memory_bytes, started_at = excluded.started_at, \
                   last_seen_at = excluded.last_seen_at";
        with_pool!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(&device.kind)
            .bind(&device.name)
            .bind(device.memory_bytes)
            .bind(started_at)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// A worker that stops says so.
    pub async fn remove_worker(&self, id: &str) -> Result<()> {
        with_pool!(self, pool => sqlx::query("DELETE FROM workers WHERE id = $1").bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Forgets workers not seen since `before` (stopped without saying so).
    pub async fn forget_workers(&self, before: i64) -> Result<u64> {
        let done = with_pool!(self, pool => sqlx::query("DELETE FROM workers WHERE last_seen_at < $1")
            .bind(before)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done)
    }

    /// Workers seen at or after `since`, with the job each holds; oldest registration first.
    pub async fn list_workers(&self, since: i64) -> Result<Vec<WorkerRecord>> {
        let sql = "SELECT w.id, w.device, w.device_name, w.memory_bytes, w.started_at, w.last_seen_at, \
                   (SELECT j.id FROM jobs j WHERE j.lock_by = w.id AND j.status = 'running' LIMIT 1) AS job_id \
                   FROM workers w WHERE w.last_seen_at >= $1 ORDER BY w.started_at, w.id";
        Ok(with_pool!(self, pool => sqlx::query_as::<_, WorkerRecord>(sql).bind(since).fetch_all(pool).await)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_match_kind_and_memory() {
        let gb = 1_i64 << 30;
        let gpu = WorkerDevice { kind: "cuda".into(), name: "cuda:0".into(), memory_bytes: Some(24 * gb) };
        assert!(gpu.can_run(None, None));
        assert!(gpu.can_run(Some("cuda"), Some(24 * gb)));
        assert!(!gpu.can_run(Some("cuda"), Some(40 * gb)));
        assert!(!gpu.can_run(Some("cpu"), None));
        let unknown = WorkerDevice { memory_bytes: None, ..gpu };
        assert!(unknown.can_run(Some("cuda"), None));
        assert!(!unknown.can_run(None, Some(1)));
    }
}
