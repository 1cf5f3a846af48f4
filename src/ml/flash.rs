//! Causal attention as tiled tensor-core kernels on CUDA (`kernels/flash_attn.cu`), for bf16
//! data and head sizes 64 and 128: the scores and probabilities stay in registers, so neither
//! direction writes a `[queries, keys]` block to memory, and the query chunks' copies, the
//! softmax passes and the key/value gradient sums of the chunked path are gone.
//!
//! The forward returns the output and each query's log-sum-exp (base 2, f32), which the backward
//! reads to recompute the probabilities. The backward runs two kernels: one per query tile for
//! `dq`, one per key tile for `dk` and `dv` (summed over the query heads sharing a kv head in
//! registers, so nothing is added atomically and the result does not depend on scheduling; where
//! that grid is small, over parts of those heads, the parts then summed in a fixed order by a
//! third kernel, `dkv_splits`).
//!
//! The chunked path (`ops::AttentionPlan`) remains for the CPU, f32/f64 data and other head
//! sizes, and is the reference of `check_device`.

use candle_core::{DType, Device, Result, Tensor};

use super::causal_softmax::CausalSpans;
use super::KernelCheck;

/// Whether the kernels take attention over `q` `[b, heads, t, head_dim]`: on CUDA, bf16, head
/// size 64 or 128.
pub fn applies(q: &Tensor) -> bool {
    q.dim(3).is_ok_and(|d| supports(q.device(), q.dtype(), d))
}

