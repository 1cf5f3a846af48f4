//! Fused element-wise and row ops of the decoder block's backward (`kernels/fused.cu` on CUDA,
//! the same formulas in f64 on the CPU), none with autograd:
//!
//! - `add`: the residual sums, 16 bytes per access;
//! - `swiglu`: `silu(g) * u` in one pass (three unfused, with a `[tokens, intermediate]`
//!   intermediate each);
//! - `swiglu_backward`: both input gradients in one pass over `g`, `u` and the output gradient
//!   (about ten unfused passes: sigmoid, affine, products, sums); `swiglu_backward_in_place`
//!   writes them over `g` and `u`;
//! - `head_dot`: per-head dot products of two `[.., heads * head_dim]` tensors, accumulated in
//!   f32 (attention's `D = sum(dO * O)` without casting both operands to f32 first);
//! - `contiguous_rows`: a transposed or narrowed view whose rows are contiguous made contiguous
//!   with coalesced row copies (candle's generic strided copy indexes every element);
//! - `add_prefix`: a gradient of the first `e` rows added into an f32 accumulator of `t` rows,
//!   in place (a cast, a zero padding and an add unfused).

use candle_core::{CpuStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::KernelCheck;

#[derive(Clone, Copy)]
enum Kind {
    Add,
    SwigluForward,
    SwigluBackward,
    HeadDot { head_dim: usize },
}

impl Kind {
    fn kernel(self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::SwigluForward => "swiglu_fwd",
            Kind::SwigluBackward => "swiglu_bwd",
            Kind::HeadDot { .. } => "head_dot",
        }
    }
}

/// The op on its first input (`g` or `a`) with the others captured: `u` (or `b`), and for the
/// SwiGLU backward the output gradient.
struct Fused<'a> {
    kind: Kind,
    other: &'a Tensor,
    grad: Option<&'a Tensor>,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

