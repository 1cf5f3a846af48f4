//! Dropout with a counter-based mask: which elements of pair `(2k, 2k + 1)` are kept is a 32-bit
//! hash of `k` and the mask's seed, its upper 16 bits against `p · 2^16` for element `2k`, its
//! lower ones for `2k + 1` (one hash per two elements), and kept elements are scaled by
//! `1 / (1 - p)`. The mask is a pure function of `(seed, i)`: one pass forward, the same pass over
//! the gradient backward, no mask tensor drawn, stored or cast, and the same elements are kept on
//! the CPU and on CUDA (`pair_keep` in `kernels/common.cuh`).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::KernelCheck;

/// Whether element `i` of the mask seeded with `seed` is kept (`threshold = p · 2^16`): the
/// lowbias32 hash of its pair's index mixed with the seed, upper half for an even `i`.
pub fn keep(seed: u64, i: u64, threshold: u32) -> bool {
    let k = i >> 1;
    let mut z = ((k as u32) ^ (seed as u32)).wrapping_add(((k >> 32) as u32).wrapping_mul(0x9e37_79b9));
    z ^= (seed >> 32) as u32;
    z ^= z >> 16;
    z = z.wrapping_mul(0x7feb_352d);
    z ^= z >> 15;
    z = z.wrapping_mul(0x846c_a68b);
    z ^= z >> 16;
    let bits = if i & 1 == 0 { z >> 16 } else { z & 0xffff };
    bits >= threshold
}

struct Dropout {
    seed: u64,
    threshold: u32,
    p: f32,
    scale: f32,
}

impl Dropout {
    fn new(p: f32, seed: u64) -> Dropout {
        let threshold = (p as f64 * 65_536.0).min(65_535.0) as u32;
        Dropout { seed, threshold, p, scale: 1.0 / (1.0 - p) }
    }

    fn out_shape(&self, shape: &Shape) -> Shape {
        shape.clone()
    }

    fn cpu<T: WithDType>(&self, x: &[T], _: &Shape) -> Result<CpuStorage> {
        let mut y = vec![T::from_f64(0.0); x.len()];
        const BLOCK: usize = 1 << 14;
        y.par_chunks_mut(BLOCK).enumerate().for_each(|(blk, out)| {
            for (k, o) in out.iter_mut().enumerate() {
                let i = blk * BLOCK + k;
                if keep(self.seed, i as u64, self.threshold) {
                    // the product rounds in f32 as on the GPU, except for f64 data
                    *o = if T::DTYPE == DType::F64 {
                        T::from_f64(x[i].to_f64() / (1.0 - self.p as f64))
                    } else {
                        T::from_f64((x[i].to_f64() as f32 * self.scale) as f64)
                    };
                }
            }
        });
        Ok(T::to_cpu_storage_owned(y))
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(&self, x: &candle_core::CudaStorage, layout: &candle_core::Layout, suffix: &str) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + WithDType,
    {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (o1, o2) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dropout: input not contiguous".into()))?;
        let dev = x.device().clone();
        let src = x.as_cuda_slice::<T>()?.slice(o1..o2);
        let n = (o2 - o1) as u64;
        // a thread per 16 bytes
        let blocks = n.div_ceil(256 * (16 / std::mem::size_of::<T>()) as u64).clamp(1, 1 << 20) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let func = dev.get_or_load_custom_func(&format!("dropout_{suffix}"), "dropout", KERNELS)?;
        // SAFETY: every element is written by the kernel
        let out = unsafe { dev.alloc::<T>(n as usize)? };
        let mut b = func.builder();
        b.arg(&src).arg(&out).arg(&n).arg(&self.seed).arg(&self.threshold).arg(&self.scale);
        // SAFETY: argument types and order match the kernel's signature
        unsafe { b.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));

impl CustomOp1 for Dropout {
    float_op_forwards!("dropout");
}

/// A mask's threshold (`p · 2^16`) and the scale of kept elements (`1 / (1 - p)`): what the
/// kernels that draw masks themselves take (`lora_group`). `p = 0` gives 0 and 1: everything kept.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn mask_params(p: f32) -> (u32, f32) {
    let d = Dropout::new(p.max(0.0), 0);
    (d.threshold, d.scale)
}

/// The mask applied to `x`, without autograd (the LoRA backward redraws it this way).
pub(crate) fn apply(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Dropout::new(p, seed))
}

/// `x` masked where `p > 0`, else `x` itself (no mask drawn).
pub(crate) fn masked(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p > 0.0 {
        apply(x, p, seed)
    } else {
        Ok(x.clone())
    }
}

/// `dst + dropout(src)` in `dst`'s dtype and shape (the LoRA backward's input gradient through
/// the adapter). On CUDA, with both of one float dtype, one pass adds into `dst`'s storage (the
/// caller must own `dst`) instead of a masked copy and a sum.
pub(crate) fn add_into(dst: Tensor, src: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if dst.shape() != src.shape() {
        candle_core::bail!("dropout add: {:?} into {:?}", src.shape(), dst.shape());
    }
    let fused = dst.device().is_cuda() && dst.dtype() == src.dtype() && matches!(dst.dtype(), DType::F32 | DType::BF16);
    if !fused {
        let dropped = apply(&src.to_dtype(dst.dtype())?, p, seed)?;
        return dst + dropped;
    }
    let dst = dst.contiguous()?;
    dst.inplace_op1(&DropoutAdd { src: &src.contiguous()?, mask: Dropout::new(p, seed) })?;
    Ok(dst)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct DropoutAdd<'a> {
    src: &'a Tensor,
    mask: Dropout,
}

