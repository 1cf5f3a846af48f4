//! Model and training checks on a tiny random Llama built here (config.json + random
//! safetensors + a small word-level tokenizer): shapes, padding invariance, determinism,
//! gradients through the frozen (quantized) base, and a learnable task.

use std::path::Path;
use std::sync::Mutex;

use arbiter::data::hyper::{Hyperparameters, LoraHyperparameters, LrSchedule};
use arbiter::data::{ArenaRow, Label};
use arbiter::ml::classifier;
use arbiter::ml::llama::{Batch, Llama, WeightFormat};
use arbiter::ml::lora::{BlockGrads, Lora, LoraConfig, LoraCtx};
use arbiter::ml::offload::Parking;
use arbiter::ml::model::{BaseFormat, BaseModel};
use arbiter::ml::observe::{EvalMetrics, TrainObserver};
use arbiter::ml::train::{self, TrainSpec};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};

#[path = "support/tiny_model.rs"]
mod tiny_model;
use tiny_model::{write_tiny_model, HIDDEN, VOCAB};

fn tiny(format: BaseFormat) -> (tempfile::TempDir, BaseModel) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let m = BaseModel::load(dir.path(), format, &Device::Cpu).unwrap();
    (dir, m)
}

fn rand_rows(n: usize, len_range: (usize, usize), seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = len_range.0 + (s >> 33) as usize % (len_range.1 - len_range.0);
            (0..len)
                .map(|j| {
                    let x = s.wrapping_add(j as u64 * 2654435761) >> 20;
                    (x % (VOCAB as u64 - 10) + 9) as u32
                })
                .collect()
        })
        .collect()
}

fn seeded(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `|other - reference| / |reference|` (L2) of two flat gradients; `what` names them when the
/// reference is zero (a gradient that never arrived).
fn relative_error(reference: &[f32], other: &[f32], what: &str) -> f32 {
    let num: f32 = reference.iter().zip(other).map(|(p, q)| (p - q).powi(2)).sum::<f32>().sqrt();
    let den: f32 = reference.iter().map(|p| p * p).sum::<f32>().sqrt();
    assert!(den > 0.0, "{what}: zero gradient");
    num / den
}

#[test]
fn padding_invariance_and_determinism() {
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = rand_rows(5, (3, 12), 7);
    let dev = Device::Cpu;
    let right = m.llama.forward(&Batch::right_padded(&rows, 0, &dev).unwrap(), None, true).unwrap();
    let left = m.llama.forward(&Batch::left_padded(&rows, 0, &dev).unwrap(), None, true).unwrap();
    assert_eq!(right.dims(), [5, HIDDEN]);
    for (i, r) in rows.iter().enumerate() {
        let alone = m.llama.forward(&Batch::right_padded(&[r.clone()], 0, &dev).unwrap(), None, true).unwrap();
        let d = max_abs_diff(&alone.squeeze(0).unwrap(), &right.get(i).unwrap());
        assert!(d < 1e-4, "row {i}: right-padded batch differs from alone by {d}");
        let d = max_abs_diff(&alone.squeeze(0).unwrap(), &left.get(i).unwrap());
        assert!(d < 1e-4, "row {i}: left-padded batch differs from alone by {d}");
    }
    let again = m.llama.forward(&Batch::right_padded(&rows, 0, &dev).unwrap(), None, true).unwrap();
    assert_eq!(max_abs_diff(&right, &again), 0.0, "forward is not deterministic");
}

/// Forward inputs refilled in place with another batch of the same shape (what a captured
/// forward replays) give that batch's forward; padding rows to a wider width changes no row's
/// output; a batch of another shape or other starts is refused.
#[test]
fn refilled_forward_inputs_and_wider_padding_give_the_same_forward() {
    let (_d, m) = tiny(BaseFormat::F32);
    let dev = Device::Cpu;
    let first = rand_rows(3, (3, 12), 11);
    let second = rand_rows(3, (3, 12), 12);
    let width = 16;
    let padded = |rows: &[Vec<u32>]| Batch::right_padded_to(rows, 0, width, &dev).unwrap();
    let inputs = m.llama.inputs(&padded(&first), true).unwrap();
    inputs.refill(&padded(&second)).unwrap();
    let refilled = m.llama.forward_inputs(&inputs, None).unwrap();
    let direct = m.llama.forward(&Batch::right_padded(&second, 0, &dev).unwrap(), None, true).unwrap();
    let d = max_abs_diff(&refilled, &direct);
    assert!(d < 1e-5, "refilled inputs at width {width} differ from the batch's own forward by {d}");
    let before = m.llama.forward(&padded(&first), None, true).unwrap();
    assert!(max_abs_diff(&before, &direct) > 1e-2, "the two batches must differ for the check to mean anything");
    // another shape, or left padding (other starts): refused, the inputs untouched
    assert!(inputs.refill(&Batch::right_padded_to(&second, 0, width + 1, &dev).unwrap()).is_err());
    let left: Vec<Vec<u32>> = [width, 10, 5].iter().map(|&n| vec![9; n]).collect();
    let left = Batch::left_padded(&left, 0, &dev).unwrap();
    assert_eq!(left.ids.dims(), [3, width]);
    assert!(inputs.refill(&left).is_err(), "rows starting after 0 need other RoPE tables and spans");
    let again = m.llama.forward_inputs(&inputs, None).unwrap();
    assert_eq!(max_abs_diff(&again, &refilled), 0.0, "a refused refill changed the inputs");
    assert!(Batch::right_padded_to(&second, 0, 2, &dev).is_err(), "a width narrower than the longest row");
}

/// Gradients of the LoRA factors and the head w.r.t. a loss, as flat vectors.
fn grads(llama: &Llama, rows: &[Vec<u32>], labels: &[usize], seed: u64) -> Vec<Vec<f32>> {
    grads_with(llama, rows, labels, seed, &LoraCtx::default())
}

/// Fresh trainable factors of `cfg` (A drawn from `seed`) with B set to uniform values in
/// `[-b_scale, b_scale]`, the i-th variable drawn from seed `b_seed + i`: B is zero at init, so
/// the adapter would change nothing and A would get no gradient.
fn adapter_with_b(cfg: LoraConfig, llama: &Llama, seed: u64, b_scale: f32, b_seed: u64) -> (Lora, Vec<(String, Var)>) {
    let mut vars: Vec<(String, Var)> = Vec::new();
    let lora = Lora::init(cfg, llama.config(), seed, &Device::Cpu, &mut vars).unwrap();
    for (i, (name, v)) in vars.iter().enumerate() {
        if name.contains("lora_B") {
            v.set(&seeded(v.dims(), b_scale, b_seed + i as u64)).unwrap();
        }
    }
    (lora, vars)
}

/// As `grads`, under the given LoRA context (dropout, activation checkpointing).
fn grads_with(llama: &Llama, rows: &[Vec<u32>], labels: &[usize], seed: u64, ctx: &LoraCtx) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let cfg = LoraConfig::from_names(4, 8.0, 0.0, &["q_proj", "v_proj", "down_proj"].map(String::from)).unwrap();
    let (lora, vars) = adapter_with_b(cfg, llama, seed, 0.1, 0);
    let head = Var::from_tensor(&seeded(&[3, HIDDEN], 0.1, 99)).unwrap();
    let batch = Batch::right_padded(rows, 0, &dev).unwrap();
    let logits = classifier::logits(llama, Some((&lora, ctx)), head.as_tensor(), &batch).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
    let mut onehot = vec![0f32; labels.len() * 3];
    for (i, y) in labels.iter().enumerate() {
        onehot[i * 3 + y] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (labels.len(), 3), &dev).unwrap();
    let loss = (logp * onehot).unwrap().sum_all().unwrap().neg().unwrap();
    let g = loss.backward().unwrap();
    let mut out = Vec::new();
    for (_, v) in &vars {
        if ctx.block_grads.is_some() {
            // through the hand-written block backwards the factors' gradients are in the block store
            assert!(g.get(v.as_tensor()).is_none(), "a factor's gradient bypassed the block backward");
        }
        let gv = ctx.take_grad(&g, v.as_tensor()).expect("lora gradient");
        out.push(gv.flatten_all().unwrap().to_vec1().unwrap());
    }
    out.push(g.get(head.as_tensor()).expect("head gradient").flatten_all().unwrap().to_vec1().unwrap());
    out
}

