//! Fine-tuning hyperparameters: the notebook's values as defaults, validated field by field.

use serde::{Deserialize, Serialize};

pub const TARGET_MODULES: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoraHyperparameters {
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha; the update is scaled by alpha / r.
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    pub dropout: f64,
    /// Linear layers that get an adapter.
    pub target_modules: Vec<String>,
}

impl Default for LoraHyperparameters {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 8.0,
            dropout: 0.05,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    pub epochs: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub lr_schedule: LrSchedule,
    pub weight_decay: f64,
    /// Gradient-norm clipping threshold (0 disables clipping).
    pub max_grad_norm: f64,
    /// Maximum tokens per row (balanced truncation keeps a share of prompt, A and B).
    pub max_length: usize,
    pub lora: LoraHyperparameters,
    /// Cross-entropy class weights in the order A, B, tie; null for unweighted.
    pub class_weights: Option<[f64; 3]>,
    /// Also train on every row with A and B swapped (labels swapped).
    pub swap_augmentation: bool,
    pub seed: u64,
    /// Evaluate every N optimizer steps (0: only at each epoch end).
    pub eval_every_steps: usize,
    /// Write a checkpoint every N optimizer steps (0: only at each epoch end).
    pub checkpoint_every_steps: usize,
    /// Fit a temperature on the validation split after training.
    pub calibrate: bool,
    /// With `calibrate`: also stack a response-length model on the logits (a logistic
    /// regression on the two responses' lengths fitted on the training rows, mixed with the
    /// logits by weights fitted on the validation split). Skipped with fewer than 20 labelled
    /// rows in either split.
    pub length_calibration: bool,
    /// Activation checkpointing: keep only each decoder block's input in the forward and
    /// recompute the block in the backward (less memory, about one more forward of time).
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`: how many decoder blocks, from the first, are recomputed;
    /// the others keep their activations (more memory, less time). Null: every block; a number
    /// above the model's block count means every block.
    pub checkpointed_layers: Option<usize>,
    /// With `checkpointed_layers`: how many decoder blocks after those keep all their
    /// activations but the MLP's gate and up projections, which the backward recomputes (two of
    /// a block's seven GEMMs, for two thirds of what it keeps). Null: none. Counts past the
    /// model's last block stop there.
    pub mlp_checkpointed_layers: Option<usize>,
    /// With `mlp_checkpointed_layers`: those blocks copy their gate and up projections to host
    /// memory in the forward and back for the backward, on a GPU beside the computation,
    /// instead of recomputing them: the same GPU memory, no GEMM redone, at the cost of host
    /// memory (page-locked) for them.
    pub mlp_offload: bool,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 8,
            gradient_accumulation: 1,
            learning_rate: 1e-4,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Linear,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            max_length: 1024,
            lora: LoraHyperparameters::default(),
            class_weights: None,
            swap_augmentation: false,
            seed: 42,
            eval_every_steps: 0,
            checkpoint_every_steps: 50,
            calibrate: true,
            length_calibration: true,
            gradient_checkpointing: false,
            checkpointed_layers: None,
            mlp_checkpointed_layers: None,
            mlp_offload: false,
        }
    }
}

/// A field that failed validation, named by its JSON path (`hyperparameters.lora.r`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl Hyperparameters {
    /// Every problem found, each naming its field under `hyperparameters.`.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut bad = |field: &str, reason: String| {
            errs.push(FieldError { field: format!("hyperparameters.{field}"), reason })
        };
        if !(1..=100).contains(&self.epochs) {
            bad("epochs", format!("must be between 1 and 100, got {}", self.epochs));
        }
        if !(1..=1024).contains(&self.batch_size) {
            bad("batch_size", format!("must be between 1 and 1024, got {}", self.batch_size));
        }
        if !(1..=1024).contains(&self.gradient_accumulation) {
            bad(
                "gradient_accumulation",
                format!("must be between 1 and 1024, got {}", self.gradient_accumulation),
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            bad("learning_rate", format!("must be in (0, 1], got {}", self.learning_rate));
        }
        if self.warmup_steps > 1_000_000 {
            bad("warmup_steps", format!("must be at most 1000000, got {}", self.warmup_steps));
        }
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            bad("weight_decay", format!("must be in [0, 1], got {}", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bad("max_grad_norm", format!("must be a finite number >= 0, got {}", self.max_grad_norm));
        }
        if !(16..=32768).contains(&self.max_length) {
            bad("max_length", format!("must be between 16 and 32768, got {}", self.max_length));
        }
        if !(1..=1024).contains(&self.lora.r) {
            bad("lora.r", format!("must be between 1 and 1024, got {}", self.lora.r));
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0 && self.lora.alpha <= 1e6) {
            bad("lora.alpha", format!("must be a positive finite number, got {}", self.lora.alpha));
        }
        if !(self.lora.dropout.is_finite() && (0.0..1.0).contains(&self.lora.dropout)) {
            bad("lora.dropout", format!("must be in [0, 1), got {}", self.lora.dropout));
        }
        if self.lora.target_modules.is_empty() {
            bad("lora.target_modules", "must name at least one module".into());
        }
        for m in &self.lora.target_modules {
            if !TARGET_MODULES.contains(&m.as_str()) {
                bad(
                    "lora.target_modules",
                    format!("unknown module {m:?}; expected some of {}", TARGET_MODULES.join(", ")),
                );
            }
        }
        if let Some(w) = self.class_weights {
            if w.iter().any(|x| !(x.is_finite() && *x > 0.0 && *x <= 1e6)) {
                bad("class_weights", format!("must be three positive finite numbers, got {w:?}"));
            }
        }
        // with MLP-only recomputation after them, no fully recomputed block is a choice
        let least = if self.mlp_checkpointed_layers.is_some() { 0 } else { 1 };
        if let Some(n) = self.checkpointed_layers {
            if !self.gradient_checkpointing {
                bad("checkpointed_layers", "needs gradient_checkpointing: true".into());
            } else if !(least..=1024).contains(&n) {
                bad("checkpointed_layers", format!("must be between {least} and 1024, got {n}"));
            }
        }
        if let Some(n) = self.mlp_checkpointed_layers {
            if self.checkpointed_layers.is_none() {
                bad(
                    "mlp_checkpointed_layers",
                    "needs gradient_checkpointing: true and checkpointed_layers (the blocks it follows; 0 for none)".into(),
                );
            } else if !(1..=1024).contains(&n) {
                bad("mlp_checkpointed_layers", format!("must be between 1 and 1024, got {n}"));
            }
        }
        if self.mlp_offload && self.mlp_checkpointed_layers.is_none() {
            bad("mlp_offload", "needs mlp_checkpointed_layers (the blocks whose gate and up projections go to host memory)".into());
        }
        errs
    }

    /// How many decoder blocks, from the first, recompute their activations in the backward
    /// (`LoraCtx::recompute_layers`).
    pub fn recomputed_layers(&self) -> usize {
        match (self.gradient_checkpointing, self.checkpointed_layers) {
            (false, _) => 0,
            (true, None) => usize::MAX,
            (true, Some(n)) => n,
        }
    }

    /// How many decoder blocks after `recomputed_layers` recompute only their MLP's gate and up
    /// projections (`LoraCtx::recompute_mlp_layers`).
    pub fn recomputed_mlp_layers(&self) -> usize {
        match (self.gradient_checkpointing, self.checkpointed_layers) {
            (true, Some(_)) => self.mlp_checkpointed_layers.unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether the `recomputed_mlp_layers` blocks park their gate and up projections in host
    /// memory rather than recompute them (`LoraCtx::mlp_parking`).
    pub fn offloads_mlp(&self) -> bool {
        self.mlp_offload && self.recomputed_mlp_layers() > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_notebook_recipe_and_valid() {
        let h = Hyperparameters::default();
        assert_eq!((h.lora.r, h.lora.alpha, h.batch_size, h.max_length), (16, 8.0, 8, 1024));
        assert!(h.validate().is_empty());
    }

    #[test]
    fn bad_fields_are_named() {
        let h: Hyperparameters = serde_json::from_str(
            r#"{"learning_rate": -1, "lora": {"r": 0, "target_modules": ["qq"]}}"#,
        )
        .unwrap();
        let fields: Vec<_> = h.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            ["hyperparameters.learning_rate", "hyperparameters.lora.r", "hyperparameters.lora.target_modules"]
        );
    }

    #[test]
    fn checkpointed_layers_need_checkpointing_and_a_count() {
        let alone: Hyperparameters = serde_json::from_str(r#"{"checkpointed_layers": 4}"#).unwrap();
        let e = alone.validate();
        assert_eq!((e.len(), e[0].field.as_str()), (1, "hyperparameters.checkpointed_layers"));
        assert!(e[0].reason.contains("gradient_checkpointing"), "{}", e[0].reason);
        let zero: Hyperparameters =
            serde_json::from_str(r#"{"gradient_checkpointing": true, "checkpointed_layers": 0}"#).unwrap();
        assert_eq!(zero.validate()[0].field, "hyperparameters.checkpointed_layers");
        let some: Hyperparameters =
            serde_json::from_str(r#"{"gradient_checkpointing": true, "checkpointed_layers": 4}"#).unwrap();
        assert!(some.validate().is_empty());
        assert_eq!(some.recomputed_layers(), 4);
        let all = Hyperparameters { gradient_checkpointing: true, ..Default::default() };
        assert_eq!(all.recomputed_layers(), usize::MAX);
        assert_eq!(Hyperparameters::default().recomputed_layers(), 0);
    }

    #[test]
    fn mlp_checkpointed_layers_follow_the_checkpointed_ones() {
        let parse = |json: &str| serde_json::from_str::<Hyperparameters>(json).unwrap();
        // without checkpointed_layers every block is recomputed whole: nothing left to follow
        for json in [r#"{"mlp_checkpointed_layers": 4}"#, r#"{"gradient_checkpointing": true, "mlp_checkpointed_layers": 4}"#] {
            let e = parse(json).validate();
            assert_eq!((e.len(), e[0].field.as_str()), (1, "hyperparameters.mlp_checkpointed_layers"), "{json}");
            assert!(e[0].reason.contains("checkpointed_layers"), "{}", e[0].reason);
        }
        let zero = parse(r#"{"gradient_checkpointing": true, "checkpointed_layers": 2, "mlp_checkpointed_layers": 0}"#);
        assert_eq!(zero.validate()[0].field, "hyperparameters.mlp_checkpointed_layers");
        // with it, no fully recomputed block is allowed
        let only_mlp = parse(r#"{"gradient_checkpointing": true, "checkpointed_layers": 0, "mlp_checkpointed_layers": 30}"#);
        assert!(only_mlp.validate().is_empty(), "{:?}", only_mlp.validate());
        assert_eq!((only_mlp.recomputed_layers(), only_mlp.recomputed_mlp_layers()), (0, 30));
        let both = parse(r#"{"gradient_checkpointing": true, "checkpointed_layers": 3, "mlp_checkpointed_layers": 5}"#);
        assert!(both.validate().is_empty());
        assert_eq!((both.recomputed_layers(), both.recomputed_mlp_layers()), (3, 5));
        assert_eq!(Hyperparameters::default().recomputed_mlp_layers(), 0);
        // parking in host memory is for the MLP-only blocks: without them, a named error
        let alone = parse(r#"{"gradient_checkpointing": true, "mlp_offload": true}"#);
        assert_eq!((alone.validate().len(), alone.validate()[0].field.as_str()), (1, "hyperparameters.mlp_offload"));
        let parked = parse(r#"{"gradient_checkpointing": true, "checkpointed_layers": 0, "mlp_checkpointed_layers": 5, "mlp_offload": true}"#);
        assert!(parked.validate().is_empty());
        assert!(parked.offloads_mlp() && !both.offloads_mlp() && !Hyperparameters::default().offloads_mlp());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<Hyperparameters>(r#"{"epochz": 1}"#).is_err());
    }
}
