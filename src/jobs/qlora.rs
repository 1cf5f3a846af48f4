//! The production trainer: LoRA on the frozen (quantized) base, through `ml::train`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Device;

use super::trainer::{TrainError, TrainObserver, TrainOutcome, TrainRequest, Trainer};
use crate::ml::model::{BaseFormat, BaseModel};
use crate::ml::train::{self, TrainFailure, TrainSpec};

/// Trains jobs on one device, keeping the last base model loaded between jobs.
pub struct QloraTrainer {
    device: Device,
    format: BaseFormat,
    /// Keep each base model's embedding table in host memory (`Llama::embeddings_to_host`).
    host_embeddings: bool,
    loaded: Mutex<Option<(PathBuf, Arc<BaseModel>)>>,
}

impl QloraTrainer {
    pub fn new(device: Device, format: BaseFormat, host_embeddings: bool) -> QloraTrainer {
        QloraTrainer { device, format, host_embeddings, loaded: Mutex::new(None) }
    }

    fn base(&self, path: &Path) -> Result<Arc<BaseModel>, TrainError> {
        let mut guard = self.loaded.lock().map_err(|_| TrainError::Failed("model cache poisoned".into()))?;
        if let Some((p, m)) = guard.as_ref() {
            if p == path {
                return Ok(m.clone());
            }
        }
        *guard = None;
        let failed = |e: &dyn std::fmt::Display| TrainError::Failed(format!("cannot load base model {}: {e}", path.display()));
        let mut model = BaseModel::load(path, self.format, &self.device).map_err(|e| failed(&e))?;
        if self.host_embeddings {
            model.llama.embeddings_to_host().map_err(|e| failed(&e))?;
            // the device copy the load made goes back to the driver
            crate::ml::pool::settle(&self.device).map_err(|e| failed(&e))?;
        }
        let model = Arc::new(model);
        *guard = Some((path.to_path_buf(), model.clone()));
        Ok(model)
    }
}

impl Trainer for QloraTrainer {
    fn train(&self, request: TrainRequest, observer: &dyn TrainObserver) -> Result<TrainOutcome, TrainError> {
        let base = self.base(&request.base_model)?;
        observer.on_log(&format!(
            "base model {} ({} layers, hidden {}) on {:?}",
            base.name,
            base.llama.config().num_layers,
            base.llama.config().hidden_size,
            self.device.location()
        ));
        let spec = TrainSpec {
            base: &base,
            hp: &request.hyperparameters,
            train_rows: &request.train_rows,
            validation_rows: &request.validation_rows,
            work_dir: &request.work_dir,
            resume_from: request.resume_from.as_deref(),
        };
        let result = train::train(&spec, observer);
        // the step's buffers go back to the driver; the loaded base model stays
        if let Err(e) = crate::ml::pool::trim(&self.device) {
            tracing::warn!(error = %e, "could not release the GPU memory pool");
        }
        match result {
            Ok(summary) => Ok(TrainOutcome {
                adapter_dir: summary.adapter_dir.clone(),
                metrics: serde_json::to_value(&summary).unwrap_or(serde_json::Value::Null),
            }),
            Err(TrainFailure::Stopped) => Err(TrainError::Stopped),
            Err(TrainFailure::Failed(m)) => Err(TrainError::Failed(m)),
            Err(TrainFailure::Passing(m)) => Err(TrainError::Passing(m)),
            Err(TrainFailure::UnusableCheckpoint(m)) => Err(TrainError::UnusableCheckpoint(m)),
        }
    }
}
