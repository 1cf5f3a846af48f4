//! AdamW (decoupled weight decay, bias-corrected moments) over named f32 variables, as
//! `torch.optim.AdamW` computes it, with the gradients' global norm clipped first. On the GPU one
//! launch steps every variable (`kernels/adamw.cu`: a table of the variables, gradients and
//! moments), after two that sum the gradients' squares on the device, so clipping needs no read
//! back; on the CPU two in-place passes per variable, the same f32 arithmetic. Written as candle
//! ops it was about sixteen launches and as many temporaries per variable, and clipping read
//! every gradient's norm back to the host.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor, Var};

use super::{KernelCheck, MlError};

pub(crate) struct AdamW {
    pub(crate) vars: Vec<(String, Var)>,
    /// Per variable `[2, n]` f32: the first and second moments.
    state: Vec<Tensor>,
    t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub(crate) fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<AdamW> {
        let mut state = Vec::with_capacity(vars.len());
        for (name, v) in &vars {
            if v.dtype() != DType::F32 {
                candle_core::bail!("AdamW: variable {name} is {:?}, expected f32", v.dtype());
            }
            state.push(Tensor::zeros((2, v.elem_count()), DType::F32, v.device())?);
        }
        Ok(AdamW { vars, state, t: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay })
    }

    /// One step with `grads[i]` the gradient of variable `i`.
    /// One step with the gradients of the variables, in order, after scaling them all by
    /// `max_grad_norm / (norm + 1e-6)` where their global norm exceeds `max_grad_norm`
    /// (0: no clipping).
    pub(crate) fn step(&mut self, grads: &[Tensor], lr: f64, max_grad_norm: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!("AdamW: {} gradients for {} variables", grads.len(), self.vars.len());
        }
        let grads = grads
            .iter()
            .zip(&self.vars)
            .map(|(g, (_, var))| {
                let g = g.to_dtype(DType::F32)?;
                if g.elem_count() != var.elem_count() {
                    candle_core::bail!("AdamW: gradient of {:?} for a variable of {:?}", g.shape(), var.shape());
                }
                // on CUDA the step reads a gradient whose rows lie apart (a block of a wider
                // matrix) where it is; elsewhere, and any other layout, contiguous
                if g.device().is_cuda() && (g.is_contiguous() || cuda_rows(&g).is_some()) {
                    return Ok(g);
                }
                g.flatten_all()?.contiguous()
            })
            .collect::<Result<Vec<_>>>()?;
        self.t += 1;
        let t = self.t as i32;
        let update = Update {
            lr: lr as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
            bc1: (1.0 - self.beta1.powi(t)) as f32,
            sqrt_bc2: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            eps: self.eps as f32,
        };
        let moments = Moments { b1: self.beta1 as f32, b2: self.beta2 as f32 };
        #[cfg(feature = "cuda")]
        if let Some(Device::Cuda(dev)) = self.vars.first().map(|(_, v)| v.device()) {
            return cuda::step(dev, &self.vars, &self.state, &grads, &moments, &update, max_grad_norm as f32);
        }
        let mut clip = 1.0;
        if max_grad_norm > 0.0 {
            let mut sq = 0.0;
            for g in &grads {
                sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            let norm = sq.sqrt();
            if norm > max_grad_norm {
                clip = max_grad_norm / (norm + 1e-6);
            }
        }
        for ((_, var), (state, g)) in self.vars.iter().zip(self.state.iter().zip(&grads)) {
            let g = if clip == 1.0 { g.clone() } else { (g * clip)? };
            state.inplace_op2(&g, &moments)?;
            var.as_tensor().inplace_op2(state, &update)?;
        }
        Ok(())
    }

