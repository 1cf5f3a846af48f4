//! GEMMs that write where the training step needs their result: added into an existing buffer
//! (a linear's output, a sum of input gradients, a LoRA factor's gradient) or produced in f32
//! from bf16 operands (the factors' gradients), with either operand read as given or as the
//! transpose of a row-major matrix. candle's matmul writes a fresh buffer in its inputs' dtype
//! and copies a transposed operand it cannot describe, so each such product cost a GEMM, a cast
//! or a copy and a sum.

use candle_core::{DType, Result, Tensor};

use super::KernelCheck;

/// How a 2-D operand lies in memory: row-major, or the transpose of a row-major matrix.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Operand {
    transposed: bool,
    /// cuBLAS's leading dimension: the row length of the row-major matrix in memory.
    ld: usize,
}

fn operand(t: &Tensor) -> Option<Operand> {
    let (r, c) = t.dims2().ok()?;
    if t.is_contiguous() {
        return Some(Operand { transposed: false, ld: c.max(1) });
    }
    t.t().ok()?.is_contiguous().then_some(Operand { transposed: true, ld: r.max(1) })
}

fn dims(acc_elems: Option<usize>, a: &Tensor, b: &Tensor) -> Result<(usize, usize, usize)> {
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 || acc_elems.is_some_and(|e| e != m * n) {
        candle_core::bail!("gemm: {acc_elems:?} elements += {:?} @ {:?} does not fit", a.shape(), b.shape());
    }
    Ok((m, k, n))
}

/// Whether one cuBLAS call computes `c (c_dtype) op= alpha · a b`.
fn on_cublas(c_dtype: DType, a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cuda()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && (c_dtype == a.dtype() || c_dtype == DType::F32)
        && operand(a).is_some()
        && operand(b).is_some()
}

/// `acc + alpha · a b` in `acc`'s dtype and shape, for `a` `[m, k]` and `b` `[k, n]` of one
/// float dtype and `acc` of `m · n` elements. On CUDA, with bf16 or f32 operands (row-major or
/// transposed views) and `acc` of their dtype or f32, one GEMM accumulates into `acc`'s storage
/// (beta = 1; the caller must own `acc`); otherwise a product and a sum.
pub fn accumulate(acc: Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let (m, k, n) = dims(Some(acc.elem_count()), a, b)?;
    if !on_cublas(acc.dtype(), a, b) {
        let product = scaled(a.matmul(b)?, alpha)?.to_dtype(acc.dtype())?.reshape(acc.shape())?;
        return acc + product;
    }
    let acc = acc.contiguous()?;
    acc.inplace_op1(&Accumulate { a, b, m, k, n, alpha })?;
    Ok(acc)
}

/// `alpha · a b` in `out`, for `a` `[m, k]` and `b` `[k, n]` of one float dtype. On CUDA, with
/// bf16 or f32 operands (row-major or transposed views) and an f32 or their own `out`, one GEMM
/// writes the result.
pub fn product(a: &Tensor, b: &Tensor, alpha: f64, out: DType) -> Result<Tensor> {
    let (m, k, n) = dims(None, a, b)?;
    if !on_cublas(out, a, b) {
        return scaled(a.matmul(b)?.to_dtype(out)?, alpha);
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = a.device() {
        // SAFETY: the GEMM (beta = 0) writes every element
        let mut storage = match out {
            DType::BF16 => candle_core::CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(m * n)? }, dev.clone()),
            _ => candle_core::CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(m * n)? }, dev.clone()),
        };
        cuda::gemm(&mut storage, 0, a, b, (m, k, n), alpha as f32, 0.0)?;
        return Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), (m, n), candle_core::op::BackpropOp::none(), false));
    }
    let _ = (m, k, n);
    candle_core::bail!("gemm: no cuBLAS on {:?}", a.device())
}

fn scaled(t: Tensor, alpha: f64) -> Result<Tensor> {
    if alpha == 1.0 {
        Ok(t)
    } else {
        t * alpha
    }
}

/// `c [m, n] += alpha · a [m, k] @ b [k, n]`, in place (cuBLAS, beta = 1).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Accumulate<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
}

