//! The `job_events` table: log lines and metric points of a job, in insertion order.

use sqlx::FromRow;

use super::{Pool, Result, Store};

#[derive(Debug, Clone, FromRow)]
pub struct EventRecord {
    pub id: i64,
    pub job_id: String,
    pub attempt: i64,
    pub level: String,
    pub kind: String,
    pub message: String,
    /// JSON document (metric values), if any.
    pub data: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub job_id: String,
    pub attempt: i64,
    pub level: &'static str,
    pub kind: &'static str,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

/// Inserts an event and returns its id.
pub(super) const INSERT_EVENT_SQL: &str = "INSERT INTO job_events (job_id, attempt, level, kind, message, data, created_at) \
                                           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

/// [`INSERT_EVENT_SQL`] that inserts only while worker `$8` holds the job (the reports of a
/// worker whose lease was lost, or whose job was cancelled, are dropped). SQLite serialises
/// writers; on Postgres the check holds the job's row `FOR SHARE`, so a cancel or a reap being
/// committed is waited for and then seen.
const INSERT_HELD_EVENT_SQL: &str = "INSERT INTO job_events (job_id, attempt, level, kind, message, data, created_at) \
     SELECT $1, $2, $3, $4, $5, $6, $7 \
     WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND lock_by = $8 AND status = 'running'{LOCK}) RETURNING id";

/// `INSERT_EVENT_SQL` with its parameters bound: the event, its `data` as JSON text and the
/// time. A macro, so one bind chain serves both backends' query types.
macro_rules! bind_event {
    ($query:expr, $e:expr, $data:expr, $now:expr) => {
        $query.bind(&$e.job_id).bind($e.attempt).bind($e.level).bind($e.kind).bind(&$e.message).bind($data).bind($now)
    };
}
pub(super) use bind_event;

impl NewEvent {
    /// `data` as the JSON text the table stores.
    pub(super) fn data_json(&self) -> Result<Option<String>> {
        Ok(self.data.as_ref().map(serde_json::to_string).transpose()?)
    }
}

impl Store {
    pub async fn insert_event(&self, e: &NewEvent, now: i64) -> Result<i64> {
        let id = self.insert_event_if(e, now, None).await?;
        // unconditional: the insert always returns its row
        id.ok_or_else(|| sqlx::Error::RowNotFound.into())
    }

    /// Inserts a report of worker `worker` while it holds the job; None (nothing written) once
    /// it does not.
    pub async fn insert_event_held(&self, e: &NewEvent, worker: &str, now: i64) -> Result<Option<i64>> {
        self.insert_event_if(e, now, Some(worker)).await
    }

    async fn insert_event_if(&self, e: &NewEvent, now: i64, held_by: Option<&str>) -> Result<Option<i64>> {
        let data = e.data_json()?;
        let held_sql = |lock: &str| INSERT_HELD_EVENT_SQL.replace("{LOCK}", lock);
        let sql = match (held_by.is_some(), &self.pool) {
            (false, _) => INSERT_EVENT_SQL.to_string(),
            (true, Pool::Sqlite(_)) => held_sql(""),
            (true, Pool::Postgres(_)) => held_sql(" FOR SHARE"),
        };
        let sql = sql.as_str();
        let row: Option<(i64,)> = match &self.pool {
            Pool::Sqlite(pool) => {
                let q = bind_event!(sqlx::query_as(sql), e, &data, now);
                let q = if let Some(w) = held_by { q.bind(w) } else { q };
                q.fetch_optional(pool).await?
            }
            Pool::Postgres(pool) => {
                // Ids come from a sequence and several processes may write events of one job
                // at once (a worker's progress, an API node's cancel): a per-job lock held to
                // commit makes a job's ids commit in order, so a reader's `id > after` cursor
                // never passes an id that commits later. (SQLite serialises all writers.)
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&e.job_id).execute(&mut *tx).await?;
                let q = bind_event!(sqlx::query_as(sql), e, &data, now);
                let q = if let Some(w) = held_by { q.bind(w) } else { q };
                let row = q.fetch_optional(&mut *tx).await?;
                tx.commit().await?;
                row
            }
        };
        Ok(row.map(|(id,)| id))
    }

    /// Events of a job with id greater than `after`, oldest first.
    pub async fn list_events(&self, job_id: &str, after: i64, limit: i64) -> Result<Vec<EventRecord>> {
        let sql = "SELECT id, job_id, attempt, level, kind, message, data, created_at FROM job_events \
                   WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3";
        Ok(with_pool!(self, pool => sqlx::query_as::<_, EventRecord>(sql)
            .bind(job_id)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }
}
