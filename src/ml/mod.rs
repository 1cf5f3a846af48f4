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

/// `name`, `cpu_fwd` and `cuda_fwd` of a `CustomOp1` over a contiguous float input. The op's
/// type provides `cpu::<T>(&self, &[T], &Shape) -> Result<CpuStorage>` for every float type,
/// `cuda::<T>(&self, &CudaStorage, &Layout, suffix) -> Result<CudaStorage>` for its f32 and
/// bf16 kernels (`suffix` names the kernel's variant), and `out_shape(&self, &Shape) -> Shape`.
macro_rules! float_op_forwards {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            storage: &candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            use candle_core::CpuStorage as S;
            let (o1, o2) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg(concat!($name, ": input not contiguous").into()))?;
            let out = match storage {
                S::F32(v) => self.cpu(&v[o1..o2], layout.shape())?,
                S::F64(v) => self.cpu(&v[o1..o2], layout.shape())?,
                S::BF16(v) => self.cpu(&v[o1..o2], layout.shape())?,
                S::F16(v) => self.cpu(&v[o1..o2], layout.shape())?,
                other => candle_core::bail!(
                    "{}: unsupported dtype {:?}",
                    $name,
                    candle_core::backend::BackendStorage::dtype(other)
                ),
            };
            Ok((out, self.out_shape(layout.shape())))
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            storage: &candle_core::CudaStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            use candle_core::backend::BackendStorage;
            let out = match storage.dtype() {
                candle_core::DType::F32 => self.cuda::<f32>(storage, layout, "f32")?,
                candle_core::DType::BF16 => self.cuda::<half::bf16>(storage, layout, "bf16")?,
                d => candle_core::bail!("{}: no CUDA kernel for {d:?}", $name),
            };
            Ok((out, self.out_shape(layout.shape())))
        }
    };
}

pub mod adapter;
pub(crate) mod adamw;
mod block;
pub mod calibrate;
pub mod causal_softmax;
pub mod dropout;
pub mod classifier;
pub mod fsutil;
pub mod flash;
pub mod fused;
pub mod gemm;
pub mod host_table;
pub mod graph;
pub mod llama;
pub mod model;
pub mod norm;
pub mod offload;
pub mod lora;
pub mod lora_group;
pub mod observe;
pub mod pool;
pub mod quant;
pub mod rope;
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

    /// `got` (on any device) against the CPU's `want`, both in f32: the largest absolute
    /// difference, within `rel` times `want`'s largest magnitude.
    pub fn relative(kernel: &'static str, dtype: String, chunk: (usize, usize), want: &candle_core::Tensor, got: &candle_core::Tensor, rel: f32) -> candle_core::Result<KernelCheck> {
        let f32s = candle_core::DType::F32;
        let want = want.to_dtype(f32s)?;
        let got = got.to_device(&candle_core::Device::Cpu)?.to_dtype(f32s)?;
        let largest = |t: &candle_core::Tensor| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
        let max_abs_diff = largest(&(&want - got)?)?;
        Ok(KernelCheck { kernel, dtype, chunk, max_abs_diff, tolerance: rel * largest(&want)? })
    }
}

/// Every device kernel of Arbiter's own against the CPU.
pub fn check_kernels(device: &candle_core::Device) -> candle_core::Result<Vec<KernelCheck>> {
    let mut checks = causal_softmax::check_device(device)?;
    checks.extend(dropout::check_device(device)?);
    checks.extend(norm::check_device(device)?);
    checks.extend(ops::check_device(device)?);
    checks.extend(fused::check_device(device)?);
    checks.extend(adamw::check_device(device)?);
    checks.extend(flash::check_device(device)?);
    checks.extend(quant::check_device(device)?);
    checks.extend(gemm::check_device(device)?);
    checks.extend(graph::check_device(device)?);
    checks.extend(rope::check_device(device)?);
    checks.extend(lora_group::check_device(device)?);
    checks.extend(offload::check_device(device)?);
    checks.extend(block::check_device(device)?);
    checks.extend(host_table::check_device(device)?);
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
