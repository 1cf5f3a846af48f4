//! Captured classifier forwards (CUDA graphs). A small model's forward at a small batch is
//! bound by the host, not the GPU: some five hundred kernel launches, each several µs of work
//! in candle and the driver, around a millisecond of kernels. Captured once for a batch shape,
//! the whole forward replays as one graph launch: the new ids and last positions are copied
//! into the captured inputs, the graph runs every kernel at the addresses it captured, and the
//! logits land in the output it captured.
//!
//! A capture holds the model's weights by address only: whoever keeps a `ForwardGraph` keeps
//! the model it was captured from alive (the prediction engine keeps its adapter's `Arc`).
//! Work is captured from, and replays on, the calling thread's stream (candle's CUDA device
//! runs each thread's work on that thread's default stream), so a graph is run by the thread
//! that captured it.

use candle_core::Tensor;

use super::classifier;
use super::llama::{Batch, ForwardInputs, Llama};
use super::lora::{Lora, LoraCtx};
use super::MlError;

/// One captured forward: the classifier's logits for batches of one shape.
pub struct ForwardGraph {
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    inputs: ForwardInputs,
    logits: Tensor,
}

impl ForwardGraph {
    /// Capture the classifier forward of `batch`'s shape (rows, padded width, row starts) on
    /// `llama` with `lora` and `head`. `None` where the device has no graphs (the CPU, or a
    /// build without CUDA). The forward runs once eagerly first, so every kernel module and
    /// library workspace it needs exists before the capture (none may be created within it).
    pub fn capture(
        llama: &Llama,
        lora: Option<(&Lora, &LoraCtx)>,
        head: &Tensor,
        batch: &Batch,
    ) -> Result<Option<ForwardGraph>, MlError> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = llama.device() {
            use candle_core::cuda_backend::cudarc::driver::sys;
            use candle_core::cuda_backend::WrapErr;
            if lora.is_some_and(|(l, ctx)| l.tracked() || ctx.dropout.is_some() || ctx.block_grads.is_some()) {
                return Err(MlError::Input("a captured forward is for inference: untracked factors, no dropout".into()));
            }
            // the captured inputs own their ids: `run` copies each batch's into them
            let own = Batch { ids: batch.ids.copy()?, spans: batch.spans.clone() };
            let inputs = llama.inputs(&own, true)?;
            // candle uploads the dims and strides of a strided op's operands from the host each
            // time; a capture would keep the host address of a vector long freed. With this
            // cache on (for this thread) the warm-up forward uploads each once, and the capture
            // reuses those device copies, or fails, rather than capture an upload. The inputs
            // above are made before it: their contents change, so they must not be cached. The
            // cached copies (a few hundred bytes per shape's op) stay for the thread's life.
            let _params = dev.enable_cuda_graph_htod_cache();
            let logits = classifier::logits_from(llama, lora, head, &inputs)?.copy()?;
            llama.device().synchronize()?;
            let stream = dev.cuda_stream();
            // thread-local: another thread's work (a training job on the same GPU) goes on
            // and is neither captured nor refused
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
            // every tensor the forward makes is freed inside the capture, so the graph owns
            // its memory; only the copy into `logits` outlives a launch
            let captured = classifier::logits_from(llama, lora, head, &inputs).and_then(|l| Ok(logits.slice_set(&l, 0, 0)?));
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
            captured?;
            let graph = graph?.ok_or_else(|| MlError::Model("the capture recorded no graph".into()))?;
            graph.upload().w()?;
            drop(_params);
            return Ok(Some(ForwardGraph { graph, inputs, logits }));
        }
        let _ = (llama, lora, head, batch);
        Ok(None)
    }

    /// Logits of `batch` (the captured shape and starts): its ids copied into the captured
    /// inputs, one launch, the output read back.
    pub fn run(&self, batch: &Batch) -> Result<Vec<[f32; 3]>, MlError> {
        self.inputs.refill(batch)?;
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            self.graph.launch().w()?;
        }
        Ok(self.logits.to_vec2::<f32>()?.into_iter().map(|r| [r[0], r[1], r[2]]).collect())
    }
}

