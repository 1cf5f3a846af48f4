//! LoRA training of the classifier on a frozen base: AdamW with decoupled weight decay,
//! warm-up then linear/cosine decay, gradient accumulation and clipping, class-weighted
//! cross-entropy, A/B swap augmentation, seeded data order, periodic evaluation (log loss,
//! accuracy, balanced accuracy), atomic checkpoints that resume exactly, the best adapter
//! by validation log loss, and a fitted softmax temperature.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::adamw::AdamW;
use super::adapter::{self, AdapterMeta};
use super::calibrate::{self, Calibration, LengthCalibration, LengthModel};
use super::classifier;
use super::fsutil;
use super::llama::Batch;
use super::lora::{BlockGrads, Lora, LoraConfig, LoraCtx, Widened};
use super::offload::Parking;
use super::model::BaseModel;
use super::observe::{EvalMetrics, TrainObserver};
use super::MlError;
use crate::data::hyper::{Hyperparameters, LrSchedule};
use crate::data::ArenaRow;

/// Why training ended without an adapter.
#[derive(Debug, thiserror::Error)]
pub enum TrainFailure {
    #[error("training stopped before completion")]
    Stopped,
    #[error("{0}")]
    Failed(String),
    /// A failure that may pass (the disk full or failing while a checkpoint or the adapter is
    /// written): a later attempt resumes from the last checkpoint.
    #[error("{0}")]
    Passing(String),
    /// The checkpoint to resume from cannot be read back (why): a later attempt resumes from an
    /// older one.
    #[error("{0}")]
    UnusableCheckpoint(String),
}

/// How a resume that failed on `e` ends: the checkpoint's content is wrong or gone (it is set
/// aside), the disk failed (a later attempt), or the device did (the run fails).
fn resume_failure(e: MlError) -> TrainFailure {
    use std::io::ErrorKind;
    match e {
        MlError::Adapter(why) | MlError::Model(why) => TrainFailure::UnusableCheckpoint(why),
        MlError::Io(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidData | ErrorKind::UnexpectedEof) => {
            TrainFailure::UnusableCheckpoint(e.to_string())
        }
        MlError::Io(e) => TrainFailure::Passing(format!("the checkpoint could not be read: {e}")),
        other => TrainFailure::from(other),
    }
}

/// A write that failed: it may succeed later.
fn passing(what: &str) -> impl FnOnce(MlError) -> TrainFailure + '_ {
    move |e| TrainFailure::Passing(format!("{what} could not be written: {e}"))
}

impl From<MlError> for TrainFailure {
    fn from(e: MlError) -> Self {
        TrainFailure::Failed(e.to_string())
    }
}

impl From<candle_core::Error> for TrainFailure {
    fn from(e: candle_core::Error) -> Self {
        TrainFailure::Failed(format!("tensor error: {e}"))
    }
}

/// What a finished run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub adapter_dir: PathBuf,
    pub steps: u64,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub final_train_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub best_eval: Option<EvalMetrics>,
    /// Validation log loss before and after temperature calibration.
    pub calibration: Option<Calibration>,
    pub temperature: f64,
    pub tokens_seen: u64,
    pub train_seconds: f64,
}

/// One training run's inputs.
pub struct TrainSpec<'a> {
    pub base: &'a BaseModel,
    pub hp: &'a Hyperparameters,
    pub train_rows: &'a [ArenaRow],
    pub validation_rows: &'a [ArenaRow],
    /// Checkpoints go to `work_dir/checkpoints/step-N`, the adapter to `work_dir/adapter`.
    pub work_dir: &'a Path,
    pub resume_from: Option<&'a Path>,
}

/// Saved with every checkpoint; with the seed it fixes the data order and dropout masks.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    total_steps: u64,
    tokens_seen: u64,
    best: Option<(u64, EvalMetrics)>,
    last_loss: Option<f64>,
    hyperparameters: Hyperparameters,
}

const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

