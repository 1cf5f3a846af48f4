//! Offline commands for notebook users and benchmarks: `arbiter train`, `arbiter predict`,
//! `arbiter bench`. They use the same `data` and `ml` code as the service, with progress bars.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::hyper::{Hyperparameters, LoraHyperparameters, LrSchedule};
use crate::data::ArenaRow;
use crate::ml::classifier;
use crate::ml::model::{BaseFormat, BaseModel};
use crate::ml::observe::{EvalMetrics, TrainObserver};
use crate::ml::train::{self, TrainSpec};

pub use crate::bench::parse_device;

/// The base model and where it runs, shared by the offline commands.
#[derive(Debug, Args)]
pub struct BaseArgs {
    /// Base model: a GGUF file or a Hugging Face model directory.
    #[arg(long, env = "ARBITER_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// How to hold the frozen base weights.
    #[arg(long, value_enum, default_value = "auto")]
    pub base_format: BaseFormat,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "ARBITER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// On a GPU, keep the token embedding table in host memory (read there by the device).
    #[arg(long, env = "ARBITER_HOST_EMBEDDINGS", value_parser = clap::builder::BoolishValueParser::new())]
    pub host_embeddings: bool,
}

impl BaseArgs {
    pub fn load(&self) -> anyhow::Result<BaseModel> {
        let device = parse_device(&self.device)?;
        eprintln!("loading {} ...", self.model.display());
        let mut model = BaseModel::load(&self.model, self.base_format, &device)?;
        if self.host_embeddings {
            model.llama.embeddings_to_host()?;
            crate::ml::pool::settle(&device)?;
        }
        Ok(model)
    }
}

/// The API's hyperparameter defaults, which the `arbiter train` flags share.
fn hp() -> Hyperparameters {
    Hyperparameters::default()
}

/// `arbiter train`: fine-tune an adapter from a CSV, no server.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training data: an arena CSV (or JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Validation data; without it, `--validation-fraction` of the training rows is held out.
    #[arg(long)]
    pub validation_data: Option<PathBuf>,
    /// Share of the training rows held out for validation when no validation file is given (0:
    /// none), chosen as the service chooses it for a job with the same seed.
    #[arg(long, default_value_t = 0.1)]
    pub validation_fraction: f64,
    /// Output directory: the adapter (PEFT layout) and checkpoints.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub base: BaseArgs,
    /// Resume from this checkpoint directory (`OUT/checkpoints/step-N`).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = hp().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = hp().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = hp().gradient_accumulation)]
    pub gradient_accumulation: usize,
    #[arg(long, default_value_t = hp().learning_rate)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = hp().warmup_steps)]
    pub warmup_steps: usize,
    #[arg(long, value_enum, default_value = "linear")]
    pub lr_schedule: Schedule,
    #[arg(long, default_value_t = hp().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = hp().max_grad_norm)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = hp().max_length)]
    pub max_length: usize,
    #[arg(long, default_value_t = hp().lora.r)]
    pub lora_r: usize,
    #[arg(long, default_value_t = hp().lora.alpha)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = hp().lora.dropout)]
    pub lora_dropout: f64,
    /// Comma-separated LoRA targets.
    #[arg(long, value_delimiter = ',', default_values_t = hp().lora.target_modules)]
    pub lora_target_modules: Vec<String>,
    /// Three comma-separated cross-entropy weights (A, B, tie).
    #[arg(long, value_delimiter = ',')]
    pub class_weights: Option<Vec<f64>>,
    /// Also train on every row with A and B swapped.
    #[arg(long)]
    pub swap_augmentation: bool,
    #[arg(long, default_value_t = hp().seed)]
    pub seed: u64,
    #[arg(long, default_value_t = hp().eval_every_steps)]
    pub eval_every_steps: usize,
    #[arg(long, default_value_t = hp().checkpoint_every_steps)]
    pub checkpoint_every_steps: usize,
    /// Skip fitting the softmax temperature on the validation split.
    #[arg(long)]
    pub no_calibrate: bool,
    /// Calibrate with the temperature only (no response-length model stacked on the logits).
    #[arg(long)]
    pub no_length_calibration: bool,
    /// Activation checkpointing: recompute each decoder block in the backward (less memory).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// With --gradient-checkpointing: recompute only the first N decoder blocks.
    #[arg(long)]
    pub checkpointed_layers: Option<usize>,
    /// With --checkpointed-layers: of the blocks after those, the next N recompute only their
    /// MLP's gate and up projections.
    #[arg(long)]
    pub mlp_checkpointed_layers: Option<usize>,
    /// With --mlp-checkpointed-layers: those blocks copy their gate and up projections to host
    /// memory and back instead of recomputing them.
    #[arg(long)]
    pub mlp_offload: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl TrainArgs {
    pub fn hyperparameters(&self) -> anyhow::Result<Hyperparameters> {
        let class_weights = match &self.class_weights {
            None => None,
            Some(w) if w.len() == 3 => Some([w[0], w[1], w[2]]),
            Some(w) => anyhow::bail!("--class-weights needs 3 numbers, got {}", w.len()),
        };
        let hp = Hyperparameters {
            epochs: self.epochs,
            batch_size: self.batch_size,
            gradient_accumulation: self.gradient_accumulation,
            learning_rate: self.learning_rate,
            warmup_steps: self.warmup_steps,
            lr_schedule: match self.lr_schedule {
                Schedule::Linear => LrSchedule::Linear,
                Schedule::Cosine => LrSchedule::Cosine,
                Schedule::Constant => LrSchedule::Constant,
            },
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            max_length: self.max_length,
            lora: LoraHyperparameters {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                target_modules: self.lora_target_modules.clone(),
            },
            class_weights,
            swap_augmentation: self.swap_augmentation,
            seed: self.seed,
            eval_every_steps: self.eval_every_steps,
            checkpoint_every_steps: self.checkpoint_every_steps,
            calibrate: !self.no_calibrate,
            length_calibration: !self.no_length_calibration,
            gradient_checkpointing: self.gradient_checkpointing,
            checkpointed_layers: self.checkpointed_layers,
            mlp_checkpointed_layers: self.mlp_checkpointed_layers,
            mlp_offload: self.mlp_offload,
        };
        if let Some(e) = hp.validate().first() {
            anyhow::bail!("--{}: {}", e.field.trim_start_matches("hyperparameters.").replace(['_', '.'], "-"), e.reason);
        }
        Ok(hp)
    }
}

