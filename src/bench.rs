//! `arbiter bench`: training and inference throughput, peak memory and achieved TFLOP/s on
//! random data, with random weights of a known shape or a real model, printed as JSON lines.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, Subcommand};

use crate::ml::classifier;
use crate::ml::llama::{known_shape, Batch, Llama};
use crate::ml::lora::{BlockGrads, Lora, LoraConfig, LoraCtx, Widened};
use crate::ml::model::{BaseFormat, BaseModel};
use crate::ml::offload::Parking;

/// Parse `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s.strip_prefix("cuda:").map_or(Ok(0), str::parse)?;
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!("device {s}: this binary was built without CUDA (cargo build --features cuda)");
            }
            let device = Device::new_cuda(n)?;
            crate::ml::pool::retain(&device)?;
            crate::ml::pool::single_stream(&device);
            Ok(device)
        }
        other => anyhow::bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// LoRA training steps (forward, backward, the trainer's AdamW) on random data.
    Train(BenchArgs),
    /// Classifier forward passes on random data.
    Predict(BenchArgs),
    /// Classifier logits of a Hugging Face `LlamaForSequenceClassification` directory
    /// (`config.json`, `*.safetensors` with `score.weight`) for the token-id rows of a JSON file
    /// (`[[ids...], ...]`, right-padded with 0 if ragged), printed as `{"logits": [[a, b, tie], ...]}`:
    /// the Arbiter side of the parity check against transformers (`bench/reference/parity.py`).
    Logits {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        ids: PathBuf,
        #[arg(long, env = "ARBITER_DEVICE", default_value = "cpu")]
        device: String,
        #[arg(long, value_enum, default_value = "auto")]
        base_format: BaseFormat,
    },
    /// Training losses of a Hugging Face `LlamaForSequenceClassification` directory from a
    /// given PEFT adapter (`lora_A`/`lora_B` of each target and `score.weight`, PEFT names):
    /// `--steps` AdamW steps (no weight decay, no dropout) on one batch of token-id rows with
    /// their labels, printed as `{"losses": [...]}`: the Arbiter side of the training parity
    /// check against PEFT (`bench/reference/parity.py --train-steps`).
    Losses {
        #[arg(long)]
        model: PathBuf,
        /// The initial adapter (safetensors, PEFT names); r and the targets are read from it.
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        lora_alpha: f64,
        #[arg(long)]
        ids: PathBuf,
        /// One label per row (0: A, 1: B, 2: tie), comma-separated.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<u32>,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, env = "ARBITER_DEVICE", default_value = "cpu")]
        device: String,
        #[arg(long, value_enum, default_value = "auto")]
        base_format: BaseFormat,
    },
    /// Arbiter's own device kernels against the CPU on random inputs: one JSON line per
    /// comparison; fails when any is beyond its tolerance.
    Kernels {
        #[arg(long, env = "ARBITER_DEVICE", default_value = "cuda")]
        device: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Model shape: llama3-8b or smollm2-135m.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    /// Random weights (no model files needed). Without it, `--model` is loaded.
    #[arg(long)]
    pub random_init: bool,
    #[arg(long, env = "ARBITER_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub base_format: BaseFormat,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Comma-separated batch sizes; each is measured.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch_size: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, env = "ARBITER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// LoRA rank (0: no adapter, prediction only).
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj")]
    pub lora_target_modules: Vec<String>,
    /// The adapters' dropout probability in `bench train` (the reference's 0.05 by default; 0:
    /// no masks drawn).
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Activation checkpointing in `bench train` (each decoder block recomputed in the backward).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// With --gradient-checkpointing: recompute only the first N decoder blocks.
    #[arg(long)]
    pub checkpointed_layers: Option<usize>,
    /// With --checkpointed-layers: the next N blocks recompute only their MLP's gate and up
    /// projections.
    #[arg(long)]
    pub mlp_checkpointed_layers: Option<usize>,
    /// With --mlp-checkpointed-layers: those blocks copy their gate and up projections to host
    /// memory and back instead of recomputing them.
    #[arg(long)]
    pub mlp_offload: bool,
    /// Rows per forward and backward in `bench train`: each step runs the batch as micro-batches
    /// of this many rows, their gradients summed into one optimizer step (the trainer's
    /// gradient accumulation). Default: the whole batch at once.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// `bench predict` on CUDA: run a batch size's forward as a captured CUDA graph where the
    /// prediction engine would (`Served::captures`); `false`: launch every kernel each time.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub graph: bool,
    /// Keep the token embedding table in host memory (`Llama::embeddings_to_host`), as the
    /// worker does with `--host-embeddings`.
    #[arg(long)]
    pub host_embeddings: bool,
}