impl Fused<'_> {
    fn out_shape(&self, shape: &Shape) -> Shape {
        let mut dims = shape.dims().to_vec();
        match self.kind {
            Kind::Add | Kind::SwigluForward => {}
            Kind::SwigluBackward => dims.insert(0, 2),
            Kind::HeadDot { head_dim } => {
                if let Some(last) = dims.last_mut() {
                    *last /= head_dim.max(1);
                }
            }
        }
        Shape::from(dims)
    }

    fn check(&self, shape: &Shape) -> Result<()> {
        let fits = |t: &Tensor| t.shape() == shape;
        if !fits(self.other) || self.grad.is_some_and(|g| !fits(g)) {
            candle_core::bail!("{}: inputs of shapes {shape:?} and {:?} do not fit", self.kind.kernel(), self.other.shape());
        }
        if let Kind::HeadDot { head_dim } = self.kind {
            if head_dim == 0 || shape.dims().last().is_none_or(|n| n % head_dim != 0) {
                candle_core::bail!("head_dot: last dimension of {shape:?} is not a multiple of {head_dim}");
            }
        }
        Ok(())
    }

    fn cpu<T: WithDType>(&self, a: &[T], shape: &Shape) -> Result<CpuStorage> {
        self.check(shape)?;
        let b = to_f64(self.other)?;
        let n = a.len();
        Ok(match self.kind {
            Kind::Add => T::to_cpu_storage_owned(a.par_iter().zip(b.par_iter()).map(|(x, y)| T::from_f64(x.to_f64() + y)).collect()),
            Kind::SwigluForward => {
                let s: Vec<T> = a
                    .par_iter()
                    .zip(b.par_iter())
                    .map(|(g, u)| {
                        let g = g.to_f64();
                        T::from_f64(g * sigmoid(g) * u)
                    })
                    .collect();
                T::to_cpu_storage_owned(s)
            }
            Kind::SwigluBackward => {
                let ds = to_f64(self.grad.ok_or_else(|| candle_core::Error::Msg("swiglu_bwd: no gradient".into()))?)?;
                let mut out = vec![T::from_f64(0.0); 2 * n];
                let (dg, du) = out.split_at_mut(n);
                dg.par_iter_mut().zip(du.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
                    let (g, u, d) = (a[i].to_f64(), b[i], ds[i]);
                    let sg = sigmoid(g);
                    *dg = T::from_f64(d * u * sg * (1.0 + g * (1.0 - sg)));
                    *du = T::from_f64(d * g * sg);
                });
                T::to_cpu_storage_owned(out)
            }
            Kind::HeadDot { head_dim } => {
                let dots: Vec<f64> = a
                    .par_chunks(head_dim)
                    .zip(b.par_chunks(head_dim))
                    .map(|(x, y)| x.iter().zip(y).map(|(x, y)| x.to_f64() * y).sum())
                    .collect();
                // f32 as on the GPU, except for f64 data
                if T::DTYPE == DType::F64 {
                    CpuStorage::F64(dots)
                } else {
                    CpuStorage::F32(dots.into_iter().map(|v| v as f32).collect())
                }
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(&self, a: &candle_core::CudaStorage, layout: &candle_core::Layout, suffix: &str) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr + WithDType,
    {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        self.check(layout.shape())?;
        let (o1, o2) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: input not contiguous", self.kind.kernel())))?;
        let dev = a.device().clone();
        let src = a.as_cuda_slice::<T>()?.slice(o1..o2);
        let other = self.other;
        let o_guard = other.storage_and_layout().0;
        let os = cuda_slice_of!(o_guard, other, T);
        let n = (o2 - o1) as u64;
        let func = dev.get_or_load_custom_func(&format!("{}_{suffix}", self.kind.kernel()), "fused", KERNELS)?;
        // a thread per 16 bytes
        let per_thread = (16 / std::mem::size_of::<T>()) as u64;
        let elementwise = LaunchConfig { grid_dim: (n.div_ceil(256 * per_thread).clamp(1, 1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY (all three allocations): every element is written by the kernel
        match self.kind {
            Kind::Add | Kind::SwigluForward => {
                let out = unsafe { dev.alloc::<T>(n as usize)? };
                let mut b = func.builder();
                b.arg(&src).arg(&os).arg(&out).arg(&n);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { b.launch(elementwise) }.w()?;
                Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::SwigluBackward => {
                let grad = self.grad.ok_or_else(|| candle_core::Error::Msg("swiglu_bwd: no gradient".into()))?;
                let g_guard = grad.storage_and_layout().0;
                let gs = cuda_slice_of!(g_guard, grad, T);
                let out = unsafe { dev.alloc::<T>(2 * n as usize)? };
                let mut b = func.builder();
                b.arg(&src).arg(&os).arg(&gs).arg(&out).arg(&n);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { b.launch(elementwise) }.w()?;
                Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::HeadDot { head_dim } => {
                let rows = n / head_dim as u64;
                let hd = head_dim as i32;
                let out = unsafe { dev.alloc::<f32>(rows as usize)? };
                // one warp per row, 8 rows per block
                let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                let mut b = func.builder();
                b.arg(&src).arg(&os).arg(&out).arg(&rows).arg(&hd);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { b.launch(cfg) }.w()?;
                Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
            }
        }
    }
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

impl CustomOp1 for Fused<'_> {
    float_op_forwards!("fused");
}

/// `a + b` for two tensors of one shape, in `a`'s dtype: on CUDA a kernel moving 16 bytes per
/// access (candle's binary kernel indexes every element through its strides).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() || a.shape() != b.shape() || !matches!(a.dtype(), DType::F32 | DType::BF16) {
        return a + b;
    }
    let b = b.to_dtype(a.dtype())?.contiguous()?;
    a.contiguous()?.apply_op1_no_bwd(&Fused { kind: Kind::Add, other: &b, grad: None })
}

/// `silu(g) * u`, in `g`'s dtype.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let u = u.to_dtype(g.dtype())?.contiguous()?;
    g.contiguous()?.apply_op1_no_bwd(&Fused { kind: Kind::SwigluForward, other: &u, grad: None })
}

/// The gradients of `silu(g) * u` with respect to `g` and `u` for the output gradient `ds`.
pub fn swiglu_backward(g: &Tensor, u: &Tensor, ds: &Tensor) -> Result<(Tensor, Tensor)> {
    let u = u.to_dtype(g.dtype())?.contiguous()?;
    let ds = ds.to_dtype(g.dtype())?.contiguous()?;
    let both = g.contiguous()?.apply_op1_no_bwd(&Fused { kind: Kind::SwigluBackward, other: &u, grad: Some(&ds) })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `swiglu_backward` for a caller done with `g` and `u`: on CUDA (f32 or bf16, both contiguous,
/// of one shape and dtype) `dg` is written over `g` and `du` over `u`, so the backward allocates
/// no `[tokens, intermediate]` pair (the MLP's largest transient); elsewhere it is
/// `swiglu_backward`. `g` and `u` must not share their storage with any other live tensor.
pub fn swiglu_backward_in_place(g: Tensor, u: Tensor, ds: &Tensor) -> Result<(Tensor, Tensor)> {
    let fits = g.device().is_cuda()
        && matches!(g.dtype(), DType::F32 | DType::BF16)
        && u.dtype() == g.dtype()
        && g.is_contiguous()
        && u.is_contiguous()
        && u.shape() == g.shape()
        && ds.shape() == g.shape();
    if !fits {
        return swiglu_backward(&g, &u, ds);
    }
    let ds = ds.to_dtype(g.dtype())?.contiguous()?;
    g.inplace_op1(&SwigluBackwardInPlace { u: &u, ds: &ds })?;
    Ok((g, u))
}

/// `[.., heads * head_dim]` x2 -> `[.., heads]`: the dot product of each head's slice, in f32
/// (f64 for f64 inputs).
pub fn head_dot(a: &Tensor, b: &Tensor, head_dim: usize) -> Result<Tensor> {
    let b = b.to_dtype(a.dtype())?.contiguous()?;
    a.contiguous()?.apply_op1_no_bwd(&Fused { kind: Kind::HeadDot { head_dim }, other: &b, grad: None })
}

/// `x` made contiguous. On CUDA, a view of at most four dimensions whose last dimension is
/// contiguous (`[b, t, h, d]` transposed to `[b, h, t, d]`, a narrow of the leading dimensions)
/// is copied a row of `d` at a time (`copy_rows`); anything else by candle's copy.
pub fn contiguous_rows(x: &Tensor) -> Result<Tensor> {
    let l = x.layout();
    let rows_contiguous = l.dims().len() <= 4 && l.stride().last() == Some(&1);
    if x.is_contiguous() || x.device().is_cpu() || !rows_contiguous || !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return x.contiguous();
    }
    x.apply_op1_no_bwd(&CopyRows)
}

/// `acc [.., t, d]` (f32, or f64 for the CPU's f64 data) plus `src [.., e, d]` (`e <= t`) on
/// its first `e` rows of every leading index; on CUDA written into `acc`'s storage, which the
/// caller must own.
pub fn add_prefix(acc: Tensor, src: &Tensor) -> Result<Tensor> {
    let rank = acc.rank();
    let fits = rank >= 2
        && src.rank() == rank
        && acc.dims()[..rank - 2] == src.dims()[..rank - 2]
        && acc.dim(rank - 1)? == src.dim(rank - 1)?
        && src.dim(rank - 2)? <= acc.dim(rank - 2)?;
    if !fits {
        candle_core::bail!("add_prefix: {:?} does not fit the first rows of {:?}", src.shape(), acc.shape());
    }
    let (t, e) = (acc.dim(rank - 2)?, src.dim(rank - 2)?);
    let kernel = acc.device().is_cuda() && acc.dtype() == DType::F32 && matches!(src.dtype(), DType::F32 | DType::BF16);
    if !kernel {
        let padded = src.to_dtype(acc.dtype())?.pad_with_zeros(rank - 2, 0, t - e)?;
        return acc + padded;
    }
    let acc = acc.contiguous()?;
    acc.inplace_op1(&AddPrefix { src: &src.contiguous()?, rows: t })?;
    Ok(acc)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AddPrefix<'a> {
    src: &'a Tensor,
    /// Rows of the accumulator per leading index.
    rows: usize,
}

impl InplaceOp1 for AddPrefix<'_> {
    fn name(&self) -> &'static str {
        "add-prefix"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("add-prefix: the CPU uses candle ops")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("add-prefix: accumulator not contiguous".into()))?;
        let dev = s.device().clone();
        let src = self.src;
        let d = src.dim(src.rank() - 1)?;
        let (n, per_src, per_dst) = (src.elem_count() as u64, (src.dim(src.rank() - 2)? * d) as u64, (self.rows * d) as u64);
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let guard = src.storage_and_layout().0;
        let mut dst = s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        macro_rules! go {
            ($t:ty, $suffix:literal) => {{
                let from = cuda_slice_of!(guard, src, $t);
                let func = dev.get_or_load_custom_func(concat!("add_prefix_", $suffix), "fused", KERNELS)?;
                let mut builder = func.builder();
                builder.arg(&mut dst).arg(&from).arg(&n).arg(&per_src).arg(&per_dst);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { builder.launch(cfg) }.w()?;
            }};
        }
        match src.dtype() {
            DType::F32 => go!(f32, "f32"),
            _ => go!(half::bf16, "bf16"),
        }
        Ok(())
    }
}

/// The SwiGLU backward writing `dg` over `g` (the op's storage) and `du` over `u`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct SwigluBackwardInPlace<'a> {
    u: &'a Tensor,
    ds: &'a Tensor,
}

impl InplaceOp1 for SwigluBackwardInPlace<'_> {
    fn name(&self) -> &'static str {
        "swiglu-backward-in-place"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("swiglu-backward-in-place: the CPU uses swiglu_backward")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("swiglu-backward-in-place: g not contiguous".into()))?;
        let dev = s.device().clone();
        let n = (b - a) as u64;
        let dtype = s.dtype();
        // a thread per 16 bytes
        let per_thread = if dtype == DType::BF16 { 8 } else { 4 };
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(256 * per_thread).clamp(1, 1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (u, ds) = (self.u, self.ds);
        let (u_guard, ds_guard) = (u.storage_and_layout().0, ds.storage_and_layout().0);
        macro_rules! go {
            ($t:ty, $suffix:literal) => {{
                let mut g = s.as_cuda_slice_mut::<$t>()?.slice_mut(a..b);
                let us = cuda_slice_of!(u_guard, u, $t);
                let dss = cuda_slice_of!(ds_guard, ds, $t);
                let func = dev.get_or_load_custom_func(concat!("swiglu_bwd_inplace_", $suffix), "fused", KERNELS)?;
                let mut builder = func.builder();
                builder.arg(&mut g).arg(&us).arg(&dss).arg(&n);
                // SAFETY: argument types and order match the kernel's signature; the kernel
                // also writes u's storage, which the caller has given up (see
                // `swiglu_backward_in_place`)
                unsafe { builder.launch(cfg) }.w()?;
            }};
        }
        match dtype {
            DType::F32 => go!(f32, "f32"),
            DType::BF16 => go!(half::bf16, "bf16"),
            d => candle_core::bail!("swiglu-backward-in-place: no kernel for {d:?}"),
        }
        Ok(())
    }
}

