//! GGML-quantized weights dequantized on the GPU straight to bf16 (`kernels/quant.cu`): the
//! 4-bit frozen linears' GEMMs run on a dense copy of the weight made per call, which candle
//! builds as f32 and then casts, writing and reading four times the bytes of the bf16 result.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use super::KernelCheck;

/// `q` as a bf16 tensor of its shape, where a kernel of `kernels/quant.cu` takes its type on
/// the GPU (Q4_0, Q4_1, Q8_0); `None` elsewhere (the caller dequantizes through candle).
pub fn dequantize_bf16(q: &QTensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = q.device() {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let kernel = match q.dtype() {
            GgmlDType::Q4_0 => "dequant_q4_0_bf16",
            GgmlDType::Q4_1 => "dequant_q4_1_bf16",
            GgmlDType::Q8_0 => "dequant_q8_0_bf16",
            _ => return Ok(None),
        };
        let n = q.shape().elem_count();
        let blocks = n / 32;
        let func = dev.get_or_load_custom_func(kernel, "quant", KERNELS)?;
        // SAFETY: each of the `blocks` blocks writes its 32 elements
        let out = unsafe { dev.alloc::<half::bf16>(n)? };
        let stream = dev.cuda_stream();
        // the guard orders later writes to the weight after this read (none happen: it is frozen)
        let (src, _guard) = q.device_ptr_with_guard(&stream)?;
        let src = src as u64;
        let blocks_u = blocks as u64;
        let grid = blocks.div_ceil(256).min(132 * 16) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&src).arg(&out).arg(&blocks_u);
        // SAFETY: argument types and order match the kernel's signature; `src` holds `blocks`
        // blocks of the kernel's type
        unsafe { b.launch(cfg) }.w()?;
        let storage = candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()));
        return Ok(Some(Tensor::from_storage(storage, q.shape().clone(), candle_core::op::BackpropOp::none(), false)));
    }
    let _ = q;
    Ok(None)
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/quant.ptx"));

/// The bf16 dequantization on `device` against candle's on the CPU (f32, then cast): equal
/// bit for bit, for each type with a kernel.
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    if device.is_cpu() {
        return Ok(out);
    }
    let w = Tensor::randn(0f32, 0.05, (96, 256), &cpu)?;
    for (kernel, t) in [("dequant-q4_0", GgmlDType::Q4_0), ("dequant-q4_1", GgmlDType::Q4_1), ("dequant-q8_0", GgmlDType::Q8_0)] {
        let want = QTensor::quantize(&w, t)?.dequantize(&cpu)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let q = QTensor::quantize_onto(&w, t, device)?;
        let got = dequantize_bf16(&q)?
            .ok_or_else(|| candle_core::Error::Msg(format!("no bf16 dequantization for {t:?} on {device:?}")))?;
        let got = got.to_device(&cpu)?.to_dtype(DType::F32)?;
        let d = (&want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        out.push(KernelCheck { kernel, dtype: "BF16".into(), chunk: (0, 0), max_abs_diff: d, tolerance: 0.0 });
    }
    Ok(out)
}