    pub(crate) fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, var), state) in self.vars.iter().zip(&self.state) {
            out.insert(format!("{name}.exp_avg"), state.get(0)?.reshape(var.shape())?);
            out.insert(format!("{name}.exp_avg_sq"), state.get(1)?.reshape(var.shape())?);
        }
        Ok(out)
    }

    /// Resume at step `t` from `state_tensors`' output.
    pub(crate) fn load_state(&mut self, t: u64, tensors: &HashMap<String, Tensor>, device: &Device) -> std::result::Result<(), MlError> {
        for ((name, var), state) in self.vars.iter().zip(self.state.iter_mut()) {
            let get = |suffix: &str| -> std::result::Result<Tensor, MlError> {
                let k = format!("{name}.{suffix}");
                let t = tensors.get(&k).ok_or_else(|| MlError::Model(format!("checkpoint lacks optimizer tensor {k}")))?;
                if t.elem_count() != var.elem_count() {
                    return Err(MlError::Model(format!("optimizer tensor {k} has shape {:?}, the variable {:?}", t.shape(), var.shape())));
                }
                Ok(t.to_device(device)?.to_dtype(DType::F32)?.flatten_all()?)
            };
            *state = Tensor::stack(&[get("exp_avg")?, get("exp_avg_sq")?], 0)?;
        }
        self.t = t;
        Ok(())
    }
}

/// `[m; v]` updated in place from the gradient.
struct Moments {
    b1: f32,
    b2: f32,
}

/// The variable updated in place from `[m; v]`.
struct Update {
    lr: f32,
    decay: f32,
    bc1: f32,
    sqrt_bc2: f32,
    eps: f32,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let g = f32_slice(s2, l2, "gradient")?;
        let state = f32_slice_mut(s1, l1, "state")?;
        let n = g.len();
        let (m, v) = state.split_at_mut(n);
        for i in 0..n {
            m[i] = self.b1 * m[i] + (1.0 - self.b1) * g[i];
            v[i] = self.b2 * v[i] + (1.0 - self.b2) * g[i] * g[i];
        }
        Ok(())
    }
}

impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let state = f32_slice(s2, l2, "state")?;
        let p = f32_slice_mut(s1, l1, "variable")?;
        let n = p.len();
        for i in 0..n {
            let denom = state[n + i].sqrt() / self.sqrt_bc2 + self.eps;
            p[i] = p[i] * self.decay - self.lr / self.bc1 * state[i] / denom;
        }
        Ok(())
    }
}

/// A 2-D f32 `t`'s row length and row stride where its rows are each contiguous, lie evenly
/// apart and do not overlap (the adamw kernels' strided gradients).
fn cuda_rows(t: &Tensor) -> Option<(usize, usize)> {
    let (rows, cols) = t.dims2().ok()?;
    let st = t.stride();
    (t.dtype() == DType::F32 && (st[1] == 1 || cols <= 1) && (st[0] >= cols || rows <= 1)).then_some((cols, if rows <= 1 { cols } else { st[0] }))
}

