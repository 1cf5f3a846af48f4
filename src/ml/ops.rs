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
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, D};

type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

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
        let value = self.take_value()?;
        let shape = value.shape().clone();
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.try_clone(layout)?, shape)),
            _ => candle_core::bail!("{}: value is not on the cpu", self.name),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let value = self.take_value()?;
        let shape = value.shape().clone();
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
            _ => candle_core::bail!("{}: value is not on a cuda device", self.name),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(grad_res).map(Some)
    }
}

/// `value` (computed from `x.detach()`) as a node of `x`'s graph with the given backward.
/// When `x` is not tracked, `value` is returned as is.
pub fn with_grad(
    name: &'static str,
    x: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
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
            FrozenWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// Bytes held by the weight.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    fn forward_detached(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => {
                let x = if x.dtype() != w.dtype() { x.to_dtype(w.dtype())? } else { x.clone() };
                linear_nt(&x, w)
            }
            FrozenWeight::Quantized(_) => {
                let dtype = x.dtype();
                let y = self.matmul.forward(&x.to_dtype(DType::F32)?)?;
                y.to_dtype(dtype)
            }
        }
    }

    /// `x @ W^T`; in backprop only `grad @ W` flows back to `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_detached(&x.detach())?;
        if !x.track_op() {
            return Ok(y);
        }
        let this = self.clone();
        let in_dtype = x.dtype();
        with_grad("frozen-linear", x, y, move |grad| {
            let w = this.dense_weight(grad.dtype())?;
            linear_nn(grad, &w)?.to_dtype(in_dtype)
        })
    }
}

/// RMSNorm with a frozen scale: `x / rms(x) * weight`; backward gives the input gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let y = if xd.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(&xd, weight, eps)?
    } else {
        candle_nn::ops::rms_norm(&xd, weight, eps)?
    };
    if !x.track_op() {
        return Ok(y);
    }
    let xs = x.detach();
    let weight = weight.clone();
    with_grad("rms-norm", x, y, move |grad| {
        // r = 1/sqrt(mean(x²)+eps); u = g*w; dx = r*u - x * r³ * mean(u*x)
        let x = xs.to_dtype(DType::F32)?;
        let g = grad.to_dtype(DType::F32)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
        let u = g.broadcast_mul(&weight.to_dtype(DType::F32)?)?;
        let ux = (&u * &x)?.mean_keepdim(D::Minus1)?;
        let dx = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * ux)?)?)?;
        dx.to_dtype(xs.dtype())
    })
}

/// Rotary embedding on `[b, h, t, d]`; `interleaved` pairs (2i, 2i+1) as GGUF files store Q/K,
/// otherwise pairs (i, i+d/2) as Hugging Face checkpoints do. Rotation is orthogonal, so the
/// backward is the rotation by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let apply = move |t: &Tensor, sin: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        if interleaved {
            candle_nn::rotary_emb::rope_i(&t, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(&t, cos, sin)
        }
    };
    let y = apply(&x.detach(), sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    with_grad("rope", x, y, move |grad| {
        let g = grad.contiguous()?;
        if interleaved {
            candle_nn::rotary_emb::rope_i(&g, &cos, &neg_sin)
        } else {
            candle_nn::rotary_emb::rope(&g, &cos, &neg_sin)
        }
    })
}

/// Softmax over the last dimension; backward `y * (g - sum(g*y))`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    let ys = y.clone();
    with_grad("softmax", x, y, move |grad| {
        let gy = (grad * &ys)?;
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
    let ys = y.clone();
    with_grad("masked-softmax", x, y, move |grad| {
        let gy = (grad * &ys)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        (gy - ys.broadcast_mul(&s)?)? * scale
    })
}

/// SiLU (x * sigmoid(x)); backward `g * s * (1 + x * (1 - s))`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::silu(&x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    let xs = x.detach();
    with_grad("silu", x, y, move |grad| {
        let s = candle_nn::ops::sigmoid(&xs)?;
        let one_minus = s.affine(-1.0, 1.0)?;
        let inner = ((&xs * one_minus)? + 1.0)?;
        grad * (s * inner)?
    })
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