/// Peak resident memory of this process (Linux `VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device memory in use now (CUDA: total - free, which includes the allocator's cached pool).
fn gpu_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// The peak of `gpu_used` while it lives: a second thread polls it every 100 µs, so the peak
/// inside the backward (where the timed loop has no sampling point) is caught as well as the
/// ones at the loop's own samples (`sample`). `None` off CUDA.
struct PeakSampler {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    device: Device,
}

impl PeakSampler {
    fn start(device: &Device) -> Option<PeakSampler> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let now = gpu_used(device)?;
        let peak = std::sync::Arc::new(AtomicU64::new(now));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (p, st, dev) = (peak.clone(), stop.clone(), device.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                raise_peak(&p, &dev);
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        });
        Some(PeakSampler { peak, stop, thread: Some(thread), device: device.clone() })
    }

    fn sample(&self) {
        raise_peak(&self.peak, &self.device);
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `peak` raised to the device memory in use now, if larger.
fn raise_peak(peak: &std::sync::atomic::AtomicU64, device: &Device) {
    if let Some(u) = gpu_used(device) {
        peak.fetch_max(u, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts (or stops) the CUDA profiler's collection around the measured steps, so that a
/// profiler started with collection off (Nsight Compute's `--profile-from-start off`,
/// `STEPS_ONLY=1 bench/profile_gpu.sh`) sees those steps alone, not the model's initialisation
/// or the warm-up. Without a profiler attached the driver does nothing; its answer is not
/// checked, so the benchmark never fails on it.
fn profiler(device: &Device, start: bool) {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        // the runtime's entry points: the driver's cuProfilerStart lives in cudaProfiler.h, which
        // the link-time driver stub of scripts/setup-cuda-toolkit.sh does not cover
        #[link(name = "cudart")]
        unsafe extern "C" {
            fn cudaProfilerStart() -> i32;
            fn cudaProfilerStop() -> i32;
        }
        // SAFETY: plain runtime calls on the thread's current context (the device's), no memory
        // passed
        let _ = unsafe { if start { cudaProfilerStart() } else { cudaProfilerStop() } };
    }
    let _ = (device, start);
}

fn sync(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

fn hf_logits(model: &std::path::Path, ids: &std::path::Path, device: &Device, fmt: BaseFormat) -> anyhow::Result<()> {
    let llama = Llama::from_hf_dir(model, fmt.weight_format(device), device)?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(ids)?)?;
    let mut head = None;
    for entry in std::fs::read_dir(model)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            if let Some(t) = candle_core::safetensors::load(&path, device)?.remove("score.weight") {
                head = Some(t.to_dtype(DType::F32)?);
            }
        }
    }
    let head = head.ok_or_else(|| anyhow::anyhow!("no score.weight in {}", model.display()))?;
    let batch = Batch::right_padded(&rows, 0, device)?;
    let logits = classifier::logits(&llama, None, &head, &batch)?.to_vec2::<f32>()?;
    println!("{}", serde_json::json!({ "logits": logits }));
    Ok(())
}

struct HfLosses<'a> {
    model: &'a std::path::Path,
    adapter: &'a std::path::Path,
    lora_alpha: f64,
    ids: &'a std::path::Path,
    labels: &'a [u32],
    steps: usize,
    lr: f64,
}

