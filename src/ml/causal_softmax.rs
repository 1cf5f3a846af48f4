//! The causal softmax of chunked attention as one fused pass per score row, forward and
//! backward, with the mask computed from indices instead of read from a mask tensor.
//!
//! Unfused, one chunk's forward is `softmax(scores + mask)` (an add over the whole score block,
//! then the softmax) and its backward `p * (dp - D)` (a broadcast subtract and a multiply over
//! the block, after recomputing `p` the same way): five passes over the largest tensors of the
//! step. Fused it is one pass forward and one backward, which returns `p` and `ds` together.
//! CUDA runs `kernels/causal_softmax.cu`; the CPU runs the same arithmetic row by row (f64).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::KernelCheck;

/// Which keys each query of a batch sees: key `j` is visible to query `i` of row `r` iff
/// `starts[r] <= j <= i`; a padding query before its row's start sees only itself (its output
/// is never used).
#[derive(Clone, Debug)]
pub struct CausalSpans {
    starts: Vec<u32>,
    /// The same starts on the tensors' device (read by the CUDA kernel).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device_starts: Tensor,
}

impl CausalSpans {
    pub fn new(starts: &[usize], device: &Device) -> Result<CausalSpans> {
        let starts: Vec<u32> = starts.iter().map(|&s| s as u32).collect();
        let device_starts = Tensor::new(starts.as_slice(), device)?;
        Ok(CausalSpans { starts, device_starts })
    }

    pub fn batch(&self) -> usize {
        self.starts.len()
    }

    /// Whether these are the spans of rows starting at `starts`.
    pub fn starts_are(&self, starts: &[usize]) -> bool {
        self.starts.len() == starts.len() && self.starts.iter().zip(starts).all(|(a, b)| *a as usize == *b)
    }

    /// The starts on the tensors' device (read by the CUDA kernels).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn device_starts(&self) -> &Tensor {
        &self.device_starts
    }

    /// The visible keys `lo..=hi` of query `q` of batch row `r`.
    fn visible(&self, r: usize, q: usize) -> (usize, usize) {
        let s = self.starts[r] as usize;
        (if q < s { q } else { s }, q)
    }

    /// The additive mask of queries `c0..c0 + c` against keys `0..c0 + c`, `[b, 1, c, c0 + c]`
    /// (0 visible, -inf hidden): what the fused op computes from indices, as a tensor.
    pub fn mask(&self, c0: usize, c: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let (b, cols) = (self.batch(), c0 + c);
        let mut m = vec![f32::NEG_INFINITY; b * c * cols];
        for r in 0..b {
            for i in 0..c {
                let (lo, hi) = self.visible(r, c0 + i);
                m[(r * c + i) * cols..][lo..=hi].fill(0.0);
            }
        }
        Tensor::from_vec(m, (b, 1, c, cols), device)?.to_dtype(dtype)
    }
}

/// One chunk's geometry: queries `c0..c0 + c`; score rows are `[b, groups, rep * c]` in
/// grouped-query order, so row `k` is query `c0 + k % c` of batch row `k / rows_per_batch`.
struct Chunk<'a> {
    spans: &'a CausalSpans,
    c0: usize,
    c: usize,
    scale: f32,
    /// For the backward: `dp` (same shape as the scores) and `D` (one f32 per score row).
    grad: Option<(&'a Tensor, &'a Tensor)>,
}

