//! Causal attention as tiled tensor-core kernels on CUDA (`kernels/flash_attn.cu`), for bf16
//! data and head sizes 64 and 128: the scores and probabilities stay in registers, so neither
//! direction writes a `[queries, keys]` block to memory, and the query chunks' copies, the
//! softmax passes and the key/value gradient sums of the chunked path are gone.
//!
//! The forward returns the output and each query's log-sum-exp (base 2, f32), which the backward
//! reads to recompute the probabilities. The backward runs two kernels: one per query tile for
//! `dq`, one per key tile for `dk` and `dv` (summed over the query heads sharing a kv head in
//! registers, so nothing is added atomically and the result does not depend on scheduling).
//!
//! The chunked path (`ops::AttentionPlan`) remains for the CPU, f32/f64 data and other head
//! sizes, and is the reference of `check_device`.

use candle_core::{DType, Device, Result, Tensor};

use super::causal_softmax::CausalSpans;
use super::KernelCheck;

/// Whether the kernels take attention over `q` `[b, heads, t, head_dim]`: on CUDA, bf16, head
/// size 64 or 128.
pub fn applies(q: &Tensor) -> bool {
    cfg!(feature = "cuda") && q.device().is_cuda() && q.dtype() == DType::BF16 && matches!(q.dim(3), Ok(64 | 128))
}

/// `x` contiguous, starting on a 16-byte boundary (the kernels load rows in 16-byte pieces).
#[cfg(feature = "cuda")]
fn aligned(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.layout().start_offset() % 8 == 0 {
        Ok(x)
    } else {
        x.copy()
    }
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Device, Result, Shape, Storage, Tensor};
    use half::bf16;

    use super::{aligned, CausalSpans, KERNELS};

    /// The shapes of one attention, its tensors' CUDA slices and its launch geometry.
    pub struct Args {
        pub b: usize,
        pub h: usize,
        pub kvh: usize,
        pub t: usize,
        pub d: usize,
        dev: CudaDevice,
    }

    impl Args {
        pub fn new(q: &Tensor, k: &Tensor) -> Result<Args> {
            let (b, h, t, d) = q.dims4()?;
            let kvh = k.dim(1)?;
            let Device::Cuda(dev) = q.device() else { candle_core::bail!("flash attention: not on a CUDA device") };
            Ok(Args { b, h, kvh, t, d, dev: dev.clone() })
        }

        /// The kernel `name` for this head size, allowed `smem` bytes of dynamic shared memory.
        fn func(&self, name: &str, smem: usize) -> Result<CudaFunction> {
            let f = self.dev.get_or_load_custom_func(&format!("{name}_{}", self.d), "flash_attn", KERNELS)?.into_cuda_function();
            if smem > 48 << 10 {
                f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
            }
            Ok(f)
        }

        /// One block of 128 threads per 64-row tile of each of `heads` heads of each batch row.
        fn cfg(&self, heads: usize, smem: usize) -> LaunchConfig {
            LaunchConfig { grid_dim: (self.t.div_ceil(64) as u32, heads as u32, self.b as u32), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 }
        }

        fn wrap<T: CudaDType>(&self, s: CudaSlice<T>, shape: impl Into<Shape>) -> Tensor {
            Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, self.dev.clone())), shape, BackpropOp::none(), false)
        }
    }

    pub fn forward(a: &Args, q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        let starts = spans.device_starts();
        let (qg, kg, vg, sg) = (q.storage_and_layout().0, k.storage_and_layout().0, v.storage_and_layout().0, starts.storage_and_layout().0);
        let (qs, ks, vs) = (cuda_slice_of!(qg, q, bf16), cuda_slice_of!(kg, k, bf16), cuda_slice_of!(vg, v, bf16));
        let ss = cuda_slice_of!(sg, starts, u32);
        let rows = a.b * a.h * a.t;
        // SAFETY (both): every element is written by the kernel (every query row of every head)
        let o = unsafe { a.dev.alloc::<bf16>(rows * a.d)? };
        let lse = unsafe { a.dev.alloc::<f32>(rows)? };
        let func = a.func("flash_fwd", 0)?;
        let (t, h, kvh) = (a.t as i32, a.h as i32, a.kvh as i32);
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let stream = a.dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&qs).arg(&ks).arg(&vs).arg(&o).arg(&lse).arg(&t).arg(&h).arg(&kvh).arg(&ss).arg(&scale_log2);
        // SAFETY: argument types and order match the kernel's signature
        unsafe { bld.launch(a.cfg(a.h, 0)) }.w()?;
        drop(bld);
        Ok((a.wrap(o, (a.b, a.h, a.t, a.d)), a.wrap(lse, (a.b, a.h, a.t))))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        a: &Args,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        dsum: &Tensor,
        spans: &CausalSpans,
        scale: f64,
    ) -> Result<[Tensor; 3]> {
        let (q, k, v, d_o) = (aligned(q)?, aligned(k)?, aligned(v)?, aligned(d_o)?);
        let (lse, dsum) = (lse.contiguous()?, dsum.contiguous()?);
        let starts = spans.device_starts();
        let guards = [&q, &k, &v, &d_o].map(|x| x.storage_and_layout().0);
        let [qg, kg, vg, og] = guards;
        let (qs, ks, vs, os) = (cuda_slice_of!(qg, q, bf16), cuda_slice_of!(kg, k, bf16), cuda_slice_of!(vg, v, bf16), cuda_slice_of!(og, d_o, bf16));
        let (lg, dg, sg) = (lse.storage_and_layout().0, dsum.storage_and_layout().0, starts.storage_and_layout().0);
        let (ls, ds, ss) = (cuda_slice_of!(lg, lse, f32), cuda_slice_of!(dg, dsum, f32), cuda_slice_of!(sg, starts, u32));
        let (b, t, h, kvh) = (a.b as i32, a.t as i32, a.h as i32, a.kvh as i32);
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let scale = scale as f32;
        let pitch = (a.d + 8) * 2;
        let stream = a.dev.cuda_stream();
        // SAFETY (both): every element is written by the kernels (every row of every head)
        let dq = unsafe { a.dev.alloc::<bf16>(a.b * a.h * a.t * a.d)? };
        let dkv = unsafe { a.dev.alloc::<bf16>(2 * a.b * a.kvh * a.t * a.d)? };
        {
            let smem = 4 * 64 * pitch;
            let func = a.func("flash_dq", smem)?;
            let mut bld = stream.launch_builder(&func);
            bld.arg(&qs).arg(&ks).arg(&vs).arg(&os).arg(&ls).arg(&ds).arg(&dq).arg(&t).arg(&h).arg(&kvh).arg(&ss).arg(&scale_log2).arg(&scale);
            // SAFETY: argument types and order match the kernel's signature
            unsafe { bld.launch(a.cfg(a.h, smem)) }.w()?;
        }
        {
            let smem = (2 * 64 + 2 * 32) * pitch + 2 * 32 * 4;
            let func = a.func("flash_dkv", smem)?;
            let mut bld = stream.launch_builder(&func);
            bld.arg(&qs).arg(&ks).arg(&vs).arg(&os).arg(&ls).arg(&ds).arg(&dkv).arg(&b).arg(&t).arg(&h).arg(&kvh).arg(&ss).arg(&scale_log2).arg(&scale);
            // SAFETY: argument types and order match the kernel's signature
            unsafe { bld.launch(a.cfg(a.kvh, smem)) }.w()?;
        }
        let dkv = a.wrap(dkv, (2, a.b, a.kvh, a.t, a.d));
        Ok([a.wrap(dq, (a.b, a.h, a.t, a.d)), dkv.get(0)?, dkv.get(1)?])
    }
}

