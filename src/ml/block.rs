//! The decoder blocks as one autograd node with hand-written backwards, for training.
//!
//! Recorded op by op, a block is some thirty nodes of candle's graph: each keeps its output
//! alive and, in the backward, gets its gradient accumulated into a fresh zero tensor, so a
//! third of the GPU time went to element-wise copies and adds. Here the forward runs outside
//! the graph and keeps only what the backward reads — RoPE'd q and k, v, the attention output,
//! the residual after attention, the gate and up projections — and the backward is written out
//! in full: the MLP, the attention (chunked, probabilities recomputed), RoPE, both RMSNorms and
//! the seven linears (input gradient of the frozen weight, gradients of the LoRA factors, which
//! go to the context's `BlockGrads`), with SwiGLU and attention's row sums fused (`fused`), RoPE
//! of q and k in one pass (`rope`), and the adapters of the linears that read one input (q/k/v,
//! gate/up) run as a group (`lora_group`): one pass over the input for their r-wide products,
//! one for their A gradients and masked input gradients. The
//! norm outputs and `silu(gate) * up` are recomputed rather than kept, and only when a linear
//! that reads them has an adapter. Under activation checkpointing nothing but the block's input is
//! kept and the backward reruns the forward first; it can cover only the first blocks
//! (`LoraCtx::recompute_layers`), trading memory for speed between the two. Blocks after those
//! can also drop just their gate and up projections, two thirds of what a block keeps, and
//! recompute only those two GEMMs in the backward (`LoraCtx::recompute_mlp_layers`), or park them
//! in host memory, copied out and back beside the computation (`offload`,
//! `LoraCtx::mlp_parking`). Where the forward is read only at each row's last position (a
//! classifier's, `llama::LastRows`), the last block computes its keys and values for every
//! position and the rest for those rows alone (`Layer::forward_last`): about one block's work and
//! activations less. The whole stack of blocks is a single node (`trained_blocks`), whose
//! backward walks the blocks in reverse.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, D};

use super::llama::{Block, BlockInputs, Proj};
use super::lora::{BlockGrads, Lora, LoraCtx, Widened};
use super::fused;
use super::norm::{rms_norm_backward_add, rms_norm_forward_wide};
use super::lora_group::{self, Member};
use super::offload::Parked;
use super::ops::{self, AttentionPlan, CastFactors, FrozenLinear, FrozenWeight, LoraParts};
use super::{gemm, rope};

/// The forward's tensors the backward reads.
struct Saved {
    /// `[b, heads, t, head_dim]`, after RoPE.
    q: Tensor,
    /// `[b, kv_heads, t, head_dim]`, after RoPE.
    k: Tensor,
    /// `[b, kv_heads, t, head_dim]`.
    v: Tensor,
    /// Attention output `[b, t, heads * head_dim]` (o_proj's input), or a `[rows, heads *
    /// head_dim]` view of wider rows (`Layer::widened_o`).
    y: Tensor,
    /// Where `y` is such a view, the same output as `[b, heads, t, head_dim]`, a view of those
    /// rows too (the flash backward reads it in place; `y` cannot be reshaped without a copy).
    o: Option<Tensor>,
    /// Each query's log-sum-exp from the flash kernels `[b, heads, t]` (see `ops::AttentionPlan`).
    lse: Option<Tensor>,
    /// The residual stream after attention `[b, t, hidden]`.
    mid: Tensor,
    /// gate_proj and up_proj outputs `[b, t, intermediate]`; `None` where the backward
    /// recomputes them (`Keep::AllButMlp`).
    mlp: Option<(Tensor, Tensor)>,
    /// Each adapted linear's `dropout(x) A^T` `[rows, r]`, so the backward need not redo it.
    lora_h: BTreeMap<Proj, Tensor>,
    /// The attention norm's output `[b, t, hidden]` (or a `[rows, hidden]` view of wider rows:
    /// `Layer::widened_qkv`) where the layer keeps it (`Layer::keep_norm`); else the backward
    /// recomputes it.
    norm: Option<Tensor>,
    /// Where q, k and v ran over widened operands (`Layer::widened_qkv`): their adapters' r-wide
    /// products side by side, `[rows, n r]` (a view of the widened input), and the widened
    /// weight, from which the backward takes the adapters' B gradients and `gh` in one GEMM
    /// each.
    qkv_products: Option<(Tensor, Tensor)>,
}

/// q, k and v from one GEMM over widened operands (`Layer::widened_qkv`) and what the backward
/// reads of it.
struct WideQkv {
    qkv: [Tensor; 3],
    /// The attention norm's output `[rows, hidden]`, a view of the widened input.
    norm: Tensor,
    /// `Saved::qkv_products`.
    products: (Tensor, Tensor),
}

/// The attention's output and o_proj's sum with the residual.
struct Attended {
    /// o_proj's input (`Saved::y`).
    y: Tensor,
    /// `Saved::o`.
    o: Option<Tensor>,
    lse: Option<Tensor>,
    /// `x + o_proj(y)`.
    mid: Tensor,
}

/// What the last block keeps where it computes only each row's last position
/// (`llama::LastRows`): besides the rows' small activations, only the keys and values of every
/// position.
struct SavedLast {
    /// `[b, heads, 1, head_dim]`, after RoPE.
    q: Tensor,
    /// `[b, kv_heads, t, head_dim]`, after RoPE.
    k: Tensor,
    /// `[b, kv_heads, t, head_dim]`.
    v: Tensor,
    /// The attention probabilities `[b, kv_heads, heads / kv_heads, t]` (f32).
    p: Tensor,
    /// Attention output `[b, heads * head_dim]`.
    y: Tensor,
    /// The residual after attention `[b, hidden]`.
    mid: Tensor,
    gate: Tensor,
    up: Tensor,
    lora_h: BTreeMap<Proj, Tensor>,
}

/// What a block's forward kept: every position's activations, or the last rows' alone.
enum Kept {
    Whole(Saved),
    Last(SavedLast),
}

/// What a block's forward keeps for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Nothing: inference, or a block the backward recomputes whole (activation checkpointing).
    Nothing,
    /// All but the MLP's gate and up projections, which the backward recomputes from the kept
    /// residual: two of the block's seven GEMMs redone for two thirds of its activations.
    AllButMlp,
    All,
}

/// One layer's frozen weights and adapter, with the forward's shared inputs.
struct Layer {
    blk: Block,
    li: usize,
    /// This layer's factors as trained (their tensor ids key the gradients).
    lora: Lora,
    /// Training: each adapted linear's factors in the activations' dtype, cast once for the
    /// forward, its recomputation and the backward.
    cast: BTreeMap<Proj, CastFactors>,
    dropout: Option<(f32, u64)>,
    inp: Arc<BlockInputs>,
    /// The last block of a forward that reads only each row's last position (`inp.last`):
    /// it computes those rows alone and returns `[b, hidden]`.
    pruned: bool,
    /// The last block of a training forward that computes every row (`down_in_chunks`).
    chunk_mlp: bool,
    /// A block that keeps all its activations keeps the attention norm's output as well
    /// (`LoraCtx::keep_norms`).
    keep_norm: bool,
    /// A training run's widened weights (`LoraCtx::widened`).
    widened: Option<Widened>,
    /// Whether the backward computes the gradient of the block's input: not for the first
    /// block where nothing reads it (`trained_blocks`).
    input_grad: bool,
}

impl Layer {
    /// With `cast_to`, each adapted linear's factors are cast to that dtype (once per step:
    /// `BlockGrads::cast`). `last`: the forward's last block.
    fn new(blk: &Block, li: usize, lora: &Lora, dropout: Option<(f32, u64)>, inp: &Arc<BlockInputs>, cast_to: Option<(DType, &BlockGrads)>, last: bool) -> Result<Layer> {
        let lora = lora.layer(li);
        let mut cast = BTreeMap::new();
        if let Some((dtype, step)) = cast_to {
            for &p in &lora.config().targets {
                if let Some((parts, a, b)) = lora.parts(&blk.proj[p as usize], li, p, dropout) {
                    cast.insert(p, step.cast(&a, &b, || parts.cast(&a.detach(), &b.detach(), dtype))?);
                }
            }
        }
        Ok(Layer { blk: blk.clone(), li, lora, cast, dropout, inp: inp.clone(), pruned: last && inp.last.is_some(), chunk_mlp: false, keep_norm: false, widened: None, input_grad: true })
    }