impl Chunk<'_> {
    /// (rows, cols, rows per batch row) of a score block, checked against the spans.
    fn geometry(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let cols = shape.dims().last().copied().unwrap_or(0);
        let rows = shape.elem_count() / cols.max(1);
        let b = self.spans.batch();
        if cols != self.c0 + self.c || !rows.is_multiple_of(b * self.c) {
            candle_core::bail!(
                "causal softmax: scores {shape:?} do not fit {b} rows of queries {}..{}",
                self.c0,
                self.c0 + self.c
            );
        }
        Ok((rows, cols, rows / b))
    }

    fn out_shape(&self, shape: &Shape) -> Shape {
        match self.grad {
            None => shape.clone(),
            Some(_) => {
                let mut d = vec![2];
                d.extend_from_slice(shape.dims());
                Shape::from(d)
            }
        }
    }

    fn cpu<T: WithDType>(&self, s: &[T], shape: &Shape) -> Result<CpuStorage> {
        let (rows, cols, per_batch) = self.geometry(shape)?;
        let n = rows * cols;
        let scale = self.scale as f64;
        // the visible keys' probabilities of row k into `probs` (f64) and `p`; everything
        // outside `lo..=hi` stays the zero the output starts as
        let row_softmax = |k: usize, p: &mut [T], probs: &mut Vec<f64>| -> usize {
            let (lo, hi) = self.spans.visible(k / per_batch, self.c0 + k % self.c);
            let x = &s[k * cols + lo..=k * cols + hi];
            let m = x.iter().map(|v| scale * v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
            probs.clear();
            probs.extend(x.iter().map(|v| (scale * v.to_f64() - m).exp()));
            let inv = 1.0 / probs.iter().sum::<f64>();
            for (o, e) in p[lo..=hi].iter_mut().zip(probs.iter_mut()) {
                *e *= inv;
                *o = T::from_f64(*e);
            }
            lo
        };
        let mut out = vec![T::from_f64(0.0); n * if self.grad.is_some() { 2 } else { 1 }];
        match self.grad {
            None => out.par_chunks_mut(cols).enumerate().for_each_init(Vec::new, |probs, (k, p)| {
                row_softmax(k, p, probs);
            }),
            Some((dp, dsum)) => {
                let dp: Vec<f64> = dp.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                let dsum: Vec<f64> = dsum.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                if dp.len() != n || dsum.len() != rows {
                    candle_core::bail!("causal softmax backward: dp has {} values and D {}, expected {n} and {rows}", dp.len(), dsum.len());
                }
                let (p_out, ds_out) = out.split_at_mut(n);
                p_out.par_chunks_mut(cols).zip(ds_out.par_chunks_mut(cols)).enumerate().for_each_init(
                    Vec::new,
                    |probs, (k, (p, ds))| {
                        let lo = row_softmax(k, p, probs);
                        let dp_row = &dp[k * cols + lo..];
                        for ((o, pr), d) in ds[lo..].iter_mut().zip(probs.iter()).zip(dp_row) {
                            *o = T::from_f64(scale * pr * (d - dsum[k]));
                        }
                    },
                );
            }
        }
        Ok(T::to_cpu_storage_owned(out))
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(&self, s: &candle_core::CudaStorage, layout: &candle_core::Layout, suffix: &str) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + WithDType,
    {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let (rows, cols, per_batch) = self.geometry(layout.shape())?;
        let (o1, o2) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("causal softmax: scores not contiguous".into()))?;
        let dev = s.device().clone();
        let scores = s.as_cuda_slice::<T>()?.slice(o1..o2);
        let n = rows * cols;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let starts_guard = self.spans.device_starts.storage_and_layout().0;
        let starts = cuda_slice_of!(starts_guard, self.spans.device_starts, u32);
        let (rows_i, cols_i, c_i, c0_i, per_batch_i) = (rows as i32, cols as i32, self.c as i32, self.c0 as i32, per_batch as i32);
        match self.grad {
            None => {
                let func = dev.get_or_load_custom_func(&format!("causal_softmax_fwd_{suffix}"), "causal_softmax", KERNELS)?;
                // SAFETY: every element is written by the kernel
                let out = unsafe { dev.alloc::<T>(n)? };
                let mut b = func.builder();
                b.arg(&scores).arg(&out).arg(&rows_i).arg(&cols_i).arg(&c_i).arg(&c0_i).arg(&per_batch_i).arg(&starts).arg(&self.scale);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { b.launch(cfg) }.w()?;
                Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
            }
            Some((dp, dsum)) => {
                let dp_guard = dp.storage_and_layout().0;
                let dp_s = cuda_slice_of!(dp_guard, dp, T);
                let dsum_guard = dsum.storage_and_layout().0;
                let dsum_s = cuda_slice_of!(dsum_guard, dsum, f32);
                if dp_s.len() != n || dsum_s.len() != rows {
                    candle_core::bail!("causal softmax backward: dp has {} values and D {}, expected {n} and {rows}", dp_s.len(), dsum_s.len());
                }
                let func = dev.get_or_load_custom_func(&format!("causal_softmax_bwd_{suffix}"), "causal_softmax", KERNELS)?;
                // SAFETY: every element of both halves is written by the kernel
                let out = unsafe { dev.alloc::<T>(2 * n)? };
                let mut b = func.builder();
                b.arg(&scores).arg(&dp_s).arg(&dsum_s).arg(&out);
                b.arg(&rows_i).arg(&cols_i).arg(&c_i).arg(&c0_i).arg(&per_batch_i).arg(&starts).arg(&self.scale);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { b.launch(cfg) }.w()?;
                Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
            }
        }
    }
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/causal_softmax.ptx"));

impl CustomOp1 for Chunk<'_> {
    float_op_forwards!("causal-softmax");
}

