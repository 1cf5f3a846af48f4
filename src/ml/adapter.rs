//! Adapters in the PEFT layout: `adapter_config.json` (LORA, SEQ_CLS) and
//! `adapter_model.safetensors` with PEFT tensor names and the score head saved as a module,
//! so the Python stack loads what Arbiter trains and Arbiter serves what PEFT trains.
//! Arbiter's own extras (calibration temperature and length model, label order, metrics) live beside them in
//! `arbiter.json`, which PEFT ignores.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::calibrate::{self, LengthCalibration};
use super::classifier::{self, HEAD_NAME};
use super::llama::{Llama, Proj};
use super::lora::{peft_name, Lora, LoraConfig};
use super::MlError;
use crate::data::ArenaRow;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const META_FILE: &str = "arbiter.json";

/// The fields of PEFT's `LoraConfig` we write and read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    /// Options that change which layers or how strongly the adapter applies, read so that an
    /// adapter using them is refused rather than served wrong: a subset of layers, per-module
    /// ranks or alphas, trained biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_bias: Option<bool>,
}

impl PeftConfig {
    /// The options of this config that Arbiter cannot honour, by name.
    fn unsupported(&self) -> Vec<&'static str> {
        let set = |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let non_empty = |m: &Option<serde_json::Map<String, serde_json::Value>>| m.as_ref().is_some_and(|m| !m.is_empty());
        [
            ("use_dora", self.use_dora),
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("layers_to_transform", set(&self.layers_to_transform)),
            ("layers_pattern", set(&self.layers_pattern)),
            ("rank_pattern", non_empty(&self.rank_pattern)),
            ("alpha_pattern", non_empty(&self.alpha_pattern)),
            ("bias", self.bias != "none"),
            ("lora_bias", self.lora_bias == Some(true)),
        ]
        .into_iter()
        .filter_map(|(name, used)| used.then_some(name))
        .collect()
    }
}

fn bias_none() -> String {
    "none".into()
}

/// PEFT accepts a list of module names or one regex string.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// Arbiter's extras beside the PEFT files.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct AdapterMeta {
    /// Class order of the head's rows.
    pub labels: Vec<String>,
    /// Softmax temperature fitted on the validation split (1 = uncalibrated).
    pub temperature: f64,
    /// Token budget the adapter was trained with (the default for prediction).
    pub max_length: usize,
    /// Base model as named in its metadata.
    pub base_model: String,
    /// Free-form metrics of the training run.
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Response-length model stacked on the logits (replaces the temperature when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_calibration: Option<LengthCalibration>,
}

impl AdapterMeta {
    /// What an adapter without Arbiter's file (one trained by PEFT) is served with: no
    /// calibration, and the reference notebook's token budget.
    pub fn without_file(base_model: String) -> AdapterMeta {
        AdapterMeta {
            labels: labels(),
            temperature: 1.0,
            max_length: 1024,
            base_model,
            metrics: serde_json::Value::Null,
            length_calibration: None,
        }
    }

    /// Calibrated logits of a row, given its [`calibrate::length_features`]: softmax them
    /// for the adapter's probabilities.
    pub fn calibrated_logits(&self, logits: &[f32; 3], features: &[f64; 3]) -> [f32; 3] {
        calibrate::calibrated_logits(self.temperature, self.length_calibration.as_ref(), logits, features)
    }

    /// Calibrated probabilities of a row.
    pub fn probabilities(&self, logits: &[f32; 3], row: &ArenaRow) -> [f32; 3] {
        classifier::softmax3(&self.calibrated_logits(logits, &calibrate::length_features(row)), 1.0)
    }
}

/// A loaded adapter, ready for inference.
pub struct Adapter {
    pub lora: Lora,
    pub head: Tensor,
    pub meta: AdapterMeta,
    pub config: PeftConfig,
}

fn labels() -> Vec<String> {
    crate::data::Label::ALL.iter().map(|l| l.column().to_string()).collect()
}