#[test]
fn hand_written_block_backward_matches_candle_autograd() {
    // The training path (each decoder block one node with a hand-written backward, activations
    // kept or recomputed) against candle's autograd over every op of the same forward, with
    // LoRA dropout on (masks redrawn from their seeds), adapters on some linears only (the
    // others take the frozen-input-gradient branch), on right- and left-padded rows. f32;
    // the same arithmetic in another order: 1e-5 relative on every LoRA factor and the head.
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = rand_rows(4, (3, 11), 21);
    let labels = [1, 0, 2, 1];
    let dropout = Some((0.2, 77));
    let reference = LoraCtx { dropout, ..LoraCtx::default() };
    let a = grads_with(&m.llama, &rows, &labels, 5, &reference);
    // activations kept in every block, recomputed in the first only, recomputed in all; then
    // the MLP's gate and up only recomputed: in every block, and in the block after a fully
    // recomputed one; then those parked (on the CPU they stay where they are: this checks the
    // blocks' schedule of parking, releasing and taking them back)
    let parking = Parking::default();
    for (recompute, mlp, park) in [(0, 0, false), (1, 0, false), (usize::MAX, 0, false), (0, usize::MAX, false), (1, 1, false), (0, usize::MAX, true), (1, 1, true)] {
        let ctx = LoraCtx::training(dropout, recompute).with_mlp_recompute(mlp).with_mlp_parking(park.then_some(&parking));
        let b = grads_with(&m.llama, &rows, &labels, 5, &ctx);
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let err = relative_error(x, y, &format!("tensor {i}"));
            assert!(err < 1e-5, "tensor {i} (recompute {recompute}, MLP {mlp}, parked {park}): relative error {err}");
        }
    }
}

#[test]
fn micro_batch_gradients_sum_in_one_store_to_the_batch_gradient() {
    // Gradient accumulation as the trainer runs it: each micro-batch's backward adds the
    // factors' gradients into one store (the first GEMM writes, the next accumulate) and the
    // score head's through `absorb`; the sum equals the gradient of the whole batch (the same
    // loss, a sum over rows), 1e-5 relative. Rows of different lengths, so the micro-batches
    // pad differently from the batch.
    let (_d, m) = tiny(BaseFormat::F32);
    let dev = Device::Cpu;
    let rows = rand_rows(5, (3, 11), 31);
    let labels = [2, 0, 1, 1, 0];
    let whole = grads_with(&m.llama, &rows, &labels, 5, &LoraCtx::training(None, 0));
    let cfg = LoraConfig::from_names(4, 8.0, 0.0, &["q_proj", "v_proj", "down_proj"].map(String::from)).unwrap();
    let (lora, mut vars) = adapter_with_b(cfg, &m.llama, 5, 0.1, 0);
    let head = Var::from_tensor(&seeded(&[3, HIDDEN], 0.1, 99)).unwrap();
    vars.push(("head".into(), head.clone()));
    let store = BlockGrads::default();
    for (part, ys) in [(&rows[..2], &labels[..2]), (&rows[2..], &labels[2..])] {
        let ctx = LoraCtx::training(None, 1).with_grads(&store);
        let batch = Batch::right_padded(part, 0, &dev).unwrap();
        let logits = classifier::logits(&m.llama, Some((&lora, &ctx)), head.as_tensor(), &batch).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let picked: Vec<Tensor> = ys.iter().enumerate().map(|(i, &y)| logp.get(i).unwrap().get(y).unwrap()).collect();
        let loss = Tensor::stack(&picked, 0).unwrap().sum_all().unwrap().neg().unwrap();
        store.absorb(&loss.backward().unwrap(), &vars).unwrap();
    }
    let summed = store.take_all(&vars).unwrap();
    assert_eq!(summed.len(), whole.len());
    for (i, (x, y)) in whole.iter().zip(&summed).enumerate() {
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let err = relative_error(x, &y, &format!("tensor {i}"));
        assert!(err < 1e-5, "tensor {i}: relative error {err}");
    }
}