/// `softmax(scale * scores)` over each query's visible keys (0 elsewhere) for the chunk of
/// queries `c0..c0 + c`; `scores` is `[b, groups, rep * c, c0 + c]`. No autograd.
pub fn forward(scores: &Tensor, spans: &CausalSpans, c0: usize, c: usize, scale: f32) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&Chunk { spans, c0, c, scale, grad: None })
}

/// The forward's `p` and the gradient of the (unscaled) scores `ds = scale * p * (dp - D)` in
/// one pass: `dp` has the scores' shape and dtype, `dsum` (`D`) one value per score row. No
/// autograd.
pub fn backward(
    scores: &Tensor,
    dp: &Tensor,
    dsum: &Tensor,
    spans: &CausalSpans,
    c0: usize,
    c: usize,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let dp = dp.to_dtype(scores.dtype())?.contiguous()?;
    // the CUDA kernel reads D as f32; the CPU reads any float type
    let dsum = if dsum.device().is_cpu() { dsum.contiguous()? } else { dsum.to_dtype(DType::F32)?.contiguous()? };
    let both = scores.contiguous()?.apply_op1_no_bwd(&Chunk { spans, c0, c, scale, grad: Some((&dp, &dsum)) })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// Runs the fused kernels on `device` and on the CPU (f64 arithmetic) with the same random
/// inputs, in f32 and bf16, over chunk shapes attention uses (rows of up to 1,024 keys, batch
/// rows padded on the left). Tolerances: 1e-5 absolute in f32; in bf16 one unit in the last
/// place, 2^-7 relative (the device's f32 result and the CPU's f64 one may round to neighbouring
/// values): 8e-3 on p <= 1, and on ds times the largest |scale * (dp - D)|.
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let (b, g, rep) = (3, 2, 3);
    let starts = [0usize, 5, 700];
    let spans_cpu = CausalSpans::new(&starts, &cpu)?;
    let spans_dev = CausalSpans::new(&starts, device)?;
    let max = |t: Tensor| -> Result<f32> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
    let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
        max((a.to_device(&cpu)?.to_dtype(DType::F32)? - b.to_device(&cpu)?.to_dtype(DType::F32)?)?)
    };
    let mut out = Vec::new();
    for (c0, c) in [(0, 256), (256, 256), (768, 256), (1000, 24)] {
        let cols = c0 + c;
        let s = Tensor::randn(0f32, 3.0, (b, g, rep * c, cols), &cpu)?;
        let dp = Tensor::randn(0f32, 1.0, (b, g, rep * c, cols), &cpu)?;
        let dsum = Tensor::randn(0f32, 1.0, (b, g, rep * c, 1), &cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
            let (s, dp) = (s.to_dtype(dtype)?, dp.to_dtype(dtype)?);
            let scale = 0.125 * max(dp.to_dtype(DType::F32)?.broadcast_sub(&dsum)?)?.max(1.0);
            let p_cpu = forward(&s, &spans_cpu, c0, c, 0.125)?;
            let (p2_cpu, ds_cpu) = backward(&s, &dp, &dsum, &spans_cpu, c0, c, 0.125)?;
            let p_dev = forward(&s.to_device(device)?, &spans_dev, c0, c, 0.125)?;
            let (p2_dev, ds_dev) =
                backward(&s.to_device(device)?, &dp.to_device(device)?, &dsum.to_device(device)?, &spans_dev, c0, c, 0.125)?;
            let check = |kernel, d, tolerance| KernelCheck { kernel, dtype: format!("{dtype:?}"), chunk: (c0, c), max_abs_diff: d, tolerance };
            out.push(check("forward p", diff(&p_dev, &p_cpu)?, tol));
            out.push(check("backward p", diff(&p2_dev, &p2_cpu)?, tol));
            out.push(check("backward ds", diff(&ds_dev, &ds_cpu)?, tol * scale));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused ops against the unfused reference: mask tensor, candle's softmax, and the
    /// backward formula written out, over two query chunks of a grouped layout.
    #[test]
    fn fused_matches_mask_then_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let (b, g, rep) = (2, 2, 3);
        let spans = CausalSpans::new(&[0, 3], &dev)?;
        for (c0, c) in [(0, 4), (4, 3)] {
            let cols = c0 + c;
            let s = Tensor::randn(0f64, 2.0, (b, g, rep * c, cols), &dev)?;
            let dp = Tensor::randn(0f64, 1.0, (b, g, rep * c, cols), &dev)?;
            let dsum = Tensor::randn(0f64, 1.0, (b, g, rep * c, 1), &dev)?;
            let mask = spans.mask(c0, c, DType::F64, &dev)?;
            let mask = mask.unsqueeze(2)?.broadcast_as((b, 1, rep, c, cols))?.reshape((b, 1, rep * c, cols))?;
            let p_ref = candle_nn::ops::softmax_last_dim(&(s.affine(0.5, 0.0)?.broadcast_add(&mask)?))?;
            // the gradient of the unscaled scores: the scale 0.5 comes back once
            let ds_ref = ((&p_ref * dp.broadcast_sub(&dsum)?)? * 0.5)?;
            let p = forward(&s, &spans, c0, c, 0.5)?;
            let (p2, ds) = backward(&s, &dp, &dsum, &spans, c0, c, 0.5)?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f64> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>() };
            assert!(diff(&p, &p_ref)? < 1e-12, "forward, chunk at {c0}");
            assert!(diff(&p2, &p_ref)? < 1e-12, "backward's p, chunk at {c0}");
            assert!(diff(&ds, &ds_ref)? < 1e-12, "backward's ds, chunk at {c0}");
        }
        Ok(())
    }

    /// The device kernels against the CPU where a CUDA device is present (the GPU machine;
    /// also `arbiter bench kernels --device cuda`); passes trivially elsewhere.
    #[test]
    fn cuda_kernels_match_the_cpu() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return Ok(());
        };
        for c in super::super::check_kernels(&gpu)? {
            assert!(c.ok(), "{c:?}");
        }
        Ok(())
    }

    #[test]
    fn a_padding_query_sees_only_itself() -> Result<()> {
        let spans = CausalSpans::new(&[2], &Device::Cpu)?;
        let m = spans.mask(0, 4, DType::F32, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let seen: Vec<Vec<usize>> =
            m.chunks(4).map(|r| (0..4).filter(|&j| r[j] == 0.0).collect()).collect();
        assert_eq!(seen, vec![vec![0], vec![1], vec![2], vec![2, 3]]);
        Ok(())
    }

    #[test]
    fn misfit_shapes_are_refused() -> Result<()> {
        let spans = CausalSpans::new(&[0, 0], &Device::Cpu)?;
        let s = Tensor::zeros((2, 1, 3, 5), DType::F32, &Device::Cpu)?;
        assert!(forward(&s, &spans, 0, 3, 1.0).is_err(), "5 keys for queries 0..3");
        assert!(forward(&s, &spans, 2, 3, 1.0).is_ok());
        Ok(())
    }
}