    fn eps(&self) -> f32 {
        self.inp.cfg.rms_norm_eps as f32
    }

    /// Linear `p` of `x`; with `lora_h`, an adapted linear leaves its `dropout(x) A^T` there.
    fn linear(&self, p: Proj, x: &Tensor, lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<Tensor> {
        let base = &self.blk.proj[p as usize];
        match (self.lora.parts(base, self.li, p, self.dropout), self.cast.get(&p)) {
            (Some((parts, _, _)), Some(c)) => {
                let (y, h) = parts.forward_cast(x, c)?;
                if let Some(kept) = lora_h {
                    kept.insert(p, h);
                }
                Ok(y)
            }
            (Some((parts, a, b)), None) => parts.forward(x, &a.detach(), &b.detach()),
            (None, _) => base.forward_detached(x),
        }
    }

    /// The adapted linears among `projs`, when every one of them has its factors cast (a
    /// training block) and, with `kept`, its forward's r-wide product there; `None` otherwise,
    /// or when none is adapted.
    fn group(&self, projs: &[Proj], kept: Option<&BTreeMap<Proj, Tensor>>) -> Option<Vec<Adapted<'_>>> {
        let mut out = Vec::new();
        for &proj in projs {
            if let Some((parts, a, b)) = self.lora.parts(&self.blk.proj[proj as usize], self.li, proj, self.dropout) {
                if kept.is_some_and(|k| !k.contains_key(&proj)) {
                    return None;
                }
                out.push(Adapted { proj, parts, cast: self.cast.get(&proj)?, a, b });
            }
        }
        (!out.is_empty() && out.len() <= lora_group::MAX_MEMBERS).then_some(out)
    }

    /// Linears `projs`, which all read `x`, as `linear` each; in a training block the adapted
    /// ones' r-wide products `dropout(x) A^T` come from one pass over `x` (`lora_group::down`).
    fn linears<const N: usize>(&self, projs: [Proj; N], x: &Tensor, mut lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<[Tensor; N]> {
        let Some(group) = self.group(&projs, None) else {
            return array(projs.iter().map(|&p| self.linear(p, x, lora_h.as_deref_mut())).collect());
        };
        self.adapted_linears(projs, x, &group, |p| self.blk.proj[p as usize].forward_detached(x), lora_h)
    }

    /// `residual + linear p (x)`, the linear as `linears` computes it. On CUDA the frozen
    /// weight's GEMM reads the residual as its addend and writes the sum
    /// (`FrozenLinear::forward_plus`), an adapter's product then accumulated into it: no
    /// separate sum, nor a copy of the residual to accumulate into. Elsewhere the linear, then
    /// the sum.
    fn linear_plus(&self, p: Proj, x: &Tensor, residual: &Tensor, lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<Tensor> {
        let base = &self.blk.proj[p as usize];
        if x.device().is_cuda() {
            if let Some(group) = self.group(&[p], None) {
                let [y] = self.adapted_linears([p], x, &group, |_| base.forward_plus(residual, x), lora_h)?;
                return Ok(y);
            }
            if self.lora.parts(base, self.li, p, self.dropout).is_none() {
                return base.forward_plus(residual, x);
            }
        }
        let [y] = self.linears([p], x, lora_h)?;
        fused::add(residual, &y)
    }

    /// `linears` of a training block's adapted `group`: the frozen weights' products from
    /// `base`, the adapters' r-wide products from one pass over `x`, each accumulated into its
    /// linear's product.
    fn adapted_linears<const N: usize>(
        &self,
        projs: [Proj; N],
        x: &Tensor,
        group: &[Adapted],
        base: impl Fn(Proj) -> Result<Tensor>,
        mut lora_h: Option<&mut BTreeMap<Proj, Tensor>>,
    ) -> Result<[Tensor; N]> {
        let n_in = x.dim(D::Minus1)?;
        let rows = x.elem_count() / n_in;
        let (members, prob) = Adapted::members(group);
        let mut hs: BTreeMap<Proj, Tensor> = group.iter().map(|m| m.proj).zip(lora_group::down(&x.reshape((rows, n_in))?, &members, prob)?).collect();
        array(projs.iter().map(|&p| {
            let y = base(p)?;
            let Some((m, h)) = group.iter().find(|m| m.proj == p).zip(hs.remove(&p)) else { return Ok(y) };
            let y = gemm::accumulate(y, &h, &m.cast.bs.t()?, 1.0)?;
            if let Some(kept) = lora_h.as_deref_mut() {
                kept.insert(p, h);
            }
            Ok(y)
        }).collect())
    }

    /// The summed input gradient of linears which all read the input `x`, for their output
    /// gradients (`linear_backward` each, summed). In a training block the adapted ones' masked
    /// input gradients and A gradients come from one pass each (`lora_group`).
    ///
    /// With `fused`, the linears' weights as one matrix and their output gradients as one
    /// `[rows, outs]` tensor (each of `outs`' gradients a slice of its columns): the frozen
    /// weights' input gradient is one GEMM over the two; and where the forward ran over a
    /// widened weight (`Packed::widened`), the adapters' B gradients and `gh` are one GEMM each
    /// over the packed gradient.
    fn linears_backward(&self, outs: &[(Proj, &Tensor)], x: impl Fn() -> Result<Tensor>, grads: &BlockGrads, lora_h: &BTreeMap<Proj, Tensor>, fused: Option<Packed>) -> Result<Tensor> {
        self.linears_backward_to(outs, x, grads, lora_h, fused, true)?.ok_or_else(|| candle_core::Error::Msg("linears backward: no input gradient".into()))
    }

    /// `linears_backward`, the input gradient left out (`None`) unless `needs_dx`: the factors'
    /// gradients alone.
    fn linears_backward_to(&self, outs: &[(Proj, &Tensor)], x: impl Fn() -> Result<Tensor>, grads: &BlockGrads, lora_h: &BTreeMap<Proj, Tensor>, fused: Option<Packed>, needs_dx: bool) -> Result<Option<Tensor>> {
        let missing = |what: &str| candle_core::Error::Msg(format!("linears backward: {what}"));
        let projs: Vec<Proj> = outs.iter().map(|(p, _)| *p).collect();
        let Some(group) = self.group(&projs, Some(lora_h)) else {
            if !needs_dx {
                for (p, g) in outs {
                    self.linear_backward(*p, &x, g, grads, None, lora_h, false)?;
                }
                return Ok(None);
            }
            if let Some(Packed { weight: w, grad: g, .. }) = fused.filter(|_| !self.adapted(&projs)) {
                let dx = w.input_grad(g, g.dtype())?;
                let first = outs.first().map(|(_, g)| *g).ok_or_else(|| missing("no linear"))?;
                let mut shape = first.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = w.in_features();
                }
                return dx.reshape(shape).map(Some);
            }
            let mut acc = None;
            for (p, g) in outs {
                acc = self.linear_backward(*p, &x, g, grads, acc.take(), lora_h, true)?;
            }
            return acc.ok_or_else(|| missing("no linear")).map(Some);
        };
        // the A gradients first (with the adapters' input gradient, where one pass writes both),
        // then the frozen weights' input gradients, summed by their GEMMs
        let first = outs.first().map(|(_, g)| *g).ok_or_else(|| missing("no linear"))?;
        let dtype = first.dtype();
        let n_in = self.blk.proj[outs[0].0 as usize].in_features();
        let rows = first.elem_count() / first.dim(D::Minus1)?.max(1);
        let mut ght = Vec::with_capacity(group.len());
        let r = group[0].cast.a.dim(0)?;
        match fused.as_ref().and_then(|f| f.widened.map(|w| (f.grad, w))).filter(|(g, (h, _))| g.dim(0).ok() == Some(rows) && h.dims() == [rows, group.len() * r]) {
            Some((g, (h, w))) => {
                // every adapter at once: scale g^T h `[outs, n r]` (f32), each adapter's B
                // gradient its block of rows and columns; and (g (scale B))^T `[n r, rows]`
                // from the widened weight's B columns, block-diagonal
                let db = gemm::product(&g.t()?, h, group[0].parts.scale, DType::F32)?;
                let all_ght = gemm::product(&w.narrow(1, n_in, group.len() * r)?.t()?, &g.t()?, 1.0, dtype)?;
                for (i, m) in group.iter().enumerate() {
                    let (first, width) = self.qkv_columns(m.proj);
                    grads.add(m.b, &db.narrow(0, first, width)?.narrow(1, i * r, r)?)?;
                    ght.push(all_ght.narrow(0, i * r, r)?);
                }
            }
            None => {
                for m in &group {
                    let g = outs.iter().find(|(p, _)| *p == m.proj).map(|(_, g)| *g).ok_or_else(|| missing("no gradient"))?;
                    let g2 = as_rows(&g.to_dtype(dtype)?, rows, m.cast.bs.dim(0)?)?;
                    let h = lora_h.get(&m.proj).ok_or_else(|| missing("no kept product"))?;
                    // dB = scale g^T h
                    grads.add_product(m.b, &g2.t()?, &as_rows(h, rows, h.elem_count() / rows.max(1))?, m.parts.scale)?;
                    // (g2 (scale B))^T [r, rows], as the group's kernels read it
                    ght.push(gemm::product(&m.cast.bs.t()?, &g2.t()?, 1.0, g2.dtype())?);
                }
            }
        }
        let (members, prob) = Adapted::members(&group);
        let ght: Vec<&Tensor> = ght.iter().collect();
        // on the kernels' path the adapters' masked input gradients are written first (with the
        // A gradients, from one pass over x) and the frozen weights' GEMMs accumulate onto them
        // (the sum read in their epilogues, not by a pass of its own); elsewhere the GEMMs' sum
        // first, the adapters' added to it
        let lora_first = {
            let x = as_rows(&x()?, rows, n_in)?;
            let (das, dx) = lora_group::backward(&x, &members, &ght, prob, group[0].a.dtype(), needs_dx.then_some(dtype))?;
            for (m, da) in group.iter().zip(das) {
                grads.add(m.a, &da)?;
            }
            dx
        };
        if !needs_dx {
            return Ok(None);
        }
        let adapters_written = lora_first.is_some();
        let mut dx = lora_first;
        match fused {
            Some(Packed { weight: w, grad: g, .. }) => {
                dx = Some(match dx {
                    Some(acc) => w.input_grad_into(acc, g)?,
                    None => w.input_grad(g, g.dtype())?,
                })
            }
            None => {
                for (p, g) in outs {
                    let base = &self.blk.proj[*p as usize];
                    dx = Some(match dx {
                        Some(acc) => base.input_grad_into(acc, g)?,
                        None => base.input_grad(g, g.dtype())?,
                    });
                }
            }
        }
        let dx = dx.ok_or_else(|| missing("no linear"))?;
        let mut shape = first.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n_in;
        }
        let dx = dx.reshape((rows, n_in))?;
        let dx = if adapters_written { dx } else { lora_group::add_dx(dx, &members, &ght, prob)? };
        dx.reshape(shape).map(Some)
    }

