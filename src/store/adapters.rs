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
        let sql = format!("INSERT INTO adapters ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {COLUMNS}");
        Ok(sqlx::query_as::<_, AdapterRecord>(&sql)
            .bind(&a.id)
            .bind(&a.name)
            .bind(&a.job_id)
            .bind(&a.base_model)
            .bind(&a.path)
            .bind(serde_json::to_string(&a.metrics)?)
            .bind(now)
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn get_adapter(&self, id: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters WHERE id = ?");
        Ok(sqlx::query_as::<_, AdapterRecord>(&sql).bind(id).fetch_optional(&self.pool).await?)
    }

    pub async fn get_adapter_by_name(&self, name: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters WHERE name = ?");
        Ok(sqlx::query_as::<_, AdapterRecord>(&sql).bind(name).fetch_optional(&self.pool).await?)
    }

    /// An adapter by id, or else by name: what `/v1/predict` accepts as `adapter`.
    pub async fn find_adapter(&self, id_or_name: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1");
        Ok(sqlx::query_as::<_, AdapterRecord>(&sql).bind(id_or_name).fetch_optional(&self.pool).await?)
    }

    /// Newest first.
    pub async fn list_adapters(&self) -> Result<Vec<AdapterRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM adapters ORDER BY created_at DESC, rowid DESC");
        Ok(sqlx::query_as::<_, AdapterRecord>(&sql).fetch_all(&self.pool).await?)
    }

    pub async fn delete_adapter(&self, id: &str) -> Result<Option<AdapterRecord>> {
        let sql = format!("DELETE FROM adapters WHERE id = ? RETURNING {COLUMNS}");
        Ok(sqlx::query_as::<_, AdapterRecord>(&sql).bind(id).fetch_optional(&self.pool).await?)
    }
}
