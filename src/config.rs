//! Settings: one clap-derived struct (flags with environment fallbacks), one variant per
//! subcommand. Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
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
    /// Fine-tune an adapter from a CSV without a server (progress bar, PEFT-layout output).
    Train(crate::cli::TrainArgs),
    /// Score an arena CSV with an adapter and write a Kaggle submission CSV.
    Predict(crate::cli::PredictArgs),
    /// Measure training or inference throughput, memory and TFLOP/s (JSON lines).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Manage the API keys kept in the database (shared by every API node).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once (only its hash is stored).
    Create(KeysCreateArgs),
    /// List keys: id, scope, name, dates (never the key).
    List(KeysListArgs),
    /// Revoke a key by id; requests with it are answered 401 from then on.
    Revoke(KeysRevokeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KeysCreateArgs {
    /// What the key may do: admin (datasets, jobs, adapters, prediction) or predict.
    #[arg(long, value_parser = ["admin", "predict"])]
    pub scope: String,
    /// A note to recognise the key by in `arbiter keys list`.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysRevokeArgs {
    /// The key's id (the 16 hex digits after `arb_`, as `arbiter keys list` shows).
    pub id: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A setting that must not be printed: `Debug` shows `***`.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
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
    /// Shared artifact store for datasets, checkpoints and adapters, for API nodes and workers
    /// on different machines: s3://bucket/prefix (settings from AWS_* variables, AWS_ENDPOINT
    /// for S3-compatible servers) or file:///shared/dir; default: the data directory only.
    #[arg(long, env = "ARBITER_ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
    /// Default base model: a GGUF file or a Hugging Face model directory.
    #[arg(long, env = "ARBITER_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Device the worker trains on: cpu, cuda or cuda:N.
    #[arg(long, env = "ARBITER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// How the frozen base weights are held (auto: dense f32 on CPU, bf16 on GPUs; q4/q4_1/q8:
    /// block-quantized, the QLoRA base).
    #[arg(long, env = "ARBITER_BASE_FORMAT", value_enum, default_value = "auto")]
    pub base_format: crate::ml::model::BaseFormat,
    /// On a GPU, the worker keeps the base model's token embedding table in host memory, mapped
    /// for the device, which reads each batch's rows there (vocab x hidden weights less on the
    /// device: 1 GiB of bf16 for Llama-3-8B).
    #[arg(long, env = "ARBITER_HOST_EMBEDDINGS", value_parser = BoolishValueParser::new())]
    pub host_embeddings: bool,
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
            .field("artifact_store", &self.artifact_store)
            .field("model", &self.model)
            .field("device", &self.device)
            .field("base_format", &self.base_format)
            .field("host_embeddings", &self.host_embeddings)
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
    /// How often an idle worker looks for queued jobs, and every node (API nodes without a
    /// worker too) for expired leases, in milliseconds.
    #[arg(long, env = "ARBITER_POLL_MS", default_value_t = 1_000)]
    pub poll_ms: u64,
    /// Attempts a job gets (a lost lease counts as one) before it is failed.
    #[arg(long, env = "ARBITER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How long a job waits before its next attempt after one failed for a passing reason (the
    /// database, the disk or the artifact store unreachable), in milliseconds; doubled for each
    /// further such attempt.
    #[arg(long, env = "ARBITER_RETRY_DELAY_MS", default_value_t = 30_000)]
    pub retry_delay_ms: u64,
    /// Name of this worker in job leases; defaults to host name, process id and a random suffix.
    #[arg(long, env = "ARBITER_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Device memory this worker offers jobs, in GB (jobs may require a least amount); default:
    /// detected (RAM, or the container's memory limit, for cpu; the GPU's total for cuda).
    #[arg(long, env = "ARBITER_DEVICE_MEMORY_GB")]
    pub device_memory_gb: Option<f64>,
}

impl QueueArgs {
    /// A lease must outlive two heartbeats, so that one late renewal does not lose it: with a
    /// shorter lease every running job is reaped between renewals and bounces between workers.
    pub fn check(&self) -> Result<(), String> {
        let heartbeat = self.heartbeat().as_millis();
        if u128::from(self.lease_ms) < 2 * heartbeat {
            return Err(format!(
                "--lease-ms ({}) must be at least twice --heartbeat-ms ({heartbeat}): a running job's lease would \
                 lapse between its renewals",
                self.lease_ms
            ));
        }
        Ok(())
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(10))
    }
    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
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
    #[arg(long, env = "ARBITER_NO_WORKER", value_parser = BoolishValueParser::new())]
    pub no_worker: bool,
    /// Largest accepted request body (dataset uploads included), in bytes.
    #[arg(long, env = "ARBITER_MAX_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest time a request may take before it is answered 408 (streams excepted once started).
    #[arg(long, env = "ARBITER_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// Longest time a client may take to send a request's headers before the connection is closed.
    #[arg(long, env = "ARBITER_HEADER_TIMEOUT_SECS", default_value_t = 15)]
    pub header_timeout_secs: u64,
    /// API keys as `scope:key` pairs, comma separated (scope: admin or predict). With none here
    /// and none created by `arbiter keys create`, the API is open and only a loopback address
    /// is allowed. Prefer the environment variable to the flag (the flag shows in `ps`).
    #[arg(long, env = "ARBITER_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<Secret>,
    /// Most rows a dataset upload may have.
    #[arg(long, env = "ARBITER_MAX_DATASET_ROWS", default_value_t = 1_000_000)]
    pub max_dataset_rows: usize,
    /// Longest text, in characters, of one prompt or response (a dataset cell, a predict field);
    /// longer is refused. Prediction cuts shorter texts to the token budget.
    #[arg(long, env = "ARBITER_MAX_TEXT_CHARS", default_value_t = 1_000_000)]
    pub max_text_chars: usize,
    /// Directory that holds the base models a job may name in `base_model`; default: the
    /// directory of --model. No other path on the server is accepted.
    #[arg(long, env = "ARBITER_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub predict: PredictArgs,
}

