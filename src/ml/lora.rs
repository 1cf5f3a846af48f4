//! LoRA adapters on the frozen linears: `y = W x + (alpha / r) * B A dropout(x)`, A random
//! (PEFT's Kaiming-uniform bound 1/sqrt(in)), B zero, so a fresh adapter changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, TensorId, Var};
use rand::{Rng, SeedableRng};

use super::llama::{Config, Proj};
use super::offload::Parking;
use super::ops::{CastFactors, FrozenLinear, LoraParts};
use super::MlError;

/// Shape of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Proj>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    pub fn from_names(r: usize, alpha: f64, dropout: f64, names: &[String]) -> Result<LoraConfig, MlError> {
        let mut targets = Vec::new();
        for n in names {
            let p = Proj::from_hf_name(n)
                .ok_or_else(|| MlError::Config(format!("unknown LoRA target module {n:?}")))?;
            if !targets.contains(&p) {
                targets.push(p);
            }
        }
        targets.sort();
        if targets.is_empty() || r == 0 {
            return Err(MlError::Config("LoRA needs r >= 1 and at least one target module".into()));
        }
        Ok(LoraConfig { r, alpha, dropout, targets })
    }
}

/// PEFT tensor name of a LoRA factor (`lora_A` or `lora_B`).
pub fn peft_name(layer: usize, p: Proj, factor: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{factor}.weight", p.hf_path())
}

/// Per-forward LoRA settings: dropout probability and the seed its masks derive from
/// (`None` at inference), and how training runs through the decoder blocks.
#[derive(Debug, Clone, Default)]
pub struct LoraCtx {
    pub dropout: Option<(f32, u64)>,
    /// Training through hand-written block backwards: when set, the decoder blocks are one
    /// autograd node whose backward (`block::trained_blocks`) leaves the LoRA factors' gradients
    /// here, not in the backward's `GradStore`. When `None`, a forward through tracked factors
    /// records every op in candle's graph (the reference the hand-written backward is tested
    /// against).
    pub block_grads: Option<BlockGrads>,
    /// With `block_grads`: activation checkpointing of the first this many decoder blocks,
    /// each keeping only its input and recomputing its activations in the backward (0: none,
    /// `usize::MAX`: all). The later blocks keep their activations.
    pub recompute_layers: usize,
    /// With `block_grads`: of the blocks after those, this many keep all but their MLP's gate
    /// and up projections, which the backward recomputes (selective recomputation: less memory
    /// per block than keeping everything, for two of its seven GEMMs).
    pub recompute_mlp_layers: usize,
    /// With this, those `recompute_mlp_layers` blocks park their gate and up projections in host
    /// memory (`offload`) instead of recomputing them: the same memory on the device, no GEMM
    /// redone. A run's steps share one `Parking` (its host buffers).
    pub mlp_parking: Option<Parking>,
    /// With `block_grads`: the blocks that keep their activations keep the attention norm's
    /// output too, where the backward reads it (adapted q, k or v), instead of recomputing it:
    /// for a run without activation checkpointing, whose memory is not at a premium.
    pub keep_norms: bool,
    /// With `block_grads`: the run's frozen weights widened by their adapters' B factors
    /// (`Widened`), kept from step to step; `None`: none made.
    pub widened: Option<Widened>,
}

impl LoraCtx {
    /// The context of a training forward: hand-written block backwards, the first
    /// `recompute_layers` blocks under activation checkpointing.
    pub fn training(dropout: Option<(f32, u64)>, recompute_layers: usize) -> LoraCtx {
        LoraCtx { dropout, block_grads: Some(BlockGrads::default()), recompute_layers, recompute_mlp_layers: 0, mlp_parking: None, keep_norms: false, widened: None }
    }

    /// The same context with `recompute_mlp_layers` blocks, after the recomputed ones,
    /// recomputing only their MLP's gate and up projections.
    pub fn with_mlp_recompute(mut self, layers: usize) -> LoraCtx {
        self.recompute_mlp_layers = layers;
        self
    }