#[test]
fn hand_written_block_backward_handles_left_padding() {
    // Left-padded rows have per-row RoPE positions and key spans: the hand-written backward
    // must match autograd there too (1e-5 relative on every factor's gradient).
    let (_d, m) = tiny(BaseFormat::F32);
    let dev = Device::Cpu;
    let rows = rand_rows(3, (2, 9), 5);
    let batch = Batch::left_padded(&rows, 0, &dev).unwrap();
    let cfg = LoraConfig::from_names(2, 4.0, 0.0, &["k_proj", "o_proj", "gate_proj", "up_proj"].map(String::from)).unwrap();
    let grads_of = |ctx: &LoraCtx| -> Vec<Vec<f32>> {
        let (lora, vars) = adapter_with_b(cfg.clone(), &m.llama, 3, 0.2, 40);
        let probe = seeded(&[3, HIDDEN], 1.0, 8);
        let h = m.llama.forward(&batch, Some((&lora, ctx)), true).unwrap();
        let g = (h * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter().map(|(_, v)| ctx.take_grad(&g, v.as_tensor()).expect("gradient").flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    let a = grads_of(&LoraCtx::default());
    // with dropout, the backward that recomputes gate and up must draw the forward's masks again
    let kept_dropout = grads_of(&LoraCtx::training(Some((0.2, 9)), 0));
    // activations kept, and gate and up (both adapted here) recomputed in the backward
    for mlp in [0, usize::MAX] {
        let b = grads_of(&LoraCtx::training(None, 0).with_mlp_recompute(mlp));
        let b_dropout = grads_of(&LoraCtx::training(Some((0.2, 9)), 0).with_mlp_recompute(mlp));
        for (i, ((x, y), (xd, yd))) in a.iter().zip(&b).zip(kept_dropout.iter().zip(&b_dropout)).enumerate() {
            let err = relative_error(x, y, &format!("factor {i}"));
            assert!(err < 1e-5, "factor {i} (MLP recompute {mlp}): relative error {err}");
            let err = relative_error(xd, yd, &format!("factor {i}"));
            assert!(err < 1e-5, "factor {i} (dropout, MLP recompute {mlp}): relative error {err}");
        }
    }
}

#[test]
fn the_last_block_computes_only_the_rows_the_head_reads() {
    // Where only each row's last position is read, the last block computes that row alone (and
    // the keys and values of every position): the hidden states and the factors' gradients are
    // those of the full forward taken at the last positions. Adapters on all seven linears,
    // right- and left-padded rows; the inference blocks, candle's autograd and the hand-written
    // backward. No dropout: its masks are drawn over the rows a linear reads, so they differ
    // from the full forward's. f32: 1e-5 (absolute on the states, relative on the gradients).
    let (_d, m) = tiny(BaseFormat::F32);
    let dev = Device::Cpu;
    let rows = rand_rows(4, (2, 10), 3);
    let names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from);
    let cfg = LoraConfig::from_names(2, 4.0, 0.0, &names).unwrap();
    let probe = seeded(&[rows.len(), HIDDEN], 1.0, 8);
    for left in [false, true] {
        let batch = if left { Batch::left_padded(&rows, 0, &dev) } else { Batch::right_padded(&rows, 0, &dev) }.unwrap();
        let (b, t) = batch.ids.dims2().unwrap();
        let at: Vec<u32> = batch.spans.iter().enumerate().map(|(r, (_, e))| (r * t + e - 1) as u32).collect();
        let at = Tensor::new(at.as_slice(), &dev).unwrap();
        let (lora, vars) = adapter_with_b(cfg.clone(), &m.llama, 3, 0.2, 40);
        let states = |lora: &Lora, ctx: &LoraCtx, last_only: bool| {
            let h = m.llama.forward(&batch, Some((lora, ctx)), last_only).unwrap();
            if last_only { h } else { h.reshape((b * t, HIDDEN)).unwrap().index_select(&at, 0).unwrap() }
        };
        let inference = lora.detached();
        let d = max_abs_diff(&states(&inference, &LoraCtx::default(), true), &states(&inference, &LoraCtx::default(), false));
        assert!(d < 1e-5, "inference (left padding {left}): the last rows differ by {d}");
        for (what, ctx) in [("autograd", LoraCtx::default()), ("hand-written backward", LoraCtx::training(None, 0))] {
            let run = |last_only: bool| {
                let h = states(&lora, &ctx, last_only);
                let g = (&h * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let grads: Vec<Vec<f32>> = vars.iter().map(|(_, v)| ctx.take_grad(&g, v.as_tensor()).expect("gradient").flatten_all().unwrap().to_vec1().unwrap()).collect();
                (h, grads)
            };
            let ((pruned, gp), (full, gf)) = (run(true), run(false));
            let d = max_abs_diff(&pruned, &full);
            assert!(d < 1e-5, "{what} (left padding {left}): the last rows differ by {d}");
            for ((name, _), (x, y)) in vars.iter().zip(gf.iter().zip(&gp)) {
                let err = relative_error(x, y, name);
                assert!(err < 1e-5, "{what} (left padding {left}): {name}: relative error {err}");
            }
        }
    }
}

#[test]
fn gradients_through_quantized_base_match_dense_reference() {
    // Q8_0 base vs a dense f32 base holding the same (dequantized) weight values: gradients
    // agree within 6% relative (the quantized CPU matmul also rounds activations to 8 bits,
    // so the forward differs slightly; the exact backward is checked by finite differences).
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 3);
    let dev = Device::Cpu;
    let q = Llama::from_hf_dir(dir.path(), WeightFormat::Quantized(Some(GgmlDType::Q8_0)), &dev).unwrap();
    let deq = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("proj.weight") {
            let qt = candle_core::quantized::QTensor::quantize(t, GgmlDType::Q8_0).unwrap();
            *t = qt.dequantize(&dev).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, deq.path().join("model.safetensors")).unwrap();
    std::fs::copy(dir.path().join("config.json"), deq.path().join("config.json")).unwrap();
    let dense = Llama::from_hf_dir(deq.path(), WeightFormat::Dense(DType::F32), &dev).unwrap();
    // the dense reference uses the quantized weights' values
    let rows = rand_rows(3, (4, 9), 11);
    let labels = [0, 2, 1];
    let gq = grads(&q, &rows, &labels, 5);
    let gd = grads(&dense, &rows, &labels, 5);
    for (a, b) in gq.iter().zip(&gd) {
        let err = relative_error(b, a, "dense reference");
        assert!(err < 0.06, "quantized vs dense gradient relative error {err}");
    }
    let _ = dense;
}

#[test]
fn lora_and_head_gradients_match_finite_differences() {
    // f64 model: analytic gradients of LoRA A/B and the head vs central differences, 1e-4 rel.
    // (or 1e-8 absolute); measured errors are around 1e-6 or below. Without dropout and with
    // it (the masks are fixed by their seed, so the loss stays a smooth function of the factors).
    for dropout in [None, Some((0.3f32, 5u64))] {
        finite_difference_check(&LoraCtx { dropout, ..LoraCtx::default() });
        // the training path: hand-written block backwards
        finite_difference_check(&LoraCtx::training(dropout, 0));
    }
}

fn finite_difference_check(ctx: &LoraCtx) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 4);
    let dev = Device::Cpu;
    let llama = Llama::from_hf_dir(dir.path(), WeightFormat::Dense(DType::F64), &dev).unwrap();
    let rows = rand_rows(2, (3, 7), 3);
    let cfg = LoraConfig::from_names(2, 4.0, 0.0, &["k_proj", "o_proj", "up_proj"].map(String::from)).unwrap();
    let mut named: std::collections::BTreeMap<String, Tensor> = std::collections::BTreeMap::new();
    for l in 0..2 {
        for p in ["self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj"] {
            let (o, i) = match p {
                "self_attn.k_proj" => (32, 64),
                "self_attn.o_proj" => (64, 64),
                _ => (96, 64),
            };
            let k = (l * 10 + o + i) as u64;
            named.insert(format!("base_model.model.model.layers.{l}.{p}.lora_A.weight"), seeded(&[2, i], 0.35, k).to_dtype(DType::F64).unwrap());
            named.insert(format!("base_model.model.model.layers.{l}.{p}.lora_B.weight"), seeded(&[o, 2], 0.35, k + 1).to_dtype(DType::F64).unwrap());
        }
    }
    let head0 = seeded(&[3, HIDDEN], 0.5, 77).to_dtype(DType::F64).unwrap();
    let batch = Batch::right_padded(&rows, 0, &dev).unwrap();
    let loss_of = |vars: &[(String, Var)], head: &Tensor| {
        let logits = forward_with_vars(&llama, &batch, &cfg, vars, head, ctx);
        let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        (logp.get(0).unwrap().get(1).unwrap() + logp.get(1).unwrap().get(2).unwrap()).unwrap()
    };
    let vars: Vec<(String, Var)> = named.iter().map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap())).collect();
    let head_var = Var::from_tensor(&head0).unwrap();
    let analytic = loss_of(&vars, head_var.as_tensor()).backward().unwrap();
    let eps = 1e-5;
    let mut checked = 0;
    for (name, var) in vars.iter().chain(std::iter::once(&("head".to_string(), head_var.clone()))) {
        let g = ctx.take_grad(&analytic, var.as_tensor()).expect("gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let t = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                let loss = if name == "head" {
                    loss_of(&vars, &t)
                } else {
                    let vs: Vec<(String, Var)> = vars
                        .iter()
                        .map(|(k, v)| (k.clone(), if k == name { Var::from_tensor(&t).unwrap() } else { v.clone() }))
                        .collect();
                    loss_of(&vs, &head0)
                };
                loss.to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let err = (numeric - g[idx]).abs() / (1e-6 + numeric.abs().max(g[idx].abs()));
            assert!(err < 1e-4 || (numeric - g[idx]).abs() < 1e-8, "{name}[{idx}]: numeric {numeric} analytic {} (rel {err})", g[idx]);
            checked += 1;
        }
    }
    assert!(checked >= 30);
}