/// The adapter's tensors under PEFT names, Q/K rows in the Hugging Face layout.
pub fn named_tensors(llama: &Llama, lora: &Lora, head: &Tensor) -> Result<HashMap<String, Tensor>, MlError> {
    let mut out = HashMap::new();
    for ((layer, p), (a, b)) in lora.factors() {
        out.insert(peft_name(*layer, *p, "lora_A"), a.to_dtype(DType::F32)?.contiguous()?);
        let b = llama.permute_qk_rows(*p, &b.to_dtype(DType::F32)?, true)?.contiguous()?;
        out.insert(peft_name(*layer, *p, "lora_B"), b);
    }
    out.insert(HEAD_NAME.to_string(), head.to_dtype(DType::F32)?.contiguous()?);
    Ok(out)
}

/// Write an adapter directory atomically: files go to `dir.tmp`, are synced, then renamed.
pub fn save(dir: &Path, llama: &Llama, lora: &Lora, head: &Tensor, meta: &AdapterMeta) -> Result<(), MlError> {
    let cfg = lora.config();
    let peft = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some("SEQ_CLS".into()),
        r: cfg.r,
        lora_alpha: cfg.alpha,
        lora_dropout: cfg.dropout,
        target_modules: TargetModules::List(cfg.targets.iter().map(|p| p.hf_name().to_string()).collect()),
        base_model_name_or_path: Some(meta.base_model.clone()),
        modules_to_save: Some(vec!["score".into()]),
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        use_rslora: false,
        use_dora: false,
        init_lora_weights: serde_json::Value::Bool(true),
        layers_to_transform: None,
        layers_pattern: None,
        rank_pattern: None,
        alpha_pattern: None,
        lora_bias: None,
    };
    let mut meta = meta.clone();
    meta.labels = labels();
    let tensors = named_tensors(llama, lora, head)?;
    super::fsutil::write_dir_atomically(dir, |tmp| {
        super::fsutil::write_file_synced(&tmp.join(CONFIG_FILE), &serde_json::to_vec_pretty(&peft).map_err(io)?)?;
        super::fsutil::write_file_synced(&tmp.join(META_FILE), &serde_json::to_vec_pretty(&meta).map_err(io)?)?;
        super::fsutil::save_safetensors_synced(&tensors, &tmp.join(WEIGHTS_FILE))
    })
}

fn io(e: serde_json::Error) -> MlError {
    MlError::Io(std::io::Error::other(e))
}

/// Read every tensor of a safetensors file to the CPU.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, MlError> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| MlError::Adapter(format!("{}: {e}", path.display())))?;
    Ok(map.into_iter().collect())
}

/// Load an adapter directory (made by Arbiter or by PEFT) for a base model.
pub fn load(dir: &Path, llama: &Llama) -> Result<Adapter, MlError> {
    let (config, lcfg) = read_config(dir)?;
    let mut tensors = read_weights(dir)?;
    // only targets that have tensors (a regex target may name absent modules); a target present
    // in some layers must be in all of them, which `from_named` checks
    let layers = llama.config().num_layers;
    let present: Vec<Proj> = lcfg
        .targets
        .iter()
        .copied()
        .filter(|p| (0..layers).any(|l| tensors.contains_key(&peft_name(l, *p, "lora_A"))))
        .collect();
    if present.is_empty() {
        return Err(MlError::Adapter(format!(
            "{WEIGHTS_FILE} holds no LoRA factors for the target modules of {CONFIG_FILE} in this base model's {layers} layers"
        )));
    }
    let lcfg = LoraConfig { targets: present, ..lcfg };
    let mut lora_scale_cfg = lcfg.clone();
    if config.use_rslora {
        // rsLoRA scales by alpha/sqrt(r): express it as an equivalent alpha
        lora_scale_cfg.alpha = config.lora_alpha * (config.r as f64).sqrt();
    }
    for &p in &lora_scale_cfg.targets {
        for layer in 0..llama.config().num_layers {
            let name = peft_name(layer, p, "lora_B");
            if let Some(b) = tensors.get(&name) {
                let b = llama.permute_qk_rows(p, &b.to_dtype(DType::F32)?, false)?;
                tensors.insert(name, b);
            }
        }
    }
    let lora = Lora::from_named(lora_scale_cfg, llama.config(), &tensors, llama.device(), None)?;
    let head = score_head(&tensors)?;
    let hidden = llama.config().hidden_size;
    if head.dims() != [3, hidden] {
        return Err(MlError::Adapter(format!("{WEIGHTS_FILE}: the score head has shape {:?}, expected [3, {hidden}]", head.dims())));
    }
    let head = head.to_device(llama.device())?.to_dtype(DType::F32)?;
    let meta = read_meta(dir, &config)?;
    Ok(Adapter { lora, head, meta, config })
}