impl candle_core::InplaceOp1 for Accumulate<'_> {
    fn name(&self) -> &'static str {
        "accumulate-gemm"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &candle_core::Layout) -> Result<()> {
        candle_core::bail!("accumulate-gemm: the CPU adds the product")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &candle_core::Layout) -> Result<()> {
        let (start, _) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("accumulate-gemm: not contiguous".into()))?;
        cuda::gemm(s, start, self.a, self.b, (self.m, self.k, self.n), self.alpha as f32, 1.0)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
    use half::bf16;

    use super::{operand, Operand};

    fn data_type(d: DType) -> sys::cudaDataType_t {
        match d {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_32F,
        }
    }

    /// `c = beta · c + alpha · a b` on `c`'s storage from element `start` (`[m, n]` row-major).
    pub(super) fn gemm(c: &mut CudaStorage, start: usize, a: &Tensor, b: &Tensor, (m, k, n): (usize, usize, usize), alpha: f32, beta: f32) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dev = c.device().clone();
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (oa, ob) = match (operand(a), operand(b)) {
            (Some(oa), Some(ob)) => (oa, ob),
            _ => candle_core::bail!("gemm: operands {:?} and {:?} are neither row-major nor transposed", a.layout(), b.layout()),
        };
        let (ga, gb) = (a.storage_and_layout().0, b.storage_and_layout().0);
        let (sa, sb) = match (&*ga, &*gb) {
            (Storage::Cuda(sa), Storage::Cuda(sb)) => (sa, sb),
            _ => candle_core::bail!("gemm: operands not on the cuda device"),
        };
        let (oa_start, ob_start) = (a.layout().start_offset(), b.layout().start_offset());
        let c_dtype = c.dtype();
        let op = |o: Operand| if o.transposed { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        // row-major c = a b is column-major c^T = b^T a^T: cuBLAS's first operand is b
        macro_rules! go {
            ($tab:ty, $tc:ty) => {{
                let va = sa.as_cuda_slice::<$tab>()?.slice(oa_start..oa_start + m * k);
                let vb = sb.as_cuda_slice::<$tab>()?.slice(ob_start..ob_start + k * n);
                let (pa, _ga) = va.device_ptr(&stream);
                let (pb, _gb) = vb.device_ptr(&stream);
                let mut cs = c.as_cuda_slice_mut::<$tc>()?.slice_mut(start..start + m * n);
                let (pc, _gc) = cs.device_ptr_mut(&stream);
                // SAFETY: a, b and c hold m·k, k·n and m·n elements from these pointers, laid out
                // as `operand` found; alpha and beta are f32 for the f32 compute type
                unsafe {
                    result::gemm_ex(
                        *blas.handle(),
                        op(ob),
                        op(oa),
                        n as i32,
                        m as i32,
                        k as i32,
                        (&alpha) as *const f32 as *const _,
                        pb as *const _,
                        data_type(b.dtype()),
                        ob.ld as i32,
                        pa as *const _,
                        data_type(a.dtype()),
                        oa.ld as i32,
                        (&beta) as *const f32 as *const _,
                        pc as *mut _,
                        data_type(c_dtype),
                        n as i32,
                        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .w()?;
            }};
        }
        match (a.dtype(), c_dtype) {
            (DType::BF16, DType::BF16) => go!(bf16, bf16),
            (DType::BF16, DType::F32) => go!(bf16, f32),
            (DType::F32, DType::F32) => go!(f32, f32),
            (ab, c) => candle_core::bail!("gemm: {ab:?} operands into a {c:?} result"),
        }
        Ok(())
    }
}

/// The GEMMs on `device` against f32 products on the CPU, on row-major and transposed operands:
/// `product` into f32 (bf16 and f32 operands) and `accumulate` into bf16 and f32 sums. Tolerances
/// relative to the largest reference value: 1e-5 for f32 operands; 2^-7 with bf16 operands (each
/// input rounded once, accumulated in f32), 2^-6 with a bf16 sum (rounded once more).
pub fn check_device(device: &candle_core::Device) -> Result<Vec<KernelCheck>> {
    let cpu = candle_core::Device::Cpu;
    let mut out = Vec::new();
    if device.is_cpu() {
        return Ok(out);
    }
    // a [48, 40] given as the transpose of [40, 48]; b [40, 24] row-major; acc [48, 24]
    let at = Tensor::randn(0f32, 1.0, (40, 48), &cpu)?;
    let b = Tensor::randn(0f32, 1.0, (40, 24), &cpu)?;
    let acc = Tensor::randn(0f32, 1.0, (48, 24), &cpu)?;
    for dtype in [DType::F32, DType::BF16] {
        let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
        let (at_r, b_r) = (round(&at)?, round(&b)?);
        let (at_d, b_d) = (at.to_device(device)?.to_dtype(dtype)?, b.to_device(device)?.to_dtype(dtype)?);
        let want = (at_r.t()?.matmul(&b_r)? * 0.5)?;
        let rel = if dtype == DType::F32 { 1e-5 } else { 2f32.powi(-7) };
        let got = product(&at_d.t()?, &b_d, 0.5, DType::F32)?;
        let mut push = |kernel, want: &Tensor, got: Tensor, rel: f32| -> Result<()> {
            out.push(KernelCheck::relative(kernel, format!("{dtype:?}"), (0, 0), want, &got, rel)?);
            Ok(())
        };
        push("gemm-product-f32", &want, got, rel)?;
        // b given as the transposed view of b^T: acc [48, 24] += a [48, 40] (row-major) @ b
        let a_rm = at.t()?.contiguous()?;
        let b_view = b_d.t()?.contiguous()?.t()?;
        if dtype == DType::BF16 {
            // bf16 operands into an f32 sum (the factors' gradients)
            let want_acc = (&acc + (round(&a_rm)?.matmul(&b_r)? * 0.5)?)?;
            let got = accumulate(acc.to_device(device)?, &a_rm.to_device(device)?.to_dtype(dtype)?, &b_view, 0.5)?;
            push("gemm-accumulate-f32", &want_acc, got, rel)?;
        }
        let acc_d = acc.to_device(device)?.to_dtype(dtype)?;
        let want_acc = (round(&acc)? + (round(&a_rm)?.matmul(&b_r)? * 0.5)?)?;
        let got = accumulate(acc_d, &a_rm.to_device(device)?.to_dtype(dtype)?, &b_view, 0.5)?;
        push("gemm-accumulate", &want_acc, got, if dtype == DType::F32 { 1e-5 } else { 2f32.powi(-6) })?;
    }
    Ok(out)
}