    /// The same context with the `recompute_mlp_layers` blocks parking their gate and up
    /// projections in `parking`'s host memory (`offload`) rather than recomputing them; `None`:
    /// recomputing them.
    pub fn with_mlp_parking(mut self, parking: Option<&Parking>) -> LoraCtx {
        self.mlp_parking = parking.cloned();
        self
    }

    /// The same context with `keep_norms` set to `keep`.
    pub fn with_kept_norms(mut self, keep: bool) -> LoraCtx {
        self.keep_norms = keep;
        self
    }

    /// The same context with the run's widened weights in `widened` (shared from step to step);
    /// `None`: no weight widened.
    pub fn with_widened(mut self, widened: Option<&Widened>) -> LoraCtx {
        self.widened = widened.cloned();
        self
    }

    /// The same context leaving its decoder blocks' gradients in `grads` (shared): a step's
    /// micro-batches sum their gradients there.
    pub fn with_grads(mut self, grads: &BlockGrads) -> LoraCtx {
        self.block_grads = Some(grads.clone());
        self
    }

    /// The gradient of a trained tensor after a backward through a forward run with this
    /// context: from `grads`, or, for a factor inside a decoder block, from the block store
    /// (taken out of it).
    pub fn take_grad(&self, grads: &candle_core::backprop::GradStore, v: &Tensor) -> Option<Tensor> {
        grads.get(v).cloned().or_else(|| self.block_grads.as_ref().and_then(|s| s.take(v)))
    }
}

/// A training run's frozen weights widened by their adapters' B factors, by layer and group of
/// linears: `[out, in + n r]`, the frozen weight in the first `in` columns and each of the n
/// adapters' `scale · B` `[out_m, r]` in its linear's rows of its own r columns (zeros
/// elsewhere). With the input widened alike by the adapters' `dropout(x) A^T` (`[rows, in + n r]`),
/// one GEMM gives the frozen product and the adapters' sum: where the adapters' products were
/// accumulated by GEMMs of their own, each read and wrote the whole `[rows, out]` output once
/// more. The frozen part is copied once for the run (the trainer keeps none under activation
/// checkpointing: at the 8B shape q/k/v's copies are 1.5 GiB, o's 1.0); the B columns are
/// written by each step's cast of the factors where one launch casts them all
/// (`BlockGrads::cast_ahead`: bf16 on CUDA), else by each forward (and by the forward that
/// makes the weight).
#[derive(Debug, Clone, Default)]
pub struct Widened {
    weights: Arc<Mutex<HashMap<(usize, u8), Tensor>>>,
    /// Where each adapted linear's `scale · B` lies, by layer and linear (`block`).
    blocks: Arc<Mutex<HashMap<(usize, Proj), BlockAt>>>,
}

/// A widened weight's block: its group's key, first row and first column.
type BlockAt = (u8, usize, usize);

impl Widened {
    /// Layer `layer`'s weight of group `group` widened to `width` columns: `base` `[out, in]`
    /// (contiguous) first, copied the first time; then each `(linear, row, column, factors)` of
    /// `blocks` recorded there (`block`) and its `scale · B` (`[out_m, r]`, of `base`'s dtype)
    /// written at that row and column, unless the step's cast wrote it there already
    /// (`CastFactors::in_widened`).
    pub(super) fn weight(&self, layer: usize, group: u8, base: &Tensor, width: usize, blocks: &[(Proj, usize, usize, &CastFactors)]) -> candle_core::Result<Tensor> {
        // a weight made here holds none of the blocks yet: every one is written, whatever a cast
        // wrote into the weight it replaces
        let (w, made) = {
            let mut map = self.weights.lock().map_err(|_| candle_core::Error::Msg("widened weights poisoned".into()))?;
            let out = base.dim(0)?;
            match map.get(&(layer, group)) {
                Some(w) if w.dims() == [out, width] && w.dtype() == base.dtype() => (w.clone(), false),
                _ => {
                    let w = Tensor::zeros((out, width), base.dtype(), base.device())?;
                    w.slice_set(&base.contiguous()?, 1, 0)?;
                    map.insert((layer, group), w.clone());
                    (w, true)
                }
            }
        };
        let mut at = self.blocks.lock().map_err(|_| candle_core::Error::Msg("widened weights poisoned".into()))?;
        if made {
            at.retain(|&(l, _), &mut (g, _, _)| l != layer || g != group);
        }
        for &(proj, row, col, c) in blocks {
            at.insert((layer, proj), (group, row, col));
            if made || !c.in_widened {
                w.narrow(0, row, c.bs.dim(0)?)?.slice_set(&c.bs.contiguous()?, 1, col)?;
            }
        }
        Ok(w)
    }