/// Forward through LoRA factors that are the given f64 variables themselves.
fn forward_with_vars(llama: &Llama, batch: &Batch, cfg: &LoraConfig, vars: &[(String, Var)], head: &Tensor, ctx: &LoraCtx) -> Tensor {
    let named: std::collections::BTreeMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let lora = Lora::from_tensors_exact(cfg.clone(), llama.config(), &named).unwrap();
    llama.forward(batch, Some((&lora, ctx)), true).unwrap().matmul(&head.t().unwrap()).unwrap()
}

struct Recorder {
    losses: Mutex<Vec<f64>>,
    evals: Mutex<Vec<EvalMetrics>>,
    checkpoints: Mutex<Vec<u64>>,
    logs: Mutex<Vec<String>>,
    /// Asks the trainer to stop once this many steps are done.
    stop_after: Option<usize>,
}

impl TrainObserver for Recorder {
    fn on_step(&self, _: u64, _: u64, _: f64, loss: f64, _: f64) {
        self.losses.lock().unwrap().push(loss);
    }
    fn on_eval(&self, _: u64, m: &EvalMetrics) {
        self.evals.lock().unwrap().push(*m);
    }
    fn on_checkpoint(&self, step: u64, _: &Path, _: Option<&EvalMetrics>) {
        self.checkpoints.lock().unwrap().push(step);
    }
    fn on_log(&self, line: &str) {
        self.logs.lock().unwrap().push(line.to_string());
    }
    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|n| self.losses.lock().unwrap().len() >= n)
    }
}

