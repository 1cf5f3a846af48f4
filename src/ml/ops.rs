//! Differentiable building blocks with hand-written backward passes.
//!
//! candle's autograd computes a gradient for both operands of every matmul, also for a frozen
//! weight, and has no backward for quantized matmuls, its fused RMSNorm, RoPE or softmax. Here
//! each op computes its forward on a detached input with the fast kernel, and attaches a
//! backward that computes only what training needs: the input gradient. The frozen base
//! weights never get a gradient.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};

use super::causal_softmax::{self, CausalSpans};
use super::lora::BlockGrads;

type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;
type Backward3 = Box<dyn Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Tensor; 3]> + Send + Sync>;

/// Attaches a backward function to a value computed outside the graph: the result equals
/// `value` and, in backprop, `grad(x) = backward(grad(result))`.
struct WithGrad {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl WithGrad {
    fn take_value(&self) -> Result<Tensor> {
        let mut guard = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned value lock", self.name)))?;
        guard
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        clone_value_cpu(self.name, self.take_value()?)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        clone_value_cuda(self.name, self.take_value()?)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(arg, res, grad_res)
    }
}

fn clone_value_cpu(name: &str, value: Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = value.shape().clone();
    let (storage, layout) = value.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok((s.try_clone(layout)?, shape)),
        _ => candle_core::bail!("{name}: value is not on the cpu"),
    }
}

fn clone_value_cuda(name: &str, value: Tensor) -> Result<(CudaStorage, Shape)> {
    let shape = value.shape().clone();
    let (storage, layout) = value.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
        _ => candle_core::bail!("{name}: value is not on a cuda device"),
    }
}

/// Like `WithGrad` for ops of three inputs.
struct WithGrad3 {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: Backward3,
}

impl CustomOp3 for WithGrad3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        clone_value_cpu(self.name, take(&self.value, self.name)?)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        clone_value_cuda(self.name, take(&self.value, self.name)?)
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [g1, g2, g3] = (self.backward)([a1, a2, a3], res, grad_res)?;
        Ok((Some(g1), Some(g2), Some(g3)))
    }
}

fn take(value: &Mutex<Option<Tensor>>, name: &str) -> Result<Tensor> {
    let mut guard = value.lock().map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned value lock")))?;
    guard.take().ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))
}

/// `value` (computed from `x.detach()`) as a node of `x`'s graph with the given backward,
/// called as `backward(x, result, grad_of_result)`. When `x` is not tracked, `value` is
/// returned as is. The backward should read `x` and the result from its arguments rather than
/// capture copies, so nothing is kept twice.
pub fn with_grad(
    name: &'static str,
    x: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    with_grad_or_none(name, x, value, move |x, res, grad| backward(x, res, grad).map(Some))
}

/// `with_grad` whose backward may give `x` no gradient (`None`): where `x` is tracked only so
/// that the node is recorded, and nothing reads its gradient.
pub fn with_grad_or_none(
    name: &'static str,
    x: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    let value = value.contiguous()?;
    x.apply_op1(WithGrad { name, value: Mutex::new(Some(value)), backward: Box::new(backward) })
}

/// `x @ w^T` for `x` of any rank `[.., in]` and `w` `[out, in]`, as one 2-D GEMM.
pub fn linear_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
    let rows = x.elem_count() / k.max(1);
    let out = w.dim(0)?;
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut shape = dims;
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    y.reshape(shape)
}

/// `x @ w` for `x` of any rank `[.., k]` and `w` `[k, n]`, as one 2-D GEMM.
pub fn linear_nn(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
    let rows = x.elem_count() / k.max(1);
    let n = w.dim(1)?;
    let y = x.reshape((rows, k))?.matmul(w)?;
    let mut shape = dims;
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    y.reshape(shape)
}

/// A frozen weight `[out, in]`: dense (f32/bf16/f16) or kept quantized in a GGML type.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

/// A frozen linear layer without bias whose backward computes the input gradient only.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    /// The matmul used in the forward (holds the same weight).
    matmul: QMatMul,
    out_features: usize,
    in_features: usize,
}

