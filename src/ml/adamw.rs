//! AdamW (decoupled weight decay, bias-corrected moments) over named f32 variables, as
//! `torch.optim.AdamW` computes it, in two in-place passes per variable: the moments
//! `[m; v]` (one `[2, n]` tensor per variable), then the variable (`kernels/adamw.cu`; the same
//! f32 arithmetic on the CPU). Written as candle ops it was about sixteen launches and as many
//! temporaries per variable, some 7,000 launches a step with adapters on every linear.

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
    pub(crate) fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!("AdamW: {} gradients for {} variables", grads.len(), self.vars.len());
        }
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
        for ((_, var), (state, g)) in self.vars.iter().zip(self.state.iter().zip(grads)) {
            let g = g.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
            if g.elem_count() != var.elem_count() {
                candle_core::bail!("AdamW: gradient of {:?} for a variable of {:?}", g.shape(), var.shape());
            }
            state.inplace_op2(&g, &moments)?;
            var.as_tensor().inplace_op2(state, &update)?;
        }
        Ok(())
    }

    /// `{name}.exp_avg` and `{name}.exp_avg_sq` of every variable, in its shape.
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

#[cfg(feature = "cuda")]
const KERNELS: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

/// Launches `name` over `n` elements with the mutable buffer first, then `rest`'s arguments.
#[cfg(feature = "cuda")]
fn launch(
    name: &str,
    s1: &mut candle_core::CudaStorage,
    l1: &Layout,
    s2: &candle_core::CudaStorage,
    l2: &Layout,
    n: usize,
    rest: &[f32],
) -> Result<()> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    let dev = s1.device().clone();
    let (a1, b1) = l1.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("adamw: not contiguous".into()))?;
    let (a2, b2) = l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("adamw: not contiguous".into()))?;
    let src = s2.as_cuda_slice::<f32>()?.slice(a2..b2);
    let dst = s1.as_cuda_slice_mut::<f32>()?;
    let mut dst = dst.slice_mut(a1..b1);
    let func = dev.get_or_load_custom_func(name, "adamw", KERNELS)?;
    let n64 = n as u64;
    let cfg = LaunchConfig { grid_dim: (n64.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(&mut dst).arg(&src).arg(&n64);
    for v in rest {
        b.arg(v);
    }
    // SAFETY: argument types and order match the kernel's signature
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<()> {
        launch("adamw_moments", s1, l1, s2, l2, l2.shape().elem_count(), &[self.b1, self.b2])
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<()> {
        let n = l1.shape().elem_count();
        launch("adamw_update", s1, l1, s2, l2, n, &[self.lr, self.decay, self.bc1, self.sqrt_bc2, self.eps])
    }
}

/// Three steps on `device` against the CPU on the same variables and gradients: the same f32
/// arithmetic, so within a few f32 roundings (1e-6 relative to the largest value).
pub fn check_device(device: &Device) -> Result<Vec<KernelCheck>> {
    let cpu = Device::Cpu;
    let init = Tensor::randn(0f32, 1.0, (37, 300), &cpu)?;
    let grads: Vec<Tensor> = (0..3).map(|_| Tensor::randn(0f32, 1.0, (37, 300), &cpu)).collect::<Result<_>>()?;
    let run = |dev: &Device| -> Result<Tensor> {
        let var = Var::from_tensor(&init.to_device(dev)?)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], 0.01)?;
        for g in &grads {
            opt.step(&[g.to_device(dev)?], 1e-2)?;
        }
        var.as_tensor().to_device(&cpu)
    };
    let want = run(&cpu)?;
    let got = run(device)?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let d = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(vec![KernelCheck { kernel: "adamw", dtype: "F32".into(), chunk: (0, 0), max_abs_diff: d, tolerance: 1e-6 * scale }])
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
            opt.step(std::slice::from_ref(&g), lr)?;
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
        opt.step(std::slice::from_ref(&g), lr)?;
        resumed.step(std::slice::from_ref(&g), lr)?;
        let d = (var.as_tensor() - twin.as_tensor())?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn a_gradient_of_another_size_is_refused() {
        let var = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var)], 0.0).unwrap();
        assert!(opt.step(&[Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap()], 0.1).is_err());
    }
}