    /// The input gradient of linear `p` for the output gradient `grad`, added to `acc` when
    /// given (the gradients of linears that share an input are summed by the GEMMs themselves);
    /// the LoRA factors' gradients go to `grads`. The linear's input `x` is only computed when
    /// the linear has an adapter (the frozen weight's input gradient does not read it).
    /// Without `needs_dx`, only the factors' gradients (`None`).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(&self, p: Proj, x: impl FnOnce() -> Result<Tensor>, grad: &Tensor, grads: &BlockGrads, acc: Option<Tensor>, lora_h: &BTreeMap<Proj, Tensor>, needs_dx: bool) -> Result<Option<Tensor>> {
        let base = &self.blk.proj[p as usize];
        match self.lora.parts(base, self.li, p, self.dropout) {
            Some((parts, a, b)) => {
                // `new` cast every adapted linear's factors for a training block
                let c = self.cast.get(&p).ok_or_else(|| candle_core::Error::Msg("lora backward: factors not cast".into()))?;
                // the gradients are keyed by the factors' ids
                let dx = parts.backward(&x()?, lora_h.get(&p), c, (a, b), grad, needs_dx, acc, grads)?;
                if needs_dx && dx.is_none() {
                    candle_core::bail!("lora backward skipped the input gradient");
                }
                Ok(dx)
            }
            None if !needs_dx => Ok(None),
            None => match acc {
                Some(acc) => base.input_grad_into(acc, grad).map(Some),
                None => base.input_grad(grad, grad.dtype()).map(Some),
            },
        }
    }

    /// `rms_norm(x)` recomputed for the backward when one of `projs` has an adapter (its
    /// factors' gradients read the linear's input); `None` otherwise, as with the default
    /// adapters on q/k/v/o, whose MLP norm output no gradient reads.
    fn norm_for(&self, projs: &[Proj], x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
        self.adapted(projs).then(|| ops::rms_norm(x, weight, self.eps())).transpose()
    }

    /// Whether one of `projs` has an adapter in this layer.
    fn adapted(&self, projs: &[Proj]) -> bool {
        self.lora.factors().any(|((li, p), _)| *li == self.li && projs.contains(p))
    }

    fn plan(&self, q: &Tensor, k: &Tensor) -> Result<AttentionPlan> {
        let hd = self.inp.cfg.head_dim;
        AttentionPlan::new(q, k, &self.inp.spans, self.inp.chunk, 1.0 / (hd as f64).sqrt())
    }

    /// Whether q, k, v and their gradients stay in the projections' `[b, t, heads, hd]` memory,
    /// seen as `[b, heads, t, hd]`: the flash kernels read and write that layout in place, and
    /// the half-split RoPE has a kernel for it (the interleaved one does not).
    fn by_row(&self, x: &Tensor) -> bool {
        let cfg = &self.inp.cfg;
        !cfg.rope_interleaved && ops::flash_attention(x.device(), x.dtype(), cfg.head_dim)
    }

    /// `[b, t, heads * hd]` -> `[b, heads, t, hd]`: a view of the same memory where `by_row`,
    /// else a contiguous copy.
    fn heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, hd) = (self.inp.b, self.inp.t, self.inp.cfg.head_dim);
        let view = x.reshape((b, t, heads, hd))?.transpose(1, 2)?;
        if self.by_row(x) {
            return Ok(view);
        }
        fused::contiguous_rows(&view)
    }

    /// RoPE of q and k `[b, heads, t, hd]` (rotated back with `inverse`: the backward), in
    /// `heads`' layout. Where `by_row`, both in one pass over their own memory (`rope::rope_pair`),
    /// which the caller gives up.
    fn rope_qk(&self, q: Tensor, k: Tensor, inverse: bool) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = (&self.inp.cos, &self.inp.sin);
        if self.by_row(&q) {
            let (q, k) = rope::rope_pair(q.transpose(1, 2)?, k.transpose(1, 2)?, cos, sin, inverse)?;
            return Ok((q.transpose(1, 2)?, k.transpose(1, 2)?));
        }
        let sin = if inverse { sin.neg()? } else { sin.clone() };
        let interleaved = self.inp.cfg.rope_interleaved;
        Ok((ops::rope_detached(&q, cos, &sin, interleaved)?, ops::rope_detached(&k, cos, &sin, interleaved)?))
    }

    /// `[b, heads, t, hd]` -> `[b, t, heads * hd]`, contiguous (no copy for a view of
    /// `[b, t, heads, hd]` memory).
    fn merge(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        fused::contiguous_rows(&x.transpose(1, 2)?)?.reshape((b, t, h * hd))
    }

    /// The block's output, and what `keep` says of what its backward reads (with
    /// `Keep::Nothing`, each activation is freed as soon as it has been used).
    fn forward(&self, x: &Tensor, keep: Keep) -> Result<(Tensor, Option<Kept>)> {
        if self.pruned {
            let (out, saved) = self.forward_last(x, keep != Keep::Nothing)?;
            return Ok((out, saved.map(Kept::Last)));
        }
        let (out, saved) = self.forward_whole(x, keep)?;
        Ok((out, saved.map(Kept::Whole)))
    }

    fn forward_whole(&self, x: &Tensor, keep: Keep) -> Result<(Tensor, Option<Saved>)> {
        let cfg = &self.inp.cfg;
        let mut lora_h = (keep != Keep::Nothing).then(BTreeMap::new);
        let ([q, k, v], h, qkv_products) = match self.widened_qkv(x, lora_h.as_mut())? {
            Some(WideQkv { qkv, norm, products }) => (qkv, norm, Some(products)),
            None => {
                let h = ops::rms_norm(x, &self.blk.attn_norm, self.eps())?;
                let qkv = match self.fused_qkv(&h, lora_h.as_mut())? {
                    Some(qkv) => qkv,
                    None => {
                        let [q, k, v] = self.linears([Proj::Q, Proj::K, Proj::V], &h, lora_h.as_mut())?;
                        let (q, k) = self.rope_qk(self.heads(&q, cfg.num_heads)?, self.heads(&k, cfg.num_kv_heads)?, false)?;
                        [q, k, self.heads(&v, cfg.num_kv_heads)?]
                    }
                };
                (qkv, h, None)
            }
        };
        // kept where the backward would otherwise recompute it (`norm_for`)
        let norm = (self.keep_norm && keep == Keep::All && self.adapted(&[Proj::Q, Proj::K, Proj::V])).then_some(h);
        let plan = self.plan(&q, &k)?;
        let Attended { y, o, lse, mid } = match self.widened_o(&plan, [&q, &k, &v], x, lora_h.as_mut())? {
            Some(done) => done,
            None => {
                let (y, lse) = plan.forward_saving(&q, &k, &v)?;
                let y = self.merge(&y)?;
                let mid = self.linear_plus(Proj::O, &y, x, lora_h.as_mut())?;
                Attended { y, o: None, lse, mid }
            }
        };
        let attention = (keep != Keep::Nothing).then_some((q, k, v, y, o, lse));
        let [gate, up] = self.gate_up(&mid, lora_h.as_mut())?;
        let base = &self.blk.proj[Proj::Down as usize];
        let frozen_down = self.lora.parts(base, self.li, Proj::Down, self.dropout).is_none();
        let (out, mlp) = if keep == Keep::All && self.down_sliced(&mid) {
            let out = self.down_in_chunks(&mid, &gate, &up)?;
            (out, Some((gate, up)))
        } else {
            let s = fused::swiglu(&gate, &up)?;
            // unless kept, gate and up are freed here, before down_proj's GEMM
            let mlp = (keep == Keep::All).then_some((gate, up));
            let out = if frozen_down {
                // a frozen down_proj's product has no buffer of its own: its GEMM writes the sum
                // with the residual (16 MB less at the end of a training forward of the 8B at
                // 2,048 tokens, where the step's memory peaks)
                base.forward_plus(&mid, &s)?
            } else {
                self.linear_plus(Proj::Down, &s, &mid, lora_h.as_mut())?
            };
            (out, mlp)
        };
        let saved = attention.map(|(q, k, v, y, o, lse)| Saved { q, k, v, y, o, lse, mid, mlp, lora_h: lora_h.unwrap_or_default(), norm, qkv_products });
        Ok((out, saved))
    }

    /// q (rotated), k (rotated) and v `[b, heads, t, hd]` of the attention norm's output `h`
    /// from q, k and v's weights in one matrix (`Block::qkv`): one GEMM writes the three
    /// projections side by side in each row, the adapters' products are accumulated into their
    /// columns, RoPE rotates q's and k's heads there, and the three are views of that one
    /// tensor, as the flash kernels read them. `None` where the block has no such matrix, the
    /// flash layout does not apply (`by_row`) or an adapted projection's factors were not cast
    /// (a forward outside training); with `lora_h`, the adapters' r-wide products are left there.
    fn fused_qkv(&self, h: &Tensor, mut lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<Option<[Tensor; 3]>> {
        let projs = [Proj::Q, Proj::K, Proj::V];
        let Some(w) = self.blk.qkv.as_ref().filter(|_| self.by_row(h)) else { return Ok(None) };
        let group = self.group(&projs, None);
        if group.is_none() && self.adapted(&projs) {
            return Ok(None);
        }
        let n_in = h.dim(D::Minus1)?;
        let rows = h.elem_count() / n_in.max(1);
        let h2 = h.reshape((rows, n_in))?;
        let y = w.forward_detached(&h2)?;
        if let Some(group) = group {
            let (members, prob) = Adapted::members(&group);
            for (m, hm) in group.iter().zip(lora_group::down(&h2, &members, prob)?) {
                let (first, width) = self.qkv_columns(m.proj);
                gemm::accumulate_in_place(&y.narrow(1, first, width)?, &hm, &m.cast.bs.t()?, 1.0)?;
                if let Some(kept) = lora_h.as_deref_mut() {
                    kept.insert(m.proj, hm);
                }
            }
        }
        self.split_qkv(y).map(Some)
    }

    /// q (rotated), k (rotated) and v `[b, heads, t, hd]` as views of the packed projections `y`
    /// `[rows, q_out + 2 kv_out]`, q's and k's heads rotated there as one tensor, in place (or,
    /// where the kernel does not apply, into a new one).
    fn split_qkv(&self, y: Tensor) -> Result<[Tensor; 3]> {
        let cfg = &self.inp.cfg;
        let (b, t, hq, hk, hd) = (self.inp.b, self.inp.t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = y.reshape((b, t, hq + 2 * hk, hd))?;
        let qk = rope::rope_heads(heads.narrow(2, 0, hq + hk)?, &self.inp.cos, &self.inp.sin, false)?;
        let (q, k) = (qk.narrow(2, 0, hq)?, qk.narrow(2, hq, hk)?);
        let v = heads.narrow(2, hq + hk, hk)?;
        Ok([q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?])
    }

    /// The first column and the width of projection `p`'s output among q, k and v's packed side
    /// by side (`Block::qkv`'s rows).
    fn qkv_columns(&self, p: Proj) -> (usize, usize) {
        let cfg = &self.inp.cfg;
        let (hq, hk, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (first, heads) = match p {
            Proj::Q => (0, hq),
            Proj::K => (hq, hk),
            _ => (hq + hk, hk),
        };
        (first * hd, heads * hd)
    }

    /// q, k and v as `fused_qkv` gives them, and the attention norm's output `[rows, hidden]`,
    /// from one GEMM over widened operands (`Widened`): the norm is written into the first
    /// columns of `[rows, hidden + n r]`, the adapters' `dropout(h) A^T` into the rest
    /// (`lora_group::down_into`), and q, k and v's weights, widened by the adapters' `scale · B`
    /// in those columns, give the frozen products and the adapters' at once. `None` where the
    /// run keeps no widened weights, `fused_qkv` would not apply, or the weight's copy would
    /// cost more memory traffic than it saves: the widened weight `[out, hidden + n r]` is
    /// copied once, the product's extra pass reads and writes `[rows, out]` at every forward.
    /// With `lora_h`, the adapters' r-wide products are left there: views of those columns,
    /// which keep the whole widened operand alive until the backward (where the run keeps the
    /// norm too, as a run without activation checkpointing does, that costs nothing more).
    fn widened_qkv(&self, x: &Tensor, lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<Option<WideQkv>> {
        let projs = [Proj::Q, Proj::K, Proj::V];
        let (Some(cache), Some(fused)) = (self.widened.as_ref(), self.blk.qkv.as_ref()) else { return Ok(None) };
        let FrozenWeight::Dense(w) = fused.weight() else { return Ok(None) };
        if !self.by_row(x) || w.dtype() != x.dtype() {
            return Ok(None);
        }
        let Some(group) = self.group(&projs, None) else { return Ok(None) };
        let (members, prob) = Adapted::members(&group);
        let n_in = x.dim(D::Minus1)?;
        let rows = x.elem_count() / n_in.max(1);
        let x2 = x.reshape((rows, n_in))?;
        let r = members[0].a.dim(0)?;
        let width = n_in + group.len() * r;
        if width >= 2 * rows || !width.is_multiple_of(8) || !lora_group::fused(&x2, &members) {
            return Ok(None);
        }
        let wide = rms_norm_forward_wide(&x2, &self.blk.attn_norm, self.eps(), width)?;
        let h = wide.narrow(1, 0, n_in)?;
        let hs = lora_group::down_into(&h, &members, prob, &wide.narrow(1, n_in, width - n_in)?)?;
        let blocks: Vec<(Proj, usize, usize, &CastFactors)> = group
            .iter()
            .enumerate()
            .map(|(i, m)| (m.proj, self.qkv_columns(m.proj).0, n_in + i * r, m.cast))
            .collect();
        let ww = cache.weight(self.li, WIDE_QKV, w, width, &blocks)?;
        let y = gemm::product(&wide, &ww.t()?, 1.0, x.dtype())?;
        if let Some(kept) = lora_h {
            for (m, hm) in group.iter().zip(hs) {
                kept.insert(m.proj, hm);
            }
        }
        let products = (wide.narrow(1, n_in, width - n_in)?, ww);
        Ok(Some(WideQkv { qkv: self.split_qkv(y)?, norm: h, products }))
    }

    /// The attention and `x + o_proj(y)` from one GEMM over widened operands, as `widened_qkv`
    /// does for q, k and v: the flash forward writes its output `y` into rows a head wider
    /// (`AttentionPlan::forward_into_rows`), o's adapter its `dropout(y) A^T` into that room
    /// (`lora_group::down_into`), and o_proj's weight widened by `scale · B` in those columns
    /// gives the frozen product and the adapter's, with the residual read as the GEMM's addend
    /// (`gemm::product_plus`). Where the widened weight costs more than it saves, or the flash
    /// kernels, the group's kernels or the run's widened weights are not there: `None`.
    fn widened_o(&self, plan: &AttentionPlan, [q, k, v]: [&Tensor; 3], x: &Tensor, lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<Option<Attended>> {
        let cfg = &self.inp.cfg;
        let base = &self.blk.proj[Proj::O as usize];
        let (Some(cache), FrozenWeight::Dense(w)) = (self.widened.as_ref(), base.weight()) else { return Ok(None) };
        if !self.by_row(x) || w.dtype() != x.dtype() {
            return Ok(None);
        }
        let Some(group) = self.group(&[Proj::O], None) else { return Ok(None) };
        let (members, prob) = Adapted::members(&group);
        let (heads, hd) = (cfg.num_heads, cfg.head_dim);
        let (n_in, hidden) = (heads * hd, x.dim(D::Minus1)?);
        let rows = x.elem_count() / hidden.max(1);
        let r = members[0].a.dim(0)?;
        let width = n_in + r;
        let extra = r.div_ceil(hd);
        let fits = lora_group::fused_shape(x.device(), x.dtype(), rows, n_in, &members) && ((heads + extra) * hd).is_multiple_of(8) && x.is_contiguous();
        if width >= 2 * rows || !width.is_multiple_of(8) || !fits {
            return Ok(None);
        }
        let Some((wide, lse)) = plan.forward_into_rows(q, k, v, extra)? else { return Ok(None) };
        let (b, t) = (self.inp.b, self.inp.t);
        let o = wide.reshape((b, t, heads + extra, hd))?.transpose(1, 2)?.narrow(1, 0, heads)?;
        let wide = wide.reshape((rows, (heads + extra) * hd))?;
        let y = wide.narrow(1, 0, n_in)?;
        let hs = lora_group::down_into(&y, &members, prob, &wide.narrow(1, n_in, r)?)?;
        let ww = cache.weight(self.li, WIDE_O, w, width, &[(Proj::O, 0, n_in, group[0].cast)])?;
        let mid = gemm::product_plus(&x.reshape((rows, hidden))?, &wide.narrow(1, 0, width)?, &ww.t()?)?.reshape(x.shape())?;
        if let Some(kept) = lora_h {
            for (m, hm) in group.iter().zip(hs) {
                kept.insert(m.proj, hm);
            }
        }
        Ok(Some(Attended { y, o: Some(o), lse: Some(lse), mid }))
    }

    /// `mid + down(silu(gate) * up)` for a frozen down_proj, the product made for about 16 MiB
    /// of rows at a time and each slice's GEMM accumulated into its rows of the output
    /// (`in_place`): the last whole block's forward is where a training step's memory peaks,
    /// and the 8B's product at 2,048 tokens is 59 MB whole, 15 MB in slices.
    fn down_in_chunks(&self, mid: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let base = &self.blk.proj[Proj::Down as usize];
        let (inter, hidden) = (gate.dim(D::Minus1)?, mid.dim(D::Minus1)?);
        let rows = gate.elem_count() / inter;
        let out = mid.copy()?;
        let flat = out.reshape((rows, hidden))?;
        let (gate, up) = (gate.reshape((rows, inter))?, up.reshape((rows, inter))?);
        for (r0, n) in Self::mlp_slices(&gate)? {
            let s = fused::swiglu(&gate.narrow(0, r0, n)?, &up.narrow(0, r0, n)?)?;
            base.forward_into(flat.narrow(0, r0, n)?, &s)?;
        }
        Ok(out)
    }

    /// Whether down_proj runs in slices of rows (`down_in_chunks` and its backward), writing
    /// into `acc`: in the last whole block of a training forward, for a frozen down_proj whose
    /// GEMM accumulates in place.
    fn down_sliced(&self, acc: &Tensor) -> bool {
        let down = &self.blk.proj[Proj::Down as usize];
        self.chunk_mlp && self.lora.parts(down, self.li, Proj::Down, self.dropout).is_none() && in_place(down, acc)
    }

    /// The slices (first row, rows) of `down_in_chunks` and its backward over gate's rows: about
    /// 16 MiB of gate's width each, at least 512 rows.
    fn mlp_slices(gate: &Tensor) -> Result<impl Iterator<Item = (usize, usize)>> {
        let inter = gate.dim(D::Minus1)?;
        let rows = gate.elem_count() / inter.max(1);
        let per = ((16usize << 20) / (inter * gate.dtype().size_in_bytes())).max(512).div_ceil(64) * 64;
        Ok((0..rows).step_by(per).map(move |r0| (r0, per.min(rows - r0))))
    }

    /// gate_proj and up_proj of the residual `mid` (through the MLP's norm).
    fn gate_up(&self, mid: &Tensor, lora_h: Option<&mut BTreeMap<Proj, Tensor>>) -> Result<[Tensor; 2]> {
        let h = ops::rms_norm(mid, &self.blk.ffn_norm, self.eps())?;
        self.linears([Proj::Gate, Proj::Up], &h, lora_h)
    }

    /// The forward of the last block where only each row's last position is read
    /// (`llama::LastRows`): RMSNorm, keys and values for every position; the query, attention,
    /// o_proj and MLP for the last rows alone. Returns `[b, hidden]` and, with `keep`, what the
    /// backward reads (small but for the keys and values).
    fn forward_last(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<SavedLast>)> {
        let cfg = &self.inp.cfg;
        let last = self.last_rows()?;
        let (b, t, hd) = (self.inp.b, self.inp.t, cfg.head_dim);
        let mut lora_h = keep.then(BTreeMap::new);
        let h = ops::rms_norm(x, &self.blk.attn_norm, self.eps())?;
        let [k, v] = self.linears([Proj::K, Proj::V], &h, lora_h.as_mut())?;
        let h_last = h.reshape((b * t, cfg.hidden_size))?.index_select(&last.idx, 0)?;
        drop(h);
        let [q] = self.linears([Proj::Q], &h_last, lora_h.as_mut())?;
        drop(h_last);
        let interleaved = cfg.rope_interleaved;
        let k = then(k, |k| ops::rope_detached(&self.by_head(k, cfg.num_kv_heads)?, &self.inp.cos, &self.inp.sin, interleaved))?;
        let v = then(v, |v| self.by_head(v, cfg.num_kv_heads))?;
        let q = then(q, |q| ops::rope_detached(&q.reshape((b, cfg.num_heads, 1, hd))?, &last.cos, &last.sin, interleaved))?;
        let (y, p) = ops::last_query_attention(&q, &k, &v, &last.mask, self.scale())?;
        let mid = self.linear_plus(Proj::O, &y, &self.last_of(x)?, lora_h.as_mut())?;
        let [gate, up] = self.gate_up(&mid, lora_h.as_mut())?;
        let s = fused::swiglu(&gate, &up)?;
        let out = self.linear_plus(Proj::Down, &s, &mid, lora_h.as_mut())?;
        let saved = lora_h.map(|lora_h| SavedLast { q, k, v, p, y, mid, gate, up, lora_h });
        Ok((out, saved))
    }

    fn last_rows(&self) -> Result<&super::llama::LastRows> {
        self.inp.last.as_ref().ok_or_else(|| candle_core::Error::Msg("last block: no last rows".into()))
    }

    /// Rows `idx` of `x` `[b, t, hidden]`: `[b, hidden]`.
    fn last_of(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(D::Minus1)?;
        x.reshape((x.elem_count() / n, n))?.index_select(&self.last_rows()?.idx, 0)
    }

    /// `[b, t, heads * hd]` -> `[b, heads, t, hd]`, contiguous.
    fn by_head(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, hd) = (self.inp.b, self.inp.t, self.inp.cfg.head_dim);
        fused::contiguous_rows(&x.reshape((b, t, heads, hd))?.transpose(1, 2)?)
    }

    fn scale(&self) -> f64 {
        1.0 / (self.inp.cfg.head_dim as f64).sqrt()
    }

    /// The gradient of the block's input (`None` where `input_grad` is off), the factors'
    /// gradients left in `grads`.
    fn backward(&self, x: &Tensor, kept: Kept, grad: &Tensor, grads: &BlockGrads) -> Result<Option<Tensor>> {
        match kept {
            Kept::Whole(saved) => self.backward_whole(x, saved, grad, grads),
            Kept::Last(saved) => self.backward_last(x, saved, grad, grads).map(Some),
        }
    }

    /// The backward of `forward_last` for the gradient of its `[b, hidden]` output.
    fn backward_last(&self, x: &Tensor, saved: SavedLast, grad: &Tensor, grads: &BlockGrads) -> Result<Tensor> {
        let cfg = &self.inp.cfg;
        let eps = self.eps();
        let last = self.last_rows()?;
        let (b, t) = (self.inp.b, self.inp.t);
        let SavedLast { q, k, v, p, y, mid, gate, up, lora_h } = saved;
        let grad = grad.to_dtype(x.dtype())?;
        let d_mid = self.mlp_backward(&mid, gate, up, &grad, grads, &lora_h)?;
        drop((mid, grad));
        let d_y = self.linears_backward(&[(Proj::O, &d_mid)], || Ok(y.clone()), grads, &lora_h, None)?;
        drop(y);
        let [dq, dk, dv] = ops::last_query_attention_backward(&q, &k, &v, &p, &d_y, self.scale())?;
        drop((q, k, v, p, d_y));
        let interleaved = cfg.rope_interleaved;
        let dq = then(dq, |dq| ops::rope_detached(dq, &last.cos, &last.sin.neg()?, interleaved)?.reshape((b, cfg.num_heads * cfg.head_dim)))?;
        let dk = then(dk, |dk| ops::rope_detached(dk, &self.inp.cos, &self.inp.sin.neg()?, interleaved))?;
        let dk = then(dk, |dk| self.merge(dk))?;
        let dv = then(dv, |dv| self.merge(dv))?;
        // keys and values read every position's norm output, the query the last rows'; each
        // recomputed only where an adapter's gradient reads it, and freed right after (this
        // backward runs with every block's activations still kept, near the step's peak)
        let norm = &self.blk.attn_norm;
        let d_h = self.linears_backward(&[(Proj::K, &dk), (Proj::V, &dv)], || ops::rms_norm(x, norm, eps), grads, &lora_h, None)?;
        drop((dk, dv));
        let x_last = self.last_of(x)?;
        let d_h_last = self.linears_backward(&[(Proj::Q, &dq)], || ops::rms_norm(&x_last, norm, eps), grads, &lora_h, None)?;
        let n = cfg.hidden_size;
        let d_h = then(d_h, |d_h| d_h.reshape((b * t, n))?.index_add(&last.idx, &d_h_last, 0)?.reshape(x.shape()))?;
        let dx = rms_norm_backward_add(x, &d_h, norm, eps, None)?;
        drop(d_h);
        // the residual's gradient reaches x at the last rows only
        dx.reshape((b * t, n))?.index_add(&last.idx, &d_mid, 0)?.reshape(x.shape())
    }

    /// The MLP's backward: the gradient of the residual `mid` for the gradient `grad` of
    /// `mid + down(silu(gate) * up)` (its own part and the residual's).
    fn mlp_backward(&self, mid: &Tensor, gate: Tensor, up: Tensor, grad: &Tensor, grads: &BlockGrads, lora_h: &BTreeMap<Proj, Tensor>) -> Result<Tensor> {
        let down = &self.blk.proj[Proj::Down as usize];
        let (d_gate, d_up) = if self.down_sliced(&gate) {
            // as `down_in_chunks`: the gradient of the product a slice of rows at a time, each
            // turned into gate's and up's in their own memory
            let (inter, hidden) = (gate.dim(D::Minus1)?, grad.dim(D::Minus1)?);
            let rows = gate.elem_count() / inter;
            let (g, u, dy) = (gate.reshape((rows, inter))?, up.reshape((rows, inter))?, grad.reshape((rows, hidden))?);
            for (r0, n) in Self::mlp_slices(&gate)? {
                let d_s = down.input_grad(&dy.narrow(0, r0, n)?, gate.dtype())?;
                fused::swiglu_backward_in_place(g.narrow(0, r0, n)?, u.narrow(0, r0, n)?, &d_s)?;
            }
            (gate, up)
        } else {
            let d_s = self.linears_backward(&[(Proj::Down, grad)], || fused::swiglu(&gate, &up), grads, lora_h, None)?;
            // gate and up are not read again: their memory takes the gradients
            fused::swiglu_backward_in_place(gate, up, &d_s)?
        };
        let h = self.norm_for(&[Proj::Gate, Proj::Up], mid, &self.blk.ffn_norm)?;
        let normed = || h.clone().ok_or_else(|| candle_core::Error::Msg("ffn norm not recomputed".into()));
        let d_h = self.linears_backward(&[(Proj::Gate, &d_gate), (Proj::Up, &d_up)], normed, grads, lora_h, None)?;
        drop((h, d_gate, d_up));
        rms_norm_backward_add(mid, &d_h, &self.blk.ffn_norm, self.eps(), Some(grad))
    }

    fn backward_whole(&self, x: &Tensor, saved: Saved, grad: &Tensor, grads: &BlockGrads) -> Result<Option<Tensor>> {
        let cfg = &self.inp.cfg;
        let eps = self.eps();
        let Saved { q, k, v, y, o, lse, mid, mlp, lora_h, norm, qkv_products } = saved;
        let grad = grad.to_dtype(x.dtype())?;
        // recomputed as the forward ran them: dropout masks are drawn from their seeds, and the
        // forward's r-wide products are already in `lora_h`
        let [gate, up] = match mlp {
            Some((gate, up)) => [gate, up],
            None => self.gate_up(&mid, None)?,
        };
        // MLP: out = mid + down(silu(gate) * up)
        let d_mid = self.mlp_backward(&mid, gate, up, &grad, grads, &lora_h)?;
        drop((mid, grad));
        super::pool::trace(x.device(), "block backward, MLP", self.li);
        // attention: mid = x + o(attention(rope(q(h)), rope(k(h)), v(h))), h = norm(x)
        let d_y = self.linears_backward(&[(Proj::O, &d_mid)], || Ok(y.clone()), grads, &lora_h, None)?;
        let d_o = self.heads(&d_y, cfg.num_heads)?;
        let o = match o {
            Some(o) => o,
            None => self.heads(&y, cfg.num_heads)?,
        };
        drop((d_y, y));
        let plan = self.plan(&q, &k)?;
        // with q, k and v's weights in one matrix, their gradients come packed as that matrix's
        // output would lie, rotated back, and the input gradient is one GEMM over them
        // (the kernels rotate dq and dk back as they store them, where RoPE's tables fit them;
        // elsewhere the gradients apart, as without the matrix)
        let (cos, sin) = (&self.inp.cos, &self.inp.sin);
        let packed = match &self.blk.qkv {
            Some(_) if self.by_row(&q) && super::flash::rope_tables_fit(cos, sin, &q) => plan.backward_packed(&q, &k, &v, &d_o, &o, lse.as_ref(), Some((cos, sin)))?,
            _ => None,
        };
        let (hq, hk, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let grads_qkv = match packed {
            Some(p) => {
                drop((q, k, v, d_o, o, lse));
                let width = p.dim(D::Minus1)?;
                let p = p.reshape((p.elem_count() / width, width))?;
                let cols = |h0: usize, n: usize| p.narrow(1, h0 * hd, n * hd);
                ([cols(0, hq)?, cols(hq, hk)?, cols(hq + hk, hk)?], Some(p))
            }
            None => {
                let [dq, dk, dv] = plan.backward(&q, &k, &v, &d_o, &o, lse.as_ref())?;
                drop((q, k, v, d_o, o, lse));
                let (dq, dk) = self.rope_qk(dq, dk, true)?;
                let dq = then(dq, |dq| self.merge(dq))?;
                let dk = then(dk, |dk| self.merge(dk))?;
                let dv = then(dv, |dv| self.merge(dv))?;
                ([dq, dk, dv], None)
            }
        };
        super::pool::trace(x.device(), "block backward, attention", self.li);
        let ([dq, dk, dv], packed) = grads_qkv;
        let h = match norm {
            Some(h) => Some(h),
            None => self.norm_for(&[Proj::Q, Proj::K, Proj::V], x, &self.blk.attn_norm)?,
        };
        let normed = || h.clone().ok_or_else(|| candle_core::Error::Msg("attention norm not recomputed".into()));
        let products = qkv_products.as_ref().map(|(h, w)| (h, w));
        let fused = self.blk.qkv.as_ref().zip(packed.as_ref()).map(|(w, g)| Packed { weight: w, grad: g, widened: products });
        let d_h = self.linears_backward_to(&[(Proj::Q, &dq), (Proj::K, &dk), (Proj::V, &dv)], normed, grads, &lora_h, fused, self.input_grad)?;
        drop((h, dq, dk, dv, packed, qkv_products));
        let Some(d_h) = d_h else { return Ok(None) };
        let d_h = d_h.reshape(x.shape())?;
        rms_norm_backward_add(x, &d_h, &self.blk.attn_norm, eps, Some(&d_mid)).map(Some)
    }
}

/// Linears that read one input as one matrix (`Block::qkv`), their output gradients packed as
/// its output lies `[rows, outs]`, and, where the forward ran over the matrix widened by the
/// adapters (`Layer::widened_qkv`), the adapters' r-wide products side by side `[rows, n r]`
/// and the widened weight.
#[derive(Clone, Copy)]
struct Packed<'a> {
    weight: &'a FrozenLinear,
    grad: &'a Tensor,
    widened: Option<(&'a Tensor, &'a Tensor)>,
}

/// One adapted linear of a group that reads one input: its projection, parts, factors cast for
/// the block, and the trained factors (whose ids key the gradients).
struct Adapted<'a> {
    proj: Proj,
    parts: LoraParts,
    cast: &'a CastFactors,
    a: &'a Tensor,
    b: &'a Tensor,
}

impl Adapted<'_> {
    /// The group's adapters as `lora_group` takes them, and their dropout probability (one for
    /// the whole forward).
    fn members<'a>(group: &'a [Adapted]) -> (Vec<Member<'a>>, f32) {
        let members = group.iter().map(|m| Member { a: &m.cast.a, seed: m.parts.dropout.map_or(0, |(_, s)| s) }).collect();
        let prob = group.iter().find_map(|m| m.parts.dropout.map(|(p, _)| p)).unwrap_or(0.0);
        (members, prob)
    }
}

