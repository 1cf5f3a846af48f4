//! The adapter side of the LoRA linears that read one input (q, k and v read the attention's
//! norm; o the attention output; gate and up the MLP's norm; down its activation), up to three
//! at once:
//!
//! - `down`: each adapter's `dropout(x) A^T` `[rows, r]`, the forward's r-wide product;
//! - `add_dx`: the adapters' part of the input gradient, `dx += Σ dropout(gh A)`, in place, or
//!   `dx`: that part alone, for the frozen weights' GEMMs to accumulate onto;
//! - `grad_a`: the gradients of the A factors, `gh^T dropout(x)` (f32);
//! - `backward`: `grad_a` and `dx` together, from one pass over `x` where its rows allow;
//!
//! where `gh` is a linear's output gradient times its scaled B, which the callers give as its
//! transpose `[r, rows]` (`ght`, what one GEMM writes as readily): the kernels read its row pairs
//! as words.
//!
//! Each adapter has its own dropout mask, a pure function of its seed (`dropout::keep`). On CUDA,
//! with bf16 data, the kernels (`kernels/lora.cu`) draw the masks in registers and run the
//! products on tensor cores, reading `x` (or writing `dx`) once for the whole group: unfused, each
//! adapter drew a masked copy of `x` in the forward and again in the backward, and added a masked
//! copy of its input gradient, a full-size pass each, besides its skinny GEMMs. Elsewhere the same
//! formulas run unfused (`dropout::apply`, GEMMs), and these are the kernels' reference.

use candle_core::{DType, Device, Result, Tensor};

use super::{dropout, gemm, ops, KernelCheck};

/// Adapters sharing one input that one launch takes.
pub const MAX_MEMBERS: usize = 3;

/// One adapter of a group: its A factor `[r, in]` in the input's dtype and its mask seed.
#[derive(Clone, Copy)]
pub struct Member<'a> {
    pub a: &'a Tensor,
    pub seed: u64,
}

/// Whether the kernels take this group: on CUDA, a bf16 input `[rows, in]` with `in` a multiple
/// of 16 and fewer than 2^32 elements, its rows contiguous (`row_pairs`: the input may be some
/// columns of a wider matrix), one to three adapters of one rank (8, 16, 32 or 64) with
/// contiguous bf16 factors.
pub fn fused(x: &Tensor, members: &[Member]) -> bool {
    x.dims2().is_ok_and(|(rows, k)| fused_shape(x.device(), x.dtype(), rows, k, members)) && row_pairs(x).is_some()
}

/// `fused` for an input of this device, dtype and shape, whatever its layout.
pub fn fused_shape(device: &Device, dtype: DType, rows: usize, k: usize, members: &[Member]) -> bool {
    let Some(first) = members.first() else { return false };
    let Ok((r, _)) = first.a.dims2() else { return false };
    cfg!(feature = "cuda")
        && device.is_cuda()
        && dtype == DType::BF16
        && k % 16 == 0
        && rows * k < 1 << 32
        && matches!(r, 8 | 16 | 32 | 64)
        && members.len() <= MAX_MEMBERS
        && members.iter().all(|m| m.a.dims() == [r, k] && m.a.dtype() == DType::BF16 && whole_pairs(m.a))
}

/// Contiguous from an even element on: the kernels read bf16 pairs as 32-bit words.
fn whole_pairs(t: &Tensor) -> bool {
    t.is_contiguous() && t.layout().start_offset().is_multiple_of(2)
}

/// The distance between the rows of a 2-D `t` whose rows are each contiguous and lie an even
/// number of elements apart from an even element on (contiguous, or some columns of a wider
/// row-major matrix): the kernels read its bf16 pairs as 32-bit words, row by row.
fn row_pairs(t: &Tensor) -> Option<usize> {
    let (rows, k) = t.dims2().ok()?;
    let st = t.stride();
    let ld = if rows <= 1 { k } else { st[0] };
    ((st[1] == 1 || k <= 1) && ld >= k && ld.is_multiple_of(2) && t.layout().start_offset().is_multiple_of(2)).then_some(ld)
}

/// `fused` for `x` and the transposed gradients `ght` `[r, rows]` of these adapters.
fn fused_with(x: &Tensor, members: &[Member], ght: &[&Tensor]) -> Result<bool> {
    if members.len() != ght.len() {
        candle_core::bail!("lora group: {} adapters, {} gradients", members.len(), ght.len());
    }
    Ok(fused(x, members) && {
        let (rows, r) = (x.dim(0)?, members[0].a.dim(0)?);
        ght.iter().all(|g| g.dims() == [r, rows] && g.dtype() == DType::BF16 && whole_pairs(g))
    })
}