impl FrozenLinear {
    pub fn dense(weight: Tensor) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            matmul: QMatMul::Tensor(weight.clone()),
            weight: FrozenWeight::Dense(weight),
            out_features,
            in_features,
        })
    }

    pub fn quantized(q: Arc<QTensor>) -> Result<Self> {
        let (out_features, in_features) = q.shape().dims2()?;
        Ok(Self {
            matmul: QMatMul::QTensor(q.clone()),
            weight: FrozenWeight::Quantized(q),
            out_features,
            in_features,
        })
    }

    /// Whether this linear's weight is `t` itself (a tied output matrix).
    pub fn shares_weight(&self, t: &Tensor) -> bool {
        matches!(&self.weight, FrozenWeight::Dense(w) if w.id() == t.id())
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight as a dense tensor of `dtype` (dequantized for quantized weights).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => w.to_dtype(dtype),
            FrozenWeight::Quantized(q) => match dtype {
                DType::BF16 => match super::quant::dequantize_bf16(q)? {
                    Some(w) => Ok(w),
                    None => q.dequantize(&q.device())?.to_dtype(dtype),
                },
                _ => q.dequantize(&q.device())?.to_dtype(dtype),
            },
        }
    }

    /// Bytes held by the weight.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// `x @ W^T` outside any graph.
    pub fn forward_detached(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => {
                let x = if x.dtype() != w.dtype() { x.to_dtype(w.dtype())? } else { x.clone() };
                linear_nt(&x, w)
            }
            // candle's CPU kernels multiply by the quantized blocks directly
            FrozenWeight::Quantized(_) if x.device().is_cpu() => {
                let dtype = x.dtype();
                let y = self.matmul.forward(&x.to_dtype(DType::F32)?)?;
                y.to_dtype(dtype)
            }
            // on a GPU, dequantized to the activations' dtype for one tensor-core GEMM (the
            // dense copy lives only for this call)
            FrozenWeight::Quantized(_) => linear_nt(x, &self.dense_weight(x.dtype())?),
        }
    }

    /// `acc + x @ W^T` in `acc`'s dtype and shape, outside any graph: the forward's counterpart
    /// of `input_grad_into` (on CUDA the GEMM accumulates into `acc`'s storage, so the product
    /// never has a buffer of its own; the caller must own `acc`).
    pub fn forward_into(&self, acc: Tensor, x: &Tensor) -> Result<Tensor> {
        if matches!(self.weight, FrozenWeight::Quantized(_)) && x.device().is_cpu() {
            let y = self.forward_detached(x)?.reshape(acc.shape())?;
            return acc + y;
        }
        let rows = x.elem_count() / self.in_features.max(1);
        let x = x.reshape((rows, self.in_features))?;
        super::gemm::accumulate(acc, &x, &self.dense_weight(x.dtype())?.t()?, 1.0)
    }

    /// `residual + x @ W^T` in a new tensor of `residual`'s dtype and shape, outside any graph.
    /// On CUDA, where `x` and `residual` share the weight's float dtype (or the weight is
    /// quantized), the GEMM reads the residual as its addend and writes the sum
    /// (`gemm::product_plus`); elsewhere `forward_into` a copy of the residual.
    pub fn forward_plus(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        let dtype = residual.dtype();
        let fits = match &self.weight {
            FrozenWeight::Dense(w) => w.dtype() == dtype,
            FrozenWeight::Quantized(_) => true,
        };
        if !(x.device().is_cuda() && fits && x.dtype() == dtype && matches!(dtype, DType::BF16 | DType::F32)) {
            return self.forward_into(residual.copy()?, x);
        }
        let rows = x.elem_count() / self.in_features.max(1);
        let w = self.dense_weight(dtype)?;
        let sum = super::gemm::product_plus(&residual.reshape((rows, self.out_features))?, &x.reshape((rows, self.in_features))?, &w.t()?)?;
        sum.reshape(residual.shape())
    }

    /// `x @ W^T`; in backprop only `grad @ W` flows back to `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_detached(&x.detach())?;
        if !x.track_op() {
            return Ok(y);
        }
        let this = self.clone();
        let in_dtype = x.dtype();
        with_grad("frozen-linear", x, y, move |_, _, grad| this.input_grad(grad, in_dtype))
    }

    /// The input gradient `grad @ W` (of dtype `in_dtype`), outside any graph.
    pub fn input_grad(&self, grad: &Tensor, in_dtype: DType) -> Result<Tensor> {
        let w = self.dense_weight(grad.dtype())?;
        linear_nn(grad, &w)?.to_dtype(in_dtype)
    }

    /// `acc + grad @ W` in `acc`'s dtype and shape: the input gradient added to a sum of them.
    /// On CUDA, with `acc` and `grad` of one float dtype, the GEMM accumulates into `acc`'s
    /// storage (cuBLAS with beta = 1; the caller must own `acc`), so no separate sum is made.
    pub fn input_grad_into(&self, acc: Tensor, grad: &Tensor) -> Result<Tensor> {
        let rows = grad.elem_count() / self.out_features.max(1);
        super::gemm::accumulate(acc, &grad.reshape((rows, self.out_features))?, &self.dense_weight(grad.dtype())?, 1.0)
    }
}

