//! RMSNorm and its input gradient as one pass per row. With `r = 1/sqrt(mean(x²) + eps)`: the
//! forward is `x·r·w`, and with `u = g·w` the backward `dx = r·u − x·r³·mean(u·x)`. Unfused the
//! backward is a dozen f32 element-wise passes and casts over `[tokens, hidden]` per norm; here
//! it is two row reductions and one write (`kernels/rms_norm.cu` on CUDA, a warp per row with
//! 16-byte accesses, or for long rows a block per row that keeps it in registers, so it is read
//! once; the same arithmetic in f64 on the CPU).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::KernelCheck;

/// The norm of `x` (`grad` `None`) or its input gradient for the output gradient `grad`.
struct RmsNormRows<'a> {
    grad: Option<&'a Tensor>,
    weight: &'a Tensor,
    /// The residual stream's gradient, added to the result.
    residual: Option<&'a Tensor>,
    eps: f32,
    /// The forward's output rows: this many elements (at least the input's), the norm in the
    /// first columns and the rest left for the caller to fill (zeros on the CPU).
    width: Option<usize>,
}

impl RmsNormRows<'_> {
    fn rows(&self, shape: &Shape) -> Result<(usize, usize)> {
        let n = shape.dims().last().copied().unwrap_or(0);
        if self.grad.is_some_and(|g| g.shape() != shape) || self.weight.dims() != [n] || self.residual.is_some_and(|r| r.shape() != shape) {
            candle_core::bail!(
                "rms-norm: x {shape:?}, gradient {:?} and weight {:?} do not fit",
                self.grad.map(|g| g.shape()),
                self.weight.shape()
            );
        }
        Ok((shape.elem_count() / n.max(1), n))
    }

    fn out_shape(&self, shape: &Shape) -> Shape {
        match self.width {
            Some(w) => {
                let mut dims = shape.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = w;
                }
                Shape::from(dims)
            }
            None => shape.clone(),
        }
    }

    /// The output's row length.
    fn ldy(&self, n: usize) -> usize {
        self.width.unwrap_or(n).max(n)
    }

    fn cpu<T: WithDType>(&self, x: &[T], shape: &Shape) -> Result<CpuStorage> {
        let (_, n) = self.rows(shape)?;
        let w: Vec<f64> = self.weight.to_dtype(DType::F64)?.to_vec1()?;
        let eps = self.eps as f64;
        let Some(grad) = self.grad else {
            let ldy = self.ldy(n);
            let mut y = vec![T::from_f64(0.0); x.len() / n.max(1) * ldy];
            y.par_chunks_mut(ldy.max(1)).zip(x.par_chunks(n.max(1))).for_each(|(out, xr)| {
                let r = 1.0 / (xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / n as f64 + eps).sqrt();
                for ((o, xv), wv) in out.iter_mut().zip(xr).zip(&w) {
                    *o = T::from_f64(xv.to_f64() * r * wv);
                }
            });
            return Ok(T::to_cpu_storage_owned(y));
        };
        let g: Vec<f64> = grad.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let res: Option<Vec<f64>> = self.residual.map(|r| r.flatten_all()?.to_dtype(DType::F64)?.to_vec1()).transpose()?;
        let mut dx = vec![T::from_f64(0.0); x.len()];
        dx.par_chunks_mut(n.max(1)).enumerate().for_each(|(row, out)| {
            let (xr, gr) = (&x[row * n..(row + 1) * n], &g[row * n..(row + 1) * n]);
            let sxx: f64 = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            let sux: f64 = (0..n).map(|j| gr[j] * w[j] * xr[j].to_f64()).sum();
            let r = 1.0 / (sxx / n as f64 + eps).sqrt();
            let c = r * r * r * sux / n as f64;
            for (j, o) in out.iter_mut().enumerate() {
                let v = r * gr[j] * w[j] - xr[j].to_f64() * c;
                *o = T::from_f64(v + res.as_ref().map_or(0.0, |res| res[row * n + j]));
            }
        });
        Ok(T::to_cpu_storage_owned(dx))
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(&self, x: &candle_core::CudaStorage, layout: &candle_core::Layout, suffix: &str) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + WithDType,
    {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (rows, n) = self.rows(layout.shape())?;
        let (o1, o2) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("rms-norm backward: x not contiguous".into()))?;
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(o1..o2);
        let weight = self.weight;
        let w_guard = weight.storage_and_layout().0;
        let ws = cuda_slice_of!(w_guard, weight, T);
        // a warp per row, eight rows per block; rows of 256 to 1,024 16-byte pieces, every
        // operand aligned, a block of 128 threads each (the `_row` kernels)
        let size = std::mem::size_of::<T>();
        let pieces = n * size / 16;
        let aligned = |t: Option<&Tensor>, offset: usize| t.is_none_or(|t| t.layout().start_offset() * size % 16 == 0) && offset * size % 16 == 0;
        let ldy = if self.grad.is_some() { n } else { self.ldy(n) };
        let by_row = (n * size).is_multiple_of(16)
            && (ldy * size).is_multiple_of(16)
            && (256..=1024).contains(&pieces)
            && aligned(Some(weight), o1)
            && aligned(self.grad, 0)
            && aligned(self.residual, 0);
        let (cfg, row) = if by_row {
            (LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }, "_row")
        } else {
            (LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }, "")
        };
        // SAFETY: every element is written by the kernel
        let out = unsafe { dev.alloc::<T>(rows * ldy)? };
        let (rows_i, n_i, ldy_i) = (rows as i32, n as i32, ldy as i32);
        let Some(grad) = self.grad else {
            let func = dev.get_or_load_custom_func(&format!("rms_norm_fwd{row}_{suffix}"), "rms_norm", KERNELS)?;
            let mut b = func.builder();
            b.arg(&xs).arg(&ws).arg(&out);
            if !by_row {
                b.arg(&rows_i);
            }
            b.arg(&n_i).arg(&ldy_i).arg(&self.eps);
            // SAFETY: argument types and order match the kernel's signature
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            return Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev));
        };
        let g_guard = grad.storage_and_layout().0;
        let gs = cuda_slice_of!(g_guard, grad, T);
        let r_guard = self.residual.map(|r| r.storage_and_layout().0);
        let rs = match (r_guard.as_ref(), self.residual) {
            (Some(guard), Some(residual)) => {
                let storage: &candle_core::Storage = guard;
                Some(cuda_slice_of!(storage, residual, T))
            }
            _ => None,
        };
        let func = dev.get_or_load_custom_func(&format!("rms_norm_bwd{row}_{suffix}"), "rms_norm", KERNELS)?;
        let mut b = func.builder();
        // a null pointer when there is no residual
        let null = 0u64;
        b.arg(&xs).arg(&gs).arg(&ws);
        match &rs {
            Some(rs) => b.arg(rs),
            None => b.arg(&null),
        };
        b.arg(&out);
        if !by_row {
            b.arg(&rows_i);
        }
        b.arg(&n_i).arg(&self.eps);
        // SAFETY: argument types and order match the kernel's signature
        unsafe { b.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));

