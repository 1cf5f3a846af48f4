//! The `datasets` table: one row per uploaded, validated dataset; rows live in a JSONL file.

use sqlx::FromRow;

use super::{Pool, Result, Store};

#[derive(Debug, Clone, FromRow)]
pub struct DatasetRecord {
    pub id: String,
    pub name: Option<String>,
    pub format: String,
    pub row_count: i64,
    pub dropped_rows: i64,
    pub count_a: i64,
    pub count_b: i64,
    pub count_tie: i64,
    pub bytes: i64,
    pub path: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewDataset {
    pub id: String,
    pub name: Option<String>,
    pub format: String,
    pub row_count: i64,
    pub dropped_rows: i64,
    pub label_counts: [i64; 3],
    pub bytes: i64,
    pub path: String,
}

/// What `delete_dataset` did.
#[derive(Debug)]
pub enum DeleteDataset {
    /// Deleted; the path of its rows file, to remove.
    Deleted(String),
    /// A queued or running job uses it.
    InUse,
    NotFound,
}

const COLUMNS: &str =
    "id, name, format, row_count, dropped_rows, count_a, count_b, count_tie, bytes, path, created_at";

impl Store {
    pub async fn insert_dataset(&self, d: &NewDataset, now: i64) -> Result<DatasetRecord> {
        let sql = format!(
            "INSERT INTO datasets ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {COLUMNS}"
        );
        let rec = with_pool!(self, pool => sqlx::query_as::<_, DatasetRecord>(&sql)
            .bind(&d.id)
            .bind(&d.name)
            .bind(&d.format)
            .bind(d.row_count)
            .bind(d.dropped_rows)
            .bind(d.label_counts[0])
            .bind(d.label_counts[1])
            .bind(d.label_counts[2])
            .bind(d.bytes)
            .bind(&d.path)
            .bind(now)
            .fetch_one(pool)
            .await)?;
        Ok(rec)
    }

    pub async fn get_dataset(&self, id: &str) -> Result<Option<DatasetRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM datasets WHERE id = $1");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, DatasetRecord>(&sql).bind(id).fetch_optional(pool).await)?)
    }

    /// Newest first; `after` is the id of the last dataset of the previous page.
    pub async fn list_datasets(&self, after: Option<&str>, limit: i64) -> Result<Vec<DatasetRecord>> {
        // Insertion order: SQLite's rowid, Postgres's `seq`.
        let order = self.sql("rowid", "seq");
        let sql = format!(
            "SELECT {COLUMNS} FROM datasets \
             WHERE ($1 IS NULL OR {order} < (SELECT {order} FROM datasets WHERE id = $1)) \
             ORDER BY {order} DESC LIMIT $2"
        );
        Ok(with_pool!(self, pool => sqlx::query_as::<_, DatasetRecord>(&sql).bind(after).bind(limit).fetch_all(pool).await)?)
    }

    /// Deletes the row in one statement unless a queued or running job uses the dataset. On
    /// Postgres the row is first locked `FOR UPDATE`, in the same transaction: that waits for a
    /// job insert that holds it `FOR SHARE` to commit, and the delete's own statement then sees
    /// that job (under READ COMMITTED each statement reads what committed before it began).
    pub async fn delete_dataset(&self, id: &str) -> Result<DeleteDataset> {
        let sql = "DELETE FROM datasets WHERE id = $1 AND NOT EXISTS (\
                SELECT 1 FROM jobs WHERE (dataset_id = $1 OR validation_dataset_id = $1) \
                AND status IN ('queued', 'running')) \
             RETURNING path";
        let deleted: Option<(String,)> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(sql).bind(id).fetch_optional(pool).await?,
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT 1 FROM datasets WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await?;
                let deleted = sqlx::query_as(sql).bind(id).fetch_optional(&mut *tx).await?;
                tx.commit().await?;
                deleted
            }
        };
        if let Some((path,)) = deleted {
            return Ok(DeleteDataset::Deleted(path));
        }
        Ok(match self.get_dataset(id).await? {
            Some(_) => DeleteDataset::InUse,
            None => DeleteDataset::NotFound,
        })
    }
}
