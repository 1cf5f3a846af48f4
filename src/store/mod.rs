//! Persistence: sqlx repositories, one file per table, over one `Store` handle.
//!
//! SQLite is the only backend today. Every query is a runtime `query`/`query_as` with its SQL
//! next to it (queue queries in `sqlite/*.sql`, one statement per file), so a Postgres flavour
//! can be added behind the same `Store` methods without touching callers. Timestamps are Unix
//! milliseconds; JSON documents are stored as TEXT.

pub mod adapters;
pub mod api_keys;
pub mod checkpoints;
pub mod datasets;
pub mod files;
pub mod job_events;
pub mod jobs;
pub mod reconcile;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use adapters::{AdapterRecord, NewAdapter};
pub use api_keys::{ApiKeyRecord, Scope};
pub use checkpoints::CheckpointRecord;
pub use datasets::{DatasetRecord, NewDataset};
pub use job_events::{EventRecord, NewEvent};
pub use jobs::{CancelOutcome, JobRecord, JobStatus, NewJob, ReapedJob};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?}: only sqlite: URLs are supported")]
    UnsupportedUrl(String),
    #[error("stored JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
}

impl StoreError {
    /// True when the error is a UNIQUE constraint violation.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => e.is_unique_violation(),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The database handle shared by the HTTP layer and the job runner.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if missing) the database, with WAL and a busy timeout so several
    /// processes can share one SQLite file, and applies the embedded migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Store { pool })
    }

    /// A trivial query: is the database reachable?
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The current time in Unix milliseconds, the unit of every stored timestamp.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A database URL with any password replaced, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &userinfo[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite:data/arbiter.db"), "sqlite:data/arbiter.db");
    }
}