struct Example {
    ids: Vec<u32>,
    label: usize,
}

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(hp: &Hyperparameters, step: u64, total: u64) -> f64 {
    let warm = hp.warmup_steps as u64;
    if step < warm {
        return hp.learning_rate * (step + 1) as f64 / warm as f64;
    }
    let span = total.saturating_sub(warm).max(1) as f64;
    let progress = ((step - warm) as f64 / span).clamp(0.0, 1.0);
    match hp.lr_schedule {
        LrSchedule::Constant => hp.learning_rate,
        LrSchedule::Linear => hp.learning_rate * (1.0 - progress),
        LrSchedule::Cosine => hp.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Micro-batches of one epoch: a seeded shuffle, length-sorted within windows of 50 batches to
/// cut padding, then the batches themselves shuffled. A pure function of (seed, epoch).
fn epoch_batches(lengths: &[usize], batch_size: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|i| std::cmp::Reverse(lengths[*i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Class-weighted mean cross-entropy of `[b, 3]` logits (torch's `CrossEntropyLoss(weight)`).
fn weighted_ce(logits: &Tensor, labels: &[usize], weights: [f64; 3]) -> candle_core::Result<Tensor> {
    let b = labels.len();
    let mut onehot = vec![0f32; b * 3];
    let mut wsum = 0.0;
    for (i, &y) in labels.iter().enumerate() {
        onehot[i * 3 + y] = weights[y] as f32;
        wsum += weights[y];
    }
    let onehot = Tensor::from_vec(onehot, (b, 3), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    (logp * onehot)?.sum_all()?.affine(-1.0 / wsum, 0.0)
}

/// Log loss, accuracy and balanced accuracy of probability rows against labels.
pub fn metrics(probs: &[[f32; 3]], labels: &[usize]) -> EvalMetrics {
    let n = labels.len().max(1) as f64;
    let mut ll = 0.0;
    let mut correct = 0usize;
    let mut per_class = [(0usize, 0usize); 3];
    for (p, &y) in probs.iter().zip(labels) {
        ll -= (p[y] as f64).clamp(1e-15, 1.0).ln();
        // the first of equal maxima (`max_by` would take the last: exact ties would all read as "tie")
        let pred = (1..3).fold(0, |best, k| if p[k] > p[best] { k } else { best });
        per_class[y].1 += 1;
        if pred == y {
            correct += 1;
            per_class[y].0 += 1;
        }
    }
    let recalls: Vec<f64> =
        per_class.iter().filter(|(_, t)| *t > 0).map(|(c, t)| *c as f64 / *t as f64).collect();
    EvalMetrics {
        log_loss: ll / n,
        accuracy: correct as f64 / n,
        balanced_accuracy: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
        rows: labels.len(),
    }
}

/// Score rows in length-sorted micro-batches (no dropout): logits per row, in input order.
pub fn predict_logits(
    base: &BaseModel,
    lora: Option<&Lora>,
    head: &Tensor,
    encoded: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<[f32; 3]>, MlError> {
    predict_logits_until(base, lora, head, encoded, batch_size, &|| false).map(Option::unwrap_or_default)
}

/// [`predict_logits`], asking `stop` before each micro-batch: None once it says to stop.
pub fn predict_logits_until(
    base: &BaseModel,
    lora: Option<&Lora>,
    head: &Tensor,
    encoded: &[Vec<u32>],
    batch_size: usize,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Vec<[f32; 3]>>, MlError> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(encoded[*i].len()));
    let mut out = vec![[0f32; 3]; encoded.len()];
    let ctx = LoraCtx::default();
    // inference: no autograd graph, even when the factors are trainable variables
    let lora = lora.map(|l| l.for_inference(base.llama.dtype())).transpose()?;
    let head = head.detach();
    for chunk in order.chunks(batch_size.max(1)) {
        if stop() {
            return Ok(None);
        }
        let rows: Vec<Vec<u32>> = chunk.iter().map(|i| encoded[*i].clone()).collect();
        let batch = Batch::right_padded(&rows, base.pad_id, base.llama.device())?;
        let logits = classifier::logits(&base.llama, lora.as_ref().map(|l| (l, &ctx)), &head, &batch)?;
        for (j, row) in logits.to_vec2::<f32>()?.into_iter().enumerate() {
            out[chunk[j]] = [row[0], row[1], row[2]];
        }
    }
    Ok(Some(out))
}

/// The step of the best checkpoint so far (by validation log loss) as recorded in the checkpoint
/// at `dir`, if it records one: the adapter is read from that step's checkpoint at the end.
pub fn checkpoint_best_step(dir: &Path) -> Option<u64> {
    #[derive(Deserialize)]
    struct Best {
        #[serde(default)]
        best: Option<(u64, serde_json::Value)>,
    }
    let bytes = std::fs::read(dir.join(STATE_FILE)).ok()?;
    serde_json::from_slice::<Best>(&bytes).ok()?.best.map(|(step, _)| step)
}

fn checkpoint_dir(work_dir: &Path, step: u64) -> PathBuf {
    work_dir.join("checkpoints").join(format!("step-{step:08}"))
}

fn encode_all(base: &BaseModel, rows: &[ArenaRow], max_length: usize, swap: bool) -> Vec<Example> {
    let mut out = Vec::with_capacity(rows.len() * if swap { 2 } else { 1 });
    for r in rows {
        let Some(label) = r.label else { continue };
        out.push(Example { ids: base.encode_row(r, max_length).ids, label: label.index() });
        if swap {
            let s = r.swapped();
            out.push(Example { ids: base.encode_row(&s, max_length).ids, label: label.swapped().index() });
        }
    }
    out
}

/// Train, checkpointing under `work_dir`; returns the adapter directory and metrics.
pub fn train(spec: &TrainSpec<'_>, obs: &dyn TrainObserver) -> Result<TrainSummary, TrainFailure> {
    let hp = spec.hp;
    let errs = hp.validate();
    if let Some(e) = errs.first() {
        return Err(TrainFailure::Failed(format!("{}: {}", e.field, e.reason)));
    }
    let base = spec.base;
    // a budget the template alone fills would train on the headers only
    let fixed = base.template_tokens();
    if hp.max_length < fixed + 3 {
        return Err(TrainFailure::Failed(format!(
            "max_length: {} leaves no room for the texts: the template alone takes {fixed} tokens of this base model; use at least {}",
            hp.max_length,
            fixed + 3
        )));
    }
    let device = base.llama.device().clone();
    let started = std::time::Instant::now();
    let train = encode_all(base, spec.train_rows, hp.max_length, hp.swap_augmentation);
    let val = encode_all(base, spec.validation_rows, hp.max_length, false);
    if train.is_empty() {
        return Err(TrainFailure::Failed("the training split has no labelled rows".into()));
    }
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let micro_per_epoch = train.len().div_ceil(hp.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(hp.gradient_accumulation) as u64;
    let total_steps = steps_per_epoch * hp.epochs as u64;
    obs.on_log(&format!(
        "training on {} examples ({} rows{}), {} validation rows, {} steps of {} x {} rows, max_length {}",
        train.len(),
        spec.train_rows.len(),
        if hp.swap_augmentation { ", with A/B swaps" } else { "" },
        val.len(),
        total_steps,
        hp.batch_size,
        hp.gradient_accumulation,
        hp.max_length
    ));

    let lcfg = LoraConfig::from_names(hp.lora.r, hp.lora.alpha, hp.lora.dropout, &hp.lora.target_modules)?;
    let mcfg = base.llama.config().clone();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut state = TrainState {
        step: 0,
        total_steps,
        tokens_seen: 0,
        best: None,
        last_loss: None,
        hyperparameters: hp.clone(),
    };
    let (lora, head, mut opt) = match spec.resume_from {
        Some(dir) => {
            // a checkpoint whose content is wrong cannot be resumed (the caller sets it aside and
            // resumes from an older one); a failing disk or device is another matter
            let unusable = |why: String| TrainFailure::UnusableCheckpoint(why);
            let state_bytes = std::fs::read(dir.join(STATE_FILE)).map_err(|e| resume_failure(MlError::Io(e)))?;
            let st: TrainState = serde_json::from_slice(&state_bytes).map_err(|e| unusable(format!("its state: {e}")))?;
            if st.hyperparameters != *hp {
                return Err(unusable("it was written with other hyperparameters".into()));
            }
            let tensors = adapter::read_tensors(&dir.join(TRAINABLE_FILE)).map_err(resume_failure)?;
            let lora = Lora::from_named(lcfg, &mcfg, &tensors, &device, Some(&mut vars)).map_err(resume_failure)?;
            let head_t = tensors.get(classifier::HEAD_NAME).ok_or_else(|| unusable("it lacks the score head".into()))?;
            let head = Var::from_tensor(&head_t.to_device(&device)?)?;
            vars.push((classifier::HEAD_NAME.to_string(), head.clone()));
            let mut opt = AdamW::new(vars.clone(), hp.weight_decay)?;
            let ot: HashMap<String, Tensor> =
                adapter::read_tensors(&dir.join(OPTIMIZER_FILE)).map_err(resume_failure)?.into_iter().collect();
            opt.load_state(st.step, &ot, &device).map_err(resume_failure)?;
            obs.on_log(&format!("resumed from checkpoint at step {}", st.step));
            state = st;
            (lora, head, opt)
        }
        None => {
            let lora = Lora::init(lcfg, &mcfg, hp.seed, &device, &mut vars)?;
            // score head: normal(0, 0.02) as transformers initialises it
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hp.seed ^ 0x5c0e);
            let init: Vec<f32> = (0..3 * mcfg.hidden_size)
                .map(|_| {
                    let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                    0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect();
            let head = Var::from_tensor(&Tensor::from_vec(init, (3, mcfg.hidden_size), &device)?)?;
            vars.push((classifier::HEAD_NAME.to_string(), head.clone()));
            let opt = AdamW::new(vars.clone(), hp.weight_decay)?;
            (lora, head, opt)
        }
    };
    let class_weights = hp.class_weights.unwrap_or([1.0; 3]);
    let dropout = hp.lora.dropout as f32;

    // a stop (a cancel, a shutdown) is honoured between the evaluation's micro-batches too: on a
    // large validation split one evaluation takes minutes
    let evaluate = |lora: &Lora, head: &Tensor| -> Result<(EvalMetrics, Vec<[f32; 3]>), TrainFailure> {
        let ids: Vec<Vec<u32>> = val.iter().map(|e| e.ids.clone()).collect();
        let stop = || obs.should_stop();
        let logits =
            predict_logits_until(base, Some(lora), head, &ids, hp.batch_size, &stop)?.ok_or(TrainFailure::Stopped)?;
        let probs: Vec<[f32; 3]> = logits.iter().map(|l| classifier::softmax3(l, 1.0)).collect();
        let labels: Vec<usize> = val.iter().map(|e| e.label).collect();
        Ok((metrics(&probs, &labels), logits))
    };
    let save_checkpoint = |state: &TrainState, opt: &AdamW| -> Result<PathBuf, MlError> {
        let dir = checkpoint_dir(spec.work_dir, state.step);
        let trainable: HashMap<String, Tensor> =
            opt.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        fsutil::write_dir_atomically(&dir, |tmp| {
            fsutil::save_safetensors_synced(&trainable, &tmp.join(TRAINABLE_FILE))?;
            fsutil::save_safetensors_synced(&opt.state_tensors()?, &tmp.join(OPTIMIZER_FILE))?;
            fsutil::write_file_synced(
                &tmp.join(STATE_FILE),
                &serde_json::to_vec_pretty(state).map_err(|e| MlError::Io(std::io::Error::other(e)))?,
            )
        })?;
        Ok(dir)
    };

    let head_t = head.as_tensor().clone();
    // host memory for the activations parked there, kept across the steps
    let parking = hp.offloads_mlp().then(Parking::default);
    // the frozen weights widened by the adapters' factors, kept across the steps: a copy of the
    // adapted attention weights, which a run under activation checkpointing, short of memory,
    // does without
    let widened = (!hp.gradient_checkpointing).then(Widened::default);
    let mut step_losses: Vec<f64> = Vec::new();
    while state.step < total_steps {
        let epoch = (state.step / steps_per_epoch) as usize;
        let step_in_epoch = (state.step % steps_per_epoch) as usize;
        let batches = epoch_batches(&lengths, hp.batch_size, hp.seed, epoch);
        let group: Vec<&Vec<usize>> = batches
            .iter()
            .skip(step_in_epoch * hp.gradient_accumulation)
            .take(hp.gradient_accumulation)
            .collect();
        let group_rows: usize = group.iter().map(|b| b.len()).sum();
        // the micro-batches' gradients sum here (the factors' by the GEMMs that compute them)
        let step_grads = BlockGrads::default();
        let mut loss_sum = Tensor::zeros((), DType::F32, &device)?;
        let _span = tracing::debug_span!("step", step = state.step + 1).entered();
        for (mi, idx) in group.iter().enumerate() {
            if obs.should_stop() {
                return Err(TrainFailure::Stopped);
            }
            let rows: Vec<Vec<u32>> = idx.iter().map(|i| train[*i].ids.clone()).collect();
            let labels: Vec<usize> = idx.iter().map(|i| train[*i].label).collect();
            let batch = Batch::right_padded(&rows, base.pad_id, &device)?;
            state.tokens_seen += batch.tokens() as u64;
            let micro_seed = hp.seed ^ (state.step * 1024 + mi as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let ctx = LoraCtx::training(Some((dropout, micro_seed)), hp.recomputed_layers())
                .with_mlp_recompute(hp.recomputed_mlp_layers())
                .with_mlp_parking(parking.as_ref())
                .with_kept_norms(!hp.gradient_checkpointing)
                .with_widened(widened.as_ref())
                .with_grads(&step_grads);
            let logits = classifier::logits(&base.llama, Some((&lora, &ctx)), &head_t, &batch)?;
            // each micro-batch weighs by its share of the group's rows
            let share = idx.len() as f64 / group_rows as f64;
            let loss = (weighted_ce(&logits, &labels, class_weights)? * share)?;
            step_grads.absorb(&loss.backward()?, &opt.vars)?;
            // summed on the device: reading each micro-batch's loss would make the host wait for
            // the device (and the device then for the host) every micro-batch
            loss_sum = (loss_sum + loss.detach())?;
        }
        // the step's one wait for the device, before its update: a loss that is not finite fails
        // the step and leaves the adapter as the last step left it
        let loss_sum = loss_sum.to_scalar::<f32>()? as f64;
        if !loss_sum.is_finite() {
            return Err(TrainFailure::Failed(format!("loss is {loss_sum} at step {}", state.step + 1)));
        }
        let grads = step_grads.take_all(&opt.vars)?;
        let lr = learning_rate(hp, state.step, total_steps);
        opt.step(&grads, lr, hp.max_grad_norm)?;
        state.step += 1;
        state.last_loss = Some(loss_sum);
        step_losses.push(loss_sum);
        let epoch_f = state.step as f64 / steps_per_epoch as f64;
        obs.on_step(state.step, total_steps, epoch_f, loss_sum, lr);

        let epoch_end = state.step % steps_per_epoch == 0;
        let eval_due = !val.is_empty()
            && (epoch_end || (hp.eval_every_steps > 0 && state.step % hp.eval_every_steps as u64 == 0));
        let mut eval = None;
        if eval_due {
            let (m, _) = evaluate(&lora, &head_t)?;
            if !m.log_loss.is_finite() {
                // it would become the best checkpoint for good, and the adapter would answer NaN
                return Err(TrainFailure::Failed(format!("validation log loss is {} at step {}", m.log_loss, state.step)));
            }
            obs.on_eval(state.step, &m);
            if state.best.as_ref().is_none_or(|(_, b)| m.log_loss < b.log_loss) {
                state.best = Some((state.step, m));
            }
            eval = Some(m);
        }
        let ckpt_due = epoch_end
            || eval.is_some()
            || (hp.checkpoint_every_steps > 0 && state.step % hp.checkpoint_every_steps as u64 == 0);
        if ckpt_due {
            let dir = save_checkpoint(&state, &opt).map_err(passing("the checkpoint"))?;
            obs.on_checkpoint(state.step, &dir, eval.as_ref());
        }
    }

    // the adapter: the best checkpoint by validation log loss, else the final weights
    let read_best = |step: u64| -> Result<(Lora, Tensor), TrainFailure> {
        let tensors = adapter::read_tensors(&checkpoint_dir(spec.work_dir, step).join(TRAINABLE_FILE))?;
        let best = Lora::from_named(lora.config().clone(), &mcfg, &tensors, &device, None)?;
        let h = tensors
            .get(classifier::HEAD_NAME)
            .ok_or_else(|| TrainFailure::Failed("checkpoint lacks the score head".into()))?
            .to_device(&device)?;
        Ok((best, h))
    };
    let (lora, head_t, best_eval, best_step) = match state.best {
        Some((step, m)) if step != state.step => match read_best(step) {
            Ok((best, h)) => {
                obs.on_log(&format!("using the best checkpoint, step {step} (validation log loss {:.4})", m.log_loss));
                (best, h, Some(m), Some(step))
            }
            // its files are gone (a node that never had them, a lost disk): the run is not thrown
            // away for it
            Err(e) => {
                obs.on_log(&format!("the best checkpoint, step {step}, cannot be read ({e}); using the final weights"));
                (lora, head_t, None, None)
            }
        },
        Some((step, m)) => (lora, head_t, Some(m), Some(step)),
        None => (lora, head_t, None, None),
    };
    let (calibration, length_calibration) = if hp.calibrate && !val.is_empty() {
        let (_, logits) = evaluate(&lora, &head_t)?;
        let labels: Vec<usize> = val.iter().map(|e| e.label).collect();
        let mut c = calibrate::fit_temperature(&logits, &labels);
        obs.on_log(&format!(
            "calibration: temperature {:.3}, validation log loss {:.4} -> {:.4}",
            c.temperature, c.log_loss_before, c.log_loss_after
        ));
        let lengths = if hp.length_calibration {
            fn labelled(rows: &[ArenaRow]) -> Vec<(&ArenaRow, usize)> {
                rows.iter().filter_map(|r| r.label.map(|l| (r, l.index()))).collect()
            }
            let val_rows = labelled(spec.validation_rows);
            let train_rows = labelled(spec.train_rows);
            let fitted = LengthModel::fit(&train_rows).and_then(|m| LengthCalibration::fit(m, &logits, &val_rows));
            if fitted.is_none() {
                obs.on_log(&format!(
                    "length calibration skipped: {} training and {} validation rows, it needs {} of each",
                    train_rows.len(),
                    val_rows.len(),
                    calibrate::MIN_LENGTH_ROWS
                ));
            }
            fitted.map(|lc| {
                let ll = calibrate::length_log_loss(&lc, &logits, &val_rows);
                obs.on_log(&format!(
                    "length calibration: logit weight {:.3}, length weight {:.3}, validation log loss {:.4}",
                    lc.logit_scale, lc.length_scale, ll
                ));
                c.log_loss_with_lengths = Some(ll);
                lc
            })
        } else {
            None
        };
        (Some(c), lengths)
    } else {
        (None, None)
    };
    let temperature = calibration.map_or(1.0, |c| c.temperature);
    let adapter_dir = spec.work_dir.join("adapter");
    let summary = TrainSummary {
        adapter_dir: adapter_dir.clone(),
        steps: state.step,
        train_rows: spec.train_rows.len(),
        validation_rows: val.len(),
        final_train_loss: state.last_loss,
        best_step,
        best_eval,
        calibration,
        temperature,
        tokens_seen: state.tokens_seen,
        train_seconds: started.elapsed().as_secs_f64(),
    };
    let meta = AdapterMeta {
        labels: Vec::new(),
        temperature,
        max_length: hp.max_length,
        base_model: base.name.clone(),
        metrics: serde_json::to_value(&summary).unwrap_or(serde_json::Value::Null),
        length_calibration,
    };
    adapter::save(&adapter_dir, &base.llama, &lora, &head_t, &meta).map_err(passing("the adapter"))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let hp = Hyperparameters { warmup_steps: 2, learning_rate: 1.0, ..Default::default() };
        assert_eq!(learning_rate(&hp, 0, 10), 0.5);
        assert_eq!(learning_rate(&hp, 1, 10), 1.0);
        assert!((learning_rate(&hp, 6, 10) - 0.5).abs() < 1e-12);
        let cos = Hyperparameters { lr_schedule: LrSchedule::Cosine, ..hp };
        assert!((learning_rate(&cos, 6, 10) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn eval_metrics() {
        let probs = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]];
        let m = metrics(&probs, &[0, 1, 2, 1]);
        assert_eq!(m.accuracy, 0.75);
        assert!((m.balanced_accuracy - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
        // exact ties predict the first class among them, not "tie"
        let even = [[1.0 / 3.0; 3], [0.4, 0.4, 0.2]];
        assert_eq!(metrics(&even, &[0, 0]).accuracy, 1.0);
    }

    #[test]
    fn epoch_order_is_seeded_and_covers_every_row() {
        let lengths: Vec<usize> = (0..103).map(|i| i % 17).collect();
        let a = epoch_batches(&lengths, 8, 1, 0);
        assert_eq!(a, epoch_batches(&lengths, 8, 1, 0));
        assert_ne!(a, epoch_batches(&lengths, 8, 1, 1));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
    }
}
