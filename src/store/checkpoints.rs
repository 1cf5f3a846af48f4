//! The `checkpoints` table: complete checkpoint directories written by a job's attempts.

use sqlx::FromRow;

use super::{Result, Store};

#[derive(Debug, Clone, FromRow)]
pub struct CheckpointRecord {
    pub id: String,
    pub job_id: String,
    pub attempt: i64,
    pub step: i64,
    pub path: String,
    /// JSON document (evaluation metrics at that step), if any.
    pub metrics: Option<String>,
    pub created_at: i64,
    /// Set when a start-up check found the directory gone (Unix milliseconds of that check).
    pub file_missing_at: Option<i64>,
}

const COLUMNS: &str = "id, job_id, attempt, step, path, metrics, created_at, file_missing_at";
const INSERT_COLUMNS: &str = "id, job_id, attempt, step, path, metrics, created_at";

impl Store {
    pub async fn insert_checkpoint(
        &self,
        job_id: &str,
        attempt: i64,
        step: i64,
        path: &str,
        metrics: Option<&serde_json::Value>,
        now: i64,
    ) -> Result<CheckpointRecord> {
        let c = self.insert_checkpoint_if(job_id, attempt, step, path, metrics, now, None).await?;
        c.ok_or_else(|| sqlx::Error::RowNotFound.into())
    }

    /// Records a checkpoint of worker `worker` while it holds the job; None (nothing written)
    /// once it does not.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_checkpoint_held(
        &self,
        job_id: &str,
        worker: &str,
        attempt: i64,
        step: i64,
        path: &str,
        metrics: Option<&serde_json::Value>,
        now: i64,
    ) -> Result<Option<CheckpointRecord>> {
        self.insert_checkpoint_if(job_id, attempt, step, path, metrics, now, Some(worker)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_checkpoint_if(
        &self,
        job_id: &str,
        attempt: i64,
        step: i64,
        path: &str,
        metrics: Option<&serde_json::Value>,
        now: i64,
        held_by: Option<&str>,
    ) -> Result<Option<CheckpointRecord>> {
        let metrics = metrics.map(serde_json::to_string).transpose()?;
        // as for events (`INSERT_HELD_EVENT_SQL`): on Postgres the job's row is held FOR SHARE
        let held = format!(
            "WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND lock_by = $8 AND status = 'running'{})",
            self.sql("", " FOR SHARE")
        );
        let sql = format!(
            "INSERT INTO checkpoints ({INSERT_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7 {} RETURNING {COLUMNS}",
            if held_by.is_some() { held.as_str() } else { "" }
        );
        let id = uuid::Uuid::now_v7().to_string();
        Ok(with_pool!(self, pool => {
            let q = sqlx::query_as::<_, CheckpointRecord>(&sql)
                .bind(&id)
                .bind(job_id)
                .bind(attempt)
                .bind(step)
                .bind(path)
                .bind(&metrics)
                .bind(now);
            let q = if let Some(w) = held_by { q.bind(w) } else { q };
            q.fetch_optional(pool).await
        })?)
    }

    /// All checkpoints of a job, newest (highest step) first.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let order = self.sql("rowid", "seq");
        let sql = format!("SELECT {COLUMNS} FROM checkpoints WHERE job_id = $1 ORDER BY step DESC, {order} DESC");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, CheckpointRecord>(&sql).bind(job_id).fetch_all(pool).await)?)
    }

    /// Every checkpoint not yet flagged as missing (id, path), for the start-up check.
    pub async fn unflagged_checkpoint_paths(&self) -> Result<Vec<(String, String)>> {
        let sql = "SELECT id, path FROM checkpoints WHERE file_missing_at IS NULL";
        Ok(with_pool!(self, pool => sqlx::query_as::<_, (String, String)>(sql).fetch_all(pool).await)?)
    }

    /// Sets aside every row of job `job_id` that names the directory `path` (several attempts
    /// may have written the same step there), as [`Store::flag_checkpoint_missing`] does.
    pub async fn flag_checkpoint_path_missing(&self, job_id: &str, path: &str, now: i64) -> Result<()> {
        let sql = "UPDATE checkpoints SET file_missing_at = $1 WHERE job_id = $2 AND path = $3 AND file_missing_at IS NULL";
        with_pool!(self, pool => sqlx::query(sql).bind(now).bind(job_id).bind(path).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Flags a checkpoint whose directory is gone.
    pub async fn flag_checkpoint_missing(&self, id: &str, now: i64) -> Result<()> {
        let sql = "UPDATE checkpoints SET file_missing_at = $1 WHERE id = $2";
        with_pool!(self, pool => sqlx::query(sql).bind(now).bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }
}