/// Each adapter's `dropout(x) A^T` `[rows, r]` in `x`'s dtype, for `x` `[rows, in]`.
pub fn down(x: &Tensor, members: &[Member], p: f32) -> Result<Vec<Tensor>> {
    if fused(x, members) {
        #[cfg(feature = "cuda")]
        return cuda::down(x, members, p);
    }
    members.iter().map(|m| ops::linear_nt(&dropout::masked(x, p, m.seed)?, m.a)).collect()
}

/// `down` written into `dest` `[rows, n r]` (bf16, its rows contiguous: some columns of a wider
/// matrix, say), adapter m's product in columns `m r .. (m + 1) r`, and returned as views of
/// those columns. Only where the kernels take the group (`fused`): the caller lays out a GEMM's
/// operand around it.
pub fn down_into(x: &Tensor, members: &[Member], p: f32, dest: &Tensor) -> Result<Vec<Tensor>> {
    let r = members.first().map_or(Ok(0), |m| m.a.dim(0))?;
    let (rows, width) = dest.dims2()?;
    if !fused(x, members) || dest.dtype() != DType::BF16 || row_pairs(dest).is_none() || width != members.len() * r || rows != x.dim(0)? {
        candle_core::bail!("lora group: no kernel writes {} products of rank {r} into {:?}", members.len(), dest.shape());
    }
    #[cfg(feature = "cuda")]
    {
        cuda::down_into(x, members, p, dest)?;
        return (0..members.len()).map(|m| dest.narrow(1, m * r, r)).collect();
    }
    #[allow(unreachable_code)]
    {
        let _ = p;
        candle_core::bail!("lora group: built without CUDA")
    }
}

/// `dx + Σ dropout(gh_m A_m)` in `dx`'s dtype and shape, for `dx` `[rows, in]` and each
/// adapter's `ght` `[r, rows]`. On the kernels' path the sum is added in `dx`'s storage (the
/// caller must own it), rounded once.
pub fn add_dx(dx: Tensor, members: &[Member], ght: &[&Tensor], p: f32) -> Result<Tensor> {
    if fused_with(&dx, members, ght)? {
        #[cfg(feature = "cuda")]
        return cuda::add_dx(dx, members, ght, p);
    }
    let mut dx = dx;
    for (m, g) in members.iter().zip(ght) {
        let through = g.t()?.matmul(m.a)?;
        dx = if p > 0.0 { dropout::add_into(dx, &through, p, m.seed)? } else { (&dx + through.to_dtype(dx.dtype())?)? };
    }
    Ok(dx)
}

/// `Σ dropout(gh_m A_m)` alone, `[rows, in]` in `dtype` on `device`, for each adapter's `ght`
/// `[r, rows]`: the adapters' part of an input gradient, for the frozen weights' GEMMs to
/// accumulate theirs onto. Where the kernels take the group, one launch writes it, reading no
/// gradient first (as `add_dx` must); elsewhere `None`, and the caller sums its GEMMs first, then
/// `add_dx` (no zero-filled buffer to add into, and the CPU's order of the sums as before).
pub fn dx(rows: usize, k: usize, dtype: DType, device: &Device, members: &[Member], ght: &[&Tensor], p: f32) -> Result<Option<Tensor>> {
    if members.len() == ght.len() && fused_shape(device, dtype, rows, k, members) {
        let r = members[0].a.dim(0)?;
        if ght.iter().all(|g| g.dims() == [r, rows] && g.dtype() == DType::BF16 && whole_pairs(g)) {
            #[cfg(feature = "cuda")]
            return cuda::dx(rows, k, device, members, ght, p).map(Some);
        }
    }
    let _ = p;
    Ok(None)
}

/// Each adapter's A gradient `gh^T dropout(x)` `[r, in]` in `out` (the trained factor's dtype;
/// the kernels write f32), for `x` `[rows, in]` and each adapter's `ght` `[r, rows]`.
pub fn grad_a(x: &Tensor, members: &[Member], ght: &[&Tensor], p: f32, out: DType) -> Result<Vec<Tensor>> {
    if fused_with(x, members, ght)? && out == DType::F32 {
        #[cfg(feature = "cuda")]
        return cuda::grad_a(x, members, ght, p);
    }
    members.iter().zip(ght).map(|(m, g)| gemm::product(g, &dropout::masked(x, p, m.seed)?, 1.0, out)).collect()
}