/// The 4-bit frozen linear on a GPU (the Q4_0 weight dequantized to the activations' dtype for
/// one GEMM), forward and input gradient (also accumulated into an existing sum), against the
/// dequantized weight's exact values in f32 on the CPU. Tolerances relative to the largest
/// reference value: 1e-4 in f32; 2^-6 in bf16 (the input, the weight and the output each rounded
/// once to 8 bits of mantissa). Nothing to compare on the CPU itself, which multiplies by the
/// quantized blocks.
pub fn check_device(device: &candle_core::Device) -> Result<Vec<super::KernelCheck>> {
    use candle_core::quantized::GgmlDType;
    let cpu = candle_core::Device::Cpu;
    if device.is_cpu() {
        return Ok(Vec::new());
    }
    let w = Tensor::randn(0f32, 0.02, (384, 512), &cpu)?;
    let exact = QTensor::quantize(&w, GgmlDType::Q4_0)?.dequantize(&cpu)?;
    let lin = FrozenLinear::quantized(Arc::new(QTensor::quantize_onto(&w, GgmlDType::Q4_0, device)?))?;
    let x = Tensor::randn(0f32, 1.0, (64, 512), &cpu)?;
    let g = Tensor::randn(0f32, 1.0, (64, 384), &cpu)?;
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let rel = if dtype == DType::F32 { 1e-4 } else { 2f32.powi(-6) };
        let acc = x.to_dtype(dtype)?;
        let (acc_d, g_d) = (acc.to_device(device)?, g.to_device(device)?.to_dtype(dtype)?);
        let cases = [
            ("q4-linear", x.matmul(&exact.t()?)?, lin.forward_detached(&x.to_device(device)?.to_dtype(dtype)?)?),
            ("q4-linear-input-grad", g.matmul(&exact)?, lin.input_grad(&g_d, dtype)?),
            // the GEMM that accumulates into an existing gradient (beta = 1)
            ("q4-linear-input-grad-into", (acc.to_dtype(DType::F32)? + g.matmul(&exact)?)?, lin.input_grad_into(acc_d, &g_d)?),
        ];
        for (kernel, want, got) in cases {
            out.push(super::KernelCheck::relative(kernel, format!("{dtype:?}"), (0, 0), &want, &got, rel)?);
        }
    }
    // the last query's attention from bf16 batched GEMMs against the same bf16 data in f32 on
    // the CPU (3 rows, 6 query heads over 2 kv heads, 70 keys, the second row padded on the
    // left): the output within 2^-7 of its largest value (rounded once to bf16), the
    // probabilities within 2^-12 (f32 scores of the same products), the gradients within 2^-6
    // (each rounded once to bf16 from f32 sums of the split terms)
    let (b, h, kvh, t, d) = (3usize, 6usize, 2usize, 70usize, 64usize);
    let bf = |shape: (usize, usize, usize, usize)| -> Result<Tensor> { Tensor::randn(0f32, 1.0, shape, &cpu)?.to_dtype(DType::BF16) };
    let (q, k, v) = (bf((b, h, 1, d))?, bf((b, kvh, t, d))?, bf((b, kvh, t, d))?);
    let dy = Tensor::randn(0f32, 1.0, (b, h * d), &cpu)?.to_dtype(DType::BF16)?;
    let mask: Vec<f32> = (0..b).flat_map(|r| (0..t).map(move |j| if r == 1 && j < 9 { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (b, 1, 1, t), &cpu)?;
    let scale = 1.0 / (d as f64).sqrt();
    let f = |x: &Tensor| x.to_dtype(DType::F32);
    let (want_y, want_p) = last_query_attention(&f(&q)?, &f(&k)?, &f(&v)?, &mask, scale)?;
    let want_g = last_query_attention_backward(&f(&q)?, &f(&k)?, &f(&v)?, &want_p, &f(&dy)?, scale)?;
    let on = |x: &Tensor| x.to_device(device);
    let (got_y, got_p) = last_query_attention(&on(&q)?, &on(&k)?, &on(&v)?, &on(&mask)?, scale)?;
    let got_g = last_query_attention_backward(&on(&q)?, &on(&k)?, &on(&v)?, &got_p, &on(&dy)?, scale)?;
    let mut push = |kernel: &'static str, want: &Tensor, got: &Tensor, rel: f32| -> Result<()> {
        out.push(super::KernelCheck::relative(kernel, "BF16".into(), (0, 0), want, got, rel)?);
        Ok(())
    };
    push("last-query attention", &want_y, &got_y, 2f32.powi(-7))?;
    push("last-query attention probabilities", &want_p, &got_p, 2f32.powi(-12))?;
    for (kernel, want, got) in [("last-query attention dq", &want_g[0], &got_g[0]), ("last-query attention dk", &want_g[1], &got_g[1]), ("last-query attention dv", &want_g[2], &got_g[2])] {
        push(kernel, want, got, 2f32.powi(-6))?;
    }
    Ok(out)
}

/// A frozen linear with a LoRA adapter as one autograd node:
/// `y = x W^T + scale · dropout(x) A^T B^T`, with `A` `[r, in]` and `B` `[out, r]` kept in f32
/// and the matmuls run in `x`'s dtype. The backward computes `dx`, `dA` and `dB` directly,
/// redrawing the counter-based dropout mask and the r-wide `dropout(x) A^T` from `x`, so none
/// of the dozen intermediate nodes (casts, reshapes, mask, scale, add) and their full-size
/// gradient buffers exist; `dx` is skipped when `x` needs none.
pub fn lora_linear(
    base: &FrozenLinear,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let lora = LoraParts { base: base.clone(), scale, dropout, prepared: false };
    let y = lora.forward(&x.detach(), &a.detach(), &b.detach())?;
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    x.apply_op3(a, b, LoraLinear { value: Mutex::new(Some(y.contiguous()?)), parts: lora })
}

/// One adapted linear: the frozen base, the adapter scale and the dropout on the adapter's
/// input (probability and mask seed); `prepared` when its factors come from
/// `Lora::for_inference` (A in the activations' dtype, B as `(scale B)^T`).
#[derive(Clone)]
pub struct LoraParts {
    pub base: FrozenLinear,
    pub scale: f64,
    pub dropout: Option<(f32, u64)>,
    pub prepared: bool,
}