fn hf_losses(a: &HfLosses<'_>, device: &Device, fmt: BaseFormat) -> anyhow::Result<()> {
    let llama = Llama::from_hf_dir(a.model, fmt.weight_format(device), device)?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(a.ids)?)?;
    anyhow::ensure!(rows.len() == a.labels.len(), "{} rows but {} labels", rows.len(), a.labels.len());
    let named: std::collections::BTreeMap<String, Tensor> = candle_core::safetensors::load(a.adapter, &Device::Cpu)?.into_iter().collect();
    let mut targets = Vec::new();
    let mut r = 0;
    for (name, t) in &named {
        if let Some(rest) = name.strip_suffix(".lora_A.weight") {
            let module = rest.rsplit('.').next().unwrap_or_default().to_string();
            if !targets.contains(&module) {
                targets.push(module);
            }
            r = t.dim(0)?;
        }
    }
    let cfg = LoraConfig::from_names(r, a.lora_alpha, 0.0, &targets)?;
    let mut vars = Vec::new();
    let lora = Lora::from_named(cfg, llama.config(), &named, device, Some(&mut vars))?;
    let head0 = named
        .get(classifier::HEAD_NAME)
        .ok_or_else(|| anyhow::anyhow!("{} lacks {}", a.adapter.display(), classifier::HEAD_NAME))?;
    let head = Var::from_tensor(&head0.to_device(device)?.to_dtype(DType::F32)?)?;
    vars.push((classifier::HEAD_NAME.to_string(), head.clone()));
    let mut opt = crate::ml::adamw::AdamW::new(vars.clone(), 0.0)?;
    let batch = Batch::right_padded(&rows, 0, device)?;
    let labels = Tensor::from_vec(a.labels.to_vec(), a.labels.len(), device)?;
    let mut losses = Vec::with_capacity(a.steps);
    let widened = Widened::default();
    for _ in 0..a.steps {
        let step_grads = BlockGrads::default();
        let ctx = LoraCtx::training(None, 0).with_widened(Some(&widened)).with_grads(&step_grads);
        let logits = classifier::logits(&llama, Some((&lora, &ctx)), head.as_tensor(), &batch)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        losses.push(loss.to_scalar::<f32>()?);
        step_grads.absorb(&loss.backward()?, &vars)?;
        let grads = step_grads.take_all(&vars)?;
        opt.step(&grads, a.lr, 0.0)?;
    }
    println!("{}", serde_json::json!({ "losses": losses }));
    Ok(())
}

fn check_kernels(device: &Device) -> anyhow::Result<()> {
    let checks = crate::ml::check_kernels(device)?;
    for c in &checks {
        println!("{}", serde_json::to_string(c)?);
    }
    let failed = checks.iter().filter(|c| !c.ok()).count();
    anyhow::ensure!(failed == 0, "{failed} of {} kernel checks beyond tolerance", checks.len());
    Ok(())
}