/// `grad_a` and, with `dx_dtype`, `dx` in that dtype (`None` where the kernels do not take the
/// group, as `dx` gives): where `x`'s rows start on 16-byte boundaries one launch writes both,
/// each adapter's mask drawn once for the two.
pub fn backward(x: &Tensor, members: &[Member], ght: &[&Tensor], p: f32, out: DType, dx_dtype: Option<DType>) -> Result<(Vec<Tensor>, Option<Tensor>)> {
    if dx_dtype == Some(x.dtype()) && fused_with(x, members, ght)? && out == DType::F32 {
        #[cfg(feature = "cuda")]
        if let Some(both) = cuda::grad_a_dx(x, members, ght, p)? {
            return Ok(both);
        }
    }
    let das = grad_a(x, members, ght, p, out)?;
    let (rows, k) = x.dims2()?;
    let dx = match dx_dtype {
        Some(dtype) => dx(rows, k, dtype, x.device(), members, ght, p)?,
        None => None,
    };
    Ok((das, dx))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Device, InplaceOp1, Layout, Result, Storage, Tensor};
    use half::bf16;

    use super::{Member, MAX_MEMBERS};

    const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));

    fn device(x: &Tensor) -> Result<&CudaDevice> {
        match x.device() {
            Device::Cuda(d) => Ok(d),
            _ => candle_core::bail!("lora group: not on a CUDA device"),
        }
    }

    fn view<'a>(s: &'a Storage, t: &Tensor) -> Result<CudaView<'a, bf16>> {
        let (o1, o2) = t.layout().contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("lora group: input not contiguous".into()))?;
        match s {
            Storage::Cuda(c) => Ok(c.as_cuda_slice::<bf16>()?.slice(o1..o2)),
            _ => candle_core::bail!("lora group: input not on the CUDA device"),
        }
    }

    /// A row-strided `t` (`super::row_pairs`): the elements from its first to its last, and the
    /// distance between its rows.
    fn rows_view<'a>(s: &'a Storage, t: &Tensor) -> Result<(CudaView<'a, bf16>, usize)> {
        let ld = super::row_pairs(t).ok_or_else(|| candle_core::Error::Msg("lora group: input rows not contiguous".into()))?;
        let (rows, k) = t.dims2()?;
        let start = t.layout().start_offset();
        let end = start + if rows == 0 { 0 } else { (rows - 1) * ld + k };
        match s {
            Storage::Cuda(c) => Ok((c.as_cuda_slice::<bf16>()?.slice(start..end), ld)),
            _ => candle_core::bail!("lora group: input not on the CUDA device"),
        }
    }

    /// Slot `i` of three (the first again past the group's size: the kernels read `n` of them).
    fn slot<T>(xs: &[T], i: usize) -> &T {
        &xs[i.min(xs.len() - 1)]
    }

    fn seeds(members: &[Member]) -> [u64; MAX_MEMBERS] {
        let mut s = [0; MAX_MEMBERS];
        for (o, m) in s.iter_mut().zip(members) {
            *o = m.seed;
        }
        s
    }

    /// Blocks of `func` (128 threads, no dynamic shared memory) resident on the whole device at
    /// once: one wave.
    fn resident_blocks(dev: &CudaDevice, func: &CudaFunction) -> Result<usize> {
        let per_sm = func.occupancy_max_active_blocks_per_multiprocessor(128, 0, None).w()?.max(1) as usize;
        let sms = dev.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?.max(1) as usize;
        Ok(per_sm * sms)
    }

    /// `warps` warps, four per block.
    fn warps(warps: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (warps.div_ceil(4).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
    }

    fn tensor<T: candle_core::cuda_backend::CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: (usize, usize)) -> Tensor {
        Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
    }

    pub fn down(x: &Tensor, members: &[Member], p: f32) -> Result<Vec<Tensor>> {
        let dev = device(x)?;
        let rows = x.dim(0)?;
        let r = members[0].a.dim(0)?;
        // SAFETY: the kernel (or, split, the sum) writes every element of each output
        let mut outs = members.iter().map(|_| unsafe { dev.alloc::<bf16>(rows * r) }).collect::<Result<Vec<_>>>()?;
        {
            let stream = dev.cuda_stream();
            let ptrs: Vec<_> = outs.iter_mut().map(|o| o.device_ptr_mut(&stream)).collect();
            let at: Vec<u64> = ptrs.iter().map(|(p, _)| *p).collect();
            launch_down(dev, x, members, p, &at, r)?;
        }
        Ok(outs.into_iter().map(|o| tensor(o, dev, (rows, r))).collect())
    }

    pub fn down_into(x: &Tensor, members: &[Member], p: f32, dest: &Tensor) -> Result<()> {
        let dev = device(x)?;
        let r = members[0].a.dim(0)?;
        let ld = super::row_pairs(dest).ok_or_else(|| candle_core::Error::Msg("lora group: destination rows not contiguous".into()))?;
        // the address of dest's first element, taken under a read lock that is let go before the
        // launch: dest is often a view of the same storage as x (columns of one wide matrix),
        // whose lock the launch takes in turn. The kernel writes only dest's columns, which
        // nothing else reads meanwhile (every op runs on the one stream, in order).
        let first = {
            let (g, l) = dest.storage_and_layout();
            let Storage::Cuda(cs) = &*g else { candle_core::bail!("lora group: destination not on the CUDA device") };
            let stream = dev.cuda_stream();
            let (base, _read) = cs.as_cuda_slice::<bf16>()?.device_ptr(&stream);
            base + 2 * l.start_offset() as u64
        };
        let at: Vec<u64> = (0..members.len()).map(|m| first + 2 * (m * r) as u64).collect();
        launch_down(dev, x, members, p, &at, ld)
    }

    /// The forward kernel (and, split, the sum) writing adapter m's `[rows, r]` product at device
    /// address `at[m]`, its rows `ldh` elements apart.
    fn launch_down(dev: &CudaDevice, x: &Tensor, members: &[Member], p: f32, at: &[u64], ldh: usize) -> Result<()> {
        let (rows, k) = x.dims2()?;
        let r = members[0].a.dim(0)?;
        let n = members.len();
        let (threshold, scale) = super::dropout::mask_params(p);
        // a block per 16-row tile; where those are few (a large model's micro-batch), the k-steps
        // split over more blocks too, some 528 in all (four per SM), each keeping eight or more
        let tiles = rows.div_ceil(16).max(1);
        let splits = 528usize.div_ceil(tiles).clamp(1, (k / 16 / 8).max(1));
        // SAFETY: with splits every element of every split's part is written
        let part = unsafe { dev.alloc::<f32>(if splits > 1 { splits * n * rows * r } else { 1 })? };
        let x_guard = x.storage_and_layout().0;
        let a_guards: Vec<_> = members.iter().map(|m| m.a.storage_and_layout().0).collect();
        let (xv, ldx) = rows_view(&x_guard, x)?;
        let a = a_guards.iter().zip(members).map(|(g, m)| view(g, m.a)).collect::<Result<Vec<_>>>()?;
        let s = seeds(members);
        let (rows64, k32, n32, ldx64, ldh64) = (rows as u64, k as i32, n as i32, ldx as u64, ldh as u64);
        // 64-column chunks read 16 bytes at a time where the rows and factors allow; where the
        // row tiles are many, a warp per tile, all of its chunks, if the blocks of four fill at
        // least half a wave (no split parts)
        let wide = k.is_multiple_of(64) && wide_rows(x) && members.iter().all(|m| m.a.layout().start_offset().is_multiple_of(8));
        let per_tile = match wide {
            true => {
                let func = dev.get_or_load_custom_func(&format!("lora_down_tiles_r{r}"), "lora", KERNELS)?.into_cuda_function();
                (2 * tiles.div_ceil(4) >= resident_blocks(dev, &func)?).then_some(func)
            }
            false => None,
        };
        let tiled = per_tile.is_some();
        let (func, cfg) = match per_tile {
            Some(func) => (func, LaunchConfig { grid_dim: (tiles.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }),
            None => (
                dev.get_or_load_custom_func(&format!("lora_down{}_r{r}", if wide { "_wide" } else { "" }), "lora", KERNELS)?.into_cuda_function(),
                LaunchConfig { grid_dim: (tiles as u32, splits as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 },
            ),
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&xv).arg(&ldx64).arg(&rows64).arg(&k32).arg(slot(&a, 0)).arg(slot(&a, 1)).arg(slot(&a, 2));
        b.arg(&s[0]).arg(&s[1]).arg(&s[2]).arg(&n32).arg(slot(at, 0)).arg(slot(at, 1)).arg(slot(at, 2)).arg(&ldh64);
        b.arg(&threshold).arg(&scale);
        if !tiled {
            b.arg(&part);
        }
        // SAFETY: argument types and order match the kernel's signature; each `at` holds `rows`
        // rows of `r` elements `ldh` apart, which nothing else reads or writes meanwhile
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        if splits > 1 && !tiled {
            let func = dev.get_or_load_custom_func("lora_down_sum", "lora", KERNELS)?;
            let (splits32, r32) = (splits as i32, r as i32);
            let mut b = func.builder();
            b.arg(&part).arg(&splits32).arg(&n32).arg(&rows64).arg(&r32).arg(slot(at, 0)).arg(slot(at, 1)).arg(slot(at, 2)).arg(&ldh64);
            let total = n * rows * r;
            let cfg = LaunchConfig { grid_dim: (total.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: argument types and order match the kernel's signature
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(())
    }

    pub fn grad_a(x: &Tensor, members: &[Member], ght: &[&Tensor], p: f32) -> Result<Vec<Tensor>> {
        Ok(launch_grad_a(x, members, ght, p, false)?.0)
    }

    /// `grad_a` and the adapters' input gradient alone from one launch, where `x`'s rows start on
    /// 16-byte boundaries (else `None`).
    pub fn grad_a_dx(x: &Tensor, members: &[Member], ght: &[&Tensor], p: f32) -> Result<Option<(Vec<Tensor>, Option<Tensor>)>> {
        if !wide_rows(x) {
            return Ok(None);
        }
        launch_grad_a(x, members, ght, p, true).map(Some)
    }

    /// Whether `x`'s rows start on 16-byte boundaries: the kernels read them 16 bytes at a time.
    fn wide_rows(x: &Tensor) -> bool {
        x.layout().start_offset().is_multiple_of(8) && super::row_pairs(x).is_some_and(|ld| ld.is_multiple_of(8))
    }

    /// The A gradients' kernel and the sum of its splits; with `with_dx` (x's rows on 16-byte
    /// boundaries) the kernel writes the adapters' input gradient `[rows, in]` too.
    fn launch_grad_a(x: &Tensor, members: &[Member], ght: &[&Tensor], p: f32, with_dx: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let dev = device(x)?;
        let (rows, k) = x.dims2()?;
        let r = members[0].a.dim(0)?;
        let (threshold, scale) = super::dropout::mask_params(p);
        let wide = wide_rows(x);
        if with_dx && !wide {
            candle_core::bail!("lora group: the input gradient comes with the A gradients only for rows on 16-byte boundaries");
        }
        let x_guard = x.storage_and_layout().0;
        let (xv, ldx) = rows_view(&x_guard, x)?;
        let name = format!("lora_grad_a{}_r{r}", if wide { "_wide" } else { "" });
        let func = dev.get_or_load_custom_func(&name, "lora", KERNELS)?.into_cuda_function();
        // one wave of blocks of four warps, each warp 16 columns of a split of the rows: a
        // second, mostly idle wave would take as long as the first
        let col_blocks = k.div_ceil(64);
        let splits = (resident_blocks(dev, &func)? / col_blocks).clamp(1, rows.div_ceil(16).max(1));
        let chunk = rows.div_ceil(splits).div_ceil(16).max(1) * 16;
        let splits = rows.div_ceil(chunk).max(1);
        let n = members.len();
        // SAFETY: each split's warps write every column of every adapter's part (zeros for no
        // rows), and with dx every element of it
        let part = unsafe { dev.alloc::<f32>(splits * n * k * r)? };
        let outs = (0..n).map(|_| unsafe { dev.alloc::<f32>(r * k) }).collect::<Result<Vec<_>>>()?;
        let dx = if with_dx { Some(unsafe { dev.alloc::<bf16>(rows * k)? }) } else { None };
        let g_guards: Vec<_> = ght.iter().map(|g| g.storage_and_layout().0).collect();
        let g = g_guards.iter().zip(ght).map(|(s, t)| view(s, t)).collect::<Result<Vec<_>>>()?;
        let a_guards: Vec<_> = members.iter().map(|m| m.a.storage_and_layout().0).collect();
        let a = a_guards.iter().zip(members).map(|(g, m)| view(g, m.a)).collect::<Result<Vec<_>>>()?;
        let s = seeds(members);
        let (rows64, k32, n32, chunk64, ldx64) = (rows as u64, k as i32, n as i32, chunk as u64, ldx as u64);
        let stream = dev.cuda_stream();
        let null = 0u64;
        let mut b = stream.launch_builder(&func);
        b.arg(&xv).arg(&ldx64).arg(&rows64).arg(&k32);
        if wide {
            b.arg(slot(&a, 0)).arg(slot(&a, 1)).arg(slot(&a, 2));
        }
        b.arg(&s[0]).arg(&s[1]).arg(&s[2]).arg(&n32).arg(slot(&g, 0)).arg(slot(&g, 1)).arg(slot(&g, 2)).arg(&threshold);
        if wide {
            b.arg(&scale);
        }
        b.arg(&chunk64).arg(&part);
        if wide {
            match &dx {
                Some(d) => b.arg(d),
                None => b.arg(&null),
            };
        }
        let cfg = LaunchConfig { grid_dim: (col_blocks as u32, splits as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: argument types and order match the kernel's signature (a null dx: none written)
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        let func = dev.get_or_load_custom_func("lora_grad_a_sum", "lora", KERNELS)?;
        let (splits32, r32, accumulate) = (splits as i32, r as i32, 0i32);
        let mut b = func.builder();
        b.arg(&part).arg(&splits32).arg(&n32).arg(&k32).arg(&r32).arg(&scale).arg(slot(&outs, 0)).arg(slot(&outs, 1)).arg(slot(&outs, 2)).arg(&accumulate);
        let total = n * k * r;
        let cfg = LaunchConfig { grid_dim: (total.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: argument types and order match the kernel's signature; every output element is written
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok((outs.into_iter().map(|o| tensor(o, dev, (r, k))).collect(), dx.map(|d| tensor(d, dev, (rows, k)))))
    }

    pub fn add_dx(dx: Tensor, members: &[Member], ght: &[&Tensor], p: f32) -> Result<Tensor> {
        dx.inplace_op1(&AddDx { members, ght, p, accumulate: true })?;
        Ok(dx)
    }

    pub fn dx(rows: usize, k: usize, device: &Device, members: &[Member], ght: &[&Tensor], p: f32) -> Result<Tensor> {
        let Device::Cuda(dev) = device else { candle_core::bail!("lora group: not on a CUDA device") };
        // SAFETY: the kernel (accumulate 0) writes every element
        let slice = unsafe { dev.alloc::<bf16>(rows * k)? };
        let mut st = CudaStorage::wrap_cuda_slice(slice, dev.clone());
        let layout = Layout::contiguous((rows, k));
        AddDx { members, ght, p, accumulate: false }.cuda_fwd(&mut st, &layout)?;
        Ok(Tensor::from_storage(Storage::Cuda(st), (rows, k), BackpropOp::none(), false))
    }

    struct AddDx<'a> {
        members: &'a [Member<'a>],
        ght: &'a [&'a Tensor],
        p: f32,
        /// Add to the gradient in place; else write the sum alone over whatever the memory held.
        accumulate: bool,
    }

    impl InplaceOp1 for AddDx<'_> {
        fn name(&self) -> &'static str {
            "lora-add-dx"
        }

        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
            candle_core::bail!("lora-add-dx: the CPU adds the masked products")
        }

        fn cuda_fwd(&self, st: &mut CudaStorage, l: &Layout) -> Result<()> {
            let (o1, o2) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("lora-add-dx: not contiguous".into()))?;
            let dev = st.device().clone();
            let (rows, k) = l.shape().dims2()?;
            let r = self.members[0].a.dim(0)?;
            let (threshold, scale) = super::super::dropout::mask_params(self.p);
            let a_guards: Vec<_> = self.members.iter().map(|m| m.a.storage_and_layout().0).collect();
            let g_guards: Vec<_> = self.ght.iter().map(|g| g.storage_and_layout().0).collect();
            let a = a_guards.iter().zip(self.members).map(|(g, m)| view(g, m.a)).collect::<Result<Vec<_>>>()?;
            let g = g_guards.iter().zip(self.ght).map(|(s, t)| view(s, t)).collect::<Result<Vec<_>>>()?;
            let s = seeds(self.members);
            let (rows64, k32, n) = (rows as u64, k as i32, self.members.len() as i32);
            let mut dxv = st.as_cuda_slice_mut::<bf16>()?.slice_mut(o1..o2);
            let func = dev.get_or_load_custom_func(&format!("lora_dx_r{r}"), "lora", KERNELS)?.into_cuda_function();
            // one wave of warps: as many slots of tiles per 64-column chunk as fit (the kernel
            // deals the tiles out), at most one per tile
            let chunks = k.div_ceil(64);
            let slots = (resident_blocks(&dev, &func)? * 4 / chunks).clamp(1, rows.div_ceil(16).max(1));
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&mut dxv).arg(&rows64).arg(&k32).arg(slot(&a, 0)).arg(slot(&a, 1)).arg(slot(&a, 2));
            b.arg(&s[0]).arg(&s[1]).arg(&s[2]).arg(&n).arg(slot(&g, 0)).arg(slot(&g, 1)).arg(slot(&g, 2));
            let accumulate = self.accumulate as i32;
            b.arg(&threshold).arg(&scale).arg(&accumulate);
            // SAFETY: argument types and order match the kernel's signature
            unsafe { b.launch(warps(slots * chunks)) }.w()?;
            Ok(())
        }
    }
}

