//! Settings: one clap-derived struct (flags with environment fallbacks), one variant per
//! subcommand. Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "arbiter", version, about = "Pairwise preference prediction: fine-tune LoRA adapters and serve them")]
pub struct Settings {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (and, unless --no-worker, an in-process job worker).
    Serve(ServeArgs),
    /// Run a job worker only, against the same database as the API.
    Worker(WorkerArgs),
}

/// Settings shared by every command that touches the database and the data directory.
#[derive(Clone, Args)]
pub struct StoreArgs {
    /// Directory for datasets, job work directories and adapters.
    #[arg(long, env = "ARBITER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Database URL; defaults to the SQLite file `arbiter.db` in the data directory.
    #[arg(long, env = "ARBITER_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Default base model: a GGUF file or a Hugging Face model directory.
    #[arg(long, env = "ARBITER_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
}

impl StoreArgs {
    /// The database URL, the default SQLite file when none was given.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("arbiter.db").display()),
        }
    }
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreArgs")
            .field("data_dir", &self.data_dir)
            .field("database_url", &self.database_url.as_deref().map(crate::store::redact_url))
            .field("model", &self.model)
            .finish()
    }
}

/// How the job worker claims, holds and gives up jobs.
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// How long a claimed job's lease lasts without a heartbeat, in milliseconds.
    #[arg(long, env = "ARBITER_LEASE_MS", default_value_t = 60_000)]
    pub lease_ms: u64,
    /// How often a running job's lease is renewed (and cancellation checked), in milliseconds.
    #[arg(long, env = "ARBITER_HEARTBEAT_MS", default_value_t = 2_000)]
    pub heartbeat_ms: u64,
    /// How often an idle worker looks for queued jobs and expired leases, in milliseconds.
    #[arg(long, env = "ARBITER_POLL_MS", default_value_t = 1_000)]
    pub poll_ms: u64,
    /// Attempts a job gets (a lost lease counts as one) before it is failed.
    #[arg(long, env = "ARBITER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Name of this worker in job leases; defaults to host name, process id and a random suffix.
    #[arg(long, env = "ARBITER_WORKER_ID")]
    pub worker_id: Option<String>,
}

impl QueueArgs {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(10))
    }
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(10))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ARBITER_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Do not run a job worker in this process (run `arbiter worker` elsewhere).
    #[arg(long, env = "ARBITER_NO_WORKER")]
    pub no_worker: bool,
    /// Largest accepted request body (dataset uploads included), in bytes.
    #[arg(long, env = "ARBITER_MAX_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest time a request may take before it is answered 408 (streams excepted once started).
    #[arg(long, env = "ARBITER_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    pub request_timeout_secs: u64,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let s = Settings::try_parse_from(["arbiter", "serve"]).unwrap();
        let Command::Serve(a) = s.command else { panic!("serve expected") };
        assert_eq!(a.addr.to_string(), "127.0.0.1:8080");
        assert!(a.store.database_url().ends_with("arbiter.db"));
        let s = Settings::try_parse_from(["arbiter", "worker", "--data-dir", "/tmp/x", "--max-attempts", "5"]).unwrap();
        let Command::Worker(w) = s.command else { panic!("worker expected") };
        assert_eq!(w.queue.max_attempts, 5);
        assert_eq!(w.store.database_url(), "sqlite:///tmp/x/arbiter.db");
    }

    #[test]
    fn database_password_is_not_printed() {
        let s = Settings::try_parse_from(["arbiter", "worker", "--database-url", "postgres://u:pw@h/db"]).unwrap();
        assert!(!format!("{s:?}").contains("pw@"));
    }
}