impl LoraParts {
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        match self.dropout {
            Some((p, seed)) => super::dropout::masked(x, p, seed),
            None => Ok(x.clone()),
        }
    }

    /// A and `scale · B` in `dtype`, the operands of the adapter's GEMMs: a training forward
    /// casts them once per block and its backward reuses them.
    pub fn cast(&self, a: &Tensor, b: &Tensor, dtype: DType) -> Result<CastFactors> {
        // the scale goes on the small B factor, not on the [tokens, out] product
        Ok(CastFactors { a: a.to_dtype(dtype)?, bs: (b.to_dtype(dtype)? * self.scale)?, in_widened: false })
    }

    /// `x W^T + scale · dropout(x) A^T B^T`, outside any graph, from the factors as stored (or
    /// as `Lora::for_inference` prepared them).
    pub fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.prepared {
            return self.forward_with(x, a, b);
        }
        Ok(self.forward_cast(x, &self.cast(a, b, x.dtype())?)?.0)
    }

    /// The forward from factors cast by `cast`, and the adapter's r-wide `dropout(x) A^T`
    /// `[rows, r]`, which the backward reads.
    pub fn forward_cast(&self, x: &Tensor, c: &CastFactors) -> Result<(Tensor, Tensor)> {
        self.forward_parts(x, &c.a, &c.bs.t()?)
    }

    fn forward_with(&self, x: &Tensor, a: &Tensor, bs_t: &Tensor) -> Result<Tensor> {
        Ok(self.forward_parts(x, a, bs_t)?.0)
    }

    /// The forward with A `[r, in]` and `(scale B)^T` `[r, out]` (any layout `gemm` reads) in
    /// `x`'s dtype, and `dropout(x) A^T` `[rows, r]`. The adapter's term is added by its GEMM
    /// into the base output, not as a full-size temporary and a sum.
    fn forward_parts(&self, x: &Tensor, a: &Tensor, bs_t: &Tensor) -> Result<(Tensor, Tensor)> {
        let y = self.base.forward_detached(x)?;
        let h = linear_nt(&self.dropped(x)?, a)?;
        let r = h.dim(D::Minus1)?;
        let h = h.reshape((h.elem_count() / r, r))?;
        // (a base output of another dtype than the input takes a plain sum)
        Ok((super::gemm::accumulate(y, &h, bs_t, 1.0)?, h))
    }

    /// The gradient of the forward's input (when `needs_dx`) for the output gradient `grad`,
    /// outside any graph; the factors' gradients (f32) are added to `grads` under the ids of
    /// `keys` (A's, B's) by the GEMMs that compute them. The dropout mask is redrawn from `x`,
    /// and the r-wide `dropout(x) A^T` too unless the forward's is given (`h`). With `acc`, the
    /// input gradient is added to it
    /// (`FrozenLinear::input_grad_into`); the adapter's part of it, `dropout(grad B A)`, is added
    /// in place by the dropout kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &Tensor,
        h: Option<&Tensor>,
        c: &CastFactors,
        keys: (&Tensor, &Tensor),
        grad: &Tensor,
        needs_dx: bool,
        acc: Option<Tensor>,
        grads: &BlockGrads,
    ) -> Result<Option<Tensor>> {
        if self.prepared {
            candle_core::bail!("lora backward: factors prepared for inference have no gradients");
        }
        let dtype = x.dtype();
        let g = grad.to_dtype(dtype)?;
        let (ad, bs) = (&c.a, &c.bs);
        let n_in = ad.dim(1)?;
        let n_out = bs.dim(0)?;
        let rows = x.elem_count() / n_in.max(1);
        let xd = self.dropped(x)?.reshape((rows, n_in))?;
        let g2 = g.reshape((rows, n_out))?;
        let h = match h {
            Some(h) => h.reshape((rows, ad.dim(0)?))?,
            None => xd.matmul(&ad.t()?)?, // [rows, r]
        };
        let gh = super::gemm::product(&g2, bs, 1.0, dtype)?; // [rows, r]
        // dA = gh^T dropout(x), dB = scale g^T h
        grads.add_product(keys.0, &gh.t()?, &xd, 1.0)?;
        grads.add_product(keys.1, &g2.t()?, &h, self.scale)?;
        if !needs_dx {
            return Ok(None);
        }
        let dx = match acc {
            Some(acc) => self.base.input_grad_into(acc.reshape((rows, n_in))?, &g2)?,
            None => self.base.input_grad(&g2, dtype)?,
        };
        let through_lora = gh.matmul(ad)?;
        let dx = match self.dropout {
            Some((p, seed)) if p > 0.0 => super::dropout::add_into(dx, &through_lora, p, seed)?,
            _ => (dx + through_lora)?,
        };
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// One adapted linear's factors in the activations' dtype (`LoraParts::cast`): A `[r, in]` and
/// `scale · B` `[out, r]`, which `in_widened` is a view of a widened weight's block
/// (`lora::Widened::block`; its rows lie that weight's width apart).
#[derive(Clone, Debug)]
pub struct CastFactors {
    pub a: Tensor,
    pub bs: Tensor,
    pub in_widened: bool,
}

struct LoraLinear {
    value: Mutex<Option<Tensor>>,
    parts: LoraParts,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        clone_value_cpu("lora-linear", take(&self.value, "lora-linear")?)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        clone_value_cuda("lora-linear", take(&self.value, "lora-linear")?)
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let needs_dx = x.track_op();
        // on detached copies: the gradients carry no graph that would keep these inputs and
        // intermediates alive (the LoRA factors' gradients outlive the backward)
        let (a, b) = (a.detach(), b.detach());
        let grads = BlockGrads::default();
        let c = self.parts.cast(&a, &b, x.dtype())?;
        let dx = self.parts.backward(&x.detach(), None, &c, (&a, &b), &grad.detach(), needs_dx, None, &grads)?;
        let take = |t: &Tensor| grads.take(t).map(|g| g.to_dtype(t.dtype())).transpose();
        Ok((dx, take(&a)?, take(&b)?))
    }
}

/// RMSNorm with a frozen scale: `x / rms(x) * weight` (on CUDA by `norm`'s row kernel);
/// backward gives the input gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let y = if xd.device().is_cuda() && matches!(xd.dtype(), DType::F32 | DType::BF16) {
        super::norm::rms_norm_forward(&xd, weight, eps)?
    } else if xd.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(&xd, weight, eps)?
    } else {
        candle_nn::ops::rms_norm(&xd, weight, eps)?
    };
    if !x.track_op() {
        return Ok(y);
    }
    let weight = weight.clone();
    with_grad("rms-norm", x, y, move |xs, _, grad| super::norm::rms_norm_backward(xs, grad, &weight, eps))
}