/// `applies` for tensors of this device, dtype and head size.
pub fn supports(device: &Device, dtype: DType, head_dim: usize) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && dtype == DType::BF16 && matches!(head_dim, 64 | 128)
}

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Device, Result, Storage, Tensor};
    use half::bf16;

    use super::{CausalSpans, Tiles, KERNELS};

    /// Element strides of a `[b, heads, t, d]` tensor's batch, head and row (the kernels' `Rows`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct Rows {
        b: i64,
        h: i64,
        r: i64,
    }

    // SAFETY: a plain struct of three i64, laid out as the kernels' `Rows`
    unsafe impl DeviceRepr for Rows {}

    /// RoPE's tables for the backward kernels to rotate dq and dk back as they store them (the
    /// kernels' `Rope`): device addresses of bf16 cos and sin (`[t, d/2]`, or `[b, t, d/2]` with
    /// `per_row`); a null cos for none.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct RopeArg {
        cos: u64,
        sin: u64,
        per_row: i32,
    }

    // SAFETY: two u64 and an i32, laid out (and padded to 24 bytes) as the kernels' `Rope`
    unsafe impl DeviceRepr for RopeArg {}

    impl RopeArg {
        const NONE: RopeArg = RopeArg { cos: 0, sin: 0, per_row: 0 };
    }

    /// `x` as the kernels read it: rows of `d` contiguous and every row on a 16-byte boundary
    /// (the kernels copy 16-byte pieces). A `[b, t, heads, d]` tensor transposed to
    /// `[b, heads, t, d]` qualifies as it is; anything else is copied.
    fn readable(x: &Tensor) -> Result<Tensor> {
        let l = x.layout();
        let st = l.stride();
        if st.len() == 4 && st[3] == 1 && l.start_offset() % 8 == 0 && st[..3].iter().all(|s| s % 8 == 0) {
            return Ok(x.clone());
        }
        let x = x.contiguous()?;
        if x.layout().start_offset() % 8 == 0 {
            Ok(x)
        } else {
            x.copy()
        }
    }

    /// The elements of `x` (see `readable`) from its first on, and its strides.
    fn view<'a>(storage: &'a Storage, x: &Tensor) -> Result<(CudaView<'a, bf16>, Rows)> {
        let l = x.layout();
        let (st, dims) = (l.stride(), l.dims());
        let end = l.start_offset() + dims.iter().zip(st).map(|(n, s)| (n - 1) * s).sum::<usize>() + 1;
        let Storage::Cuda(c) = storage else { candle_core::bail!("flash attention: input not on the cuda device") };
        let rows = Rows { b: st[0] as i64, h: st[1] as i64, r: st[2] as i64 };
        Ok((c.as_cuda_slice::<bf16>()?.slice(l.start_offset()..end), rows))
    }

    /// The shapes of one attention and its device.
    pub struct Args {
        pub b: usize,
        pub h: usize,
        pub kvh: usize,
        pub t: usize,
        pub d: usize,
        dev: CudaDevice,
    }

    /// A new `[b, heads, t, d]` bf16 tensor laid out in `like`'s memory order (heads within rows
    /// for a transposed `[b, t, heads, d]`), its storage and strides, every element left for the
    /// kernel to write.
    struct Out {
        slice: CudaSlice<bf16>,
        rows: Rows,
        by_row: bool,
        heads: usize,
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

        /// One block of 128 threads per 64-row tile of each of `heads` heads of each batch row. The
        /// tile is the grid's slowest dimension: blocks start in the order of their linear index,
        /// so all blocks of one tile rank (the kernels order the ranks longest first) start
        /// before any of the next, and the last to start are the shortest.
        fn cfg(&self, heads: usize, smem: usize) -> LaunchConfig {
            self.cfg_tiles(heads, 64, smem)
        }

        /// `cfg` with tiles of `rows` rows.
        fn cfg_tiles(&self, heads: usize, rows: usize, smem: usize) -> LaunchConfig {
            LaunchConfig { grid_dim: (heads as u32, self.b as u32, self.t.div_ceil(rows) as u32), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 }
        }

        /// Shared memory rows are `d + 8` elements (the padding spreads ldmatrix's rows over the
        /// banks).
        fn pitch_bytes(&self) -> usize {
            (self.d + 8) * 2
        }

        fn out_like(&self, like: &Tensor) -> Result<Out> {
            let heads = like.dim(1)?;
            let (t, d) = (self.t, self.d);
            let st = like.stride();
            let by_row = st[1] < st[2];
            // SAFETY: the kernel writes every element (each row of each head of each batch row)
            let slice = unsafe { self.dev.alloc::<bf16>(self.b * heads * t * d)? };
            let rows = if by_row {
                Rows { b: (t * heads * d) as i64, h: d as i64, r: (heads * d) as i64 }
            } else {
                Rows { b: (heads * t * d) as i64, h: (t * d) as i64, r: d as i64 }
            };
            Ok(Out { slice, rows, by_row, heads })
        }

        /// `out_like` for rows of `heads + extra` heads (`[b, t, (heads + extra) d]`), the
        /// kernel writing the first `heads` of each row.
        fn out_rows(&self, extra: usize) -> Result<Out> {
            let (t, d, width) = (self.t, self.d, (self.h + extra) * self.d);
            // SAFETY: the kernel writes every element of the first `heads` heads of each row;
            // the caller writes or never reads the rest
            let slice = unsafe { self.dev.alloc::<bf16>(self.b * t * width)? };
            let rows = Rows { b: (t * width) as i64, h: d as i64, r: width as i64 };
            Ok(Out { slice, rows, by_row: true, heads: self.h })
        }

        fn tensor(&self, out: Out) -> Result<Tensor> {
            let (b, t, d, heads) = (self.b, self.t, self.d, out.heads);
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out.slice, self.dev.clone()));
            if out.by_row {
                Tensor::from_storage(storage, (b, t, heads, d), BackpropOp::none(), false).transpose(1, 2)
            } else {
                Ok(Tensor::from_storage(storage, (b, heads, t, d), BackpropOp::none(), false))
            }
        }

        fn f32s(&self, n: usize) -> Result<CudaSlice<f32>> {
            // SAFETY: the kernel writes every element (one per query row of each head)
            Ok(unsafe { self.dev.alloc::<f32>(n)? })
        }
    }

    /// The output `[b, heads, t, d]` (laid out as `q`), or with `extra` heads, `[b, t, (heads +
    /// extra) d]`: each row's heads first, the last `extra · d` elements of each row left
    /// unwritten. And each query's log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(a: &Args, q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64, tiles: Tiles, extra: Option<usize>) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = (readable(q)?, readable(k)?, readable(v)?);
        let starts = spans.device_starts();
        let (qg, kg, vg, sg) = (q.storage_and_layout().0, k.storage_and_layout().0, v.storage_and_layout().0, starts.storage_and_layout().0);
        let ((qs, sq), (ks, sk), (vs, sv)) = (view(&qg, &q)?, view(&kg, &k)?, view(&vg, &v)?);
        let ss = cuda_slice_of!(sg, starts, u32);
        let o = match extra {
            Some(extra) => a.out_rows(extra)?,
            None => a.out_like(&q)?,
        };
        let lse = a.f32s(a.b * a.h * a.t)?;
        let smem = 4 * 64 * a.pitch_bytes();
        let (name, rows) = match tiles {
            Tiles::Two if a.d == 64 => ("flash_fwd2", 128),
            _ => ("flash_fwd", 64),
        };
        let func = a.func(name, smem)?;
        let (t, h, kvh) = (a.t as i32, a.h as i32, a.kvh as i32);
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let stream = a.dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&qs).arg(&ks).arg(&vs).arg(&o.slice).arg(&lse).arg(&sq).arg(&sk).arg(&sv).arg(&o.rows);
        bld.arg(&t).arg(&h).arg(&kvh).arg(&ss).arg(&scale_log2);
        // SAFETY: argument types and order match the kernel's signature
        unsafe { bld.launch(a.cfg_tiles(a.h, rows, smem)) }.w()?;
        drop(bld);
        let lse = Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(lse, a.dev.clone())), (a.b, a.h, a.t), BackpropOp::none(), false);
        let o = match extra {
            Some(extra) => Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(o.slice, a.dev.clone())), (a.b, a.t, (a.h + extra) * a.d), BackpropOp::none(), false),
            None => a.tensor(o)?,
        };
        Ok((o, lse))
    }

    /// A gradient's first element and strides in the memory the kernels write.
    struct Dest {
        ptr: u64,
        rows: Rows,
    }

    /// `[dq, dk, dv]`, each laid out as its input.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        a: &Args,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        spans: &CausalSpans,
        scale: f64,
    ) -> Result<[Tensor; 3]> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
        let stream = a.dev.cuda_stream();
        let (mut dq, mut dk, mut dv) = (a.out_like(q)?, a.out_like(k)?, a.out_like(v)?);
        {
            let (pq, _gq) = dq.slice.device_ptr_mut(&stream);
            let (pk, _gk) = dk.slice.device_ptr_mut(&stream);
            let (pv, _gv) = dv.slice.device_ptr_mut(&stream);
            let dest = [Dest { ptr: pq, rows: dq.rows }, Dest { ptr: pk, rows: dk.rows }, Dest { ptr: pv, rows: dv.rows }];
            launch_backward(a, q, k, v, d_o, o, lse, spans, scale, &dest, RopeArg::NONE)?;
        }
        Ok([a.tensor(dq)?, a.tensor(dk)?, a.tensor(dv)?])
    }

    /// The gradients in one `[b, t, (heads + 2 kv_heads) d]` tensor, each row dq's heads, then
    /// dk's, then dv's; with `rope`'s tables, dq and dk rotated back as they are stored.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_packed(
        a: &Args,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        spans: &CausalSpans,
        scale: f64,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let stream = a.dev.cuda_stream();
        let tables = rope.map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let slices = match &tables {
            None => None,
            Some(((cg, cl), (sg, sl))) => match (&**cg, &**sg) {
                (Storage::Cuda(c), Storage::Cuda(s)) => Some((c.as_cuda_slice::<bf16>()?, cl, s.as_cuda_slice::<bf16>()?, sl)),
                _ => candle_core::bail!("flash attention: RoPE tables not on the cuda device"),
            },
        };
        // the tables' addresses, read by the kernels (the guards kept to the end)
        let reads = slices.as_ref().map(|(c, cl, s, sl)| {
            let ((pc, gc), (ps, gs)) = (c.device_ptr(&stream), s.device_ptr(&stream));
            let arg = RopeArg { cos: pc + 2 * cl.start_offset() as u64, sin: ps + 2 * sl.start_offset() as u64, per_row: (cl.dims().len() == 3) as i32 };
            (arg, gc, gs)
        });
        let rope = reads.as_ref().map_or(RopeArg::NONE, |r| r.0);
        let (b, t, d, h, kvh) = (a.b, a.t, a.d, a.h, a.kvh);
        let width = (h + 2 * kvh) * d;
        // SAFETY: the kernels write every element: each row's heads of dq, dk and dv
        let mut slice = unsafe { a.dev.alloc::<bf16>(b * t * width)? };
        {
            let (p, _g) = slice.device_ptr_mut(&stream);
            let rows = Rows { b: (t * width) as i64, h: d as i64, r: width as i64 };
            let at = |heads: usize| Dest { ptr: p + 2 * (heads * d) as u64, rows };
            launch_backward(a, q, k, v, d_o, o, lse, spans, scale, &[at(0), at(h), at(h + kvh)], rope)?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, a.dev.clone()));
        Ok(Tensor::from_storage(storage, (b, t, width), BackpropOp::none(), false))
    }

    /// The backward's kernels, writing dq, dk and dv to `dest`, memory of the sizes their
    /// strides say that nothing else reads or writes meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn launch_backward(
        a: &Args,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_o: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        spans: &CausalSpans,
        scale: f64,
        dest: &[Dest; 3],
        rope: RopeArg,
    ) -> Result<()> {
        let (q, k, v, d_o, o) = (readable(q)?, readable(k)?, readable(v)?, readable(d_o)?, readable(o)?);
        let lse = lse.contiguous()?;
        let starts = spans.device_starts();
        let [qg, kg, vg, dog, og] = [&q, &k, &v, &d_o, &o].map(|x| x.storage_and_layout().0);
        let ((qs, sq), (ks, sk), (vs, sv), (dos, sdo)) = (view(&qg, &q)?, view(&kg, &k)?, view(&vg, &v)?, view(&dog, &d_o)?);
        let (os, so) = view(&og, &o)?;
        let (lg, sg) = (lse.storage_and_layout().0, starts.storage_and_layout().0);
        let (ls, ss) = (cuda_slice_of!(lg, lse, f32), cuda_slice_of!(sg, starts, u32));
        // D = sum_d do * o per query, written by the dq kernel for the dk/dv kernel
        let ds = a.f32s(a.b * a.h * a.t)?;
        let (t, h, kvh) = (a.t as i32, a.h as i32, a.kvh as i32);
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let scale = scale as f32;
        let stream = a.dev.cuda_stream();
        let [dq, dk, dv] = dest;
        {
            let smem = 6 * 64 * a.pitch_bytes();
            let func = a.func("flash_dq", smem)?;
            let mut bld = stream.launch_builder(&func);
            bld.arg(&qs).arg(&ks).arg(&vs).arg(&dos).arg(&os).arg(&ls).arg(&ds).arg(&dq.ptr);
            bld.arg(&sq).arg(&sk).arg(&sv).arg(&sdo).arg(&so).arg(&dq.rows);
            bld.arg(&t).arg(&h).arg(&kvh).arg(&ss).arg(&scale_log2).arg(&scale).arg(&rope);
            // SAFETY: argument types and order match the kernel's signature
            unsafe { bld.launch(a.cfg(a.h, smem)) }.w()?;
        }
        {
            // queries per step: 64 for head size 64, 32 for 128 (as `dkv_step` in the kernel)
            let step = if a.d == 64 { 64 } else { 32 };
            let smem = (2 * 64 + 4 * step) * a.pitch_bytes() + 4 * step * 4;
            let func = a.func("flash_dkv", smem)?;
            let splits = if a.d == 128 { super::dkv_splits(a.t.div_ceil(64) * a.kvh * a.b, a.h / a.kvh) } else { 1 };
            let n = a.b * a.kvh * a.t * a.d;
            // the partial sums of a split launch (a single element when unused)
            let part = a.f32s(if splits > 1 { 2 * splits * n } else { 1 })?;
            let splits_i = splits as i32;
            let mut bld = stream.launch_builder(&func);
            bld.arg(&qs).arg(&ks).arg(&vs).arg(&dos).arg(&ls).arg(&ds).arg(&dk.ptr).arg(&dv.ptr).arg(&part).arg(&splits_i);
            bld.arg(&sq).arg(&sk).arg(&sv).arg(&sdo).arg(&dk.rows).arg(&dv.rows);
            bld.arg(&t).arg(&h).arg(&kvh).arg(&ss).arg(&scale_log2).arg(&scale).arg(&rope);
            // SAFETY: argument types and order match the kernel's signature; `part` holds the
            // 2 · splits · n floats a split launch writes
            unsafe { bld.launch(a.cfg(a.kvh * splits, smem)) }.w()?;
            drop(bld);
            if splits > 1 {
                let func = a.dev.get_or_load_custom_func("flash_dkv_sum", "flash_attn", KERNELS)?;
                let (b, kvh, d) = (a.b as i32, a.kvh as i32, a.d as i32);
                let blocks = (n / 2).div_ceil(256).min(132 * 16) as u32;
                let mut bld = func.builder();
                bld.arg(&part).arg(&dk.ptr).arg(&dv.ptr).arg(&dk.rows).arg(&dv.rows).arg(&splits_i).arg(&b).arg(&kvh).arg(&t).arg(&d).arg(&rope);
                // SAFETY: argument types and order match the kernel's signature
                unsafe { bld.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
            }
        }
        Ok(())
    }
}

