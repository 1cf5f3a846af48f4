//! The boundary between the job runner and whatever trains: the runner hands a `TrainRequest`
//! and an observer to a `Trainer` on a blocking thread and turns the observer's calls into job
//! events, progress and checkpoint rows.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::hyper::Hyperparameters;
use crate::data::ArenaRow;

/// Everything a trainer needs for one attempt of one job.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub job_id: String,
    pub attempt: i64,
    /// Resolved path of the base model (GGUF file or Hugging Face model directory).
    pub base_model: PathBuf,
    pub hyperparameters: Hyperparameters,
    pub train_rows: Vec<ArenaRow>,
    pub validation_rows: Vec<ArenaRow>,
    /// The job's own directory; checkpoints and the final adapter are written under it.
    pub work_dir: PathBuf,
    /// The newest complete checkpoint directory of an earlier attempt, if any.
    pub resume_from: Option<PathBuf>,
}

pub use crate::ml::observe::{EvalMetrics, TrainObserver};

/// What a successful training run leaves behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Directory holding the final adapter in the PEFT layout.
    pub adapter_dir: PathBuf,
    /// Final metrics (free-form JSON: eval metrics, calibration temperature, ...).
    pub metrics: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// `should_stop` returned true and the trainer stopped at a safe point.
    #[error("training stopped before completion")]
    Stopped,
    /// The job cannot succeed (bad hyperparameters for this model, NaN loss, out of memory...).
    /// The message is shown to the user.
    #[error("{0}")]
    Failed(String),
    /// A failure that may pass (a full disk, say): the attempt counts and the job runs again
    /// later, from its last checkpoint. The message is shown to the user.
    #[error("{0}")]
    Passing(String),
    /// `resume_from` cannot be read back (why): the runner sets that checkpoint aside and the
    /// job runs again from an older one.
    #[error("{0}")]
    UnusableCheckpoint(String),
}

/// Trains one job. Called on a blocking thread; must poll `observer.should_stop()` at least
/// every few seconds.
pub trait Trainer: Send + Sync + 'static {
    fn train(&self, request: TrainRequest, observer: &dyn TrainObserver) -> Result<TrainOutcome, TrainError>;
}