/// Attention over `q` `[b, heads, t, d]`, `k` and `v` `[b, kv_heads, t, d]` (see `applies`):
/// the output `[b, heads, t, d]` and each query's log-sum-exp of the scaled scores, base 2,
/// `[b, heads, t]` f32. No autograd.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64) -> Result<(Tensor, Tensor)> {
    check(q, k, spans)?;
    #[cfg(feature = "cuda")]
    {
        launch::forward(&launch::Args::new(q, k)?, q, k, v, spans, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (v, scale);
        unreachable!("check refuses every tensor without the cuda feature")
    }
}

/// `[dq, dk, dv]` for the output gradient `d_o` `[b, heads, t, d]`, the forward's `lse` and
/// `dsum = sum_d d_o * o` `[b, heads, t]` (f32). No autograd.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    dsum: &Tensor,
    spans: &CausalSpans,
    scale: f64,
) -> Result<[Tensor; 3]> {
    check(q, k, spans)?;
    let rows = (q.dim(0)?, q.dim(1)?, q.dim(2)?);
    if d_o.shape() != q.shape() || lse.dims() != [rows.0, rows.1, rows.2] || dsum.dims() != lse.dims() {
        candle_core::bail!("flash attention backward: d_o {:?}, lse {:?} or D {:?} do not fit q {:?}", d_o.shape(), lse.shape(), dsum.shape(), q.shape());
    }
    if lse.dtype() != DType::F32 || dsum.dtype() != DType::F32 {
        candle_core::bail!("flash attention backward: lse and D are f32");
    }
    #[cfg(feature = "cuda")]
    {
        launch::backward(&launch::Args::new(q, k)?, q, k, v, &d_o.to_dtype(DType::BF16)?, lse, dsum, spans, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (v, scale);
        unreachable!("check refuses every tensor without the cuda feature")
    }
}

fn check(q: &Tensor, k: &Tensor, spans: &CausalSpans) -> Result<()> {
    if !applies(q) {
        candle_core::bail!("flash attention: q {:?} {:?} on {:?} (bf16 on CUDA, head size 64 or 128)", q.shape(), q.dtype(), q.device().location());
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kvh, kt, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) || kvh == 0 || h % kvh != 0 || k.dtype() != q.dtype() || spans.batch() != b {
        candle_core::bail!("flash attention: q {:?}, k {:?} and {} spans do not fit", q.shape(), k.shape(), spans.batch());
    }
    Ok(())
}

/// The kernels against the chunked path on the CPU (f32 arithmetic on the same bf16 inputs)
/// for both head sizes, a length that is not a multiple of the 64-row tiles, grouped query heads
/// and batch rows padded on the left (one past two whole key tiles). The backward is given the
/// CPU's `D`. Tolerances: the output within 2^-7 of the largest |v| (the probabilities and the
/// output are each rounded once to bf16); the gradients within 2^-5 of their largest magnitude
/// (the probabilities or score gradients are rounded to bf16 before their second product, then
/// the result), as the bf16 parity check allows.
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    if !device.is_cuda() {
        return Ok(Vec::new());
    }
    let (b, h, kvh, t) = (2, 4, 2, 200);
    let starts = [3usize, 150];
    let (spans_cpu, spans_dev) = (CausalSpans::new(&starts, &cpu)?, CausalSpans::new(&starts, device)?);
    let max = |x: &Tensor| -> Result<f32> { x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
    let mut out = Vec::new();
    for d in [64usize, 128] {
        let scale = 1.0 / (d as f64).sqrt();
        let bf = |shape: (usize, usize, usize, usize)| -> Result<Tensor> { Tensor::randn(0f32, 1.0, shape, &cpu)?.to_dtype(DType::BF16) };
        let (q, k, v, d_o) = (bf((b, h, t, d))?, bf((b, kvh, t, d))?, bf((b, kvh, t, d))?, bf((b, h, t, d))?);
        let f32s = [&q, &k, &v, &d_o].map(|x| x.to_dtype(DType::F32));
        let [qf, kf, vf, of] = f32s;
        let (qf, kf, vf, of) = (qf?, kf?, vf?, of?);
        let plan = super::ops::AttentionPlan::new(&qf, &kf, &spans_cpu, 64, scale)?;
        let want = plan.forward(&qf, &kf, &vf)?;
        let dsum = (&of * &want)?.sum_keepdim(3)?;
        let [dq, dk, dv] = plan.backward(&qf, &kf, &vf, &of, &dsum, None)?;
        let on = |x: &Tensor| x.to_device(device);
        let (got, lse) = forward(&on(&q)?, &on(&k)?, &on(&v)?, &spans_dev, scale)?;
        let grads = backward(&on(&q)?, &on(&k)?, &on(&v)?, &on(&d_o)?, &lse, &on(&dsum.squeeze(3)?)?, &spans_dev, scale)?;
        let diff = |want: &Tensor, got: &Tensor| -> Result<f32> { max(&(want - got.to_device(&cpu)?.to_dtype(DType::F32)?)?) };
        let tol = 2f32.powi(-7) * max(&vf)?;
        out.push(KernelCheck { kernel: "flash attention", dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(&want, &got)?, tolerance: tol });
        for (kernel, want, got) in [("flash attention dq", &dq, &grads[0]), ("flash attention dk", &dk, &grads[1]), ("flash attention dv", &dv, &grads[2])] {
            out.push(KernelCheck { kernel, dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(want, got)?, tolerance: 2f32.powi(-5) * max(want)? });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_and_other_dtypes_are_left_to_the_chunked_path() -> Result<()> {
        let q = Tensor::zeros((1, 2, 8, 64), DType::BF16, &Device::Cpu)?;
        assert!(!applies(&q), "CPU");
        let spans = CausalSpans::new(&[0], &Device::Cpu)?;
        let err = forward(&q, &q, &q, &spans, 0.125).expect_err("refused on the CPU").to_string();
        assert!(err.contains("bf16 on CUDA"), "{err}");
        Ok(())
    }
}