/// Read an arena CSV or JSONL file (by extension).
pub fn read_dataset(path: &Path) -> anyhow::Result<crate::data::arena::ParsedDataset> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
    let parsed = if is_jsonl { crate::data::arena::parse_jsonl(&bytes) } else { crate::data::arena::parse_csv(&bytes) };
    parsed.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The rows of an arena file that can train (both-empty rows dropped).
pub fn read_rows(path: &Path) -> anyhow::Result<Vec<ArenaRow>> {
    Ok(read_dataset(path)?.rows)
}

struct BarObserver {
    bar: ProgressBar,
    last_eval: Mutex<Option<EvalMetrics>>,
}

impl BarObserver {
    /// A line above the bar, or on stderr when there is no terminal to draw the bar on.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl TrainObserver for BarObserver {
    fn on_step(&self, step: u64, total: u64, epoch: f64, loss: f64, lr: f64) {
        self.bar.set_length(total);
        self.bar.set_position(step);
        let eval = self.last_eval.lock().ok().and_then(|g| *g);
        let eval = eval.map(|m| format!(" | val log loss {:.4} acc {:.3}", m.log_loss, m.accuracy)).unwrap_or_default();
        self.bar.set_message(format!("epoch {epoch:.2} loss {loss:.4} lr {lr:.2e}{eval}"));
        if self.bar.is_hidden() {
            eprintln!("step {step}/{total} epoch {epoch:.2} loss {loss:.4} lr {lr:.2e}");
        }
    }
    fn on_eval(&self, step: u64, m: &EvalMetrics) {
        if let Ok(mut g) = self.last_eval.lock() {
            *g = Some(*m);
        }
        self.say(format!(
            "step {step}: validation log loss {:.4}, accuracy {:.3}, balanced accuracy {:.3} ({} rows)",
            m.log_loss, m.accuracy, m.balanced_accuracy, m.rows
        ));
    }
    fn on_checkpoint(&self, step: u64, path: &Path, _: Option<&EvalMetrics>) {
        self.say(format!("step {step}: checkpoint {}", path.display()));
    }
    fn on_log(&self, message: &str) {
        self.say(message.to_string());
    }
    fn should_stop(&self) -> bool {
        false
    }
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let hp = args.hyperparameters()?;
    let rows = read_rows(&args.data)?;
    let (train_rows, val_rows) = match &args.validation_data {
        Some(p) => (rows, read_rows(p)?),
        None if args.validation_fraction > 0.0 => crate::data::split_validation(rows, args.validation_fraction, hp.seed),
        None => (rows, Vec::new()),
    };
    let base = args.base.load()?;
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps (ETA {eta}) {msg}")
            .map_err(|e| anyhow::anyhow!("progress style: {e}"))?,
    );
    let obs = BarObserver { bar, last_eval: Mutex::new(None) };
    let spec = TrainSpec {
        base: &base,
        hp: &hp,
        train_rows: &train_rows,
        validation_rows: &val_rows,
        work_dir: &args.out,
        resume_from: args.resume.as_deref(),
    };
    let summary = train::train(&spec, &obs).map_err(|e| anyhow::anyhow!("{e}"))?;
    obs.bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("adapter written to {}", summary.adapter_dir.display());
    Ok(())
}