/// The groups of linears whose weights a layer widens (`lora::Widened`'s key): q, k and v's,
/// and o's.
const WIDE_QKV: u8 = 0;
const WIDE_O: u8 = 1;

/// Whether `FrozenLinear::forward_into` accumulates into a slice of `acc` in place: a dense
/// weight of `acc`'s float dtype on CUDA (cuBLAS with beta = 1).
fn in_place(base: &FrozenLinear, acc: &Tensor) -> bool {
    matches!(base.weight(), FrozenWeight::Dense(w) if w.dtype() == acc.dtype()) && acc.device().is_cuda() && matches!(acc.dtype(), DType::BF16 | DType::F32)
}

/// `g` as `[rows, n]`: itself where it already is (a slice of a wider matrix's columns stays a
/// view, which a reshape would copy), else reshaped.
fn as_rows(g: &Tensor, rows: usize, n: usize) -> Result<Tensor> {
    if g.dims() == [rows, n] {
        Ok(g.clone())
    } else {
        g.reshape((rows, n))
    }
}

/// `f` of `x`, which is freed once `f` has run: `let y = then(y, ..)` gives the old `y` up, where
/// shadowing it would keep it alive to the end of the scope.
fn then(x: Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    f(&x)
}

/// `N` results as an array.
fn array<const N: usize>(xs: Result<Vec<Tensor>>) -> Result<[Tensor; N]> {
    xs?.try_into().map_err(|v: Vec<Tensor>| candle_core::Error::Msg(format!("{} results for {N} linears", v.len())))
}