/// Captured forwards against the same forwards launched kernel by kernel (`arbiter bench
/// kernels`): a small random bf16 model with adapter factors beside its attention linears and
/// a random head; two right-padded batches of one shape, the second (other ids, other lengths)
/// run through the first one's capture. Nothing on a device without graphs.
pub fn check_device(device: &candle_core::Device) -> candle_core::Result<Vec<super::KernelCheck>> {
    use candle_core::DType;

    use super::llama::{Config, WeightFormat};
    use super::lora::LoraConfig;
    let err = |e: MlError| candle_core::Error::Msg(e.to_string());
    let cfg = Config::small(2);
    let llama = Llama::random(cfg.clone(), WeightFormat::Dense(DType::BF16), 7, device).map_err(err)?;
    let targets: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).into();
    let mut vars = Vec::new();
    let lcfg = LoraConfig::from_names(8, 16.0, 0.0, &targets).map_err(err)?;
    let lora = Lora::init(lcfg, &cfg, 7, device, &mut vars).map_err(err)?;
    // B starts at zero: draw it, so the factors change the logits
    for (name, v) in &vars {
        if name.contains("lora_B") {
            v.set(&(Tensor::randn(0f32, 1f32, v.shape(), device)? * 0.05)?)?;
        }
    }
    let lora = lora.for_inference(DType::BF16).map_err(err)?;
    let head = Tensor::randn(0f32, 1f32, (3, cfg.hidden_size), device)?;
    let rows = |seed: usize, lens: &[usize]| -> Vec<Vec<u32>> {
        lens.iter()
            .enumerate()
            .map(|(r, &n)| (0..n).map(|j| ((seed * 131 + r * 7919 + j * 104_729) % 999 + 1) as u32).collect())
            .collect()
    };
    let a = Batch::right_padded(&rows(1, &[40, 64, 17]), 0, device).map_err(err)?;
    let b = Batch::right_padded(&rows(2, &[64, 3, 50]), 0, device).map_err(err)?;
    let ctx = LoraCtx::default();
    let adapter = Some((&lora, &ctx));
    let Some(graph) = ForwardGraph::capture(&llama, adapter, &head, &a).map_err(err)? else {
        return Ok(Vec::new());
    };
    // the same model with its embedding table in host memory (`Llama::embeddings_to_host`)
    let mut host = llama.clone();
    host.embeddings_to_host().map_err(err)?;
    let host_graph = ForwardGraph::capture(&host, adapter, &head, &a).map_err(err)?;
    let mut checks = Vec::new();
    // the same kernels on the same inputs: only a different GEMM algorithm could differ, by
    // bf16 rounding; stale inputs would differ by the logits' own size (about 1)
    let mut compare = |kernel: &'static str, batch: &Batch, got: Vec<[f32; 3]>| -> candle_core::Result<()> {
        let want = classifier::logits(&llama, adapter, &head, batch).map_err(err)?.to_vec2::<f32>()?;
        let max_abs_diff = if want.len() != got.len() {
            f32::INFINITY
        } else {
            want.iter().zip(&got).flat_map(|(w, g)| w.iter().zip(g).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max)
        };
        checks.push(super::KernelCheck { kernel, dtype: "bf16".into(), chunk: (0, 0), max_abs_diff, tolerance: 1e-3 });
        Ok(())
    };
    for (kernel, batch) in [("graph-forward", &a), ("graph-forward-refilled", &b)] {
        compare(kernel, batch, graph.run(batch).map_err(err)?)?;
    }
    let rows3 = |t: Tensor| -> candle_core::Result<Vec<[f32; 3]>> { Ok(t.to_vec2::<f32>()?.into_iter().map(|r| [r[0], r[1], r[2]]).collect()) };
    compare("host-embeddings-forward", &b, rows3(classifier::logits(&host, adapter, &head, &b).map_err(err)?)?)?;
    if let Some(g) = &host_graph {
        for (kernel, batch) in [("host-embeddings-graph", &a), ("host-embeddings-graph-refilled", &b)] {
            compare(kernel, batch, g.run(batch).map_err(err)?)?;
        }
    }
    // the device reads the table in place: no host copy hides behind an equal result
    let mapped = host.host_embeddings() == Some(true);
    checks.push(super::KernelCheck { kernel: "host-embeddings-mapped", dtype: "bf16".into(), chunk: (0, 0), max_abs_diff: if mapped { 0.0 } else { 1.0 }, tolerance: 0.0 });
    // the tied output matrix went to the host with the table: its logits are multiplied there
    let want = llama.next_token_logits(&b).map_err(err)?.to_device(&candle_core::Device::Cpu)?;
    let got = host.next_token_logits(&b).map_err(err)?;
    checks.push(super::KernelCheck::relative("host-embeddings-lm-head", "bf16".into(), (0, 0), &want, &got, 1.0 / 128.0)?);
    Ok(checks)
}
