//! Sequence classification: the final-norm hidden state of each row's last token → score head
//! `Linear(hidden, 3, bias=false)` → logits in the order `winner_model_a, winner_model_b,
//! winner_tie` (as `LlamaForSequenceClassification` does).

use candle_core::{DType, Tensor};

use super::llama::{Batch, ForwardInputs, Llama};
use super::lora::{Lora, LoraCtx};
use super::MlError;

/// PEFT name of the score head (saved as a module with `modules_to_save`).
pub const HEAD_NAME: &str = "base_model.model.score.weight";

/// Logits `[b, 3]` (f32).
pub fn logits(
    llama: &Llama,
    lora: Option<(&Lora, &LoraCtx)>,
    head: &Tensor,
    batch: &Batch,
) -> Result<Tensor, MlError> {
    logits_from(llama, lora, head, &llama.inputs(batch, true)?)
}

/// `logits` from forward inputs already on the device (`Llama::inputs` with `last_only`).
pub fn logits_from(
    llama: &Llama,
    lora: Option<(&Lora, &LoraCtx)>,
    head: &Tensor,
    inputs: &ForwardInputs,
) -> Result<Tensor, MlError> {
    let h = llama.forward_inputs(inputs, lora)?;
    let h = if h.dtype() != head.dtype() { h.to_dtype(head.dtype())? } else { h };
    Ok(h.matmul(&head.t()?)?.to_dtype(DType::F32)?)
}

/// Softmax of `logits / temperature`, row by row.
pub fn probabilities(logits: &Tensor, temperature: f64) -> Result<Vec<[f32; 3]>, MlError> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows.iter().map(|r| softmax3(r, temperature)).collect())
}

pub fn softmax3(r: &[f32], temperature: f64) -> [f32; 3] {
    let t = temperature.max(1e-6) as f32;
    let m = r.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let e: Vec<f32> = r.iter().map(|x| ((x - m) / t).exp()).collect();
    let s: f32 = e.iter().sum();
    [e[0] / s, e[1] / s, e[2] / s]
}

/// Probabilities of a pair scored both ways: `p` for (A, B) and `q` for the swapped (B, A).
/// The swapped run's A/B probabilities are swapped back and the two averaged, so the result
/// is exactly symmetric under swapping the request's responses.
pub fn symmetric(p: [f32; 3], q: [f32; 3]) -> [f32; 3] {
    [(p[0] + q[1]) / 2.0, (p[1] + q[0]) / 2.0, (p[2] + q[2]) / 2.0]
}