    /// Linear `proj`'s block of layer `layer`'s widened weight, `dims` `[out, r]`, as a view
    /// that a step's cast of `scale · B` writes into (`BlockGrads::cast_ahead`); `None` before
    /// the weight is made, or where the block does not have those dims.
    pub(super) fn block(&self, layer: usize, proj: Proj, dims: &[usize]) -> candle_core::Result<Option<Tensor>> {
        let Some(&(group, row, col)) = self.blocks.lock().map_err(|_| candle_core::Error::Msg("widened weights poisoned".into()))?.get(&(layer, proj)) else { return Ok(None) };
        let Some(w) = self.weights.lock().map_err(|_| candle_core::Error::Msg("widened weights poisoned".into()))?.get(&(layer, group)).cloned() else { return Ok(None) };
        let &[out, r] = dims else { return Ok(None) };
        let (rows, width) = w.dims2()?;
        if row + out > rows || col + r > width {
            return Ok(None);
        }
        Ok(Some(w.narrow(0, row, out)?.narrow(1, col, r)?))
    }

    /// Zeros linear `proj`'s block of layer `layer`'s widened weight (`block`); whether there is
    /// such a block.
    pub(super) fn zero_block(&self, layer: usize, proj: Proj, dims: &[usize]) -> candle_core::Result<bool> {
        let Some(block) = self.block(layer, proj, dims)? else { return Ok(false) };
        let (rows, col) = {
            let at = self.blocks.lock().map_err(|_| candle_core::Error::Msg("widened weights poisoned".into()))?;
            let &(group, row, col) = at.get(&(layer, proj)).ok_or_else(|| candle_core::Error::Msg("widened block gone".into()))?;
            let w = self.weights.lock().map_err(|_| candle_core::Error::Msg("widened weights poisoned".into()))?.get(&(layer, group)).cloned();
            (w.ok_or_else(|| candle_core::Error::Msg("widened weight gone".into()))?.narrow(0, row, dims[0])?, col)
        };
        rows.slice_set(&block.zeros_like()?, 1, col)?;
        Ok(true)
    }

    /// Whether no weight has been widened yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many weights have been widened (one per layer and group of linears).
    pub fn len(&self) -> usize {
        self.weights.lock().map_or(0, |m| m.len())
    }
}

/// Gradients of LoRA factors computed by the decoder blocks' backwards, by tensor id, summed
/// over a step's micro-batches; and the factors cast for the step's forwards.
#[derive(Debug, Clone, Default)]
pub struct BlockGrads {
    grads: Arc<Mutex<HashMap<TensorId, Tensor>>>,
    /// Each adapted linear's factors in the activations' dtype, by the ids of its A and B:
    /// they change only at the optimizer step, so a step's micro-batches cast them once (three
    /// launches per adapted linear and micro-batch fewer). Emptied by `take_all`, which ends
    /// the step.
    casts: Arc<Mutex<HashMap<(TensorId, TensorId), CastFactors>>>,
}

impl BlockGrads {
    /// The factors `a` and `b` of an adapted linear, cast by `cast` the first time in the step.
    pub(super) fn cast(&self, a: &Tensor, b: &Tensor, cast: impl FnOnce() -> candle_core::Result<CastFactors>) -> candle_core::Result<CastFactors> {
        let mut map = self.casts.lock().map_err(|_| candle_core::Error::Msg("cast factors poisoned".into()))?;
        if let Some(c) = map.get(&(a.id(), b.id())) {
            return Ok(c.clone());
        }
        let c = cast()?;
        map.insert((a.id(), b.id()), c.clone());
        Ok(c)
    }