/// Parts the dk/dv kernel splits each kv head's query heads into (a divisor of `rep`, the query
/// heads per kv head), given its `blocks` unsplit blocks: each block owns a key tile of a kv head
/// and walks all the queries after it, so the first tiles carry up to t / 64 times the work of
/// the last. With few rows (micro-batches of 2 on the 8B shape: 256 blocks) that is one
/// unbalanced wave; split until the grid holds about 1,024 blocks (some four waves on 132 SMs),
/// the parts summed by a second kernel.
pub fn dkv_splits(blocks: usize, rep: usize) -> usize {
    const ENOUGH: usize = 1024;
    let mut splits = 1;
    while blocks * splits < ENOUGH {
        match (splits + 1..=rep).find(|s| rep % s == 0) {
            Some(next) => splits = next,
            None => break,
        }
    }
    splits
}

/// The forward kernel's query tiles per warp (of 16 rows each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tiles {
    One,
    /// Head size 64 only (128-query blocks; elsewhere `One`): each key and value operand read
    /// from shared memory serves both tiles.
    Two,
}

impl Tiles {
    /// `Two`, unless the environment sets `ARBITER_FLASH_FORWARD=one` (to compare the two).
    fn chosen() -> Tiles {
        static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *ONE.get_or_init(|| std::env::var("ARBITER_FLASH_FORWARD").is_ok_and(|v| v == "one")) {
            Tiles::One
        } else {
            Tiles::Two
        }
    }
}