/// `bf16(bf16(x) · scale)` of each `(x, scale, into)`, f32 tensors on one CUDA device, in one
/// launch (`factor_casts`): the trained factors in the activations' dtype for a step's forwards,
/// the same values as a cast then a scaling in bf16, which took two launches per factor. Each
/// result is written into `into` where given (a bf16 matrix of `x`'s shape whose rows are each
/// contiguous: a block of a widened weight, say) and is that tensor; the others are views of one
/// new buffer, each starting 128 bytes apart at least. `None` where the tensors are not all
/// contiguous f32 on the same CUDA device (the caller casts them one by one); an error where an
/// `into` does not fit its source.
pub(crate) fn cast_scaled_bf16(xs: &[(&Tensor, f64, Option<&Tensor>)]) -> Result<Option<Vec<Tensor>>> {
    let Some((first, _, _)) = xs.first() else { return Ok(Some(Vec::new())) };
    let Device::Cuda(dev) = first.device() else { return Ok(None) };
    if xs.iter().any(|(x, _, _)| x.dtype() != DType::F32 || !x.is_contiguous() || !x.device().same_device(first.device())) {
        return Ok(None);
    }
    for (x, _, into) in xs {
        if let Some(into) = into {
            let fits = into.dims() == x.dims()
                && into.rank() == 2
                && into.dtype() == DType::BF16
                && into.stride()[1] == 1
                && (into.dim(0)? <= 1 || into.stride()[0] >= into.dim(1)?)
                && into.device().same_device(x.device());
            if !fits {
                candle_core::bail!("factor casts: {:?} cannot be written into {:?} {:?}", x.shape(), into.layout(), into.dtype());
            }
        }
    }
    #[cfg(feature = "cuda")]
    return cuda::cast_scaled_bf16(dev, xs).map(Some);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{Result, Storage, Tensor, Var};

    use super::{Moments, Update};

    const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

    /// The step of every variable in one launch (two more sum the gradients' squares when
    /// clipping). Variables and moments are contiguous f32 on `dev`, gradients contiguous or
    /// with rows apart (`super::cuda_rows`).
    pub(super) fn step(dev: &CudaDevice, vars: &[(String, Var)], state: &[Tensor], grads: &[Tensor], m: &Moments, u: &Update, max_norm: f32) -> Result<()> {
        let stream = dev.cuda_stream();
        let tensors: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).chain(grads).chain(state).collect();
        let locks: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        // each gradient's row length and stride
        let rows: Vec<(u64, u64)> = grads
            .iter()
            .map(|g| match (g.is_contiguous(), super::cuda_rows(g)) {
                (true, _) => Ok((g.elem_count() as u64, g.elem_count() as u64)),
                (false, Some((cols, ld))) => Ok((cols as u64, ld as u64)),
                (false, None) => Err(candle_core::Error::Msg(format!("adamw: a gradient {:?} neither contiguous nor in rows", g.layout()))),
            })
            .collect::<Result<_>>()?;
        let n = vars.len();
        // the address of each tensor's first element; the kernels write the variables and the
        // moments through theirs (every op runs on the one stream, in order)
        let mut addr = Vec::with_capacity(tensors.len());
        let mut reads = Vec::with_capacity(tensors.len());
        for (i, (t, (g, l))) in tensors.iter().zip(&locks).enumerate() {
            let Storage::Cuda(cs) = &**g else { candle_core::bail!("adamw: a tensor is not on the cuda device") };
            let is_grad = (n..2 * n).contains(&i);
            if !l.is_contiguous() && !is_grad {
                candle_core::bail!("adamw: {:?} is not contiguous", t.shape());
            }
            let (p, read) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
            addr.push(p + 4 * l.start_offset() as u64);
            reads.push(read);
        }
        if n > 65_535 {
            candle_core::bail!("adamw: {n} variables, more than a grid has rows");
        }
        let mut table = Vec::with_capacity(6 * n);
        let mut longest = 1;
        for (i, (_, v)) in vars.iter().enumerate() {
            let (cols, ld) = rows[i];
            table.extend_from_slice(&[addr[i], addr[n + i], addr[2 * n + i], v.elem_count() as u64, cols.max(1), ld]);
            longest = longest.max(v.elem_count());
        }
        let table = stream.clone_htod(&table).w()?;
        let segs = n as u32;
        let blocks = |cap: usize| longest.div_ceil(256).clamp(1, cap) as u32;
        // SAFETY (each launch): argument types and order match the kernel's signature; the table
        // holds `segs` segments of live, contiguous f32 buffers of the lengths it gives
        let sum_sq = unsafe { dev.alloc::<f32>(1)? };
        if max_norm > 0.0 {
            let x = blocks(64);
            let parts = unsafe { dev.alloc::<f32>(x as usize * n)? };
            let f = dev.get_or_load_custom_func("grad_sq_partials", "adamw", KERNELS)?;
            let mut b = f.builder();
            b.arg(&table).arg(&parts);
            unsafe { b.launch(LaunchConfig { grid_dim: (x, segs, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
            let f = dev.get_or_load_custom_func("sum_partials", "adamw", KERNELS)?;
            let count = (x as usize * n) as u64;
            let mut b = f.builder();
            b.arg(&parts).arg(&count).arg(&sum_sq);
            unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        }
        let f = dev.get_or_load_custom_func("adamw_step", "adamw", KERNELS)?;
        let mut b = f.builder();
        b.arg(&table).arg(&sum_sq).arg(&max_norm).arg(&m.b1).arg(&m.b2);
        b.arg(&u.lr).arg(&u.decay).arg(&u.bc1).arg(&u.sqrt_bc2).arg(&u.eps);
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks(1024), segs, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        drop(reads);
        Ok(())
    }

    /// See `super::cast_scaled_bf16`; every source is contiguous f32 on `dev`, every `into` a
    /// bf16 matrix of its source's shape with contiguous rows.
    pub(super) fn cast_scaled_bf16(dev: &CudaDevice, xs: &[(&Tensor, f64, Option<&Tensor>)]) -> Result<Vec<Tensor>> {
        // each result not written elsewhere starts on a 64-element (128-byte) boundary of the
        // one buffer
        let mut starts = Vec::with_capacity(xs.len());
        let mut total = 0;
        for (x, _, into) in xs {
            starts.push(total);
            if into.is_none() {
                total += x.elem_count().div_ceil(64) * 64;
            }
        }
        let n = xs.len();
        if n > 65_535 {
            candle_core::bail!("factor casts: {n} tensors, more than a grid has rows");
        }
        let stream = dev.cuda_stream();
        // SAFETY: the kernel writes every element of each result; the padding between them is
        // never read
        let mut out = unsafe { dev.alloc::<half::bf16>(total.max(1))? };
        let (base, out_write) = out.device_ptr_mut(&stream);
        let locks: Vec<_> = xs.iter().map(|(x, _, _)| x.storage_and_layout()).collect();
        // the destinations' addresses, each taken under a read lock let go before the launch
        // (the kernel writes only the given blocks, which nothing else reads meanwhile: every op
        // runs on the one stream, in order)
        let mut dests = Vec::with_capacity(n);
        for ((x, _, into), start) in xs.iter().zip(&starts) {
            let n = x.elem_count() as u64;
            dests.push(match into {
                Some(into) => {
                    let (g, l) = into.storage_and_layout();
                    let Storage::Cuda(cs) = &*g else { candle_core::bail!("factor casts: a destination is not on the cuda device") };
                    let (p, _read) = cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream);
                    (p + 2 * l.start_offset() as u64, into.dim(1)? as u64, l.stride()[0] as u64)
                }
                None => (base + 2 * *start as u64, n, n),
            });
        }
        let mut table = Vec::with_capacity(6 * n);
        let mut reads = Vec::with_capacity(n);
        let mut longest = 1;
        for (((x, scale, _), (g, l)), (dst, cols, ld)) in xs.iter().zip(&locks).zip(&dests) {
            let Storage::Cuda(cs) = &**g else { candle_core::bail!("factor casts: a tensor is not on the cuda device") };
            let (p, read) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
            reads.push(read);
            // the scale as the bf16 scaling would round it
            let scale = half::bf16::from_f64(*scale).to_f32();
            table.extend_from_slice(&[p + 4 * l.start_offset() as u64, *dst, x.elem_count() as u64, scale.to_bits() as u64, (*cols).max(1), *ld]);
            longest = longest.max(x.elem_count());
        }
        let table = stream.clone_htod(&table).w()?;
        let f = dev.get_or_load_custom_func("factor_casts", "adamw", KERNELS)?;
        let mut b = f.builder();
        b.arg(&table);
        let blocks = longest.div_ceil(256).clamp(1, 64) as u32;
        // SAFETY: the argument matches the kernel's signature; the table holds `n` segments of
        // live f32 sources and bf16 destinations inside `out`, of the lengths it gives
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, n as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        drop(b);
        drop((reads, out_write));
        let flat = Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())), total.max(1), BackpropOp::none(), false);
        xs.iter()
            .zip(starts)
            .map(|((x, _, into), start)| match into {
                Some(into) => Ok((*into).clone()),
                None => flat.narrow(0, start, x.elem_count())?.reshape(x.shape()),
            })
            .collect()
    }
}