/// One block's part of the stack's backward: its layer, its input and, unless recomputed, what
/// its forward kept.
struct Pending {
    layer: Layer,
    x: Tensor,
    saved: Option<Kept>,
    /// The MLP's gate and up projections, parked in host memory (`LoraCtx::mlp_parking`).
    parked: Option<Parked>,
}

/// Parked activations' device copies are freed this many blocks after their own forward (their
/// copy out is done by then, so the device's stream does not wait for it) ...
const RELEASE_AFTER: usize = 3;
/// ... and copied back this many blocks ahead of their backward.
const FETCH_AHEAD: usize = 2;

/// The decoder blocks of a training forward as one node of `x`'s graph (see the module docs):
/// its backward runs the blocks' backwards in reverse, freeing each block's input and
/// activations once it has run, adds the LoRA factors' gradients to `grads` and returns the
/// first block's input gradient. One node rather than one per block: candle gives each node's
/// input a fresh zero gradient and adds the node's result to it, a full-size pass per block.
/// Dropout masks are pure functions of their seeds, so a recomputed forward draws the same ones.
/// Without `input_grad` (nothing reads the gradient of `x`, tracked only for the node to be
/// recorded: frozen embeddings) the first block's backward stops at its factors' gradients:
/// q, k and v's input gradient, the attention norm's backward and the sum into `x`'s gradient
/// are left out (unless that block is also the last, computing only the last rows: a one-block
/// model's backward gives the gradient all the same).
#[allow(clippy::too_many_arguments)]
pub(super) fn trained_blocks(blocks: &[Block], x: &Tensor, lora: &Lora, ctx: &LoraCtx, grads: &BlockGrads, inp: &Arc<BlockInputs>, input_grad: bool) -> Result<Tensor> {
    let mut pending = Vec::with_capacity(blocks.len());
    let mut h = x.detach();
    grads.cast_ahead(lora, h.dtype(), ctx.widened.as_ref())?;
    for (li, blk) in blocks.iter().enumerate() {
        let _span = tracing::trace_span!("block", layer = li).entered();
        let mut layer = Layer::new(blk, li, lora, ctx.dropout, inp, Some((h.dtype(), grads)), li + 1 == blocks.len())?;
        // the last block that computes every row: its forward ends at the step's peak of memory
        layer.chunk_mlp = li + 1 + usize::from(inp.last.is_some()) == blocks.len();
        layer.keep_norm = ctx.keep_norms;
        layer.widened = ctx.widened.clone();
        layer.input_grad = input_grad || li > 0;
        let mlp_only = li >= ctx.recompute_layers && li - ctx.recompute_layers < ctx.recompute_mlp_layers;
        let keep = if li < ctx.recompute_layers {
            Keep::Nothing
        } else if mlp_only && ctx.mlp_parking.is_none() {
            Keep::AllButMlp
        } else {
            Keep::All
        };
        let (out, mut saved) = layer.forward(&h, keep)?;
        let parked = match saved.as_mut() {
            Some(Kept::Whole(s)) if mlp_only => match (&ctx.mlp_parking, s.mlp.take()) {
                (Some(parking), Some((gate, up))) => Some(parking.park(li, vec![gate, up])?),
                (_, mlp) => {
                    s.mlp = mlp;
                    None
                }
            },
            _ => None,
        };
        pending.push(Pending { layer, x: h, saved, parked });
        if let Some(p) = li.checked_sub(RELEASE_AFTER).and_then(|at| pending[at].parked.as_mut()) {
            p.release()?;
        }
        h = out;
        super::pool::trace(h.device(), "block forward", li);
    }
    for p in pending.iter_mut().filter_map(|p| p.parked.as_mut()) {
        p.release()?;
    }
    let pending = Mutex::new(pending);
    let grads = grads.clone();
    let parking = ctx.mlp_parking.clone().unwrap_or_default();
    ops::with_grad_or_none("decoder-blocks", x, h, move |_, _, grad| {
        let mut pending = pending.lock().map_err(|_| candle_core::Error::Msg("decoder blocks: poisoned lock".into()))?;
        let mut g = grad.detach();
        while let Some(Pending { layer, x, saved, parked }) = pending.pop() {
            let _span = tracing::trace_span!("block backward", layer = layer.li).entered();
            for p in pending.iter_mut().rev().take(FETCH_AHEAD).filter_map(|p| p.parked.as_mut()) {
                p.fetch(&parking)?;
            }
            let saved = match (saved, parked) {
                (Some(Kept::Whole(mut s)), Some(p)) => {
                    let mut back = p.take(&parking)?.into_iter();
                    s.mlp = back.next().zip(back.next());
                    Kept::Whole(s)
                }
                (Some(s), _) => s,
                (None, _) => layer.forward(&x, Keep::All)?.1.ok_or_else(|| candle_core::Error::Msg("decoder block: nothing kept".into()))?,
            };
            let li = layer.li;
            match layer.backward(&x, saved, &g, &grads)? {
                Some(next) => g = next,
                // the first block without its input's gradient: the last of the walk
                None => return Ok(None),
            }
            super::pool::trace(g.device(), "block backward", li);
        }
        Ok(Some(g))
    })
}