/// Attention over `q` `[b, heads, t, d]`, `k` and `v` `[b, kv_heads, t, d]` (see `applies`):
/// the output `[b, heads, t, d]` and each query's log-sum-exp of the scaled scores, base 2,
/// `[b, heads, t]` f32. No autograd.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64) -> Result<(Tensor, Tensor)> {
    forward_tiles(q, k, v, spans, scale, Tiles::chosen())
}

fn forward_tiles(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64, tiles: Tiles) -> Result<(Tensor, Tensor)> {
    launch_forward(q, k, v, spans, scale, tiles, None)
}

/// `forward` with the output written into rows `extra` heads wider: `[b, t, (heads + extra) d]`,
/// each row's heads (as `[b, t, heads, d]` lies) first and its last `extra · d` elements left
/// for the caller (a GEMM's operand widened by an adapter's r-wide product, say). The
/// `[b, heads, t, d]` output is a view of it: reshaped to `[b, t, heads + extra, d]`,
/// transposed to `[b, heads + extra, t, d]`, then `narrow(1, 0, heads)`.
pub fn forward_into_rows(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64, extra: usize) -> Result<(Tensor, Tensor)> {
    launch_forward(q, k, v, spans, scale, Tiles::chosen(), Some(extra))
}

fn launch_forward(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, scale: f64, tiles: Tiles, extra: Option<usize>) -> Result<(Tensor, Tensor)> {
    check(q, k, v, spans)?;
    #[cfg(feature = "cuda")]
    {
        launch::forward(&launch::Args::new(q, k)?, q, k, v, spans, scale, tiles, extra)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (v, scale, tiles, extra);
        unreachable!("check refuses every tensor without the cuda feature")
    }
}