/// Three steps on `device` against the CPU on the same variables and gradients, two variables
/// of different sizes, without clipping and with a norm limit the gradients exceed: the same f32
/// arithmetic, so within a few f32 roundings (1e-6 relative to the largest value).
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let shapes = [(37, 300), (16, 9)];
    let init: Vec<Tensor> = shapes.iter().map(|&s| Tensor::randn(0f32, 1.0, s, &cpu)).collect::<Result<_>>()?;
    let grads: Vec<Vec<Tensor>> =
        (0..3).map(|_| shapes.iter().map(|&s| Tensor::randn(0f32, 1.0, s, &cpu)).collect::<Result<_>>()).collect::<Result<_>>()?;
    // with `in_rows`, the second gradient on the device is a block of a wider matrix, its rows
    // 20 elements apart (as q, k and v's B gradients come from one GEMM)
    let run = |dev: &Device, max_norm: f64, in_rows: bool| -> Result<Tensor> {
        let vars: Vec<(String, Var)> =
            init.iter().enumerate().map(|(i, t)| Ok((format!("w{i}"), Var::from_tensor(&t.to_device(dev)?)?))).collect::<Result<_>>()?;
        let mut opt = AdamW::new(vars.clone(), 0.01)?;
        for g in &grads {
            let g: Vec<Tensor> = g
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    if in_rows && i == 1 {
                        let (r, c) = g.dims2()?;
                        Tensor::cat(&[&Tensor::ones((r, 3), DType::F32, &cpu)?, g, &Tensor::ones((r, 20 - 3 - c), DType::F32, &cpu)?], 1)?.to_device(dev)?.narrow(1, 3, c)
                    } else {
                        g.to_device(dev)
                    }
                })
                .collect::<Result<_>>()?;
            opt.step(&g, 1e-2, max_norm)?;
        }
        let flat: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().flatten_all()?.to_device(&cpu)).collect::<Result<_>>()?;
        Tensor::cat(&flat, 0)
    };
    let mut out = Vec::new();
    // the gradients' norm is about sqrt(37 * 300 + 16 * 9) = 106: clipped to 10
    for (kernel, max_norm, in_rows) in [("adamw", 0.0, false), ("adamw-clipped", 10.0, false), ("adamw, a gradient in rows of a wider matrix", 0.0, true), ("adamw-clipped, a gradient in rows of a wider matrix", 10.0, true)] {
        let (want, got) = (run(&cpu, max_norm, false)?, run(device, max_norm, in_rows)?);
        out.push(KernelCheck::relative(kernel, "F32".into(), (0, 0), &want, &got, 1e-6)?);
    }
    // the factors' casts against candle's cast and bf16 scaling on the CPU, bit for bit: scales
    // of one, a power of two and one bf16 rounds
    let xs: Vec<(Tensor, f64)> = [((16, 576), 1.0), ((576, 16), 2.0), ((8, 37), 1.3)]
        .into_iter()
        .map(|(s, scale)| Ok((Tensor::randn(0f32, 1.0, s, &cpu)?, scale)))
        .collect::<Result<_>>()?;
    // the last source starts three rows into a larger tensor's storage
    let on_dev: Vec<(Tensor, f64)> = xs
        .iter()
        .enumerate()
        .map(|(i, (x, s))| {
            let x = if i + 1 == xs.len() { Tensor::cat(&[&x.narrow(0, 0, 3)?, x], 0)?.to_device(device)?.narrow(0, 3, x.dim(0)?)? } else { x.to_device(device)? };
            Ok((x, *s))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<(&Tensor, f64, Option<&Tensor>)> = on_dev.iter().map(|(x, s)| (x, *s, None)).collect();
    if let Some(got) = cast_scaled_bf16(&refs)? {
        for ((x, scale), got) in xs.iter().zip(got) {
            let want = (x.to_dtype(DType::BF16)? * *scale)?;
            out.push(KernelCheck::relative("factor-casts", "BF16".into(), (0, 0), &want, &got, 0.0)?);
        }
    }
    // the second written into columns 600.. of a wider matrix's rows 5.., the first and third
    // into new memory: the block bit for bit, the rest of the matrix as it was
    let wide = Tensor::randn(0f32, 1.0, (600, 640), &cpu)?.to_dtype(DType::BF16)?;
    let wide_dev = wide.to_device(device)?;
    let block = wide_dev.narrow(0, 5, 576)?.narrow(1, 600, 16)?;
    let refs: Vec<(&Tensor, f64, Option<&Tensor>)> = on_dev.iter().enumerate().map(|(i, (x, s))| (x, *s, (i == 1).then_some(&block))).collect();
    if let Some(got) = cast_scaled_bf16(&refs)? {
        for ((x, scale), got) in xs.iter().zip(got) {
            let want = (x.to_dtype(DType::BF16)? * *scale)?;
            out.push(KernelCheck::relative("factor-casts into a wider matrix", "BF16".into(), (0, 0), &want, &got, 0.0)?);
        }
        let mut rest = wide_dev.to_device(&cpu)?;
        let mut want_rest = wide.clone();
        for t in [&mut rest, &mut want_rest] {
            // the block zeroed on both sides: everything else must be untouched
            *t = t.slice_assign(&[5..581, 600..616], &Tensor::zeros((576, 16), DType::BF16, &cpu)?)?;
        }
        out.push(KernelCheck::relative("factor-casts into a wider matrix, the rest", "BF16".into(), (0, 0), &want_rest, &rest, 0.0)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against torch's AdamW written out in f64 over three steps with weight decay.
    #[test]
    fn matches_the_written_out_formula() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (4, 7), &dev)?;
        let var = Var::from_tensor(&init)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], 0.1)?;
        let (b1, b2, eps, wd, lr) = (0.9f64, 0.999f64, 1e-8f64, 0.1f64, 0.05f64);
        let mut p: Vec<f64> = init.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let (mut m, mut v) = (vec![0f64; p.len()], vec![0f64; p.len()]);
        for t in 1..=3 {
            let g = Tensor::randn(0f32, 1.0, (4, 7), &dev)?;
            opt.step(std::slice::from_ref(&g), lr, 0.0)?;
            let gv: Vec<f64> = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * gv[i];
                v[i] = b2 * v[i] + (1.0 - b2) * gv[i] * gv[i];
                let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        for (a, b) in got.iter().zip(&p) {
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // the saved state resumes the same trajectory
        let saved = opt.state_tensors()?;
        let twin = Var::from_tensor(&var.as_tensor().copy()?)?;
        let mut resumed = AdamW::new(vec![("w".into(), twin.clone())], 0.1)?;
        resumed.load_state(3, &saved, &dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let g = Tensor::randn(0f32, 1.0, (4, 7), &dev)?;
        opt.step(std::slice::from_ref(&g), lr, 0.0)?;
        resumed.step(std::slice::from_ref(&g), lr, 0.0)?;
        let d = (var.as_tensor() - twin.as_tensor())?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn a_gradient_of_another_size_is_refused() {
        let var = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var)], 0.0).unwrap();
        assert!(opt.step(&[Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap()], 0.1, 0.0).is_err());
    }
}
