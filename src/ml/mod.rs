//! Candle code: model loading, tokenizer, LoRA, classifier, training, batched inference,
//! adapter (de)serialization. Knows nothing of HTTP or SQL.

/// A captured tensor's CUDA slice of element type `$ty`, checked contiguous; `$guard` is the
/// tensor's storage read guard (`t.storage_and_layout().0`), which keeps the slice alive.
#[cfg(feature = "cuda")]
macro_rules! cuda_slice_of {
    ($guard:ident, $t:expr, $ty:ty) => {{
        let (o1, o2) = $t
            .layout()
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: input not contiguous", stringify!($t))))?;
        match &*$guard {
            candle_core::Storage::Cuda(c) => c.as_cuda_slice::<$ty>()?.slice(o1..o2),
            _ => candle_core::bail!("{}: input not on the cuda device", stringify!($t)),
        }
    }};
}

pub mod adapter;
pub mod calibrate;
pub mod causal_softmax;
pub mod dropout;
pub mod classifier;
pub mod fsutil;
pub mod llama;
pub mod model;
pub mod norm;
pub mod lora;
pub mod observe;
pub mod ops;
pub mod serve;
pub mod tokenizer;
pub mod train;

/// One comparison of a device kernel's output with the CPU's on the same inputs
/// (`arbiter bench kernels`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub dtype: String,
    /// First query of the chunk and its length (attention kernels).
    pub chunk: (usize, usize),
    pub max_abs_diff: f32,
    pub tolerance: f32,
}

impl KernelCheck {
    pub fn ok(&self) -> bool {
        self.max_abs_diff <= self.tolerance
    }
}

/// Every device kernel of Arbiter's own against the CPU.
pub fn check_kernels(device: &candle_core::Device) -> candle_core::Result<Vec<KernelCheck>> {
    let mut checks = causal_softmax::check_device(device)?;
    checks.extend(dropout::check_device(device)?);
    checks.extend(norm::check_device(device)?);
    Ok(checks)
}

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// The model files are missing, malformed or of an unsupported architecture.
    #[error("model: {0}")]
    Model(String),
    /// The adapter files are missing or do not fit the base model.
    #[error("adapter: {0}")]
    Adapter(String),
    /// The caller's input cannot be processed (empty rows, bad shapes...).
    #[error("input: {0}")]
    Input(String),
    /// Hyperparameters that do not fit this model or data.
    #[error("config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