/// A learnable task: the prompt holds a marker word (`w1`: A wins, `w2`: B wins, `w3`: tie) at
/// a random position among filler words.
fn synthetic_rows(n: usize, seed: u64) -> Vec<ArenaRow> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let mut filler = |k: usize| -> Vec<String> { (0..k).map(|_| format!("w{}", rng.random_range(10..70))).collect() };
            let (mut prompt, a, b) = (filler(4), filler(4), filler(4));
            let label = Label::from_index(rng.random_range(0..3)).unwrap();
            prompt.insert(rng.random_range(0..5), format!("w{}", label.index() + 1));
            ArenaRow {
                id: format!("r{i}"),
                prompt: vec![prompt.join(" ")],
                response_a: vec![a.join(" ")],
                response_b: vec![b.join(" ")],
                label: Some(label),
            }
        })
        .collect()
}

fn recorder() -> Recorder {
    Recorder {
        losses: Mutex::new(vec![]),
        evals: Mutex::new(vec![]),
        checkpoints: Mutex::new(vec![]),
        logs: Mutex::new(vec![]),
        stop_after: None,
    }
}

#[test]
fn a_hugging_face_base_starts_each_input_as_its_tokenizer_does() {
    // Without a post-processor nothing is added; with one that puts a token first (Llama 3's
    // `<|begin_of_text|>`), every encoded row starts with it, as transformers' tokenizer(text).
    let (_d, plain) = tiny(BaseFormat::F32);
    let row = &synthetic_rows(1, 31)[0];
    let without = plain.encode_row(row, 64).ids;
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), 1);
    let path = dir.path().join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    tok["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "--------", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "--------", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"--------": {"id": "--------", "ids": [8], "tokens": ["--------"]}}
    });
    std::fs::write(&path, tok.to_string()).unwrap();
    let with_bos = BaseModel::load(dir.path(), BaseFormat::F32, &Device::Cpu).unwrap();
    let with = with_bos.encode_row(row, 64).ids;
    assert_eq!(with[0], 8);
    assert_eq!(with[1..], without[..], "the rest is the same");
}

