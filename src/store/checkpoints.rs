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
        let metrics = metrics.map(serde_json::to_string).transpose()?;
        let sql = format!("INSERT INTO checkpoints ({INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {COLUMNS}");
        Ok(sqlx::query_as::<_, CheckpointRecord>(&sql)
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(job_id)
            .bind(attempt)
            .bind(step)
            .bind(path)
            .bind(metrics)
            .bind(now)
            .fetch_one(&self.pool)
            .await?)
    }

    /// All checkpoints of a job, newest (highest step) first.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM checkpoints WHERE job_id = ? ORDER BY step DESC, rowid DESC");
        Ok(sqlx::query_as::<_, CheckpointRecord>(&sql).bind(job_id).fetch_all(&self.pool).await?)
    }

    /// Every checkpoint not yet flagged as missing (id, path), for the start-up check.
    pub async fn unflagged_checkpoint_paths(&self) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as::<_, (String, String)>("SELECT id, path FROM checkpoints WHERE file_missing_at IS NULL")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Flags a checkpoint whose directory is gone.
    pub async fn flag_checkpoint_missing(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE checkpoints SET file_missing_at = ? WHERE id = ?").bind(now).bind(id).execute(&self.pool).await?;
        Ok(())
    }
}