impl CustomOp1 for RmsNormRows<'_> {
    float_op_forwards!("rms-norm");
}

/// The input gradient of `x / rms(x) * weight` for the output gradient `grad`, in `x`'s dtype.
/// No autograd.
pub fn rms_norm_backward(x: &Tensor, grad: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    rms_norm_backward_add(x, grad, weight, eps, None)
}

/// `rms_norm_backward` plus `residual` (the gradient reaching `x` around the norm, of `x`'s
/// shape), in the same pass and rounded once.
pub fn rms_norm_backward_add(x: &Tensor, grad: &Tensor, weight: &Tensor, eps: f32, residual: Option<&Tensor>) -> Result<Tensor> {
    let dtype = x.dtype();
    let grad = grad.to_dtype(dtype)?.contiguous()?;
    let weight = weight.to_dtype(dtype)?.contiguous()?;
    let residual = residual.map(|r| r.to_dtype(dtype)?.contiguous()).transpose()?;
    x.contiguous()?.apply_op1_no_bwd(&RmsNormRows { grad: Some(&grad), weight: &weight, residual: residual.as_ref(), eps, width: None })
}

/// `x / rms(x) * weight` over the last dimension, in `x`'s dtype, by the row kernel (f64 arithmetic
/// on the CPU). No autograd.
pub fn rms_norm_forward(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    rms_norm_forward_wide(x, weight, eps, x.dims().last().copied().unwrap_or(0))
}

/// `rms_norm_forward` into the first columns of a new `[.., width]` tensor (`width` at least
/// `x`'s last dimension), the rest of each row left for the caller to write (zeros on the CPU,
/// unwritten memory on CUDA): the norm as the first part of a wider GEMM operand, with no copy.
pub fn rms_norm_forward_wide(x: &Tensor, weight: &Tensor, eps: f32, width: usize) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    if width < n {
        candle_core::bail!("rms-norm: rows of {width} cannot hold {n} columns");
    }
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op1_no_bwd(&RmsNormRows { grad: None, weight: &weight, residual: None, eps, width: Some(width) })
}