/// Rotary embedding on `[b, h, t, d]`; `interleaved` pairs (2i, 2i+1) as GGUF files store Q/K,
/// otherwise pairs (i, i+d/2) as Hugging Face checkpoints do. Rotation is orthogonal, so the
/// backward is the rotation by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let y = rope_detached(&x.detach(), cos, sin, interleaved)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    with_grad("rope", x, y, move |_, _, grad| rope_detached(grad, &cos, &neg_sin, interleaved))
}

/// The rotation of `rope` outside any graph; with `-sin` it is its backward.
pub fn rope_detached(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    if interleaved {
        candle_nn::rotary_emb::rope_i(&x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope(&x, cos, sin)
    }
}

/// Softmax over the last dimension; backward `y * (g - sum(g*y))`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    with_grad("softmax", x, y, move |_, ys, grad| {
        let gy = (grad * ys)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        gy - ys.broadcast_mul(&s)?
    })
}

/// `softmax(x * scale + mask)` over the last dimension, `mask` broadcast onto `x` (additive,
/// `-inf` hides a key). Only the input and the output stay alive for the backward
/// (`scale * y * (g - sum(g*y))`), not the scaled and masked intermediates.
pub fn masked_softmax(x: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let xd = (x.detach() * scale)?;
    let xd = match mask {
        Some(m) => xd.broadcast_add(&m.to_dtype(xd.dtype())?)?,
        None => xd,
    };
    let y = candle_nn::ops::softmax_last_dim(&xd.contiguous()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    with_grad("masked-softmax", x, y, move |_, ys, grad| {
        let gy = (grad * ys)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        (gy - ys.broadcast_mul(&s)?)? * scale
    })
}

/// Attention of one query per row over the row's keys (`llama::LastRows`: each row's last
/// position): q `[b, h, 1, d]`, k and v `[b, kv_heads, t, d]`, `mask` `[b, 1, 1, t]` additive.
/// The output `[b, h * d]` in q's dtype, and the probabilities `[b, kv_heads, h / kv_heads, t]`
/// (f32, f64 for f64 inputs) that `last_query_attention_backward` reads. A few rows: plain
/// batched matmuls in f32, differentiable through candle's ops where the inputs are tracked.
///
/// On CUDA with bf16 data the products are strided-batched GEMMs of the bf16 tensors into f32
/// (`gemm::batched_product`), q k^T and, in the backward, dy v^T exactly so; the f32
/// probabilities and score gradients enter theirs as two bf16 terms, `x ≈ hi + lo`
/// (`split_product`, some 16 bits of each value): no f32 copies of k and v, whose casts and f32
/// GEMMs took some 0.5 ms of the 135M shape's training step.
pub fn last_query_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, h, _, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    if bf16_batches(q, k, v) {
        let (t, rep) = (k.dim(2)?, h / kvh);
        let qg = q.reshape((b * kvh, rep, d))?;
        let s = super::gemm::batched_product(&qg, &as_batches(k)?.transpose(1, 2)?, None, DType::F32)?;
        let p = masked_softmax(&s.reshape((b, kvh, rep, t))?, Some(mask), scale)?;
        let y = split_product(&p.reshape((b * kvh, rep, t))?, &as_batches(v)?)?;
        return Ok((y.reshape((b, h * d))?.to_dtype(q.dtype())?, p));
    }
    let wide = wide(q.dtype());
    let qw = q.reshape((b, kvh, h / kvh, d))?.to_dtype(wide)?;
    let s = qw.matmul(&k.to_dtype(wide)?.t()?)?;
    let p = masked_softmax(&s, Some(mask), scale)?;
    let y = p.matmul(&v.to_dtype(wide)?)?;
    Ok((y.reshape((b, h * d))?.to_dtype(q.dtype())?, p))
}

/// The gradients of q, k and v (in their dtype) of `last_query_attention` for its output
/// gradient `dy` `[b, h * d]`, from its probabilities `p`. Off the bf16 batched GEMMs, one wide
/// copy of k or v at a time: this runs where a training step's memory peaks.
pub fn last_query_attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, p: &Tensor, dy: &Tensor, scale: f64) -> Result<[Tensor; 3]> {
    let (b, h, _, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    if bf16_batches(q, k, v) && dy.dtype() == DType::BF16 && p.dtype() == DType::F32 {
        let (t, rep) = (k.dim(2)?, h / kvh);
        let (kb, vb) = (as_batches(k)?, as_batches(v)?);
        let dyg = dy.reshape((b * kvh, rep, d))?;
        let p = p.reshape((b * kvh, rep, t))?;
        let dv = split_product(&p.transpose(1, 2)?, &dyg)?.reshape((b, kvh, t, d))?.to_dtype(v.dtype())?;
        let dp = super::gemm::batched_product(&dyg, &vb.transpose(1, 2)?, None, DType::F32)?;
        // dS = P (dP - sum(dP P)) scale; masked keys have P = 0
        let dots = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = ((dp.broadcast_sub(&dots)? * &p)? * scale)?;
        let dq = split_product(&ds, &kb)?.reshape((b, h, 1, d))?.to_dtype(q.dtype())?;
        let dk = split_product(&ds.transpose(1, 2)?, &q.reshape((b * kvh, rep, d))?)?.reshape((b, kvh, t, d))?.to_dtype(k.dtype())?;
        return Ok([dq, dk, dv]);
    }
    let wide = p.dtype();
    let dy = dy.reshape((b, kvh, h / kvh, d))?.to_dtype(wide)?;
    let dv = p.t()?.matmul(&dy)?.to_dtype(v.dtype())?;
    let dp = dy.matmul(&v.to_dtype(wide)?.t()?)?;
    // dS = P (dP - sum(dP P)) scale; masked keys have P = 0
    let dots = (&dp * p)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&dots)? * p)? * scale)?;
    let dq = ds.matmul(&k.to_dtype(wide)?)?.reshape((b, h, 1, d))?.to_dtype(q.dtype())?;
    let dk = ds.t()?.matmul(&q.reshape((b, kvh, h / kvh, d))?.to_dtype(wide)?)?.to_dtype(k.dtype())?;
    Ok([dq, dk, dv])
}