/// `[dq, dk, dv]` for the output gradient `d_o` `[b, heads, t, d]`, given the forward's output
/// `o` and `lse`. No autograd. (`D = sum_d d_o * o` per query is computed by the dq kernel.)
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    spans: &CausalSpans,
    scale: f64,
) -> Result<[Tensor; 3]> {
    check_backward(q, k, v, d_o, o, lse, spans)?;
    #[cfg(feature = "cuda")]
    {
        let bf = |x: &Tensor| x.to_dtype(DType::BF16);
        launch::backward(&launch::Args::new(q, k)?, q, k, v, &bf(d_o)?, &bf(o)?, lse, spans, scale)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (v, scale);
        unreachable!("check refuses every tensor without the cuda feature")
    }
}

/// `backward`'s gradients packed in one `[b, t, (heads + 2 kv_heads) d]` tensor: each row the
/// row's dq heads, then dk's, then dv's, as a fused q/k/v projection's output lies, so that the
/// three projections' input gradient is one GEMM over it. With `rope`, RoPE's tables `(cos,
/// sin)` (`rope_tables_fit`), dq and dk come rotated back (the gradients before RoPE).
#[allow(clippy::too_many_arguments)]
pub fn backward_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    spans: &CausalSpans,
    scale: f64,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    check_backward(q, k, v, d_o, o, lse, spans)?;
    if let Some((cos, sin)) = rope {
        if !rope_tables_fit(cos, sin, q) {
            candle_core::bail!("flash attention backward: RoPE tables {:?} and {:?} do not fit q {:?}", cos.layout(), sin.layout(), q.shape());
        }
    }
    #[cfg(feature = "cuda")]
    {
        let bf = |x: &Tensor| x.to_dtype(DType::BF16);
        launch::backward_packed(&launch::Args::new(q, k)?, q, k, v, &bf(d_o)?, &bf(o)?, lse, spans, scale, rope)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (v, scale);
        unreachable!("check refuses every tensor without the cuda feature")
    }
}