struct CopyRows;

impl CustomOp1 for CopyRows {
    fn name(&self) -> &'static str {
        "copy-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &candle_core::Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("copy-rows: the CPU uses candle's copy")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        fn launch<T>(s: &candle_core::CudaStorage, l: &candle_core::Layout, suffix: &str) -> Result<candle_core::CudaStorage>
        where
            T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
        {
            let pad = 4 - l.dims().len();
            let dims: Vec<usize> = std::iter::repeat_n(1, pad).chain(l.dims().iter().copied()).collect();
            let strides: Vec<usize> = std::iter::repeat_n(0, pad).chain(l.stride().iter().copied()).collect();
            let (d, rows) = (dims[3], dims[0] * dims[1] * dims[2]);
            let dev = s.device().clone();
            let src = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
            let func = dev.get_or_load_custom_func(&format!("copy_rows_{suffix}"), "fused", KERNELS)?;
            // SAFETY: every element is written by the kernel
            let out = unsafe { dev.alloc::<T>(rows * d)? };
            let cfg = LaunchConfig { grid_dim: ((rows as u64).div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (rows_u, d_i, n1, n2) = (rows as u64, d as i32, dims[1] as i32, dims[2] as i32);
            let (s0, s1, s2) = (strides[0] as u64, strides[1] as u64, strides[2] as u64);
            let mut b = func.builder();
            b.arg(&src).arg(&out).arg(&rows_u).arg(&d_i).arg(&n1).arg(&n2).arg(&s0).arg(&s1).arg(&s2);
            // SAFETY: argument types and order match the kernel's signature
            unsafe { b.launch(cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = match s.dtype() {
            DType::F32 => launch::<f32>(s, l, "f32")?,
            DType::BF16 => launch::<half::bf16>(s, l, "bf16")?,
            d => candle_core::bail!("copy-rows: no kernel for {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// The kernels on `device` against the CPU (f64 arithmetic) on the same inputs, f32 and bf16,
/// for a row length that moves 16 bytes per access and one that leaves a tail. Tolerances
/// relative to the largest reference value: 1e-5 in f32; in bf16 one unit in the last place
/// (2^-7: the device's f32 result and the CPU's f64 one may round to neighbouring values), the
/// head dot (f32 out) 1e-5.
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    for (width, dtype) in [(1536, DType::F32), (1536, DType::BF16), (1535, DType::BF16)] {
        let g = (Tensor::randn(0f32, 1.0, (37, width), &cpu)? * 3.0)?.to_dtype(dtype)?;
        let u = Tensor::randn(0f32, 1.0, (37, width), &cpu)?.to_dtype(dtype)?;
        let ds = Tensor::randn(0f32, 1.0, (37, width), &cpu)?.to_dtype(dtype)?;
        let (gd, ud, dsd) = (g.to_device(device)?, u.to_device(device)?, ds.to_device(device)?);
        let (dg, du) = swiglu_backward(&g, &u, &ds)?;
        let (dg_d, du_d) = swiglu_backward(&gd, &ud, &dsd)?;
        let round = if dtype == DType::F32 { 1e-5 } else { 1.0 / 128.0 };
        // the in-place variant writes over copies of g and u
        let (dg_i, du_i) = swiglu_backward_in_place(gd.copy()?, ud.copy()?, &dsd)?;
        let mut cases = vec![
            ("swiglu backward in place dg", dg.clone(), dg_i, round),
            ("swiglu backward in place du", du.clone(), du_i, round),
            ("add", add(&g, &u)?, add(&gd, &ud)?, round),
            ("swiglu", swiglu(&g, &u)?, swiglu(&gd, &ud)?, round),
            ("swiglu backward dg", dg, dg_d, round),
            ("swiglu backward du", du, du_d, round),
        ];
        if width % 128 == 0 {
            cases.push(("head dot", head_dot(&g, &u, 128)?, head_dot(&gd, &ud, 128)?, 1e-5));
        }
        for (kernel, want, got, rel) in cases {
            out.push(KernelCheck::relative(kernel, format!("{dtype:?}"), (0, width), &want, &got, rel)?);
        }
        if width != 1536 {
            continue;
        }
        // row copies are exact: a transpose of the middle dimensions and a narrow of one
        let x = g.reshape((37, 12, 128))?;
        let xd = x.to_device(device)?;
        let views = [
            ("copy rows (transpose)", x.transpose(0, 1)?, xd.transpose(0, 1)?),
            ("copy rows (narrow)", x.reshape((1, 37, 12, 128))?.narrow(2, 3, 5)?, xd.reshape((1, 37, 12, 128))?.narrow(2, 3, 5)?),
        ];
        for (kernel, want, got) in views {
            let want = want.contiguous()?.to_dtype(DType::F32)?;
            let got = contiguous_rows(&got)?.to_device(&cpu)?.to_dtype(DType::F32)?;
            let d = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            out.push(KernelCheck { kernel, dtype: format!("{dtype:?}"), chunk: (0, 0), max_abs_diff: d, tolerance: 0.0 });
        }
        // one f32 add per element on both sides: exact
        let acc = Tensor::randn(0f32, 1.0, (3, 4, 37, 128), &cpu)?;
        let src = g.narrow(0, 0, 36)?.reshape((3, 4, 36, 128))?;
        let want = add_prefix(acc.clone(), &src)?;
        let got = add_prefix(acc.to_device(device)?, &src.to_device(device)?)?.to_device(&cpu)?;
        let d = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        out.push(KernelCheck { kernel: "add prefix", dtype: format!("{dtype:?}"), chunk: (0, 0), max_abs_diff: d, tolerance: 0.0 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Against the formulas written out with tensor ops (and autograd), in f64.
    #[test]
    fn match_the_unfused_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let g = (Tensor::randn(0f64, 1.0, (3, 5, 8), &dev)? * 3.0)?;
        let u = Tensor::randn(0f64, 1.0, (3, 5, 8), &dev)?;
        let ds = Tensor::randn(0f64, 1.0, (3, 5, 8), &dev)?;
        let s = (candle_nn::ops::silu(&g)? * &u)?;
        assert!(max_diff(&swiglu(&g, &u)?, &s) < 1e-12);
        let (gv, uv) = (candle_core::Var::from_tensor(&g)?, candle_core::Var::from_tensor(&u)?);
        let loss = ((gv.as_tensor() * candle_nn::ops::sigmoid(gv.as_tensor())?)? * uv.as_tensor())?;
        let grads = (loss * &ds)?.sum_all()?.backward()?;
        let (dg, du) = swiglu_backward(&g, &u, &ds)?;
        assert!(max_diff(&dg, grads.get(gv.as_tensor()).expect("dg")) < 1e-12);
        assert!(max_diff(&du, grads.get(uv.as_tensor()).expect("du")) < 1e-12);
        // the in-place variant gives the same gradients (on the CPU through swiglu_backward)
        let (dg2, du2) = swiglu_backward_in_place(g.copy()?, u.copy()?, &ds)?;
        assert!(max_diff(&dg, &dg2) < 1e-12 && max_diff(&du, &du2) < 1e-12);
        assert!(max_diff(&add(&g, &u)?, &(&g + &u)?) < 1e-12);
        let dots = (&g * &u)?.reshape((3, 5, 2, 4))?.sum(3)?;
        assert!(max_diff(&head_dot(&g, &u, 4)?, &dots) < 1e-12);
        // the first 3 of 5 rows of each leading index
        let acc = Tensor::randn(0f64, 1.0, (3, 5, 8), &dev)?;
        let sum = add_prefix(acc.clone(), &g.narrow(1, 0, 3)?)?;
        assert!(max_diff(&sum.narrow(1, 0, 3)?, &(acc.narrow(1, 0, 3)? + g.narrow(1, 0, 3)?)?) < 1e-12);
        assert!(max_diff(&sum.narrow(1, 3, 2)?, &acc.narrow(1, 3, 2)?) < 1e-12);
        Ok(())
    }

    #[test]
    fn misfit_shapes_are_refused() {
        let a = Tensor::zeros((2, 6), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&a, &b).is_err());
        assert!(add(&a, &b).is_err());
        assert!(head_dot(&a, &a, 4).is_err());
        assert!(head_dot(&a, &a, 3).is_ok());
        assert!(add_prefix(b.clone(), &a).is_err(), "more rows than the accumulator");
        assert!(add_prefix(a.clone(), &Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