#[test]
fn peft_adapters_the_loader_cannot_honour_are_refused_naming_why() {
    use arbiter::ml::adapter::{self, AdapterMeta, CONFIG_FILE, WEIGHTS_FILE};
    let (_d, m) = tiny(BaseFormat::F32);
    let cfg = LoraConfig::from_names(2, 4.0, 0.0, &["q_proj".into(), "v_proj".into()]).unwrap();
    let lora = Lora::init(cfg, m.llama.config(), 5, &Device::Cpu, &mut Vec::new()).unwrap();
    let head = Tensor::zeros((3, HIDDEN), DType::F32, &Device::Cpu).unwrap();
    let meta = AdapterMeta { temperature: 1.0, max_length: 64, ..Default::default() };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("adapter");
    adapter::save(&dir, &m.llama, &lora, &head, &meta).unwrap();
    adapter::load(&dir, &m.llama).expect("as saved");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let load_with = |key: &str, value: serde_json::Value| {
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(dir.join(CONFIG_FILE), c.to_string()).unwrap();
        adapter::load(&dir, &m.llama).map(|_| ()).map_err(|e| e.to_string())
    };
    for (key, value) in [
        ("layers_to_transform", serde_json::json!([1])),
        ("layers_pattern", serde_json::json!("layers")),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("alpha_pattern", serde_json::json!({"v_proj": 32})),
        ("bias", serde_json::json!("lora_only")),
        ("lora_bias", serde_json::json!(true)),
        ("use_dora", serde_json::json!(true)),
    ] {
        let err = load_with(key, value).expect_err(key);
        assert!(err.contains(&format!("uses {key}")), "{key}: {err}");
    }
    // the values PEFT writes when the options are unused are fine
    for (key, value) in [("layers_to_transform", serde_json::Value::Null), ("rank_pattern", serde_json::json!({})), ("lora_bias", serde_json::json!(false))] {
        load_with(key, value).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    load_with("bias", serde_json::json!("none")).unwrap();

    // factors missing from the first layer (a subset of layers, not declared): refused, not
    // served as the bare base model
    let tensors = adapter::read_tensors(&dir.join(WEIGHTS_FILE)).unwrap();
    let keep = |pred: &dyn Fn(&str) -> bool| {
        let kept: std::collections::HashMap<String, Tensor> =
            tensors.iter().filter(|(k, _)| pred(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        candle_core::safetensors::save(&kept, dir.join(WEIGHTS_FILE)).unwrap();
        adapter::load(&dir, &m.llama).map(|_| ()).map_err(|e| e.to_string())
    };
    let err = keep(&|k| !k.contains("layers.0.")).unwrap_err();
    assert!(err.contains("missing tensor") && err.contains("layers.0."), "{err}");
    let err = keep(&|k| !k.contains("lora_")).unwrap_err();
    assert!(err.contains("no LoRA factors"), "{err}");
}

#[test]
fn a_max_length_the_template_fills_is_refused_before_training() {
    // The default model's tokenizer spends more than a dozen tokens on the template: a budget
    // of 16, which the hyperparameters allow, would train on the headers alone.
    let gguf = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        println!("skipped: {} is absent (run scripts/fetch-model.sh)", gguf.display());
        return;
    }
    let m = BaseModel::load(&gguf, BaseFormat::Q4_1, &Device::Cpu).unwrap();
    let fixed = m.template_tokens();
    assert!(fixed + 3 > 16, "the template takes {fixed} tokens");
    let rows = synthetic_rows(4, 41);
    let train_with = |max_length: usize| {
        let hp = Hyperparameters { epochs: 1, batch_size: 4, max_length, ..Default::default() };
        let work = tempfile::tempdir().unwrap();
        let spec = TrainSpec { base: &m, hp: &hp, train_rows: &rows, validation_rows: &[], work_dir: work.path(), resume_from: None };
        train::train(&spec, &recorder()).map(|_| ())
    };
    match train_with(16) {
        Err(train::TrainFailure::Failed(message)) => {
            assert!(message.contains(&format!("template alone takes {fixed} tokens")) && message.contains(&format!("at least {}", fixed + 3)), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_checkpoint_that_cannot_be_written_is_a_passing_failure() {
    // A full or failing disk is no reason to fail the job for good: the runner gives it back
    // and a later attempt resumes from the last checkpoint written.
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = synthetic_rows(16, 23);
    let hp = Hyperparameters {
        epochs: 1,
        batch_size: 8,
        max_length: 48,
        checkpoint_every_steps: 1,
        lora: LoraHyperparameters { r: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["q_proj".into()] },
        ..Default::default()
    };
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("checkpoints"), b"in the way").unwrap();
    let spec = TrainSpec { base: &m, hp: &hp, train_rows: &rows, validation_rows: &[], work_dir: work.path(), resume_from: None };
    match train::train(&spec, &recorder()) {
        Err(train::TrainFailure::Passing(message)) => assert!(message.starts_with("the checkpoint could not be written"), "{message}"),
        other => panic!("expected a passing failure, got {:?}", other.map(|s| s.steps)),
    }
}

#[test]
fn a_stop_during_an_evaluation_is_honoured_before_it_ends() {
    // Two steps, then the epoch's evaluation of 48 rows in micro-batches of 8: the stop asked
    // for after the last step ends the run before the evaluation finishes.
    let (_d, m) = tiny(BaseFormat::F32);
    let (rows, val) = (synthetic_rows(16, 21), synthetic_rows(48, 22));
    let hp = Hyperparameters {
        epochs: 1,
        batch_size: 8,
        max_length: 48,
        lora: LoraHyperparameters { r: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["q_proj".into()] },
        ..Default::default()
    };
    let work = tempfile::tempdir().unwrap();
    let rec = Recorder { stop_after: Some(2), ..recorder() };
    let spec = TrainSpec { base: &m, hp: &hp, train_rows: &rows, validation_rows: &val, work_dir: work.path(), resume_from: None };
    let result = train::train(&spec, &rec);
    assert!(matches!(result, Err(train::TrainFailure::Stopped)), "{:?}", result.map(|s| s.steps));
    assert_eq!(rec.losses.lock().unwrap().len(), 2);
    assert!(rec.evals.lock().unwrap().is_empty(), "the evaluation did not finish");
}

#[test]
fn learns_a_synthetic_task_and_saves_a_reloadable_adapter() {
    let (_d, m) = tiny(BaseFormat::F32);
    let train_rows = synthetic_rows(128, 1);
    let val_rows = synthetic_rows(48, 2);
    let hp = Hyperparameters {
        epochs: 8,
        batch_size: 8,
        learning_rate: 5e-3,
        max_length: 64,
        warmup_steps: 4,
        lr_schedule: LrSchedule::Linear,
        lora: LoraHyperparameters { r: 8, alpha: 16.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()] },
        eval_every_steps: 0,
        checkpoint_every_steps: 0,
        ..Default::default()
    };
    let work = tempfile::tempdir().unwrap();
    let rec = recorder();
    let spec = TrainSpec { base: &m, hp: &hp, train_rows: &train_rows, validation_rows: &val_rows, work_dir: work.path(), resume_from: None };
    let summary = train::train(&spec, &rec).unwrap();
    let losses = rec.losses.lock().unwrap().clone();
    let first: f64 = losses[..6].iter().sum::<f64>() / 6.0;
    let last: f64 = losses[losses.len() - 6..].iter().sum::<f64>() / 6.0;
    eprintln!("loss first {first:.3} last {last:.3}, best {:?}", summary.best_eval);
    assert!(last < first * 0.6, "loss did not fall: first {first:.3} last {last:.3}");
    let best = summary.best_eval.expect("evaluated");
    assert!(best.accuracy > 0.8, "validation accuracy {}", best.accuracy);
    assert_eq!(rec.evals.lock().unwrap().len(), 8, "one evaluation per epoch");

    // round trip: the saved adapter reloaded gives the same logits as the trained one
    let adapter = arbiter::ml::adapter::load(&summary.adapter_dir, &m.llama).unwrap();
    let ids: Vec<Vec<u32>> = val_rows.iter().map(|r| m.encode_row(r, 64).ids).collect();
    let logits = train::predict_logits(&m, Some(&adapter.lora), &adapter.head, &ids, 4).unwrap();
    let probs: Vec<[f32; 3]> = logits.iter().map(|l| classifier::softmax3(l, 1.0)).collect();
    let labels: Vec<usize> = val_rows.iter().map(|r| r.label.unwrap().index()).collect();
    let again = train::metrics(&probs, &labels);
    assert!((again.log_loss - best.log_loss).abs() < 1e-4, "reloaded adapter log loss {} vs {}", again.log_loss, best.log_loss);

    // calibration: the stacked length model contains the temperature-only fit (length weight
    // 0), so on the validation split it is never worse; here the logits carry the label and the
    // lengths nothing, so the fit leans on the logits
    let c = summary.calibration.expect("calibrated");
    let with_lengths = c.log_loss_with_lengths.expect("length model fitted");
    assert!(with_lengths <= c.log_loss_after + 1e-4, "stacked {with_lengths} vs temperature only {}", c.log_loss_after);
    let lc = adapter.meta.length_calibration.as_ref().expect("saved with the adapter");
    assert!(lc.logit_scale > 0.5, "{lc:?}");
    let calibrated: Vec<[f32; 3]> = logits.iter().zip(&val_rows).map(|(l, r)| adapter.meta.probabilities(l, r)).collect();
    let served = train::metrics(&calibrated, &labels).log_loss;
    assert!((served - with_lengths).abs() < 1e-4, "served {served} vs fitted {with_lengths}");
}

#[test]
fn too_few_validation_rows_get_the_temperature_but_no_length_model() {
    // 8 validation rows: the temperature is fitted, the length model is not (it would fit noise
    // and extrapolate it), and the adapter is saved without one
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = synthetic_rows(40, 11);
    let val = synthetic_rows(8, 12);
    let hp = Hyperparameters {
        epochs: 1,
        batch_size: 8,
        max_length: 48,
        lora: LoraHyperparameters { r: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["q_proj".into()] },
        ..Default::default()
    };
    assert!(hp.calibrate && hp.length_calibration);
    let work = tempfile::tempdir().unwrap();
    let spec = TrainSpec { base: &m, hp: &hp, train_rows: &rows, validation_rows: &val, work_dir: work.path(), resume_from: None };
    let summary = train::train(&spec, &recorder()).unwrap();
    let c = summary.calibration.expect("temperature fitted");
    assert!(c.log_loss_with_lengths.is_none());
    let adapter = arbiter::ml::adapter::load(&summary.adapter_dir, &m.llama).unwrap();
    assert!(adapter.meta.length_calibration.is_none());
}

#[test]
fn resumed_run_ends_with_the_same_adapter() {
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = synthetic_rows(40, 9);
    let val = synthetic_rows(8, 10);
    let hp = Hyperparameters {
        epochs: 2,
        batch_size: 4,
        gradient_accumulation: 2,
        learning_rate: 2e-3,
        max_length: 48,
        checkpoint_every_steps: 2,
        calibrate: false,
        lora: LoraHyperparameters { r: 4, alpha: 8.0, dropout: 0.1, target_modules: vec!["q_proj".into(), "o_proj".into()] },
        ..Default::default()
    };
    let full = tempfile::tempdir().unwrap();
    let spec = TrainSpec { base: &m, hp: &hp, train_rows: &rows, validation_rows: &val, work_dir: full.path(), resume_from: None };
    let s1 = train::train(&spec, &recorder()).unwrap();

    // a second run that resumes from the uninterrupted run's step-2 checkpoint
    let part = tempfile::tempdir().unwrap();
    let ckpt = full.path().join("checkpoints").join("step-00000002");
    assert!(ckpt.join("state.json").exists());
    let spec2 = TrainSpec { work_dir: part.path(), resume_from: Some(&ckpt), ..spec };
    let s2 = train::train(&spec2, &recorder()).unwrap();
    let w1 = std::fs::read(s1.adapter_dir.join("adapter_model.safetensors")).unwrap();
    let w2 = std::fs::read(s2.adapter_dir.join("adapter_model.safetensors")).unwrap();
    assert!(w1 == w2, "resumed adapter differs from the uninterrupted one");

    // a checkpoint whose weights were cut short cannot be resumed, and says so as such (the
    // runner then sets it aside), rather than as a failed run
    let trainable = ckpt.join("trainable.safetensors");
    let bytes = std::fs::read(&trainable).unwrap();
    std::fs::write(&trainable, &bytes[..bytes.len() / 2]).unwrap();
    let spec3 = TrainSpec { work_dir: part.path(), resume_from: Some(&ckpt), ..spec };
    match train::train(&spec3, &recorder()) {
        Err(train::TrainFailure::UnusableCheckpoint(why)) => assert!(why.contains("trainable.safetensors"), "{why}"),
        other => panic!("expected an unusable checkpoint, got {:?}", other.map(|s| s.steps)),
    }
}

#[test]
fn a_resumed_run_reads_the_best_checkpoint_from_its_own_directory_or_keeps_its_final_weights() {
    // The adapter is the best checkpoint by validation loss, read at the end from the run's own
    // directory. A run resumed elsewhere (another node) has it only if it was fetched: with it,
    // it is used; without it, the run keeps its final weights instead of failing.
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = synthetic_rows(16, 21);
    let val = synthetic_rows(8, 22);
    let hp = Hyperparameters {
        epochs: 2,
        batch_size: 4,
        max_length: 48,
        checkpoint_every_steps: 2,
        calibrate: false,
        lora: LoraHyperparameters { r: 2, alpha: 4.0, dropout: 0.0, target_modules: vec!["q_proj".into()] },
        ..Default::default()
    };
    let first = tempfile::tempdir().unwrap();
    let spec = TrainSpec { base: &m, hp: &hp, train_rows: &rows, validation_rows: &val, work_dir: first.path(), resume_from: None };
    train::train(&spec, &recorder()).unwrap();
    // the end of epoch one (step 4) was evaluated: its checkpoint records itself as the best so
    // far; make it unbeatable, so that it stays the best after epoch two
    let epoch_one = first.path().join("checkpoints").join("step-00000004");
    assert_eq!(train::checkpoint_best_step(&epoch_one), Some(4));
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(epoch_one.join("state.json")).unwrap()).unwrap();
    state["best"][1]["log_loss"] = serde_json::json!(-1.0);
    std::fs::write(epoch_one.join("state.json"), state.to_string()).unwrap();
    // the checkpoint before any evaluation records none
    assert!(first.path().join("checkpoints").join("step-00000002").join("state.json").is_file());
    assert_eq!(train::checkpoint_best_step(&first.path().join("checkpoints").join("step-00000002")), None);

    let copy = |to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(&epoch_one).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    // resumed where the best checkpoint's files were fetched too (the resume point is that same
    // checkpoint, copied into the new directory)
    let with = tempfile::tempdir().unwrap();
    let at = with.path().join("checkpoints").join("step-00000004");
    copy(&at);
    let rec = recorder();
    let s = train::train(&TrainSpec { work_dir: with.path(), resume_from: Some(&at), ..spec }, &rec).unwrap();
    assert_eq!(s.best_step, Some(4));
    assert!(rec.logs.lock().unwrap().iter().any(|l| l.contains("using the best checkpoint, step 4")));

    // resumed from a copy outside the new directory, whose step-4 files were never fetched
    let elsewhere = tempfile::tempdir().unwrap();
    copy(elsewhere.path());
    let without = tempfile::tempdir().unwrap();
    let rec = recorder();
    let s = train::train(&TrainSpec { work_dir: without.path(), resume_from: Some(elsewhere.path()), ..spec }, &rec).unwrap();
    assert_eq!(s.best_step, None, "final weights");
    assert!(rec.logs.lock().unwrap().iter().any(|l| l.contains("step 4, cannot be read")), "{:?}", rec.logs.lock().unwrap());
    arbiter::ml::adapter::load(&s.adapter_dir, &m.llama).expect("a usable adapter");
}

#[test]
fn checkpointed_training_matches_plain_training() {
    // The same run with activation checkpointing on: accumulation, dropout and clipping go
    // through the recomputed blocks; the final adapter weights agree to f32 rounding.
    let (_d, m) = tiny(BaseFormat::F32);
    let rows = synthetic_rows(24, 31);
    let val = synthetic_rows(6, 32);
    let hp = Hyperparameters {
        epochs: 1,
        batch_size: 4,
        gradient_accumulation: 2,
        learning_rate: 2e-3,
        max_length: 48,
        checkpoint_every_steps: 0,
        calibrate: false,
        lora: LoraHyperparameters { r: 4, alpha: 8.0, dropout: 0.1, target_modules: vec!["q_proj".into(), "down_proj".into()] },
        ..Default::default()
    };
    let adapter = |hp: &Hyperparameters| {
        let dir = tempfile::tempdir().unwrap();
        let spec = TrainSpec { base: &m, hp, train_rows: &rows, validation_rows: &val, work_dir: dir.path(), resume_from: None };
        let s = train::train(&spec, &recorder()).unwrap();
        candle_core::safetensors::load(s.adapter_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
    };
    let plain = adapter(&hp);
    // every block recomputed, only the first of the two, and the second's gate and up after it,
    // recomputed or parked (`mlp_offload`: the trainer's steps share one parking)
    for (layers, mlp, offload) in [(None, None, false), (Some(1), None, false), (Some(1), Some(1), false), (Some(0), Some(2), true)] {
        let checkpointed = adapter(&Hyperparameters {
            gradient_checkpointing: true,
            checkpointed_layers: layers,
            mlp_checkpointed_layers: mlp,
            mlp_offload: offload,
            ..hp.clone()
        });
        assert_eq!(plain.len(), checkpointed.len());
        for (name, a) in &plain {
            let b = &checkpointed[name];
            let d = max_abs_diff(a, b);
            let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-5 * scale.max(1e-3), "{name} ({layers:?} recomputed, MLP {mlp:?}, parked {offload}): differs by {d} (scale {scale})");
        }
    }
}

#[test]
fn served_adapters_score_as_the_autograd_forward_does() {
    // The three inference routes of an adapter against candle's op-by-op forward through the
    // trainable factors (the reference): the factors prepared once (`for_inference`), and the
    // adapter merged into the weights (`serve::prepare` merges a model this small). f32 on
    // left-padded rows: the same arithmetic in another order, 1e-5 relative.
    use arbiter::ml::serve::{prepare, Served};
    let (_d, m) = tiny(BaseFormat::F32);
    let dev = Device::Cpu;
    let rows = rand_rows(3, (2, 9), 11);
    let batch = Batch::left_padded(&rows, 0, &dev).unwrap();
    let cfg = LoraConfig::from_names(2, 4.0, 0.0, &["q_proj", "v_proj", "o_proj", "down_proj"].map(String::from)).unwrap();
    let (lora, _vars) = adapter_with_b(cfg, &m.llama, 5, 0.2, 60);
    let head = seeded(&[3, HIDDEN], 1.0, 9);
    let ctx = LoraCtx::default();
    let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let reference = flat(classifier::logits(&m.llama, Some((&lora, &ctx)), &head, &batch).unwrap());
    let prepared = lora.for_inference(DType::F32).unwrap();
    let factors = flat(classifier::logits(&m.llama, Some((&prepared, &ctx)), &head, &batch).unwrap());
    let served = prepare(&m.llama, &lora).unwrap();
    assert!(matches!(served, Served::Merged(_)), "a tiny dense model is served merged");
    let (model, adapter) = served.parts(&m.llama, &ctx);
    let merged = flat(classifier::logits(model, adapter, &head, &batch).unwrap());
    let without = flat(classifier::logits(&m.llama, None, &head, &batch).unwrap());
    for (what, got) in [("prepared factors", &factors), ("merged", &merged)] {
        let err = relative_error(&reference, got, what);
        assert!(err < 1e-5, "{what}: relative error {err}");
    }
    // and the adapter does change the scores (the comparison above is not vacuous)
    assert!(relative_error(&reference, &without, "base") > 1e-3);
    // a 4-bit base is never merged (that would need dense copies): prepared factors
    let (_q, q4) = tiny(BaseFormat::Q4);
    assert!(matches!(prepare(&q4.llama, &lora).unwrap(), Served::Factors(_)));
}
