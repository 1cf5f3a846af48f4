//! Persistence: sqlx repositories, one file per table, over one `Store` handle.
//!
//! Two backends behind the same `Store` methods, chosen by the database URL: SQLite (the
//! embedded default, `sqlite:`) and PostgreSQL (`postgres:` / `postgresql:`), for several API
//! nodes and worker machines sharing one queue. Every query is a runtime `query`/`query_as`
//! (no compile-time macros: they bind to one database). Statements that read the same on both
//! use `$N` placeholders, which SQLite accepts too; the others have one text per backend (queue
//! statements in `sqlite/*.sql` and `postgres/*.sql`, one statement per file). Each backend has
//! its own migrations (`migrations/sqlite`, `migrations/postgres`). Timestamps are Unix
//! milliseconds (BIGINT); JSON documents are stored as TEXT, merged with `json_patch` (SQLite's
//! built-in; a PL/pgSQL function of the same meaning on Postgres).

/// Runs `$body` with `$pool` bound to the store's pool: a `SqlitePool` or a `PgPool`. The body is
/// compiled once per backend, so its binds and row types are checked against both.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($pool) => $body,
            $crate::store::Pool::Postgres($pool) => $body,
        }
    };
}

pub mod adapters;
pub mod api_keys;
pub mod artifacts;
pub mod checkpoints;
pub mod datasets;
pub mod files;
pub mod job_events;
pub mod jobs;
pub mod reconcile;
pub mod workers;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub use adapters::{AdapterRecord, NewAdapter};
pub use api_keys::{ApiKeyRecord, Scope};
pub use checkpoints::CheckpointRecord;
pub use datasets::{DatasetRecord, NewDataset};
pub use job_events::{EventRecord, NewEvent};
pub use jobs::{CancelOutcome, JobRecord, JobStatus, NewJob, ReapedJob, Release};
pub use workers::{WorkerDevice, WorkerRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?}: use a sqlite: or postgres: URL")]
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

/// Which database a `Store` talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL selects, if any.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The database handle shared by the HTTP layer and the job runner.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Opens the database named by `url` and applies that backend's embedded migrations.
    /// SQLite: the file is created if missing, with WAL and a busy timeout so several processes
    /// can share it. Postgres: the database must exist; concurrent starts are safe (the
    /// migrator holds an advisory lock).
    pub async fn connect(url: &str) -> Result<Store> {
        match Backend::of_url(url) {
            Some(Backend::Sqlite) => Self::connect_sqlite(url).await,
            Some(Backend::Postgres) => Self::connect_postgres(url).await,
            None => Err(StoreError::UnsupportedUrl(redact_url(url))),
        }
    }

    async fn connect_sqlite(url: &str) -> Result<Store> {
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
        Ok(Store { pool: Pool::Sqlite(pool) })
    }

    async fn connect_postgres(url: &str) -> Result<Store> {
        let options = PgConnectOptions::from_str(url)?.application_name("arbiter");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Store { pool: Pool::Postgres(pool) })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// The statement text for this store's backend.
    fn sql<'a>(&self, sqlite: &'a str, postgres: &'a str) -> &'a str {
        match self.backend() {
            Backend::Sqlite => sqlite,
            Backend::Postgres => postgres,
        }
    }

    /// A trivial query: is the database reachable?
    pub async fn ping(&self) -> Result<()> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
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

    #[test]
    fn the_url_scheme_picks_the_backend() {
        assert_eq!(Backend::of_url("sqlite://data/arbiter.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("postgres://u@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("postgresql://u@h:5433/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("mysql://u@h/db"), None);
    }
}