/// Whether `last_query_attention` runs as strided-batched GEMMs of the bf16 data: on CUDA, q
/// `[b, h, 1, d]`, k and v `[b, kv_heads, t, d]`, all bf16, contiguous and untracked (the GEMMs
/// record no graph; a tracked forward, the reference of the hand-written backwards, takes
/// candle's differentiable ops).
fn bf16_batches(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    q.device().is_cuda() && [q, k, v].iter().all(|x| x.dtype() == DType::BF16 && x.is_contiguous() && !x.track_op()) && q.dim(2).is_ok_and(|n| n == 1)
}

/// `[b, kv_heads, t, d]` as `[b kv_heads, t, d]`.
fn as_batches(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.reshape((b * h, t, d))
}

/// `x_i y_i` (f32) for f32 `x` `[n, m, k]` and bf16 `y` `[n, k, p]`, as two bf16 GEMMs into one
/// f32 sum: `x ≈ hi + lo`, `hi` x rounded to bf16 and `lo` the rest rounded (some 16 bits of
/// each value together).
fn split_product(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let hi = x.to_dtype(DType::BF16)?;
    let lo = (x - hi.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?;
    let sum = super::gemm::batched_product(&hi, y, None, DType::F32)?;
    super::gemm::batched_product(&lo, y, Some(sum), DType::F32)
}

/// f64 for f64, f32 for anything narrower.
fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Causal grouped-query attention `softmax(q k^T * scale + mask) v`: q `[b, h, t, d]`,
/// k and v `[b, kv_heads, t, d]` (each kv head serves `h / kv_heads` query heads), the mask
/// given by `spans`. Computed in query chunks so no `[t, t]` score matrix is kept: the backward
/// recomputes each chunk's probabilities (as FlashAttention does) from q, k, v and the output.
/// Chunk `i` reads keys only up to its last query (causal skipping); the key and value
/// gradients of a group's heads are summed by the chunk matmuls themselves. The masked softmax
/// and its backward are one fused pass each (`causal_softmax`).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, spans: &CausalSpans, chunk: usize, scale: f64) -> Result<Tensor> {
    let plan = AttentionPlan::new(q, k, spans, chunk, scale)?;
    let (out, lse) = plan.forward_saving(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let backward = move |[q, k, v]: [&Tensor; 3], o: &Tensor, d_o: &Tensor| -> Result<[Tensor; 3]> {
        // on detached copies, so the gradients carry no graph holding q, k, v or o
        let (q, k, v, o) = (&q.detach(), &k.detach(), &v.detach(), &o.detach());
        let d_o = d_o.to_dtype(q.dtype())?.contiguous()?;
        plan.backward(q, k, v, &d_o, o, lse.as_ref())
    };
    let out = out.contiguous()?;
    q.apply_op3(k, v, WithGrad3 { name: "causal-attention", value: Mutex::new(Some(out)), backward: Box::new(backward) })
}

/// The shapes and query chunks of one causal attention (see `causal_attention`), with its
/// forward and backward outside any graph. Where `flash::applies` (bf16 on CUDA, head size 64
/// or 128) the tiled kernels of `flash` run instead of the chunks, unless the environment sets
/// `ARBITER_ATTENTION=chunked` (to compare the two).
#[derive(Clone)]
pub struct AttentionPlan {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    d: usize,
    chunks: Vec<(usize, usize)>,
    scale: f64,
    spans: CausalSpans,
    flash: bool,
}

/// Whether the environment asks for the chunked attention where the flash kernels apply.
fn chunked_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("ARBITER_ATTENTION").is_ok_and(|v| v == "chunked"))
}

/// Whether `AttentionPlan` runs the flash kernels for tensors of this device, dtype and head
/// size.
pub fn flash_attention(device: &candle_core::Device, dtype: DType, head_dim: usize) -> bool {
    super::flash::supports(device, dtype, head_dim) && !chunked_forced()
}

impl AttentionPlan {
    /// For q `[b, h, t, d]` and k `[b, kv_heads, t, d]`, in query chunks of `chunk` rows.
    pub fn new(q: &Tensor, k: &Tensor, spans: &CausalSpans, chunk: usize, scale: f64) -> Result<AttentionPlan> {
        let (b, h, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        if spans.batch() != b {
            candle_core::bail!("causal attention: {} spans for a batch of {b}", spans.batch());
        }
        if kvh == 0 || h % kvh != 0 {
            candle_core::bail!("causal attention: {h} query heads do not share {kvh} kv heads evenly");
        }
        let chunks = (0..t).step_by(chunk.max(1)).map(|c0| (c0, (c0 + chunk).min(t) - c0)).collect();
        let flash = flash_attention(q.device(), q.dtype(), d);
        Ok(AttentionPlan { b, h, kvh, t, d, chunks, scale, spans: spans.clone(), flash })
    }

    /// Rows `c0..c0 + c` of `[b, h, t, x]` as `[b, kvh, rep * c, x]`.
    fn group(&self, x: &Tensor, c0: usize, c: usize) -> Result<Tensor> {
        super::fused::contiguous_rows(&x.narrow(2, c0, c)?)?.reshape((self.b, self.kvh, self.h / self.kvh * c, x.dim(3)?))
    }

    /// The attention output `[b, h, t, d]`. The scale is applied in the softmax (in f32), not
    /// to q, so q is not rounded once more.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(self.forward_saving(q, k, v)?.0)
    }