/// The kernels (backward with and without the residual, forward) on `device` against the CPU
/// (f64) on the same inputs, f32 and bf16, for the hidden sizes of both shapes and one between.
/// Tolerances relative to the largest output: 1e-5 in f32, and in bf16 one rounding of the output
/// plus the inputs' (2^-7).
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    // 576: a warp per row; 2,048 and 4,096: a block per row (bf16; f32 at 2,048 and 4,096 too)
    for n in [576usize, 2048, 4096] {
        let x = Tensor::randn(0f32, 1.0, (37, n), &cpu)?;
        let g = Tensor::randn(0f32, 1.0, (37, n), &cpu)?;
        let w = Tensor::randn(1f32, 0.2, n, &cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let (x, g, w) = (x.to_dtype(dtype)?, g.to_dtype(dtype)?, w.to_dtype(dtype)?);
            let res = (&g * 0.5)?;
            let tol = if dtype == DType::F32 { 1e-5 } else { 1.0 / 128.0 };
            for (kernel, residual) in [("rms-norm backward", None), ("rms-norm backward + residual", Some(&res))] {
                let want = rms_norm_backward_add(&x, &g, &w, 1e-5, residual)?;
                let res_d = residual.map(|r| r.to_device(device)).transpose()?;
                let got = rms_norm_backward_add(&x.to_device(device)?, &g.to_device(device)?, &w.to_device(device)?, 1e-5, res_d.as_ref())?;
                out.push(KernelCheck::relative(kernel, format!("{dtype:?}"), (0, n), &want, &got, tol)?);
            }
            let want = rms_norm_forward(&x, &w, 1e-5)?;
            let got = rms_norm_forward(&x.to_device(device)?, &w.to_device(device)?, 1e-5)?;
            out.push(KernelCheck::relative("rms-norm", format!("{dtype:?}"), (0, n), &want, &got, tol)?);
            // into the first columns of wider rows (48 more: three rank-16 products' room)
            let wide = rms_norm_forward_wide(&x.to_device(device)?, &w.to_device(device)?, 1e-5, n + 48)?;
            out.push(KernelCheck::relative("rms-norm into wider rows", format!("{dtype:?}"), (0, n), &want, &wide.narrow(1, 0, n)?, tol)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the formula written out with tensor ops, in f64.
    #[test]
    fn matches_the_unfused_formula() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 6), &dev)?;
        let g = Tensor::randn(0f64, 1.0, (2, 3, 6), &dev)?;
        let w = Tensor::randn(0f64, 1.0, 6, &dev)?;
        let eps = 1e-5f32;
        let r = (x.sqr()?.mean_keepdim(2)? + eps as f64)?.sqrt()?.recip()?;
        let u = g.broadcast_mul(&w)?;
        let ux = (&u * &x)?.mean_keepdim(2)?;
        let want = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * ux)?)?)?;
        let got = rms_norm_backward(&x, &g, &w, eps)?;
        let d = (&want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "{d}");
        // with the residual stream's gradient added in the same pass
        let res = Tensor::randn(0f64, 1.0, (2, 3, 6), &dev)?;
        let got = rms_norm_backward_add(&x, &g, &w, eps, Some(&res))?;
        let d = ((want + res)? - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "{d}");
        assert!(rms_norm_backward_add(&x, &g, &w, eps, Some(&Tensor::zeros((2, 6), DType::F64, &dev)?)).is_err());
        Ok(())
    }

    /// The forward against candle's reference RMSNorm, in f64.
    #[test]
    fn forward_matches_candle() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (3, 5, 40), &Device::Cpu)?;
        let w = Tensor::randn(1f64, 0.3, 40, &Device::Cpu)?;
        let want = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5)?;
        let d = (want - rms_norm_forward(&x, &w, 1e-5)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "{d}");
        Ok(())
    }

    /// Into wider rows: the same norm in the first columns, zeros after them on the CPU.
    #[test]
    fn wide_rows_hold_the_norm_first() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (7, 40), &Device::Cpu)?;
        let w = Tensor::randn(1f64, 0.3, 40, &Device::Cpu)?;
        let wide = rms_norm_forward_wide(&x, &w, 1e-5, 48)?;
        assert_eq!(wide.dims(), [7, 48]);
        let d = (rms_norm_forward(&x, &w, 1e-5)? - wide.narrow(1, 0, 40)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d == 0.0, "{d}");
        assert_eq!(wide.narrow(1, 40, 8)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?, 0.0);
        assert!(rms_norm_forward_wide(&x, &w, 1e-5, 39).is_err());
        Ok(())
    }

    #[test]
    fn misfit_shapes_are_refused() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm_backward(&x, &x, &w, 1e-5).is_err());
    }
}