    /// Every adapted linear's factors of `lora` cast to `dtype` ahead of the step's first
    /// forward, as `LoraParts::cast` would, where one launch does them all
    /// (`adamw::cast_scaled_bf16`: bf16 activations on CUDA); `cast` then finds them. Cast one
    /// by one, the small factors cost three launches per adapted linear, some 1 % of the
    /// 135M shape's step on a GPU. A `scale · B` whose block the run's `widened` weights hold
    /// (made by an earlier forward) is written straight there, not copied in by each forward.
    pub(super) fn cast_ahead(&self, lora: &Lora, dtype: DType, widened: Option<&Widened>) -> candle_core::Result<()> {
        if dtype != DType::BF16 || lora.prepared {
            return Ok(());
        }
        let mut map = self.casts.lock().map_err(|_| candle_core::Error::Msg("cast factors poisoned".into()))?;
        let todo: Vec<(&(usize, Proj), &Tensor, &Tensor)> = lora.factors.iter().filter(|(_, (a, b))| !map.contains_key(&(a.id(), b.id()))).map(|(k, (a, b))| (k, a, b)).collect();
        let blocks = todo.iter().map(|&(&(layer, p), _, b)| widened.map_or(Ok(None), |w| w.block(layer, p, b.dims()))).collect::<candle_core::Result<Vec<_>>>()?;
        let xs: Vec<(&Tensor, f64, Option<&Tensor>)> = todo.iter().zip(&blocks).flat_map(|(&(_, a, b), into)| [(a, 1.0, None), (b, lora.scale, into.as_ref())]).collect();
        let Some(cast) = super::adamw::cast_scaled_bf16(&xs)? else { return Ok(()) };
        for ((_, a, b), (pair, into)) in todo.into_iter().zip(cast.chunks_exact(2).zip(&blocks)) {
            map.insert((a.id(), b.id()), CastFactors { a: pair[0].clone(), bs: pair[1].clone(), in_widened: into.is_some() });
        }
        Ok(())
    }

    /// Replaces the gradient of `of` by `sum` of it (`None` for the first term).
    fn update(&self, of: &Tensor, sum: impl FnOnce(Option<Tensor>) -> candle_core::Result<Tensor>) -> candle_core::Result<()> {
        let mut map = self.grads.lock().map_err(|_| candle_core::Error::Msg("checkpoint gradients poisoned".into()))?;
        let next = sum(map.remove(&of.id()))?;
        map.insert(of.id(), next);
        Ok(())
    }

    pub fn add(&self, of: &Tensor, grad: &Tensor) -> candle_core::Result<()> {
        self.update(of, |acc| match acc {
            Some(acc) => acc + grad,
            None => Ok(grad.clone()),
        })
    }

    /// Adds `alpha · a b` to the gradient of `of` (in `of`'s dtype, f32 for the trained factors):
    /// the GEMM writes the first term and accumulates the later ones into it (`gemm`), with no
    /// product in between.
    pub fn add_product(&self, of: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> candle_core::Result<()> {
        self.update(of, |acc| match acc {
            Some(acc) => super::gemm::accumulate(acc, a, b, alpha),
            None => super::gemm::product(a, b, alpha, of.dtype()),
        })
    }

    /// Adds the gradients of `vars` that a backward's store holds (those computed outside the
    /// decoder blocks, as the score head's) to this store: a step's micro-batches sum here.
    pub fn absorb(&self, grads: &candle_core::backprop::GradStore, vars: &[(String, Var)]) -> candle_core::Result<()> {
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.add(v.as_tensor(), g)?;
            }
        }
        Ok(())
    }

    /// Every variable's summed gradient, in order, taken out of the store; zeros where none. The
    /// step is over: the cast factors go too (the optimizer is about to change the factors).
    pub fn take_all(&self, vars: &[(String, Var)]) -> candle_core::Result<Vec<Tensor>> {
        if let Ok(mut casts) = self.casts.lock() {
            casts.clear();
        }
        vars.iter().map(|(_, v)| self.take(v.as_tensor()).map_or_else(|| v.zeros_like(), Ok)).collect()
    }

    /// The summed gradient of `of`, removed from the store.
    pub fn take(&self, of: &Tensor) -> Option<Tensor> {
        self.grads.lock().ok()?.remove(&of.id())
    }
}