    /// The output and, from the flash kernels, each query's log-sum-exp, which `backward` reads
    /// instead of running the forward again.
    pub fn forward_saving(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if self.flash {
            let (out, lse) = super::flash::forward(q, k, v, &self.spans, self.scale)?;
            return Ok((out, Some(lse)));
        }
        Ok((self.chunked_forward(q, k, v)?, None))
    }

    /// `forward_saving` through the flash kernels, the output written into rows `extra` heads
    /// wider (`flash::forward_into_rows`): `[b, t, (h + extra) d]` and the log-sum-exp. `None`
    /// where the flash kernels do not run.
    pub fn forward_into_rows(&self, q: &Tensor, k: &Tensor, v: &Tensor, extra: usize) -> Result<Option<(Tensor, Tensor)>> {
        if !self.flash {
            return Ok(None);
        }
        super::flash::forward_into_rows(q, k, v, &self.spans, self.scale, extra).map(Some)
    }

    fn chunked_forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, d) = (self.b, self.h, self.d);
        let scale = self.scale as f32;
        let mut outs = Vec::with_capacity(self.chunks.len());
        for &(c0, c) in &self.chunks {
            let qc = self.group(q, c0, c)?;
            let kc = k.narrow(2, 0, c0 + c)?;
            let vc = v.narrow(2, 0, c0 + c)?;
            let p = causal_softmax::forward(&qc.matmul(&kc.t()?)?, &self.spans, c0, c, scale)?;
            outs.push(p.matmul(&vc)?.reshape((b, h, c, d))?);
        }
        if outs.len() == 1 {
            return Ok(outs.remove(0));
        }
        Tensor::cat(&outs, 2)
    }

    /// `backward`'s gradients packed in one `[b, t, (heads + 2 kv_heads) d]` tensor (dq's heads,
    /// dk's, dv's in each row: `flash::backward_packed`) where the flash kernels run; `None`
    /// elsewhere. With `rope`, RoPE's tables `(cos, sin)` that the kernels rotate dq and dk back with
    /// (`flash::rope_tables_fit`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_packed(&self, q: &Tensor, k: &Tensor, v: &Tensor, d_o: &Tensor, o: &Tensor, lse: Option<&Tensor>, rope: Option<(&Tensor, &Tensor)>) -> Result<Option<Tensor>> {
        if !self.flash {
            return Ok(None);
        }
        let lse = self.flash_lse(q, k, v, lse)?;
        super::flash::backward_packed(q, k, v, d_o, o, &lse, &self.spans, self.scale, rope).map(Some)
    }

    /// The flash kernels' log-sum-exp of the forward: `lse` where kept, else recomputed.
    fn flash_lse(&self, q: &Tensor, k: &Tensor, v: &Tensor, lse: Option<&Tensor>) -> Result<Tensor> {
        match lse {
            Some(lse) => Ok(lse.clone()),
            None => Ok(super::flash::forward(q, k, v, &self.spans, self.scale)?.1),
        }
    }

    /// `[dq, dk, dv]` for the output gradient `d_o` (q's dtype, contiguous), given the forward's
    /// output `o` `[b, h, t, d]` (any layout). Each chunk's probabilities are recomputed; the
    /// flash kernels recompute them from `lse` (the forward's, from `forward_saving`; computed
    /// again when `None`). Both need `D = sum_d d_o * o` per query: the flash dq kernel computes
    /// it on the way, the chunked path first (f32; f64 for f64 data).
    pub fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, d_o: &Tensor, o: &Tensor, lse: Option<&Tensor>) -> Result<[Tensor; 3]> {
        let (b, h, kvh, t, d) = (self.b, self.h, self.kvh, self.t, self.d);
        if self.flash {
            let lse = self.flash_lse(q, k, v, lse)?;
            return super::flash::backward(q, k, v, d_o, o, &lse, &self.spans, self.scale);
        }
        let dsum = super::fused::head_dot(d_o, o, d)?.unsqueeze(3)?;
        let dsum = &dsum;
        let scale = self.scale as f32;
        let dtype = q.dtype();
        let mut dqs = Vec::with_capacity(self.chunks.len());
        // f32 accumulators (f64 for f64 data), each chunk's rows added in place
        let acc = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let mut dk = Tensor::zeros((b, kvh, t, d), acc, q.device())?;
        let mut dv = Tensor::zeros((b, kvh, t, d), acc, q.device())?;
        for &(c0, c) in &self.chunks {
            let end = c0 + c;
            let qc = self.group(q, c0, c)?;
            let kc = k.narrow(2, 0, end)?;
            let vc = v.narrow(2, 0, end)?;
            let doc = self.group(d_o, c0, c)?;
            let dc = self.group(dsum, c0, c)?;
            let dp = doc.matmul(&vc.t()?)?;
            // ds is the gradient of the unscaled scores q k^T
            let (p, ds) = causal_softmax::backward(&qc.matmul(&kc.t()?)?, &dp, &dc, &self.spans, c0, c, scale)?;
            let dvc = p.t()?.matmul(&doc)?;
            dqs.push(ds.matmul(&kc)?.reshape((b, h, c, d))?);
            dk = super::fused::add_prefix(dk, &ds.t()?.matmul(&qc)?)?;
            dv = super::fused::add_prefix(dv, &dvc)?;
        }
        let dq = if dqs.len() == 1 { dqs.remove(0) } else { Tensor::cat(&dqs, 2)? };
        Ok([dq, dk.to_dtype(dtype)?, dv.to_dtype(dtype)?])
    }
}

