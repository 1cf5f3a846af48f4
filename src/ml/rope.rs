//! Half-split rotary embedding of a block's queries and keys together: on CUDA one launch rotates
//! both in place (`kernels/rope.cu`), 16 bytes per access with the products in f32, where candle's
//! `rope_thd` took one launch per tensor, a fresh output each, two-byte accesses and bf16
//! arithmetic; elsewhere `rope_thd` itself. The backward is the inverse rotation (`inverse`).

use candle_core::{DType, Device, InplaceOp1, Layout, Result, Tensor};

use super::KernelCheck;

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));

/// `q` `[b, t, hq, d]` and `k` `[b, t, hk, d]` rotated by the tables `cos` and `sin`
/// (`[t, d/2]`, or `[b, t, d/2]` where rows start at other positions), or rotated back with
/// `inverse`. On CUDA (f32 or bf16 of one dtype, `d/2` a whole number of 16-byte pieces, the
/// tables contiguous, q and k each with its rows' heads contiguous and its rows evenly spaced:
/// contiguous, or some heads of a wider packed row; see `rotates_in_place`) both are rotated in
/// their own storage, which the caller must own.
pub fn rope_pair(q: Tensor, k: Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<(Tensor, Tensor)> {
    let (b, t, hq, d) = q.dims4()?;
    let (bk, tk, hk, dk) = k.dims4()?;
    if (bk, tk, dk) != (b, t, d) || d % 2 != 0 {
        candle_core::bail!("rope: keys {:?} do not fit queries {:?}", k.shape(), q.shape());
    }
    check_tables(cos, sin, &q)?;
    let (Some(ldq), Some(ldk)) = (in_place_rows(&q, cos, sin), in_place_rows(&k, cos, sin)) else {
        let sin = if inverse { sin.neg()? } else { sin.clone() };
        let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, &sin)?;
        return Ok((q, k));
    };
    let per_row_tables = cos.rank() == 3;
    q.inplace_op1(&RopePair { k: Some(&k), cos, sin, rows: b * t, ldq, ldk, t, hq, hk, d, per_row_tables, sign: if inverse { -1.0 } else { 1.0 } })?;
    Ok((q, k))
}

/// `rope_pair` for the heads of one tensor `x` `[b, t, h, d]`: the queries' and keys' heads side
/// by side in one packed row (`x` a slice of its heads), rotated in their own storage by one
/// launch where `rotates_in_place`, else into a new tensor. One tensor, because q and k as two
/// slices of one storage would have the kernel's launch lock that storage twice.
pub fn rope_heads(x: Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    check_tables(cos, sin, &x)?;
    let Some(ld) = in_place_rows(&x, cos, sin) else {
        let sin = if inverse { sin.neg()? } else { sin.clone() };
        return candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, &sin);
    };
    let per_row_tables = cos.rank() == 3;
    x.inplace_op1(&RopePair { k: None, cos, sin, rows: b * t, ldq: ld, ldk: 0, t, hq: h, hk: 0, d, per_row_tables, sign: if inverse { -1.0 } else { 1.0 } })?;
    Ok(x)
}

/// An error unless `cos` and `sin` are tables for `x` `[b, t, h, d]` (even `d`): `[t, d/2]` or
/// `[b, t, d/2]`.
fn check_tables(cos: &Tensor, sin: &Tensor, x: &Tensor) -> Result<()> {
    let (b, t, _, d) = x.dims4()?;
    let table = |y: &Tensor| y.dims() == [t, d / 2] || y.dims() == [b, t, d / 2];
    if d % 2 != 0 || !table(cos) || !table(sin) {
        candle_core::bail!("rope: tables {:?} and {:?} do not fit {:?}", cos.shape(), sin.shape(), x.shape());
    }
    Ok(())
}

/// Whether `rope_heads` rotates `x` in its own storage (the kernel's case), rather than into a
/// new tensor.
pub fn rotates_in_place(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    in_place_rows(x, cos, sin).is_some()
}

