//! GEMMs that write where the training step needs their result: added into an existing buffer
//! (a linear's output, a sum of input gradients, a LoRA factor's gradient) or produced in f32
//! from bf16 operands (the factors' gradients), with either operand read as given or as the
//! transpose of a row-major matrix. candle's matmul writes a fresh buffer in its inputs' dtype
//! and copies a transposed operand it cannot describe, so each such product cost a GEMM, a cast
//! or a copy and a sum.

use candle_core::{DType, Result, Tensor};

use super::KernelCheck;

/// How a 2-D operand lies in memory: row-major, or the transpose of a row-major matrix, whose
/// rows may lie further apart than their length (a slice of a wider matrix's columns).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Operand {
    transposed: bool,
    /// cuBLAS's leading dimension: the distance between rows of the row-major matrix in memory.
    ld: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Operand {
    /// Elements from the first of an `[rows, cols]` operand to its last, both included.
    fn span(self, rows: usize, cols: usize) -> usize {
        let (outer, inner) = if self.transposed { (cols, rows) } else { (rows, cols) };
        if outer == 0 || inner == 0 {
            0
        } else {
            (outer - 1) * self.ld + inner
        }
    }
}

fn operand(t: &Tensor) -> Option<Operand> {
    let (r, c) = t.dims2().ok()?;
    let st = t.stride();
    if (st[1] == 1 || c <= 1) && st[0] >= c && (st[0] > 0 || r <= 1) {
        return Some(Operand { transposed: false, ld: st[0].max(c).max(1) });
    }
    ((st[0] == 1 || r <= 1) && st[1] >= r && (st[1] > 0 || c <= 1)).then_some(Operand { transposed: true, ld: st[1].max(r).max(1) })
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
/// (beta = 1; the caller must own `acc`), which may also be an `[m, n]` view of some columns of
/// a wider row-major matrix (written in place there); otherwise a product and a sum.
pub fn accumulate(acc: Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let (m, _, n) = dims(Some(acc.elem_count()), a, b)?;
    if !on_cublas(acc.dtype(), a, b) {
        let product = scaled(a.matmul(b)?, alpha)?.to_dtype(acc.dtype())?.reshape(acc.shape())?;
        return acc + product;
    }
    let acc = if row_strided(&acc, m, n) { acc } else { acc.contiguous()? };
    accumulate_in_place(&acc, a, b, alpha)?;
    Ok(acc)
}

/// `acc += alpha · a b` in `acc`'s own storage, for a contiguous or row-strided `[m, n]` `acc`
/// (some columns of a wider matrix, as `accumulate` takes it) and operands of its dtype on CUDA
/// that cuBLAS reads; an error where one GEMM cannot do it in place.
pub fn accumulate_in_place(acc: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<()> {
    let (m, k, n) = dims(Some(acc.elem_count()), a, b)?;
    if !on_cublas(acc.dtype(), a, b) || !(acc.is_contiguous() || row_strided(acc, m, n)) {
        candle_core::bail!("gemm: {:?} += {:?} @ {:?} cannot be accumulated in place", acc.layout(), a.layout(), b.layout());
    }
    acc.inplace_op1(&Accumulate { a, b, m, k, n, alpha })
}

/// Whether `t` is an `[m, n]` matrix whose rows are contiguous and evenly spaced (cuBLAS's
/// output with a leading dimension).
fn row_strided(t: &Tensor, m: usize, n: usize) -> bool {
    layout_row_strided(t.layout(), m, n)
}

fn layout_row_strided(l: &candle_core::Layout, m: usize, n: usize) -> bool {
    l.dims() == [m, n] && l.stride()[1] == 1 && l.stride()[0] >= n
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
        cuda::gemm(&mut storage, 0, n, a, b, (m, k, n), alpha as f32, 0.0)?;
        return Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), (m, n), candle_core::op::BackpropOp::none(), false));
    }
    let _ = (m, k, n);
    candle_core::bail!("gemm: no cuBLAS on {:?}", a.device())
}