/// SiLU (x * sigmoid(x)); backward `g * s * (1 + x * (1 - s))`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::silu(&x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    with_grad("silu", x, y, move |xs, _, grad| silu_backward(xs, grad))
}

/// SiLU's input gradient at `x` for the output gradient `grad`, outside any graph.
fn silu_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(x)?;
    let one_minus = s.affine(-1.0, 1.0)?;
    let inner = ((x * one_minus)? + 1.0)?;
    grad * (s * inner)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn finite_diff_check(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        shape: &[usize],
        tol: f64,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, shape, &dev)?;
        let probe = Tensor::randn(0f64, 1.0, f(&x0)?.shape(), &dev)?;
        let x = Var::from_tensor(&x0)?;
        let loss = (f(x.as_tensor())? * &probe)?.sum_all()?;
        let grads = loss.backward()?;
        let analytic = grads.get(x.as_tensor()).expect("gradient present").flatten_all()?.to_vec1::<f64>()?;
        let flat = x0.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        for i in (0..flat.len()).step_by(7) {
            let mut plus = flat.clone();
            plus[i] += eps;
            let mut minus = flat.clone();
            minus[i] -= eps;
            let eval = |v: Vec<f64>| -> Result<f64> {
                let t = Tensor::from_vec(v, shape, &dev)?;
                (f(&t)? * &probe)?.sum_all()?.to_scalar::<f64>()
            };
            let numeric = (eval(plus)? - eval(minus)?) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs() / (1.0 + numeric.abs());
            assert!(err < tol, "element {i}: numeric {numeric} analytic {} err {err}", analytic[i]);
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_gradient_matches_finite_differences() -> Result<()> {
        let w = Tensor::randn(0f64, 1.0, (5, 4), &Device::Cpu)?;
        let lin = FrozenLinear::dense(w)?;
        finite_diff_check(|x| lin.forward(x), &[2, 3, 4], 1e-6)
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() -> Result<()> {
        let w = Tensor::randn(0f64, 1.0, 6, &Device::Cpu)?;
        finite_diff_check(|x| rms_norm(x, &w, 1e-5), &[2, 3, 6], 1e-6)
    }

    #[test]
    fn softmax_and_silu_gradients_match_finite_differences() -> Result<()> {
        finite_diff_check(softmax_last_dim, &[2, 3, 5], 1e-6)?;
        finite_diff_check(silu, &[2, 7], 1e-6)?;
        let mask = Tensor::new(&[[0f64, f64::NEG_INFINITY, 0.0, 0.0, -1.0]], &Device::Cpu)?;
        finite_diff_check(|x| masked_softmax(x, Some(&mask), 0.7), &[2, 3, 5], 1e-6)
    }

    #[test]
    fn chunked_attention_matches_plain_attention_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kvh, t, d) = (2, 4, 2, 7, 4);
        let spans = CausalSpans::new(&[0, 2], &dev)?;
        let k = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev)?;
        let v = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev)?;
        let full = spans.mask(0, t, DType::F64, &dev)?;
        let q0 = Tensor::randn(0f64, 1.0, (b, h, t, d), &dev)?;
        // reference: heads 2g and 2g+1 read kv head g
        let rep = |x: &Tensor| x.unsqueeze(2)?.broadcast_as((b, kvh, 2, t, d))?.reshape((b, h, t, d));
        let plain = masked_softmax(&q0.matmul(&rep(&k)?.t()?)?, Some(&full), 0.5)?.matmul(&rep(&v)?)?;
        let chunked = causal_attention(&q0, &k, &v, &spans, 3, 0.5)?;
        let diff = (plain - &chunked)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "chunked attention differs by {diff}");
        finite_diff_check(|q| causal_attention(q, &k, &v, &spans, 3, 0.5), &[b, h, t, d], 1e-6)?;
        finite_diff_check(|k| causal_attention(&q0, k, &v, &spans, 3, 0.5), &[b, kvh, t, d], 1e-6)?;
        finite_diff_check(|v| causal_attention(&q0, &k, v, &spans, 3, 0.5), &[b, kvh, t, d], 1e-6)
    }

    #[test]
    fn rope_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (t, d) = (3, 4);
        let theta = Tensor::randn(0f64, 1.0, (t, d / 2), &dev)?;
        let (cos, sin) = (theta.cos()?, theta.sin()?);
        for interleaved in [false, true] {
            finite_diff_check(|x| rope(x, &cos, &sin, interleaved), &[1, 2, t, d], 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_gives_no_weight_gradient() -> Result<()> {
        let w = Var::randn(0f32, 1.0, (5, 4), &Device::Cpu)?;
        let lin = FrozenLinear::dense(w.as_tensor().clone())?;
        let x = Var::randn(0f32, 1.0, (3, 4), &Device::Cpu)?;
        let grads = lin.forward(x.as_tensor())?.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(w.as_tensor()).is_none());
        Ok(())
    }
}
