//! What a training run reports while it runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Metrics of one evaluation over the validation rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvalMetrics {
    pub log_loss: f64,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub rows: usize,
}

/// Calls from the trainer (on its own thread) back into the runner.
pub trait TrainObserver: Send + Sync {
    /// One optimizer step finished. `epoch` is fractional (1.5 = halfway through epoch 2).
    fn on_step(&self, step: u64, total_steps: u64, epoch: f64, loss: f64, learning_rate: f64);
    /// One evaluation finished.
    fn on_eval(&self, step: u64, metrics: &EvalMetrics);
    /// A checkpoint directory was completely and atomically written.
    fn on_checkpoint(&self, step: u64, path: &Path, metrics: Option<&EvalMetrics>);
    /// A human-readable log line for the job's event stream.
    fn on_log(&self, message: &str);
    /// True once the trainer must stop at its next safe point: the job was cancelled, the lease
    /// was lost or the process is shutting down.
    fn should_stop(&self) -> bool;
}

