//! The `adapters` table: trained adapters (PEFT layout directories) that can be served.

use sqlx::FromRow;

use super::{Result, Store};

#[derive(Debug, Clone, FromRow)]
pub struct AdapterRecord {
    pub id: String,
    pub name: String,
    pub job_id: Option<String>,
    pub base_model: String,
    /// Directory holding `adapter_config.json` and `adapter_model.safetensors`.
    pub path: String,
    /// JSON document: the final metrics of the training run.
    pub metrics: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewAdapter {
    pub id: String,
    pub name: String,
    pub job_id: Option<String>,
    pub base_model: String,
    pub path: String,
    pub metrics: serde_json::Value,
}

pub(super) const COLUMNS: &str = "id, name, job_id, base_model, path, metrics, created_at";

impl Store {
    /// Registers an adapter that was not trained by a job here (e.g. imported from PEFT).
    pub async fn insert_adapter(&self, a: &NewAdapter, now: i64) -> Result<AdapterRecord> {
        let sql = format!("INSERT INTO adapters ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}");
        let metrics = serde_json::to_string(&a.metrics)?;
        Ok(with_pool!(self, pool => sqlx::query_as::<_, AdapterRecord>(&sql)
            .bind(&a.id)
            .bind(&a.name)
            .bind(&a.job_id)
            .bind(&a.base_model)
            .bind(&a.path)
            .bind(&metrics)
            .bind(now)
            .fetch_one(pool)
            .await)?)
    }

    pub async fn get_adapter(&self, id: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters WHERE id = $1");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, AdapterRecord>(&sql).bind(id).fetch_optional(pool).await)?)
    }

    pub async fn get_adapter_by_name(&self, name: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters WHERE name = $1");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, AdapterRecord>(&sql).bind(name).fetch_optional(pool).await)?)
    }

    /// An adapter by id, or else by name: what `/v1/predict` accepts as `adapter`.
    pub async fn find_adapter(&self, id_or_name: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC LIMIT 1");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, AdapterRecord>(&sql).bind(id_or_name).fetch_optional(pool).await)?)
    }

    /// Newest first (ties in insertion order: SQLite's rowid, Postgres's `seq`).
    pub async fn list_adapters(&self) -> Result<Vec<AdapterRecord>> {
        let order = self.sql("rowid", "seq");
        let sql = format!("SELECT {COLUMNS} FROM adapters ORDER BY created_at DESC, {order} DESC");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, AdapterRecord>(&sql).fetch_all(pool).await)?)
    }

    pub async fn delete_adapter(&self, id: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("DELETE FROM adapters WHERE id = $1 RETURNING {COLUMNS}");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, AdapterRecord>(&sql).bind(id).fetch_optional(pool).await)?)
    }
}