/// The A and B factors of every adapted linear.
pub struct Lora {
    cfg: LoraConfig,
    scale: f64,
    factors: BTreeMap<(usize, Proj), (Tensor, Tensor)>,
    /// Factors prepared for inference (`for_inference`): A `[r, in]` and the scaled, transposed
    /// B `[r, out]`, both in the activations' dtype. Forward only.
    prepared: bool,
}

impl Lora {
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// Fresh trainable factors registered as variables under their PEFT names.
    pub fn init(
        cfg: LoraConfig,
        model: &Config,
        seed: u64,
        device: &Device,
        vars: &mut Vec<(String, Var)>,
    ) -> Result<Lora, MlError> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut factors = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &p in &cfg.targets {
                let (fan_in, fan_out) = model.proj_shape(p);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * fan_in).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, fan_in), device)?)?;
                let b = Var::zeros((fan_out, cfg.r), DType::F32, device)?;
                factors.insert((layer, p), (a.as_tensor().clone(), b.as_tensor().clone()));
                vars.push((peft_name(layer, p, "lora_A"), a));
                vars.push((peft_name(layer, p, "lora_B"), b));
            }
        }
        let scale = cfg.scale();
        Ok(Lora { cfg, scale, factors, prepared: false })
    }

    /// Factors from tensors keyed by PEFT name (a loaded adapter or checkpoint). With `vars`,
    /// the factors become trainable variables registered there.
    pub fn from_named(
        cfg: LoraConfig,
        model: &Config,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
        mut vars: Option<&mut Vec<(String, Var)>>,
    ) -> Result<Lora, MlError> {
        let mut factors = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &p in &cfg.targets {
                let (fan_in, fan_out) = model.proj_shape(p);
                let mut get = |factor: &str, shape: (usize, usize)| -> Result<Tensor, MlError> {
                    let name = peft_name(layer, p, factor);
                    let t = tensors
                        .get(&name)
                        .ok_or_else(|| MlError::Adapter(format!("missing tensor {name}")))?;
                    if t.dims() != [shape.0, shape.1] {
                        return Err(MlError::Adapter(format!(
                            "tensor {name} has shape {:?}, the base model needs {shape:?}",
                            t.dims()
                        )));
                    }
                    let t = t.to_device(device)?.to_dtype(DType::F32)?;
                    Ok(match vars.as_deref_mut() {
                        Some(v) => {
                            let var = Var::from_tensor(&t)?;
                            v.push((name, var.clone()));
                            var.as_tensor().clone()
                        }
                        None => t,
                    })
                };
                let a = get("lora_A", (cfg.r, fan_in))?;
                let b = get("lora_B", (fan_out, cfg.r))?;
                factors.insert((layer, p), (a, b));
            }
        }
        let scale = cfg.scale();
        Ok(Lora { cfg, scale, factors, prepared: false })
    }

    /// Factors keyed by PEFT name, used exactly as given (same dtype, same graph nodes).
    pub fn from_tensors_exact(
        cfg: LoraConfig,
        model: &Config,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Lora, MlError> {
        let mut factors = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &p in &cfg.targets {
                let get = |factor: &str| -> Result<Tensor, MlError> {
                    let name = peft_name(layer, p, factor);
                    tensors.get(&name).cloned().ok_or_else(|| MlError::Adapter(format!("missing tensor {name}")))
                };
                factors.insert((layer, p), (get("lora_A")?, get("lora_B")?));
            }
        }
        let scale = cfg.scale();
        Ok(Lora { cfg, scale, factors, prepared: false })
    }

    /// The same factors outside any autograd graph (shared storage), for inference: a forward
    /// through trainable variables would otherwise record a graph and keep every activation.
    pub fn detached(&self) -> Lora {
        let factors = self.factors.iter().map(|(k, (a, b))| (*k, (a.detach(), b.detach()))).collect();
        Lora { cfg: self.cfg.clone(), scale: self.scale, factors, prepared: self.prepared }
    }

    /// The factors of one layer only (the same tensors, so gradients still reach them).
    pub fn layer(&self, layer: usize) -> Lora {
        let factors = self.factors.iter().filter(|(k, _)| k.0 == layer).map(|(k, f)| (*k, f.clone())).collect();
        Lora { cfg: self.cfg.clone(), scale: self.scale, factors, prepared: self.prepared }
    }

    /// Factors converted to `dtype` (inference in bf16, say).
    pub fn to_dtype(&self, dtype: DType) -> Result<Lora, MlError> {
        let mut factors = BTreeMap::new();
        for (k, (a, b)) in &self.factors {
            factors.insert(*k, (a.to_dtype(dtype)?, b.to_dtype(dtype)?));
        }
        Ok(Lora { cfg: self.cfg.clone(), scale: self.scale, factors, prepared: self.prepared })
    }

    /// The factors ready for inference in `dtype`: A cast once, B scaled, transposed and cast
    /// once (in f32, then rounded), so that each adapted linear of a forward is three GEMMs
    /// (the base, `x A^T`, and `(x A^T)(sB)^T` accumulated into the base's output) instead of
    /// casts, a scaling and a transposing copy per call. The result serves forwards only.
    pub fn for_inference(&self, dtype: DType) -> Result<Lora, MlError> {
        if self.prepared {
            return Ok(self.detached());
        }
        let mut factors = BTreeMap::new();
        for (k, (a, b)) in &self.factors {
            let a = a.detach().to_dtype(dtype)?.contiguous()?;
            let bs_t = (b.detach().to_dtype(DType::F32)? * self.scale)?.t()?.to_dtype(dtype)?.contiguous()?;
            factors.insert(*k, (a, bs_t));
        }
        Ok(Lora { cfg: self.cfg.clone(), scale: self.scale, factors, prepared: true })
    }

    /// `scale · B A` of each adapted linear, `[out, in]` in f32: what merging adds to the
    /// frozen weight.
    pub fn deltas(&self) -> Result<Vec<((usize, Proj), Tensor)>, MlError> {
        let mut out = Vec::with_capacity(self.factors.len());
        for (k, (a, b)) in &self.factors {
            let a = a.detach().to_dtype(DType::F32)?;
            let b = b.detach().to_dtype(DType::F32)?;
            // prepared factors hold (scale B)^T
            let d = if self.prepared { b.t()?.matmul(&a)? } else { (b.matmul(&a)? * self.scale)? };
            out.push((*k, d));
        }
        Ok(out)
    }

    /// No adapter at all (a forward through the frozen base only).
    pub fn none() -> Lora {
        let cfg = LoraConfig { r: 0, alpha: 0.0, dropout: 0.0, targets: Vec::new() };
        Lora { cfg, scale: 0.0, factors: BTreeMap::new(), prepared: true }
    }

    /// Whether a forward through these factors is recorded by autograd (they are variables, or
    /// computed from some).
    pub fn tracked(&self) -> bool {
        self.factors.values().any(|(a, b)| a.track_op() || b.track_op())
    }

    pub fn factors(&self) -> impl Iterator<Item = (&(usize, Proj), &(Tensor, Tensor))> {
        self.factors.iter()
    }

    /// The base linear plus this adapter's term at one linear (one autograd node, see
    /// `ops::lora_linear`), or the base alone when that linear has no adapter.
    pub fn linear(&self, base: &FrozenLinear, layer: usize, p: Proj, x: &Tensor, ctx: &LoraCtx) -> candle_core::Result<Tensor> {
        match self.parts(base, layer, p, ctx.dropout) {
            Some((parts, a, b)) if parts.prepared => parts.forward(x, a, b),
            Some((parts, a, b)) => super::ops::lora_linear(base, x, a, b, parts.scale, parts.dropout),
            None => base.forward(x),
        }
    }

    /// The adapted linear at `(layer, p)` with its factors, or `None` when it has no adapter.
    /// Each linear's dropout mask seed derives from the forward's seed, the layer and `p`.
    pub fn parts(&self, base: &FrozenLinear, layer: usize, p: Proj, dropout: Option<(f32, u64)>) -> Option<(LoraParts, &Tensor, &Tensor)> {
        let (a, b) = self.factors.get(&(layer, p))?;
        let dropout = match dropout {
            Some((prob, seed)) if prob > 0.0 => Some((prob, mix(seed, layer as u64, p as u64))),
            _ => None,
        };
        Some((LoraParts { base: base.clone(), scale: self.scale, dropout, prepared: self.prepared }, a, b))
    }
}