/// Whether the backward kernels rotate dq and dk back with these RoPE tables for the queries
/// `q` `[b, heads, t, d]`: contiguous bf16 `[t, d/2]` or `[b, t, d/2]` on q's device, starting on
/// a 4-byte boundary (the kernels read them in pairs).
pub fn rope_tables_fit(cos: &Tensor, sin: &Tensor, q: &Tensor) -> bool {
    let Ok((b, _, t, d)) = q.dims4() else { return false };
    [cos, sin].iter().all(|x| {
        x.dtype() == DType::BF16
            && x.is_contiguous()
            && x.layout().start_offset().is_multiple_of(2)
            && (x.dims() == [t, d / 2] || x.dims() == [b, t, d / 2])
            && x.device().same_device(q.device())
    }) && cos.dims() == sin.dims()
}

fn check_backward(q: &Tensor, k: &Tensor, v: &Tensor, d_o: &Tensor, o: &Tensor, lse: &Tensor, spans: &CausalSpans) -> Result<()> {
    check(q, k, v, spans)?;
    let rows = (q.dim(0)?, q.dim(1)?, q.dim(2)?);
    if d_o.shape() != q.shape() || o.shape() != q.shape() || lse.dims() != [rows.0, rows.1, rows.2] {
        candle_core::bail!("flash attention backward: d_o {:?}, o {:?} or lse {:?} do not fit q {:?}", d_o.shape(), o.shape(), lse.shape(), q.shape());
    }
    if lse.dtype() != DType::F32 {
        candle_core::bail!("flash attention backward: lse is f32");
    }
    Ok(())
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans) -> Result<()> {
    if !applies(q) {
        candle_core::bail!("flash attention: q {:?} {:?} on {:?} (bf16 on CUDA, head size 64 or 128)", q.shape(), q.dtype(), q.device().location());
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kvh, kt, kd) = k.dims4()?;
    let fits = t > 0 && (kb, kt, kd) == (b, t, d) && kvh > 0 && h % kvh == 0 && v.shape() == k.shape();
    if !fits || k.dtype() != q.dtype() || v.dtype() != q.dtype() || spans.batch() != b {
        candle_core::bail!("flash attention: q {:?}, k {:?}, v {:?} and {} spans do not fit", q.shape(), k.shape(), v.shape(), spans.batch());
    }
    Ok(())
}