pub fn bench(cmd: &BenchCommand) -> anyhow::Result<()> {
    let (args, training) = match cmd {
        BenchCommand::Train(a) => (a, true),
        BenchCommand::Predict(a) => (a, false),
        BenchCommand::Kernels { device } => return check_kernels(&parse_device(device)?),
        BenchCommand::Logits { model, ids, device, base_format } => {
            return hf_logits(model, ids, &parse_device(device)?, *base_format)
        }
        BenchCommand::Losses { model, adapter, lora_alpha, ids, labels, steps, lr, device, base_format } => {
            let device = parse_device(device)?;
            return hf_losses(&HfLosses { model, adapter, lora_alpha: *lora_alpha, ids, labels, steps: *steps, lr: *lr }, &device, *base_format);
        }
    };
    if !(0.0..1.0).contains(&args.lora_dropout) {
        anyhow::bail!("--lora-dropout: {} is not a probability below 1", args.lora_dropout);
    }
    let device = parse_device(&args.device)?;
    // what the CUDA context itself holds, before any weight is loaded
    let context_bytes = gpu_used(&device);
    let fmt = args.base_format.weight_format(&device);
    let mut llama = if args.random_init {
        let cfg = known_shape(&args.shape).ok_or_else(|| anyhow::anyhow!("unknown shape {:?}", args.shape))?;
        Llama::random(cfg, fmt, 1, &device)?
    } else {
        BaseModel::load(&args.model, args.base_format, &device)?.llama
    };
    if args.host_embeddings {
        llama.embeddings_to_host()?;
    }
    // what the load staged (f32 draws, weights before quantizing) leaves the pool
    crate::ml::pool::settle(&device)?;
    let cfg = llama.config().clone();
    let mut vars = Vec::new();
    // --lora-r 0 measures the classifier without an adapter (prediction only)
    let lcfg = LoraConfig::from_names(args.lora_r.max(1), 2.0 * args.lora_r.max(1) as f64, 0.0, &args.lora_target_modules)?;
    let lora = Lora::init(lcfg, &cfg, 1, &device, &mut vars)?;
    if args.lora_r == 0 && training {
        anyhow::bail!("--lora-r 0 is for `bench predict`: training needs an adapter");
    }
    let head = Var::zeros((3, cfg.hidden_size), DType::F32, &device)?;
    vars.push((classifier::HEAD_NAME.to_string(), head.clone()));
    // as the prediction service holds a loaded adapter (merged, for a small model)
    let served = crate::ml::serve::prepare(&llama, &lora)?;
    let opt = std::cell::RefCell::new(crate::ml::adamw::AdamW::new(vars.clone(), 0.0)?);
    for &b in &args.batch_size {
        let ids: Vec<Vec<u32>> = (0..b)
            .map(|i| (0..args.seq_len).map(|j| ((i * 7919 + j * 104_729) % (cfg.vocab_size - 1) + 1) as u32).collect())
            .collect();
        let micro = if training { args.micro_batch.unwrap_or(b).clamp(1, b) } else { b };
        let micro_batches = ids
            .chunks(micro)
            .map(|rows| {
                let labels = (0..rows.len() as u32).map(|i| i % 3).collect::<Vec<_>>();
                Ok((Batch::right_padded(rows, 0, &device)?, Tensor::from_vec(labels, rows.len(), &device)?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let hp = crate::data::hyper::Hyperparameters {
            gradient_checkpointing: args.gradient_checkpointing,
            checkpointed_layers: args.checkpointed_layers,
            mlp_checkpointed_layers: args.mlp_checkpointed_layers,
            mlp_offload: args.mlp_offload,
            ..Default::default()
        };
        if let Some(e) = hp.validate().first() {
            anyhow::bail!("--{}: {}", e.field.trim_start_matches("hyperparameters.").replace('_', "-"), e.reason);
        }
        // host memory for the parked activations, kept across the steps
        let parking = hp.offloads_mlp().then(Parking::default);
        // as the trainer: widened weights unless under activation checkpointing
        let widened = (!hp.gradient_checkpointing).then(Widened::default);
        let infer = LoraCtx::default();
        let (model, adapter) = if args.lora_r > 0 { served.parts(&llama, &infer) } else { (&llama, None) };
        let head_infer = head.as_tensor().detach();
        // captured after one eager forward (the capture's own warm-up), before the peak resets
        let graph = if !training && args.graph && served.captures(b, args.seq_len) {
            crate::ml::graph::ForwardGraph::capture(model, adapter, &head_infer, &micro_batches[0].0)?
        } else {
            None
        };
        crate::ml::pool::reset_peak(&device)?;
        let peak_gpu = PeakSampler::start(&device);
        let sample = || {
            if let Some(p) = &peak_gpu {
                p.sample();
            }
        };
        // the last step's loss: the same data and dropout masks each step, so after the same
        // updates it is the same under any recomputation (a check that theirs are the gradients)
        let last_loss = std::cell::Cell::new(None::<f64>);
        // seconds the host took to queue the training steps' forwards and backwards (up to the
        // loss read, the step's one wait for the device): near the step time, the host bounds
        // the step
        let queued = std::cell::Cell::new(0.0f64);
        let run = |training: bool| -> anyhow::Result<()> {
            let t = Instant::now();
            if training {
                let step_grads = BlockGrads::default();
                // summed on the device and read once before the update, as the trainer does: a
                // read per micro-batch would drain the queue each time
                let mut step_loss = Tensor::zeros((), DType::F32, &device)?;
                for (mi, (batch, labels)) in micro_batches.iter().enumerate() {
                    let ctx = LoraCtx::training((args.lora_dropout > 0.0).then_some((args.lora_dropout, 1 + mi as u64)), hp.recomputed_layers())
                        .with_mlp_recompute(hp.recomputed_mlp_layers())
                        .with_mlp_parking(parking.as_ref())
                        .with_kept_norms(!hp.gradient_checkpointing)
                        .with_widened(widened.as_ref())
                        .with_grads(&step_grads);
                    let logits = classifier::logits(&llama, Some((&lora, &ctx)), head.as_tensor(), batch)?;
                    sample();
                    // each micro-batch weighs by its share of the rows, as in the trainer
                    let share = labels.dim(0)? as f64 / b as f64;
                    let loss = (candle_nn::loss::cross_entropy(&logits, labels)? * share)?;
                    step_grads.absorb(&loss.backward()?, &vars)?;
                    crate::ml::pool::trace(&device, "micro-batch", mi);
                    step_loss = (step_loss + loss.detach())?;
                }
                queued.set(queued.get() + t.elapsed().as_secs_f64());
                last_loss.set(Some(step_loss.to_scalar::<f32>()? as f64));
                let grads = step_grads.take_all(&vars)?;
                // the trainer's optimizer, as the reference benchmark steps torch's AdamW
                opt.borrow_mut().step(&grads, 1e-4, 0.0)?;
            } else if let Some(g) = &graph {
                let _ = g.run(&micro_batches[0].0)?;
            } else {
                let logits = classifier::logits(model, adapter, &head_infer, &micro_batches[0].0)?;
                let _ = logits.to_vec2::<f32>()?;
            }
            sample();
            Ok(())
        };
        for _ in 0..args.warmup {
            run(training)?;
        }
        sync(&device)?;
        queued.set(0.0);
        let t0 = Instant::now();
        profiler(&device, true);
        for _ in 0..args.steps {
            run(training)?;
        }
        sync(&device)?;
        let secs = t0.elapsed().as_secs_f64();
        profiler(&device, false);
        let tokens = (b * args.seq_len * args.steps) as f64;
        // the reference benchmark's FLOP model: N = matmul parameters (blocks + score head);
        // causal attention averages T/2 keys; frozen-base LoRA training = fwd 2N + input-grad
        // bwd 2N, attention and LoRA fwd + 2x bwd
        let (d, l) = (cfg.hidden_size as f64, cfg.num_layers as f64);
        let (qd, kvd) = ((cfg.num_heads * cfg.head_dim) as f64, (cfg.num_kv_heads * cfg.head_dim) as f64);
        let n_mm = l * (2.0 * d * qd + 2.0 * d * kvd + 3.0 * d * cfg.intermediate_size as f64) + 3.0 * d;
        let attn = l * 2.0 * 2.0 * (args.seq_len as f64 / 2.0) * qd;
        let lora_fwd = l * 2.0 * args.lora_r as f64 * ((d + qd) * 2.0 + (d + kvd) * 2.0);
        let flops_per_token =
            if training { 4.0 * n_mm + 3.0 * attn + 3.0 * lora_fwd } else { 2.0 * n_mm + attn + lora_fwd };
        let report = serde_json::json!({
            "mode": if training { "train" } else { "predict" },
            "shape": if args.random_init { args.shape.clone() } else { args.model.display().to_string() },
            "device": args.device,
            "base_format": format!("{:?}", fmt),
            "gradient_checkpointing": training && args.gradient_checkpointing,
            "checkpointed_layers": (training && args.gradient_checkpointing)
                .then(|| args.checkpointed_layers.unwrap_or(cfg.num_layers).min(cfg.num_layers)),
            "mlp_checkpointed_layers": (training && args.gradient_checkpointing).then(|| {
                let full = args.checkpointed_layers.unwrap_or(cfg.num_layers).min(cfg.num_layers);
                hp.recomputed_mlp_layers().min(cfg.num_layers - full)
            }),
            "mlp_offload": training && hp.offloads_mlp(),
            "micro_batch": training.then_some(micro),
            "lora_dropout": training.then_some(args.lora_dropout),
            "host_embeddings": llama.host_embeddings().is_some(),
            "host_embeddings_mapped": llama.host_embeddings().unwrap_or(false),
            "graph": graph.is_some(),
            "seq_len": args.seq_len,
            "batch_size": b,
            "steps": args.steps,
            "seconds": secs,
            "last_loss": last_loss.get(),
            "tokens_per_s": tokens / secs,
            "sequences_per_s": (b * args.steps) as f64 / secs,
            "ms_per_step": secs * 1000.0 / args.steps as f64,
            "host_queue_ms_per_step": training.then(|| queued.get() * 1000.0 / args.steps as f64),
            "tflops": flops_per_token * tokens / secs / 1e12,
            "mfu_vs_790": flops_per_token * tokens / secs / 790e12,
            "peak_rss_bytes": peak_rss(),
            "peak_gpu_bytes": peak_gpu.map(PeakSampler::finish),
            // what tensors held at most (PyTorch's max_memory_allocated), without the CUDA
            // context, loaded modules and the pool's unused reserve that peak_gpu_bytes counts
            "peak_allocated_bytes": crate::ml::pool::peak_in_use(&device)?,
            // captured forwards allocate from the graphs' own pool, outside the figure above
            "graph_reserved_bytes": if graph.is_some() { crate::ml::pool::graph_reserved(&device)? } else { None },
            "gpu_context_bytes": context_bytes,
            "weight_bytes": llama.weight_bytes(),
        });
        println!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Command, Settings};
    use clap::Parser;

    fn bench_of(args: &[&str]) -> super::BenchCommand {
        let all = ["arbiter", "bench", "train", "--random-init"].iter().chain(args).copied();
        match Settings::try_parse_from(all).unwrap().command {
            Command::Bench(b) => b,
            other => panic!("not a bench command: {other:?}"),
        }
    }

    #[test]
    fn lora_dropout_defaults_to_the_reference_and_is_refused_outside_a_probability() {
        match bench_of(&[]) {
            super::BenchCommand::Train(a) => assert_eq!(a.lora_dropout, 0.05),
            other => panic!("{other:?}"),
        }
        for bad in ["1", "-0.1", "NaN"] {
            // refused before any model is built
            let e = super::bench(&bench_of(&[&format!("--lora-dropout={bad}")])).unwrap_err().to_string();
            assert!(e.starts_with("--lora-dropout: "), "{bad}: {e}");
        }
    }
}