fn mix(a: u64, b: u64, c: u64) -> u64 {
    splitmix(splitmix(a ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(b) ^ c.rotate_left(32))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_widened_weight_made_anew_gets_every_block_even_one_cast_into_the_old() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::ones((4, 3), DType::F32, &dev)?;
        let cast = |v: f32, in_widened: bool| -> candle_core::Result<CastFactors> {
            Ok(CastFactors { a: Tensor::zeros((2, 3), DType::F32, &dev)?, bs: (Tensor::ones((4, 2), DType::F32, &dev)? * v as f64)?, in_widened })
        };
        let wide = Widened::default();
        let w = wide.weight(0, 0, &base, 5, &[(Proj::Q, 0, 3, &cast(2.0, false)?)])?;
        assert_eq!(w.narrow(1, 3, 2)?.sum_all()?.to_scalar::<f32>()?, 16.0);
        assert!(wide.block(0, Proj::Q, &[4, 2])?.is_some());
        // the same shape: a block the step's cast wrote is left as it is
        let w = wide.weight(0, 0, &base, 5, &[(Proj::Q, 0, 3, &cast(3.0, true)?)])?;
        assert_eq!(w.narrow(1, 3, 2)?.sum_all()?.to_scalar::<f32>()?, 16.0);
        // another width: a new weight, which must get the block whatever the cast says
        let w = wide.weight(0, 0, &base, 7, &[(Proj::Q, 0, 5, &cast(3.0, true)?)])?;
        assert_eq!(w.narrow(1, 5, 2)?.sum_all()?.to_scalar::<f32>()?, 24.0);
        assert_eq!(w.narrow(1, 3, 2)?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn a_step_casts_each_factor_once_and_the_next_step_again() {
        let dev = Device::Cpu;
        let (a, b) = (Tensor::ones((2, 3), DType::F32, &dev).unwrap(), Tensor::ones((3, 2), DType::F32, &dev).unwrap());
        let step = BlockGrads::default();
        let calls = std::cell::Cell::new(0);
        let cast = |scale: f64| {
            calls.set(calls.get() + 1);
            Ok(CastFactors { a: a.to_dtype(DType::BF16)?, bs: (b.to_dtype(DType::BF16)? * scale)?, in_widened: false })
        };
        let first = step.cast(&a, &b, || cast(2.0)).unwrap();
        // the step's later micro-batches get the first cast, not a new one
        let again = step.cast(&a, &b, || cast(3.0)).unwrap();
        assert_eq!(calls.get(), 1);
        assert_eq!(again.bs.to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 12.0);
        assert_eq!(first.a.id(), again.a.id());
        // the factors change at the update: the step's end drops the casts
        step.take_all(&[]).unwrap();
        let next = step.cast(&a, &b, || cast(3.0)).unwrap();
        assert_eq!(calls.get(), 2);
        // another B (a perturbed copy, a finite-difference check) is another cast
        let b2 = b.affine(1.0, 0.0).unwrap();
        step.cast(&a, &b2, || cast(1.0)).unwrap();
        assert_eq!(calls.get(), 3);
        assert_eq!(next.bs.to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 18.0);
    }
}