/// The prediction engine: dynamic batching, back-pressure, adapter cache, request limits.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// Padded tokens (rows x longest row) per forward pass of the prediction engine.
    #[arg(long, env = "ARBITER_PREDICT_BATCH_TOKENS", default_value_t = 2048)]
    pub predict_batch_tokens: usize,
    /// Longest wait, in milliseconds, for other requests to join a prediction batch.
    #[arg(long, env = "ARBITER_PREDICT_MAX_WAIT_MS", default_value_t = 5)]
    pub predict_max_wait_ms: u64,
    /// Rows (pairs, twice for symmetric ones) waiting or running at once; more is answered 429.
    #[arg(long, env = "ARBITER_PREDICT_QUEUE_ROWS", default_value_t = 512)]
    pub predict_queue_rows: usize,
    /// Adapters kept loaded at once (least recently used evicted).
    #[arg(long, env = "ARBITER_PREDICT_ADAPTER_CACHE", default_value_t = 4)]
    pub predict_adapter_cache: usize,
    /// Base models kept loaded for prediction at once.
    #[arg(long, env = "ARBITER_PREDICT_BASE_CACHE", default_value_t = 1)]
    pub predict_base_cache: usize,
    /// Merge concurrent requests into shared batches (false: one request at a time).
    #[arg(long, env = "ARBITER_PREDICT_BATCHING", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub predict_batching: bool,
    /// Forwards kept captured as CUDA graphs on a GPU (any batch of a small, merged adapter; a
    /// large model's up to 2,048 padded tokens): a batch shape seen twice is captured once and
    /// then replayed as one launch (0: off).
    #[arg(long, env = "ARBITER_PREDICT_GRAPHS", default_value_t = 16)]
    pub predict_graphs: usize,
    /// Pairs per prediction request.
    #[arg(long, env = "ARBITER_PREDICT_MAX_PAIRS", default_value_t = 64)]
    pub predict_max_pairs: usize,
    /// Largest token budget per pair (longer pairs are truncated, and the answer says so).
    #[arg(long, env = "ARBITER_PREDICT_MAX_LENGTH", default_value_t = 2048)]
    pub predict_max_length: usize,
    /// Rows of a CSV sent to /v1/predict/file.
    #[arg(long, env = "ARBITER_PREDICT_MAX_FILE_ROWS", default_value_t = 10_000)]
    pub predict_max_file_rows: usize,
    /// Adapter (id or name) for requests that name none; default: the newest adapter.
    #[arg(long, env = "ARBITER_DEFAULT_ADAPTER")]
    pub default_adapter: Option<String>,
    /// Load the default base model for prediction at startup instead of on first use.
    #[arg(long, env = "ARBITER_PREDICT_PRELOAD", value_parser = BoolishValueParser::new())]
    pub predict_preload: bool,
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
    fn api_keys_are_not_printed() {
        let s = Settings::try_parse_from(["arbiter", "serve", "--api-keys", "admin:supersecretkey123456"]).unwrap();
        let Command::Serve(a) = &s.command else { panic!("serve expected") };
        assert_eq!(a.api_keys.as_ref().map(|k| k.0.as_str()), Some("admin:supersecretkey123456"));
        assert!(!format!("{s:?}").contains("supersecret"));
    }

    #[test]
    fn database_password_is_not_printed() {
        let s = Settings::try_parse_from(["arbiter", "worker", "--database-url", "postgres://u:pw@h/db"]).unwrap();
        assert!(!format!("{s:?}").contains("pw@"));
    }
}