/// Decoder block `li` of a forward outside autograd (inference): the training forward's kernels
/// and layouts (q, k, v in the projections' memory, flash attention, the fused adds and SwiGLU),
/// every activation freed once used. `lora`'s factors must not be tracked.
/// With `last` and `inp.last`, the forward's last block, which computes only each row's last
/// position and returns `[b, hidden]`.
pub(super) fn inference_block(blk: &Block, li: usize, x: &Tensor, lora: &Lora, dropout: Option<(f32, u64)>, inp: &Arc<BlockInputs>, last: bool) -> Result<Tensor> {
    Ok(Layer::new(blk, li, lora, dropout, inp, None, last)?.forward(x, Keep::Nothing)?.0)
}

/// A training step's gradients through the fused q/k/v path on `device` (one GEMM over
/// `Block::qkv`, the adapters accumulated into its columns, RoPE in place, the packed and
/// rotated attention gradients, one input-gradient GEMM, the adapters' input gradients written
/// first) against the same model and batch with the three weights apart
/// (`Llama::with_qkv_apart`), adapters on q, k, v and o with dropout; and the same through
/// widened weights (`widened_qkv`: one GEMM for q, k and v's frozen products and the adapters',
/// the norm kept as a view of the widened operand, their B gradients and `gh` one GEMM each
/// over the packed gradient; `widened_o`: the attention written into wider rows, o's frozen
/// product, its adapter's and the residual from one GEMM). The logits and every factor's gradient
/// within 2^-5 of the reference's largest magnitude (both bf16; the paths sum the same products
/// in other orders, some rounded once more or less). Nothing where the weights are never fused
/// (the CPU).
pub fn check_device(device: &candle_core::Device) -> Result<Vec<super::KernelCheck>> {
    use super::classifier;
    use super::llama::{Batch, Config, Llama, WeightFormat};
    use super::lora::LoraConfig;
    use candle_core::Var;
    let err = |e: super::MlError| candle_core::Error::Msg(e.to_string());
    let cfg = Config::small(3);
    let fused = Llama::random(cfg.clone(), WeightFormat::Dense(DType::BF16), 11, device).map_err(err)?;
    if !fused.has_fused_qkv() {
        return Ok(Vec::new());
    }
    let apart = fused.with_qkv_apart();
    let targets: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).into();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let lcfg = LoraConfig::from_names(16, 32.0, 0.1, &targets).map_err(err)?;
    let lora = Lora::init(lcfg, &cfg, 11, device, &mut vars).map_err(err)?;
    for (name, v) in &vars {
        if name.contains("lora_B") {
            v.set(&(Tensor::randn(0f32, 1f32, v.shape(), device)? * 0.05)?)?;
        }
    }
    let head = Tensor::randn(0f32, 1f32, (3, cfg.hidden_size), device)?;
    let rows: Vec<Vec<u32>> = [70usize, 128, 33].iter().enumerate().map(|(r, &n)| (0..n).map(|j| ((r * 7919 + j * 104_729) % 999 + 1) as u32).collect()).collect();
    let batch = Batch::right_padded(&rows, 0, device).map_err(err)?;
    let onehot = Tensor::from_vec(vec![1f32, 0., 0., 0., 1., 0., 0., 0., 1.], (3, 3), device)?;
    // the logits and each factor's gradient through one model
    let run_with = |llama: &Llama, widened: Option<&Widened>| -> Result<Vec<Tensor>> {
        let ctx = LoraCtx::training(Some((0.1, 5)), 0);
        // widened: with the attention norm kept, as a view of the widened operand's columns
        let ctx = match widened {
            Some(w) => ctx.with_widened(Some(w)).with_kept_norms(true),
            None => ctx,
        };
        let logits = classifier::logits(llama, Some((&lora, &ctx)), &head, &batch).map_err(err)?;
        let loss = (candle_nn::ops::log_softmax(&logits, 1)? * &onehot)?.sum_all()?.neg()?;
        let g = loss.backward()?;
        let mut out = vec![logits.detach()];
        for (name, v) in &vars {
            out.push(ctx.take_grad(&g, v.as_tensor()).ok_or_else(|| candle_core::Error::Msg(format!("no gradient of {name}")))?);
        }
        Ok(out)
    };
    let widened = Widened::default();
    let want = run_with(&apart, None)?;
    let (got, got_wide) = (run_with(&fused, None)?, run_with(&fused, Some(&widened))?);
    // a second step: each B now cast straight into its block of the widened weights, which are
    // zeroed first (a cast that missed its block would leave zeros there)
    let zeroed = lora.factors().map(|((layer, p), (_, b))| widened.zero_block(*layer, *p, b.dims())).collect::<Result<Vec<bool>>>()?;
    if zeroed.iter().filter(|z| **z).count() != 4 * (cfg.num_layers - 1) {
        candle_core::bail!("fused q/k/v block check: {:?} blocks of the widened weights", zeroed);
    }
    let got_cast_into = run_with(&fused, Some(&widened))?;
    // q/k/v's and o's weights of every block but the last, which computes only the rows the
    // classifier reads (`forward_last`)
    if widened.len() != 2 * (cfg.num_layers - 1) {
        candle_core::bail!("fused q/k/v block check: {} weights widened, not q/k/v's and o's of {} blocks", widened.len(), cfg.num_layers - 1);
    }
    let mut checks = Vec::new();
    let cases = [
        (["fused q/k/v block logits", "fused q/k/v block factor gradient"], got),
        (["widened q/k/v block logits", "widened q/k/v block factor gradient"], got_wide),
        (["widened block, factors cast into it, logits", "widened block, factors cast into it, factor gradient"], got_cast_into),
    ];
    for (names, got) in cases {
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let kernel = names[usize::from(i > 0)];
            let what = if i == 0 { "logits".to_string() } else { vars[i - 1].0.clone() };
            let check = super::KernelCheck::relative(kernel, format!("bf16 {what}"), (0, 0), &w.to_device(&candle_core::Device::Cpu)?, g, 2f32.powi(-5))?;
            checks.push(check);
        }
    }
    Ok(checks)
}