/// `c + a b` in a new tensor of `c`'s dtype and shape, for `a` `[m, k]` and `b` `[k, n]` of
/// `c`'s float dtype and `c` of `m · n` elements. On CUDA, with bf16 or f32 operands (row-major
/// or transposed views) and a contiguous `c`, one cuBLASLt GEMM reads `c` as its addend and
/// writes the sum to the new buffer (beta = 1, C and D apart): neither a copy of `c` to
/// accumulate into nor a separate sum of the product; otherwise a product and a sum.
pub fn product_plus(c: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k, n) = dims(Some(c.elem_count()), a, b)?;
    if !on_cublas(c.dtype(), a, b) || c.dtype() != a.dtype() || !c.is_contiguous() {
        let product = a.matmul(b)?.to_dtype(c.dtype())?.reshape(c.shape())?;
        return c + product;
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = a.device() {
        // SAFETY: the GEMM writes every element
        let mut storage = match c.dtype() {
            DType::BF16 => candle_core::CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(m * n)? }, dev.clone()),
            _ => candle_core::CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(m * n)? }, dev.clone()),
        };
        cuda::gemm_plus(&mut storage, c, a, b, (m, k, n))?;
        return Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), c.shape(), candle_core::op::BackpropOp::none(), false));
    }
    let _ = (m, k, n);
    candle_core::bail!("gemm: no cuBLAS on {:?}", a.device())
}

/// One matrix of a batch `[n, rows, cols]`: how each lies (`Operand`) and the elements from one
/// to the next (0 for a batch of one; a larger batch's matrices lie apart).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Batched {
    each: Operand,
    stride: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn batched(t: &Tensor) -> Option<Batched> {
    let (n, r, c) = t.dims3().ok()?;
    let st = t.stride();
    let each = if (st[2] == 1 || c <= 1) && st[1] >= c && (st[1] > 0 || r <= 1) {
        Operand { transposed: false, ld: st[1].max(c).max(1) }
    } else if (st[1] == 1 || r <= 1) && st[2] >= r && (st[2] > 0 || c <= 1) {
        Operand { transposed: true, ld: st[2].max(r).max(1) }
    } else {
        return None;
    };
    (n <= 1 || st[0] > 0).then_some(Batched { each, stride: if n <= 1 { 0 } else { st[0] } })
}

/// `a_i b_i` for each of `n` pairs, `a` `[n, m, k]` and `b` `[n, k, p]` of one float dtype: a new
/// `[n, m, p]` tensor in `out`, or with `acc` (`[n, m, p]`, contiguous, of dtype `out`) added to
/// it, in `acc`'s own storage. On CUDA, with bf16 or f32 operands whose matrices are each
/// row-major or transposed views, evenly apart, one strided-batched cuBLAS call (bf16 operands
/// into an f32 result: the f32 products of bf16 data, with no f32 copy of it); elsewhere
/// candle's batched matmul.
pub fn batched_product(a: &Tensor, b: &Tensor, acc: Option<Tensor>, out: DType) -> Result<Tensor> {
    let (n, m, k) = a.dims3()?;
    let (n2, k2, p) = b.dims3()?;
    if n != n2 || k != k2 || acc.as_ref().is_some_and(|c| c.dims() != [n, m, p] || c.dtype() != out) {
        candle_core::bail!("gemm: {:?} @ {:?} into {:?} does not fit", a.shape(), b.shape(), acc.as_ref().map(|c| c.shape().clone()));
    }
    let fits = a.device().is_cuda()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && (out == a.dtype() || out == DType::F32)
        && batched(a).is_some()
        && batched(b).is_some()
        && acc.as_ref().is_none_or(|c| c.is_contiguous());
    if !fits {
        let product = a.to_dtype(out)?.matmul(&b.to_dtype(out)?)?;
        return match acc {
            Some(c) => c + product,
            None => Ok(product),
        };
    }
    if let Some(acc) = acc {
        // the caller owns `acc`: the GEMM adds into its storage (beta = 1)
        acc.inplace_op1(&AccumulateBatched { a, b, dims: (n, m, k, p) })?;
        return Ok(acc);
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = a.device() {
        // SAFETY: the GEMM (beta = 0) writes every element
        let mut storage = match out {
            DType::BF16 => candle_core::CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n * m * p)? }, dev.clone()),
            _ => candle_core::CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n * m * p)? }, dev.clone()),
        };
        cuda::gemm_batched(&mut storage, 0, a, b, (n, m, k, p), 0.0)?;
        return Ok(Tensor::from_storage(candle_core::Storage::Cuda(storage), (n, m, p), candle_core::op::BackpropOp::none(), false));
    }
    let _ = (n, m, k, p);
    candle_core::bail!("gemm: no cuBLAS on {:?}", a.device())
}