/// The kernels on `device` against the unfused formulas on the CPU (f32 products of the same
/// bf16 inputs, masked and scaled in f32, the same masks), for groups of one to three adapters,
/// each rank, with and without dropout, and a row count that leaves a partial tile. Tolerances
/// relative to the largest reference value: 2^-7 (the kernels' bf16 outputs rounded once).
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    let bf = |t: Tensor| t.to_dtype(DType::BF16);
    // the seventh case's x starts 4 elements into its buffer: rows off 16-byte boundaries. With
    // `wide`, x is the first k columns of a `[rows, k + n r + wide]` matrix and the forward's
    // products are written into the next n r (`down_into`), as for a widened GEMM's operand:
    // rows 16-byte aligned (wide 0), or not (wide 2: the kernels that read 32-bit words)
    for (rows, k, r, n, p, offset, wide) in [
        (77usize, 576usize, 16usize, 3usize, 0.1f32, 0usize, None),
        (64, 576, 16, 1, 0.0, 0, None),
        (48, 576, 16, 3, 0.0, 0, None),
        (50, 1536, 8, 2, 0.05, 0, None),
        (33, 272, 32, 3, 0.2, 0, None),
        (40, 128, 64, 2, 0.1, 0, None),
        (45, 576, 16, 3, 0.1, 4, None),
        // more row tiles than one wave of the input gradient's warps has slots per column chunk
        (20000, 128, 16, 2, 0.1, 0, None),
        // the k-steps split over blocks (few row tiles), then not (the forward's direct store)
        (77, 576, 16, 3, 0.1, 0, Some(0usize)),
        (9000, 576, 16, 3, 0.1, 0, Some(0)),
        // so many row tiles that the forward gives each its own warp
        (20000, 576, 16, 3, 0.1, 0, Some(0)),
        (45, 576, 16, 2, 0.1, 0, Some(2)),
    ] {
        if wide.is_some() && !device.is_cuda() {
            continue;
        }
        let x = bf(Tensor::randn(0f32, 1.0, (rows, k), &cpu)?)?;
        let dx = bf(Tensor::randn(0f32, 1.0, (rows, k), &cpu)?)?;
        let a: Vec<Tensor> = (0..n).map(|_| bf((Tensor::randn(0f32, 1.0, (r, k), &cpu)? * 0.1)?)).collect::<Result<_>>()?;
        let gh: Vec<Tensor> = (0..n).map(|_| bf(Tensor::randn(0f32, 1.0, (rows, r), &cpu)?)).collect::<Result<_>>()?;
        let ght: Vec<Tensor> = gh.iter().map(|g| g.t()?.contiguous()).collect::<Result<_>>()?;
        let seeds: Vec<u64> = (0..n as u64).map(|i| 1000 + 17 * i).collect();
        let members = |a: &[Tensor]| -> Vec<(Tensor, u64)> { a.iter().cloned().zip(seeds.iter().copied()).collect() };
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        // the reference: products in f32 of the masked, scaled input (the kernels multiply by
        // the unscaled masked input and scale the f32 sums)
        let want_down: Vec<Tensor> = members(&a)
            .iter()
            .map(|(a, s)| ops::linear_nt(&dropout::masked(&f32s(&x)?, p, *s)?, &f32s(a)?))
            .collect::<Result<_>>()?;
        let mut want_dx = f32s(&dx)?;
        for ((a, s), g) in members(&a).iter().zip(&gh) {
            let through = f32s(g)?.matmul(&f32s(a)?)?;
            want_dx = (want_dx + dropout::masked(&through, p, *s)?)?;
        }
        let want_da: Vec<Tensor> = members(&a)
            .iter()
            .zip(&gh)
            .map(|((_, s), g)| f32s(g)?.t()?.matmul(&dropout::masked(&f32s(&x)?, p, *s)?))
            .collect::<Result<_>>()?;
        let on = |t: &Tensor| t.to_device(device);
        let (a_d, gh_d) = (a.iter().map(on).collect::<Result<Vec<_>>>()?, ght.iter().map(on).collect::<Result<Vec<_>>>()?);
        let m: Vec<Member> = a_d.iter().zip(&seeds).map(|(a, &seed)| Member { a, seed }).collect();
        let gh_refs: Vec<&Tensor> = gh_d.iter().collect();
        let outer = match wide {
            Some(extra) => Some(on(&Tensor::cat(&[&x, &Tensor::zeros((rows, n * r + extra), DType::BF16, &cpu)?], 1)?)?),
            None => None,
        };
        let x_d = if let Some(outer) = &outer {
            outer.narrow(1, 0, k)?
        } else if offset == 0 {
            on(&x)?
        } else {
            let flat = Tensor::cat(&[&Tensor::zeros(offset, DType::BF16, &cpu)?, &x.flatten_all()?], 0)?;
            on(&flat)?.narrow(0, offset, rows * k)?.reshape((rows, k))?
        };
        let got_down = match &outer {
            Some(outer) => {
                let got = down_into(&x_d, &m, p, &outer.narrow(1, k, n * r)?)?;
                // x's columns and those past the products untouched
                let kept = (outer.narrow(1, 0, k)?.to_dtype(DType::F32)? - x.to_device(device)?.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?;
                // (no empty tensor made on the device: its allocation would fail)
                let past = match outer.dim(1)? - k - n * r {
                    0 => 0.0,
                    extra => outer.narrow(1, k + n * r, extra)?.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?,
                };
                if kept.to_scalar::<f32>()? != 0.0 || past != 0.0 {
                    candle_core::bail!("lora group check: down_into wrote outside its columns");
                }
                got
            }
            None => down(&x_d, &m, p)?,
        };
        let got_dx = add_dx(on(&dx)?.copy()?, &m, &gh_refs, p)?;
        // the adapters' part alone, written into fresh memory
        let got_part = super::lora_group::dx(rows, k, DType::BF16, device, &m, &gh_refs, p)?;
        let want_part = (&want_dx - f32s(&dx)?)?;
        if device.is_cuda() && got_part.is_none() {
            candle_core::bail!("lora group check: the adapters' input gradient alone not written by the kernel");
        }
        let got_da = grad_a(&x_d, &m, &gh_refs, p, DType::F32)?;
        // both from one call (one launch where x's rows start on 16-byte boundaries)
        let (got_da_both, got_part_both) = backward(&x_d, &m, &gh_refs, p, DType::F32, Some(DType::BF16))?;
        if device.is_cuda() && got_part_both.is_none() {
            candle_core::bail!("lora group check: the input gradient not written with the A gradients");
        }
        let mut cases: Vec<(&'static str, Tensor, Tensor)> = Vec::new();
        for (w, g) in want_down.into_iter().zip(got_down) {
            cases.push((if wide.is_some() { "lora group down into" } else { "lora group down" }, w, g));
        }
        cases.push(("lora group dx", want_dx, got_dx));
        if let Some(got_part) = got_part {
            cases.push(("lora group dx alone", want_part.clone(), got_part));
        }
        if let Some(got) = got_part_both {
            cases.push(("lora group dx with dA", want_part, got));
        }
        for ((w, g), g_both) in want_da.into_iter().zip(got_da).zip(got_da_both) {
            cases.push(("lora group dA with dx", w.clone(), g_both));
            cases.push(("lora group dA", w, g));
        }
        for (kernel, want, got) in cases {
            let at = match (offset, wide) {
                (_, Some(extra)) => format!(" in rows of {}", k + n * r + extra),
                (0, None) => String::new(),
                _ => format!(" at offset {offset}"),
            };
            out.push(KernelCheck::relative(kernel, format!("r{r} x{n} p{p}{at}"), (rows, k), &want, &got, 1.0 / 128.0)?);
        }
    }
    Ok(out)
}