/// `arbiter predict`: score an arena CSV with an adapter, write a submission CSV.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Adapter directory (PEFT layout).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Rows to score: an arena CSV (test layout `id,prompt,response_a,response_b` is enough).
    #[arg(long)]
    pub data: PathBuf,
    /// Submission CSV to write (`id,winner_model_a,winner_model_b,winner_tie`).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub base: BaseArgs,
    /// Token budget per row (default: the adapter's training max_length).
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Also score every pair with A and B swapped and average.
    #[arg(long)]
    pub symmetric: bool,
    /// Ignore the adapter's calibration (softmax of the raw logits).
    #[arg(long)]
    pub no_calibration: bool,
    /// Use the adapter's temperature but not its response-length model.
    #[arg(long)]
    pub no_length_calibration: bool,
}

pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    // every id gets a prediction, also those whose two responses are empty
    let rows = read_dataset(&args.data)?.into_all_rows();
    let base = args.base.load()?;
    let adapter = crate::ml::adapter::load(&args.adapter, &base.llama)?;
    let max_length = args.max_length.unwrap_or(adapter.meta.max_length);
    let bar = ProgressBar::new(rows.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows (ETA {eta})")
            .map_err(|e| anyhow::anyhow!("progress style: {e}"))?,
    );
    let mut out = csv::Writer::from_path(&args.out)?;
    out.write_record(["id", "winner_model_a", "winner_model_b", "winner_tie"])?;
    let mut meta = adapter.meta.clone();
    if args.no_calibration {
        meta.temperature = 1.0;
    }
    if args.no_calibration || args.no_length_calibration {
        meta.length_calibration = None;
    }
    for chunk in rows.chunks(args.batch_size.max(1) * 8) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|r| base.encode_row(r, max_length).ids).collect();
        let logits = train::predict_logits(&base, Some(&adapter.lora), &adapter.head, &ids, args.batch_size)?;
        let swapped = if args.symmetric {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|r| base.encode_row(&r.swapped(), max_length).ids).collect();
            Some(train::predict_logits(&base, Some(&adapter.lora), &adapter.head, &ids, args.batch_size)?)
        } else {
            None
        };
        for (i, r) in chunk.iter().enumerate() {
            let mut p = meta.probabilities(&logits[i], r);
            if let Some(s) = &swapped {
                p = classifier::symmetric(p, meta.probabilities(&s[i], &r.swapped()));
            }
            out.write_record([r.id.clone(), p[0].to_string(), p[1].to_string(), p[2].to_string()])?;
        }
        bar.inc(chunk.len() as u64);
    }
    out.flush()?;
    bar.finish_and_clear();
    eprintln!("{} predictions written to {}", rows.len(), args.out.display());
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        train: TrainArgs,
    }

    #[test]
    fn train_flags_default_to_the_api_defaults() {
        let p = Probe::try_parse_from(["probe", "--data", "t.csv", "--out", "o"]).unwrap();
        assert_eq!(p.train.hyperparameters().unwrap(), Hyperparameters::default());
    }

    #[test]
    fn a_bad_flag_names_itself() {
        let p = Probe::try_parse_from(["probe", "--data", "t.csv", "--out", "o", "--lora-r", "0"]).unwrap();
        let err = p.train.hyperparameters().unwrap_err().to_string();
        assert!(err.starts_with("--lora-r:"), "{err}");
    }
}