impl candle_core::InplaceOp1 for DropoutAdd<'_> {
    fn name(&self) -> &'static str {
        "dropout-add"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &candle_core::Layout) -> Result<()> {
        candle_core::bail!("dropout-add: the CPU adds the masked copy")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &candle_core::Layout) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("dropout-add: not contiguous".into()))?;
        let dev = s.device().clone();
        let n = (b - a) as u64;
        // a thread per 16 bytes (8 bf16 or 4 f32)
        let per_thread = if s.dtype() == DType::BF16 { 8 } else { 4 };
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(256 * per_thread).clamp(1, 1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let guard = self.src.storage_and_layout().0;
        let m = &self.mask;
        macro_rules! go {
            ($t:ty, $suffix:literal) => {{
                let src = cuda_slice_of!(guard, self.src, $t);
                let mut dst = s.as_cuda_slice_mut::<$t>()?.slice_mut(a..b);
                let func = dev.get_or_load_custom_func(concat!("dropout_add_", $suffix), "dropout", KERNELS)?;
                let mut builder = func.builder();
                builder.arg(&mut dst).arg(&src).arg(&n).arg(&m.seed).arg(&m.threshold).arg(&m.scale);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { builder.launch(cfg) }.w()?;
            }};
        }
        match s.dtype() {
            DType::F32 => go!(f32, "f32"),
            _ => go!(half::bf16, "bf16"),
        }
        Ok(())
    }
}

/// Dropout of probability `p` in `[0, 1)` with the mask seeded by `seed`; differentiable, the
/// backward applies the same mask to the gradient.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is not in [0, 1)");
    }
    let y = apply(&x.detach(), p, seed)?;
    super::ops::with_grad("dropout", x, y, move |xs, _, grad| apply(&grad.to_dtype(xs.dtype())?, p, seed))
}

/// The kernel on `device` against the CPU on the same inputs, f32 and bf16: the same elements
/// kept and the same values (the product rounds in f32 on both), so the tolerance is 0.
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 1000, 257), &cpu)?;
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let x = x.to_dtype(dtype)?;
        let want = apply(&x, 0.1, 12345)?.to_dtype(DType::F32)?;
        let got = apply(&x.to_device(device)?, 0.1, 12345)?.to_device(&cpu)?.to_dtype(DType::F32)?;
        let d = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        out.push(KernelCheck { kernel: "dropout", dtype: format!("{dtype:?}"), chunk: (0, 0), max_abs_diff: d, tolerance: 0.0 });
        // the in-place sum rounds once on the GPU, twice on the CPU in bf16
        let y = x.affine(0.5, 1.0)?;
        let want = add_into(y.copy()?, &x, 0.1, 12345)?;
        let got = add_into(y.to_device(device)?, &x.to_device(device)?, 0.1, 12345)?;
        let rel = if dtype == DType::F32 { 1e-6 } else { 1.0 / 128.0 };
        out.push(KernelCheck::relative("dropout add", format!("{dtype:?}"), (0, 0), &want, &got, rel)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn the_mask_is_seeded_and_keeps_the_right_share() -> Result<()> {
        let x = Tensor::ones((200, 500), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.1, 7)?.flatten_all()?.to_vec1::<f32>()?;
        let b = dropout(&x, 0.1, 7)?.flatten_all()?.to_vec1::<f32>()?;
        let c = dropout(&x, 0.1, 8)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b, "same seed, same mask");
        assert_ne!(a, c, "another seed, another mask");
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped share {dropped}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.9).abs() < 1e-6), "kept elements scaled by 1/(1-p)");
        // the two elements of a pair take independent halves of one hash
        let both = a.chunks(2).filter(|p| p[0] != 0.0 && p[1] != 0.0).count() as f64 / (a.len() / 2) as f64;
        assert!((both - 0.81).abs() < 0.01, "both of a pair kept: {both}");
        Ok(())
    }

    #[test]
    fn the_backward_applies_the_same_mask() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 300), &Device::Cpu)?)?;
        let probe = Tensor::randn(0f32, 1.0, (4, 300), &Device::Cpu)?;
        let y = dropout(x.as_tensor(), 0.3, 99)?;
        let g = (&y * &probe)?.sum_all()?.backward()?.get(x.as_tensor()).expect("gradient").clone();
        // d(sum(y * probe))/dx = probe * mask / (1 - p) = dropout(probe)
        let want = dropout(&probe, 0.3, 99)?;
        let d = (g - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn the_in_place_sum_adds_the_masked_copy() -> Result<()> {
        let dst = Tensor::randn(0f32, 1.0, (3, 200), &Device::Cpu)?;
        let src = Tensor::randn(0f32, 1.0, (3, 200), &Device::Cpu)?;
        let got = add_into(dst.copy()?, &src, 0.2, 5)?;
        let d = (got - (dst + dropout(&src, 0.2, 5)?)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        assert!(add_into(Tensor::zeros(4, DType::F32, &Device::Cpu)?, &Tensor::zeros(5, DType::F32, &Device::Cpu)?, 0.2, 5).is_err());
        Ok(())
    }

    #[test]
    fn a_probability_outside_zero_one_is_refused() {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(dropout(&x, 1.0, 1).is_err());
        assert!(dropout(&x, -0.1, 1).is_err());
        assert!(dropout(&x, 0.0, 1).is_ok());
    }
}