fn scaled(t: Tensor, alpha: f64) -> Result<Tensor> {
    if alpha == 1.0 {
        Ok(t)
    } else {
        t * alpha
    }
}

/// `c_i [m, p] += a_i [m, k] @ b_i [k, p]` for each of a contiguous `c`'s `n` matrices, in
/// place (one strided-batched cuBLAS call, beta = 1).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AccumulateBatched<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    dims: (usize, usize, usize, usize),
}

impl candle_core::InplaceOp1 for AccumulateBatched<'_> {
    fn name(&self) -> &'static str {
        "accumulate-batched-gemm"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &candle_core::Layout) -> Result<()> {
        candle_core::bail!("accumulate-batched-gemm: the CPU adds the product")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &candle_core::Layout) -> Result<()> {
        if !l.is_contiguous() {
            candle_core::bail!("accumulate-batched-gemm: {:?} is not contiguous", l)
        }
        cuda::gemm_batched(s, l.start_offset(), self.a, self.b, self.dims, 1.0)
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
        let ldc = if l.is_contiguous() {
            self.n
        } else if layout_row_strided(l, self.m, self.n) {
            l.stride()[0]
        } else {
            candle_core::bail!("accumulate-gemm: {:?} is neither contiguous nor row-strided", l)
        };
        cuda::gemm(s, l.start_offset(), ldc, self.a, self.b, (self.m, self.k, self.n), self.alpha as f32, 1.0)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublaslt as lt;
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::DeviceId;
    use candle_core::{CudaStorage, DType, Result, Storage, Tensor};
    use half::bf16;
    use std::sync::Mutex;

    use super::{operand, Operand};

    fn data_type(d: DType) -> sys::cudaDataType_t {
        match d {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_32F,
        }
    }

    /// `c = beta · c + alpha · a b` on `c`'s storage from element `start` (`[m, n]` row-major,
    /// rows `ldc` apart).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(c: &mut CudaStorage, start: usize, ldc: usize, a: &Tensor, b: &Tensor, (m, k, n): (usize, usize, usize), alpha: f32, beta: f32) -> Result<()> {
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
                let va = sa.as_cuda_slice::<$tab>()?.slice(oa_start..oa_start + oa.span(m, k));
                let vb = sb.as_cuda_slice::<$tab>()?.slice(ob_start..ob_start + ob.span(k, n));
                let (pa, _ga) = va.device_ptr(&stream);
                let (pb, _gb) = vb.device_ptr(&stream);
                let mut cs = c.as_cuda_slice_mut::<$tc>()?.slice_mut(start..start + (m - 1) * ldc + n);
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
                        ldc as i32,
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

    /// `c_i = beta · c_i + a_i b_i` for `n` pairs (`a` `[n, m, k]`, `b` `[n, k, p]`, as `batched`
    /// describes them) on `c`'s storage from element `start` (`[n, m, p]` contiguous).
    pub(super) fn gemm_batched(c: &mut CudaStorage, start: usize, a: &Tensor, b: &Tensor, (n, m, k, p): (usize, usize, usize, usize), beta: f32) -> Result<()> {
        if n == 0 || m == 0 || p == 0 {
            return Ok(());
        }
        let dev = c.device().clone();
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (ba, bb) = match (super::batched(a), super::batched(b)) {
            (Some(ba), Some(bb)) => (ba, bb),
            _ => candle_core::bail!("gemm: batches {:?} and {:?} are neither row-major nor transposed", a.layout(), b.layout()),
        };
        let (ga, gb) = (a.storage_and_layout().0, b.storage_and_layout().0);
        let (sa, sb) = match (&*ga, &*gb) {
            (Storage::Cuda(sa), Storage::Cuda(sb)) => (sa, sb),
            _ => candle_core::bail!("gemm: operands not on the cuda device"),
        };
        let (oa_start, ob_start) = (a.layout().start_offset(), b.layout().start_offset());
        let c_dtype = c.dtype();
        let op = |o: Operand| if o.transposed { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        let alpha = 1.0f32;
        // as `gemm`: row-major c_i = a_i b_i is column-major c_i^T = b_i^T a_i^T
        macro_rules! go {
            ($tab:ty, $tc:ty) => {{
                let va = sa.as_cuda_slice::<$tab>()?.slice(oa_start..oa_start + (n - 1) * ba.stride + ba.each.span(m, k));
                let vb = sb.as_cuda_slice::<$tab>()?.slice(ob_start..ob_start + (n - 1) * bb.stride + bb.each.span(k, p));
                let (pa, _ga) = va.device_ptr(&stream);
                let (pb, _gb) = vb.device_ptr(&stream);
                let mut cs = c.as_cuda_slice_mut::<$tc>()?.slice_mut(start..start + n * m * p);
                let (pc, _gc) = cs.device_ptr_mut(&stream);
                // SAFETY: a, b and c hold n matrices of m·k, k·p and m·p elements from these
                // pointers, `stride` apart, laid out as `batched` found; alpha and beta are f32
                // for the f32 compute type
                unsafe {
                    result::gemm_strided_batched_ex(
                        *blas.handle(),
                        op(bb.each),
                        op(ba.each),
                        p as i32,
                        m as i32,
                        k as i32,
                        (&alpha) as *const f32 as *const _,
                        pb as *const _,
                        data_type(b.dtype()),
                        bb.each.ld as i32,
                        bb.stride as i64,
                        pa as *const _,
                        data_type(a.dtype()),
                        ba.each.ld as i32,
                        ba.stride as i64,
                        (&beta) as *const f32 as *const _,
                        pc as *mut _,
                        data_type(c_dtype),
                        p as i32,
                        (m * p) as i64,
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

    /// A cuBLASLt handle and its workspace, one per device.
    struct Lt {
        handle: lt::sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
    }

    // SAFETY: the handle is only used under the mutex below, on its device's stream
    unsafe impl Send for Lt {}

    /// Workspace of each handle: what the heuristic may pick split-K algorithms with.
    const LT_WORKSPACE: usize = 4 << 20;

    static LTS: Mutex<Vec<(DeviceId, Lt)>> = Mutex::new(Vec::new());

    fn lt_error(e: lt::result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cublasLt: {e:?}"))
    }

    /// Owns cuBLASLt descriptors for the length of one call.
    struct Descs {
        layouts: Vec<lt::sys::cublasLtMatrixLayout_t>,
        desc: Option<lt::sys::cublasLtMatmulDesc_t>,
        pref: Option<lt::sys::cublasLtMatmulPreference_t>,
    }

    impl Drop for Descs {
        fn drop(&mut self) {
            // SAFETY: each was created once and is destroyed once, after the launch
            unsafe {
                for &l in &self.layouts {
                    let _ = lt::result::destroy_matrix_layout(l);
                }
                if let Some(d) = self.desc {
                    let _ = lt::result::destroy_matmul_desc(d);
                }
                if let Some(p) = self.pref {
                    let _ = lt::result::destroy_matmul_pref(p);
                }
            }
        }
    }

    /// `d = c + a b` (`[m, n]` row-major each, `d` from its first element, `c` as its layout
    /// says), one cuBLASLt matmul with C and D apart.
    pub(super) fn gemm_plus(d: &mut CudaStorage, c: &Tensor, a: &Tensor, b: &Tensor, (m, k, n): (usize, usize, usize)) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dev = d.device().clone();
        let stream = dev.cuda_stream();
        let (oa, ob) = match (operand(a), operand(b)) {
            (Some(oa), Some(ob)) => (oa, ob),
            _ => candle_core::bail!("gemm: operands {:?} and {:?} are neither row-major nor transposed", a.layout(), b.layout()),
        };
        let (ga, gb, gc) = (a.storage_and_layout().0, b.storage_and_layout().0, c.storage_and_layout().0);
        let (sa, sb, sc) = match (&*ga, &*gb, &*gc) {
            (Storage::Cuda(sa), Storage::Cuda(sb), Storage::Cuda(sc)) => (sa, sb, sc),
            _ => candle_core::bail!("gemm: operands not on the cuda device"),
        };
        let (oa_start, ob_start, c_start) = (a.layout().start_offset(), b.layout().start_offset(), c.layout().start_offset());
        let ty = match a.dtype() {
            DType::BF16 => lt::sys::cudaDataType_t::CUDA_R_16BF,
            _ => lt::sys::cudaDataType_t::CUDA_R_32F,
        };
        // row-major d = c + a b is column-major d^T = c^T + b^T a^T: cuBLAS's first operand is
        // b, stored [n, k] (op N) or [k, n] (op T) column-major, the second a, [k, m] or [m, k]
        let stored = |o: Operand, rows: usize, cols: usize| if o.transposed { (cols, rows) } else { (rows, cols) };
        let (b_rows, b_cols) = stored(ob, n, k);
        let (a_rows, a_cols) = stored(oa, k, m);
        let mut descs = Descs { layouts: Vec::with_capacity(3), desc: None, pref: None };
        for (rows, cols, ld) in [(b_rows, b_cols, ob.ld), (a_rows, a_cols, oa.ld), (n, m, n)] {
            descs.layouts.push(lt::result::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map_err(lt_error)?);
        }
        let desc = lt::result::create_matmul_desc(lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::sys::cudaDataType_t::CUDA_R_32F).map_err(lt_error)?;
        descs.desc = Some(desc);
        // cublasOperation_t as cuBLASLt reads it: 0 N, 1 T
        let op = |o: Operand| o.transposed as i32;
        let pref = lt::result::create_matmul_pref().map_err(lt_error)?;
        descs.pref = Some(pref);
        // SAFETY: the attributes are written from values of the types cuBLASLt reads for them
        unsafe {
            for (attr, o) in [
                (lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, op(ob)),
                (lt::sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, op(oa)),
            ] {
                lt::result::set_matmul_desc_attribute(desc, attr, (&o) as *const _ as *const _, std::mem::size_of_val(&o)).map_err(lt_error)?;
            }
            let size = LT_WORKSPACE as u64;
            lt::result::set_matmul_pref_attribute(
                pref,
                lt::sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size) as *const _ as *const _,
                std::mem::size_of_val(&size),
            )
            .map_err(lt_error)?;
        }
        let mut lts = LTS.lock().map_err(|_| candle_core::Error::Msg("cublasLt: a poisoned handle lock".into()))?;
        if !lts.iter().any(|(id, _)| *id == dev.id()) {
            stream.context().bind_to_thread().w()?;
            let handle = lt::result::create_handle().map_err(lt_error)?;
            // SAFETY: scratch memory, never read before cuBLASLt writes it
            let workspace = unsafe { stream.alloc::<u8>(LT_WORKSPACE) }.w()?;
            lts.push((dev.id(), Lt { handle, workspace }));
        }
        let lt_dev = lts.iter().find(|(id, _)| *id == dev.id()).map(|(_, l)| l).ok_or_else(|| candle_core::Error::Msg("cublasLt: no handle".into()))?;
        let [lb, la, lc] = [descs.layouts[0], descs.layouts[1], descs.layouts[2]];
        // SAFETY: the descriptors describe the operands' memory as `operand` found it
        let heuristic = unsafe { lt::result::get_matmul_algo_heuristic(lt_dev.handle, desc, lb, la, lc, lc, pref) }.map_err(lt_error)?;
        let (alpha, beta) = (1.0f32, 1.0f32);
        macro_rules! go {
            ($t:ty) => {{
                let va = sa.as_cuda_slice::<$t>()?.slice(oa_start..oa_start + oa.span(m, k));
                let vb = sb.as_cuda_slice::<$t>()?.slice(ob_start..ob_start + ob.span(k, n));
                let vc = sc.as_cuda_slice::<$t>()?.slice(c_start..c_start + m * n);
                let (pa, _ga) = va.device_ptr(&stream);
                let (pb, _gb) = vb.device_ptr(&stream);
                let (pc, _gc) = vc.device_ptr(&stream);
                let mut vd = d.as_cuda_slice_mut::<$t>()?.slice_mut(0..m * n);
                let (pd, _gd) = vd.device_ptr_mut(&stream);
                let (pw, _gw) = lt_dev.workspace.device_ptr(&stream);
                // SAFETY: a, b, c and d hold m·k, k·n, m·n and m·n elements from these pointers,
                // as the layouts say; alpha and beta are f32 for the f32 compute type
                unsafe {
                    lt::result::matmul(
                        lt_dev.handle,
                        desc,
                        (&alpha) as *const f32 as *const _,
                        (&beta) as *const f32 as *const _,
                        pb as *const _,
                        lb,
                        pa as *const _,
                        la,
                        pc as *const _,
                        lc,
                        pd as *mut _,
                        lc,
                        &heuristic.algo,
                        pw as *mut _,
                        LT_WORKSPACE,
                        stream.cu_stream() as *mut _,
                    )
                }
                .map_err(lt_error)?;
            }};
        }
        match a.dtype() {
            DType::BF16 => go!(bf16),
            DType::F32 => go!(f32),
            dt => candle_core::bail!("gemm: {dt:?} operands"),
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
        // c + a b into a new buffer (cuBLASLt, C and D apart); c itself is left as it was
        let c_d = acc.to_device(device)?.to_dtype(dtype)?;
        let want_plus = (round(&acc)? + round(&a_rm)?.matmul(&b_r)?)?;
        let got = product_plus(&c_d, &a_rm.to_device(device)?.to_dtype(dtype)?, &b_view)?;
        push("gemm-product-plus", &want_plus, got, if dtype == DType::F32 { 1e-5 } else { 2f32.powi(-6) })?;
        push("gemm-product-plus-addend", &round(&acc)?, c_d, 0.0)?;
        // operands and the sum as column slices of wider matrices (rows further apart than
        // their length): a [48, 40] = columns 8..48 of [48, 56], the sum columns 16..40 of
        // [48, 40]; the sum's other columns are left as they were
        let wide_a = Tensor::randn(0f32, 1.0, (48, 56), &cpu)?;
        let wide_acc = Tensor::randn(0f32, 1.0, (48, 40), &cpu)?;
        let a_r = round(&wide_a.narrow(1, 8, 40)?)?;
        let wide_acc_d = wide_acc.to_device(device)?.to_dtype(dtype)?;
        let a_view = wide_a.to_device(device)?.to_dtype(dtype)?.narrow(1, 8, 40)?;
        accumulate(wide_acc_d.narrow(1, 16, 24)?, &a_view, &b_view, 1.0)?;
        let sum = (round(&wide_acc.narrow(1, 16, 24)?)? + a_r.matmul(&b_r)?)?;
        let want = Tensor::cat(&[round(&wide_acc.narrow(1, 0, 16)?)?, sum], 1)?;
        push("gemm-accumulate-strided", &want, wide_acc_d, if dtype == DType::F32 { 1e-5 } else { 2f32.powi(-6) })?;
        // the strided operand transposed: a^T [40, 48] @ acc [48, 24]
        let want = a_r.t()?.matmul(&round(&acc)?)?;
        let got = product(&a_view.t()?, &acc.to_device(device)?.to_dtype(dtype)?, 1.0, DType::F32)?;
        push("gemm-product-strided", &want, got, rel)?;
        // batched: 6 pairs of [3, 40] (row-major, each a slice of a wider row) @ the transposes
        // of [50, 40] (as keys are read), into f32 and accumulated into it
        let qa = Tensor::randn(0f32, 1.0, (6, 3, 48), &cpu)?;
        let kb = Tensor::randn(0f32, 1.0, (6, 50, 40), &cpu)?;
        let (qa_r, kb_r) = (round(&qa.narrow(2, 8, 40)?)?, round(&kb)?);
        let want = qa_r.matmul(&kb_r.transpose(1, 2)?)?;
        let (qa_d, kb_d) = (qa.to_device(device)?.to_dtype(dtype)?.narrow(2, 8, 40)?, kb.to_device(device)?.to_dtype(dtype)?);
        let got = batched_product(&qa_d, &kb_d.transpose(1, 2)?, None, DType::F32)?;
        push("gemm-batched", &want, got.copy()?, rel)?;
        let want_twice = (&want * 2.0)?;
        let got = batched_product(&qa_d, &kb_d.transpose(1, 2)?, Some(got), DType::F32)?;
        push("gemm-batched-accumulate", &want_twice, got, rel)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// How cuBLAS is told each layout: row-major with its row distance, the transpose of one, or
    /// none (the caller then copies), and the elements from an operand's first to its last.
    #[test]
    fn operands_are_described_by_their_strides() -> Result<()> {
        let m = Tensor::zeros((6, 10), DType::F32, &Device::Cpu)?;
        let describe = |t: &Tensor| operand(t).map(|o| (o.transposed, o.ld));
        // contiguous, and its transpose
        assert_eq!(describe(&m), Some((false, 10)));
        assert_eq!(describe(&m.t()?), Some((true, 10)));
        // columns 2..6: rows 10 apart; its transpose likewise
        let cols = m.narrow(1, 2, 4)?;
        assert_eq!(describe(&cols), Some((false, 10)));
        assert_eq!(describe(&cols.t()?), Some((true, 10)));
        assert_eq!(operand(&cols).map(|o| o.span(6, 4)), Some(5 * 10 + 4));
        assert_eq!(operand(&cols.t()?).map(|o| o.span(4, 6)), Some(5 * 10 + 4));
        // one row or one column of any stride is still a matrix cuBLAS reads
        assert_eq!(describe(&m.narrow(0, 3, 1)?), Some((false, 10)));
        assert_eq!(describe(&m.narrow(1, 3, 1)?), Some((false, 10)));
        // every other column, and a broadcast, are neither
        let every_other = m.reshape((6, 5, 2))?.narrow(2, 0, 1)?.squeeze(2)?;
        assert_eq!(describe(&every_other), None);
        let broadcast = Tensor::zeros((1, 10), DType::F32, &Device::Cpu)?.broadcast_as((6, 10))?;
        assert_eq!(describe(&broadcast), None);
        Ok(())
    }

    #[test]
    fn a_sum_in_place_takes_contiguous_or_row_strided_matrices() -> Result<()> {
        let m = Tensor::zeros((6, 10), DType::F32, &Device::Cpu)?;
        assert!(row_strided(&m.narrow(1, 2, 4)?, 6, 4));
        assert!(!row_strided(&m.t()?, 10, 6));
        assert!(!row_strided(&m.narrow(1, 2, 4)?, 4, 6));
        // off CUDA nothing is summed in place: an error, not a silent copy
        let (a, b) = (Tensor::zeros((6, 3), DType::F32, &Device::Cpu)?, Tensor::zeros((3, 4), DType::F32, &Device::Cpu)?);
        assert!(accumulate_in_place(&m.narrow(1, 2, 4)?, &a, &b, 1.0).is_err());
        Ok(())
    }
}