/// The kernels against the chunked path on the CPU (f32 arithmetic on the same bf16 inputs)
/// for both head sizes, both layouts (contiguous, and `[b, t, heads, d]` transposed), a length
/// that is not a multiple of the 64-row tiles, grouped query heads and batch rows padded on the
/// left (one past two whole key tiles), the forward with one and two query tiles per warp. The
/// backward reads the kernel's output (and computes `D` from it). Tolerances: the output within
/// 2^-7 of the largest |v| (the probabilities and the output are each rounded once to bf16); the
/// gradients within 2^-5 of their largest magnitude (the probabilities or score gradients are
/// rounded to bf16 before their second product, then the result), as the bf16 parity check
/// allows.
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
        let [dq, dk, dv] = plan.backward(&qf, &kf, &vf, &of, &want, None)?;
        let diff = |want: &Tensor, got: &Tensor| -> Result<f32> { max(&(want - got.to_device(&cpu)?.to_dtype(DType::F32)?)?) };
        // contiguous, then each input a [b, t, heads, d] tensor transposed (as projections give
        // them), read in place; at head size 64 both forward kernels
        let cases = [
            (["flash attention", "flash attention dq", "flash attention dk", "flash attention dv"], false, Tiles::One),
            (["flash attention btHd", "flash attention btHd dq", "flash attention btHd dk", "flash attention btHd dv"], true, Tiles::One),
            (["flash attention 2 tiles", "flash attention 2 tiles dq", "flash attention 2 tiles dk", "flash attention 2 tiles dv"], true, Tiles::Two),
        ];
        for (names, by_row, tiles) in cases {
            if tiles == Tiles::Two && d != 64 {
                continue;
            }
            let on = |x: &Tensor| -> Result<Tensor> {
                if by_row {
                    x.transpose(1, 2)?.contiguous()?.to_device(device)?.transpose(1, 2)
                } else {
                    x.to_device(device)
                }
            };
            let (got, lse) = forward_tiles(&on(&q)?, &on(&k)?, &on(&v)?, &spans_dev, scale, tiles)?;
            // the backward reads the kernel's own output, as in training
            let grads = backward(&on(&q)?, &on(&k)?, &on(&v)?, &on(&d_o)?, &got, &lse, &spans_dev, scale)?;
            let tol = 2f32.powi(-7) * max(&vf)?;
            out.push(KernelCheck { kernel: names[0], dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(&want, &got)?, tolerance: tol });
            for (kernel, want, got) in [(names[1], &dq, &grads[0]), (names[2], &dk, &grads[1]), (names[3], &dv, &grads[2])] {
                out.push(KernelCheck { kernel, dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(want, got)?, tolerance: 2f32.powi(-5) * max(want)? });
            }
            if by_row && tiles == Tiles::One {
                // the same gradients packed in one [b, t, (h + 2 kvh) d] tensor
                let packed = backward_packed(&on(&q)?, &on(&k)?, &on(&v)?, &on(&d_o)?, &got, &lse, &spans_dev, scale, None)?.reshape((b, t, h + 2 * kvh, d))?;
                let heads = |h0: usize, n: usize| packed.narrow(2, h0, n)?.transpose(1, 2);
                let names = ["flash attention packed dq", "flash attention packed dk", "flash attention packed dv"];
                for (kernel, want, got) in [(names[0], &dq, heads(0, h)?), (names[1], &dk, heads(h, kvh)?), (names[2], &dv, heads(h + kvh, kvh)?)] {
                    out.push(KernelCheck { kernel, dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(want, &got)?, tolerance: 2f32.powi(-5) * max(want)? });
                }
                // dq and dk rotated back by RoPE as they are stored, with tables shared by the
                // batch rows and with a table per row: against the reference's gradients rotated
                // back on the CPU (`[b, t, heads, d]`, f32)
                for per_row in [false, true] {
                    let ang = Tensor::randn(0f32, 3.0, (b, t, d / 2), &cpu)?;
                    let ang = if per_row { ang } else { ang.get(0)? };
                    let (cos, sin) = (ang.cos()?.to_dtype(DType::BF16)?, ang.sin()?.to_dtype(DType::BF16)?);
                    let (cos_f, sin_f) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
                    let back = |x: &Tensor| candle_nn::rotary_emb::rope_thd(&x.transpose(1, 2)?.contiguous()?, &cos_f, &sin_f.neg()?);
                    let (cos_d, sin_d) = (cos.to_device(device)?, sin.to_device(device)?);
                    let rotated = backward_packed(&on(&q)?, &on(&k)?, &on(&v)?, &on(&d_o)?, &got, &lse, &spans_dev, scale, Some((&cos_d, &sin_d)))?;
                    let rotated = rotated.reshape((b, t, h + 2 * kvh, d))?;
                    let names: [&'static str; 3] = if per_row {
                        ["flash attention rotated dq, per-row tables", "flash attention rotated dk, per-row tables", "flash attention rotated dv, per-row tables"]
                    } else {
                        ["flash attention rotated dq", "flash attention rotated dk", "flash attention rotated dv"]
                    };
                    let cases = [(names[0], back(&dq)?, rotated.narrow(2, 0, h)?), (names[1], back(&dk)?, rotated.narrow(2, h, kvh)?), (names[2], dv.transpose(1, 2)?, rotated.narrow(2, h + kvh, kvh)?)];
                    for (kernel, want, got) in cases {
                        out.push(KernelCheck { kernel, dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(&want, &got)?, tolerance: 2f32.powi(-5) * max(&want)? });
                    }
                }
            }
        }
        // the output written into rows a head wider (`forward_into_rows`), its heads read back
        // as a view by the backward, as o_proj's widened operand is
        let on = |x: &Tensor| -> Result<Tensor> { x.transpose(1, 2)?.contiguous()?.to_device(device)?.transpose(1, 2) };
        let (wide, lse) = forward_into_rows(&on(&q)?, &on(&k)?, &on(&v)?, &spans_dev, scale, 1)?;
        let got = wide.reshape((b, t, h + 1, d))?.transpose(1, 2)?.narrow(1, 0, h)?;
        let grads = backward(&on(&q)?, &on(&k)?, &on(&v)?, &on(&d_o)?, &got, &lse, &spans_dev, scale)?;
        out.push(KernelCheck { kernel: "flash attention into wider rows", dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(&want, &got)?, tolerance: 2f32.powi(-7) * max(&vf)? });
        out.push(KernelCheck { kernel: "flash attention into wider rows dq", dtype: "BF16".into(), chunk: (0, d), max_abs_diff: diff(&dq, &grads[0])?, tolerance: 2f32.powi(-5) * max(&dq)? });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dk_dv_split_only_where_the_grid_is_small() {
        // the 8B shape: 16 key tiles x 8 kv heads x rows, 4 query heads per kv head
        assert_eq!(dkv_splits(16 * 8 * 2, 4), 4);
        assert_eq!(dkv_splits(16 * 8 * 4, 4), 2);
        assert_eq!(dkv_splits(16 * 8 * 8, 4), 1);
        // no more parts than query heads, and only divisors of them
        assert_eq!(dkv_splits(4, 3), 3);
        assert_eq!(dkv_splits(100, 6), 6);
        assert_eq!(dkv_splits(400, 6), 3);
        assert_eq!(dkv_splits(10, 1), 1);
    }

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