/// The distance between `x`'s rows (`[b, t, h, d]`) where the kernel rotates it in place with
/// these tables: on CUDA, f32 or bf16 like the contiguous tables, `d/2` a whole number of
/// 16-byte pieces, each row's heads contiguous and the rows evenly spaced, every row starting
/// on 16 bytes.
fn in_place_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<usize> {
    let dtype = x.dtype();
    let size = dtype.size_in_bytes();
    let piece = 16 / size;
    let (_, t, h, d) = x.dims4().ok()?;
    let st = x.stride();
    let aligned = |x: &Tensor| (x.layout().start_offset() * size).is_multiple_of(16);
    let fits = x.device().is_cuda()
        && matches!(dtype, DType::F32 | DType::BF16)
        && [cos, sin].iter().all(|y| y.dtype() == dtype && y.is_contiguous() && aligned(y))
        && (d / 2) % piece == 0
        && aligned(x)
        && st[3] == 1
        && (st[2] == d || h == 1)
        && st[1] >= h * d
        && st[1].is_multiple_of(piece)
        && st[0] == t * st[1];
    fits.then_some(st[1])
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RopePair<'a> {
    /// None: the op's own tensor holds every head (`hk` 0).
    k: Option<&'a Tensor>,
    cos: &'a Tensor,
    sin: &'a Tensor,
    rows: usize,
    /// Elements between consecutive rows of q and of k.
    ldq: usize,
    ldk: usize,
    t: usize,
    hq: usize,
    hk: usize,
    d: usize,
    per_row_tables: bool,
    sign: f32,
}

impl InplaceOp1 for RopePair<'_> {
    fn name(&self) -> &'static str {
        "rope-pair"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("rope-pair: the CPU uses rope_thd")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let dev = s.device().clone();
        let dtype = s.dtype();
        // each tensor's elements from its first to its last
        let span = |ld: usize, heads: usize| if self.rows == 0 { 0 } else { (self.rows - 1) * ld + heads * self.d };
        let a = l.start_offset();
        let b = a + span(self.ldq, self.hq);
        let rows = self.rows as u64;
        let (ldq, ldk) = (self.ldq as u64, self.ldk as u64);
        let pieces = rows * ((self.hq + self.hk) * self.d / 2 / (16 / dtype.size_in_bytes())) as u64;
        let cfg = LaunchConfig { grid_dim: (pieces.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (k, cos, sin) = (self.k, self.cos, self.sin);
        let k_guard = k.map(|k| k.storage_and_layout());
        let (cos_guard, sin_guard) = (cos.storage_and_layout().0, sin.storage_and_layout().0);
        let (t, hq, hk, d) = (self.t as i32, self.hq as i32, self.hk as i32, self.d as i32);
        let per_row = self.per_row_tables as i32;
        macro_rules! go {
            ($t:ty, $suffix:literal) => {{
                let mut qs = s.as_cuda_slice_mut::<$t>()?.slice_mut(a..b);
                let ks = match &k_guard {
                    Some((g, l)) => match &**g {
                        candle_core::Storage::Cuda(c) => {
                            let k0 = l.start_offset();
                            Some(c.as_cuda_slice::<$t>()?.slice(k0..k0 + span(self.ldk, self.hk)))
                        }
                        _ => candle_core::bail!("rope-pair: keys not on the cuda device"),
                    },
                    None => None,
                };
                let cs = cuda_slice_of!(cos_guard, cos, $t);
                let ss = cuda_slice_of!(sin_guard, sin, $t);
                let func = dev.get_or_load_custom_func(concat!("rope_qk_", $suffix), "rope", KERNELS)?;
                let mut builder = func.builder();
                // without keys (hk 0) the kernel never reads its k pointer
                let no_keys = 0u64;
                builder.arg(&mut qs);
                match &ks {
                    Some(ks) => builder.arg(ks),
                    None => builder.arg(&no_keys),
                };
                builder.arg(&cs).arg(&ss).arg(&rows).arg(&ldq).arg(&ldk).arg(&t).arg(&hq).arg(&hk).arg(&d).arg(&per_row).arg(&self.sign);
                // SAFETY: argument types and order match the kernel's signature; the kernel also
                // writes k's storage, which the caller owns (see `rope_pair`)
                unsafe { builder.launch(cfg) }.w()?;
            }};
        }
        match dtype {
            DType::F32 => go!(f32, "f32"),
            DType::BF16 => go!(half::bf16, "bf16"),
            d => candle_core::bail!("rope-pair: no kernel for {d:?}"),
        }
        Ok(())
    }
}