/// Checks what can be checked of an adapter directory without its base model: its config (one
/// Arbiter can serve), its weights file (readable, with a score head and LoRA factors) and
/// Arbiter's file if there is one. Errors start with the name of the file at fault.
pub fn check_files(dir: &Path) -> Result<(), MlError> {
    let (config, _) = read_config(dir)?;
    let tensors = read_weights(dir)?;
    score_head(&tensors)?;
    if !tensors.keys().any(|k| k.contains(".lora_A.")) {
        return Err(MlError::Adapter(format!("{WEIGHTS_FILE} holds no LoRA factors")));
    }
    read_meta(dir, &config).map(|_| ())
}

/// The PEFT config of the adapter at `dir`, refused unless Arbiter can serve it, and its LoRA
/// settings.
fn read_config(dir: &Path) -> Result<(PeftConfig, LoraConfig), MlError> {
    let bad = |why: String| MlError::Adapter(format!("{CONFIG_FILE}: {why}"));
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).map_err(|e| bad(e.to_string()))?;
    let config: PeftConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if config.peft_type != "LORA" {
        return Err(bad(format!("peft_type {:?} is not supported (LORA only)", config.peft_type)));
    }
    let unsupported = config.unsupported();
    if !unsupported.is_empty() {
        return Err(MlError::Adapter(format!(
            "{CONFIG_FILE} uses {} (not supported: Arbiter applies one rank and alpha to every layer, without biases)",
            unsupported.join(", ")
        )));
    }
    let targets = match &config.target_modules {
        TargetModules::List(v) => v.clone(),
        TargetModules::One(s) => Proj::ALL
            .iter()
            .map(|p| p.hf_name().to_string())
            .filter(|n| s == n || s == "all-linear" || s.contains(n.as_str()))
            .collect(),
    };
    let lcfg = LoraConfig::from_names(config.r, config.lora_alpha, config.lora_dropout, &targets).map_err(|e| bad(e.to_string()))?;
    Ok((config, lcfg))
}

/// The adapter's tensors, under PEFT's names without the adapter's own name (`.default.`).
fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>, MlError> {
    let tensors = read_tensors(&dir.join(WEIGHTS_FILE))?;
    Ok(tensors.into_iter().map(|(k, v)| (k.replace(".default.", "."), v)).collect())
}

/// The score head among the adapter's tensors (saved as `modules_to_save`, either way PEFT names it).
fn score_head(tensors: &BTreeMap<String, Tensor>) -> Result<&Tensor, MlError> {
    tensors
        .get(HEAD_NAME)
        .or_else(|| tensors.get("base_model.model.score.modules_to_save.weight"))
        .ok_or_else(|| MlError::Adapter(format!("{WEIGHTS_FILE}: missing score head tensor {HEAD_NAME}")))
}

/// Arbiter's file beside the adapter, or the defaults a PEFT adapter is served with.
fn read_meta(dir: &Path, config: &PeftConfig) -> Result<AdapterMeta, MlError> {
    let meta = match std::fs::read_to_string(dir.join(META_FILE)) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| MlError::Adapter(format!("{META_FILE}: {e}")))?,
        Err(_) => AdapterMeta::without_file(config.base_model_name_or_path.clone().unwrap_or_default()),
    };
    if !(meta.temperature.is_finite() && meta.temperature > 0.0) {
        return Err(MlError::Adapter(format!("{META_FILE}: temperature {} is not a positive number", meta.temperature)));
    }
    Ok(meta)
}