/// The kernel on `device` against candle's `rope_thd` on the CPU in f32, forward and inverse, with
/// shared tables and per-row ones, for both head sizes: f32 within 1e-5 of the largest value,
/// bf16 within 2^-7 (the inputs and tables rounded to bf16 once, the output once).
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    for (d, hq, hk) in [(64usize, 9usize, 3usize), (128, 4, 1)] {
        let (b, t) = (2, 37);
        let q = Tensor::randn(0f32, 1.0, (b, t, hq, d), &cpu)?;
        let k = Tensor::randn(0f32, 1.0, (b, t, hk, d), &cpu)?;
        let ang = Tensor::randn(0f32, 3.0, (b, t, d / 2), &cpu)?;
        for per_row in [false, true] {
            let ang = if per_row { ang.clone() } else { ang.get(0)? };
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            for dtype in [DType::F32, DType::BF16] {
                let to = |x: &Tensor| x.to_dtype(dtype)?.to_dtype(DType::F32);
                let (qr, kr, cr, sr) = (to(&q)?, to(&k)?, to(&cos)?, to(&sin)?);
                let on = |x: &Tensor| x.to_dtype(dtype)?.to_device(device);
                for inverse in [false, true] {
                    let s = if inverse { sr.neg()? } else { sr.clone() };
                    let want_q = candle_nn::rotary_emb::rope_thd(&qr, &cr, &s)?;
                    let want_k = candle_nn::rotary_emb::rope_thd(&kr, &cr, &s)?;
                    let (got_q, got_k) = rope_pair(on(&q)?, on(&k)?, &on(&cos)?, &on(&sin)?, inverse)?;
                    let rel = if dtype == DType::F32 { 1e-5 } else { 1.0 / 128.0 };
                    for (kernel, want, got) in [("rope q", &want_q, got_q), ("rope k", &want_k, got_k)] {
                        out.push(KernelCheck::relative(kernel, format!("{dtype:?}"), (per_row as usize, d), want, &got, rel)?);
                    }
                    // q and k as heads of one packed row [q | k | v] (v's heads, k's copy, are
                    // left as they were): rotated in the packed memory
                    let packed = on(&Tensor::cat(&[&q, &k, &k], 2)?)?;
                    let qk = packed.narrow(2, 0, hq + hk)?;
                    let (cos_d, sin_d) = (on(&cos)?, on(&sin)?);
                    if !rotates_in_place(&qk, &cos_d, &sin_d) {
                        continue;
                    }
                    rope_heads(qk, &cos_d, &sin_d, inverse)?;
                    let want = Tensor::cat(&[&want_q, &want_k, &kr], 2)?;
                    out.push(KernelCheck::relative("rope packed", format!("{dtype:?}"), (per_row as usize, d), &want, &packed, rel)?);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU: the inverse undoes the rotation, and misfitting shapes are refused.
    #[test]
    fn the_inverse_rotation_undoes_the_rotation() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 5, 1, 8), &dev)?;
        let ang = Tensor::randn(0f32, 2.0, (5, 4), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let (rq, rk) = rope_pair(q.clone(), k.clone(), &cos, &sin, false)?;
        assert!((&rq - &q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.1, "rotated");
        let (bq, bk) = rope_pair(rq, rk, &cos, &sin, true)?;
        for (a, b) in [(bq, q), (bk, k)] {
            assert!((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-5);
        }
        let short = Tensor::randn(0f32, 1.0, (2, 4, 1, 8), &dev)?;
        assert!(rope_pair(Tensor::zeros((2, 5, 3, 8), DType::F32, &dev)?, short, &cos, &sin, false).is_err());
        Ok(())
    }
}
