//! The inference engine: one thread owns the forward passes and is reached through a channel.
//!
//! - **Requests** carry already-tokenized rows, the adapter to score them with and a oneshot
//!   reply. Tokenizing happens in the caller (the HTTP handler, on the blocking pool): it is
//!   CPU work that needs no model weights, so it runs in parallel with the forward pass of the
//!   batch before instead of stalling the one thread that owns the model, and the caller needs
//!   the token counts anyway (truncation flags, `usage`, the queue bound).
//! - **Dynamic batching**: the engine waits at most `max_wait` after it first sees a request
//!   for more to arrive (less when `batch_tokens` are already waiting), then takes requests in
//!   arrival order until their tokens fill `batch_tokens`. The rows of one round are grouped
//!   by adapter, sorted by length (to cut padding) and packed into micro-batches whose
//!   *padded* size stays under `batch_tokens`. Every request gets its own rows' logits back,
//!   in its own order, as soon as its last micro-batch is done. With batching off, requests
//!   are run one at a time (a request's own rows still share forwards): the baseline of the
//!   load benchmark.
//! - **Back-pressure**: the rows waiting or running are counted; a request that would push the
//!   count over `queue_rows` is refused at once with [`ServeError::Overloaded`], with a retry
//!   hint from the measured throughput. Memory never grows without bound.
//! - **Models**: base models are loaded once per path, on first use (or ahead with
//!   [`Engine::preload`]), and shared by every adapter trained on them; an LRU cache keeps
//!   `adapter_cache` adapters hot, loaded on first use from the directory the caller names,
//!   off the engine thread. A request holds its adapter (and so its base) through an `Arc`,
//!   so an eviction never pulls weights from under a running batch.
//! - **Errors** are `Clone`: when a micro-batch fails every request in it gets the error. A
//!   panic inside a forward is caught; its requests get an internal error and the engine
//!   keeps serving.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::adapter::{self, AdapterMeta};
use super::classifier;
use super::graph::ForwardGraph;
use super::llama::{Batch, Llama};
use super::lora::{Lora, LoraCtx};
use super::model::BaseModel;
use super::MlError;
use crate::data::template::Encoded;
use crate::data::ArenaRow;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Padded tokens (rows x longest row) per forward pass; also how many waiting tokens
    /// end the batching window early.
    pub batch_tokens: usize,
    /// Longest wait after a request is first seen for others to join its batch.
    pub max_wait: Duration,
    /// Rows waiting or running at once; beyond it requests are refused as overloaded.
    pub queue_rows: usize,
    /// Adapters kept loaded at once (least recently used evicted first).
    pub adapter_cache: usize,
    /// Base models kept loaded at once (least recently used evicted first, with its adapters).
    pub base_cache: usize,
    /// Merge requests into shared batches (off: one request at a time).
    pub batching: bool,
    /// Captured forwards (CUDA graphs) kept at once on a GPU, for the batches
    /// `Served::captures` names (0: every forward launches its kernels one by one).
    pub graphs: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_tokens: 4096,
            max_wait: Duration::from_millis(5),
            queue_rows: 1024,
            adapter_cache: 4,
            base_cache: 1,
            batching: true,
            graphs: 16,
        }
    }
}

/// Why a request was not scored. Cloned to every request of a failed batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The queue is full; try again after about `retry_after_s` seconds.
    #[error("the predictor is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    /// The adapter's base model cannot be loaded (the cause is logged).
    #[error("the base model of this adapter cannot be loaded")]
    BaseModel,
    /// The engine has stopped.
    #[error("the predictor is unavailable")]
    Unavailable,
    /// The adapter's files are missing, unreadable or do not fit its base model.
    #[error("adapter {key} cannot be loaded for its base model")]
    Adapter { key: String },
    /// The request cannot be scored as given (empty row, more rows than the queue holds).
    #[error("{0}")]
    Input(String),
    /// A forward pass failed (the cause is logged, not returned).
    #[error("inference failed")]
    Internal,
}

/// An adapter ready for inference, with its base: merged into a copy of the adapted weights
/// when that copy is small (`prepare`), else its factors prepared once (`Lora::for_inference`).
pub struct LoadedAdapter {
    /// The caller's key (the adapter's id in the store).
    pub key: String,
    pub dir: PathBuf,
    pub meta: AdapterMeta,
    pub base: Arc<BaseModel>,
    served: Served,
    head: Tensor,
}

/// How a loaded adapter runs its forwards (`prepare`).
pub enum Served {
    /// The base with the adapter merged into copies of the adapted weights.
    Merged(Llama),
    /// The shared base, the adapter's factors applied beside each adapted linear.
    Factors(Lora),
}

/// Padded tokens up to which a large model's forward (its adapter's factors beside the base) is
/// captured: beyond, its GEMMs take far longer than the launches, and each capture would hold
/// gigabytes of activations of its own.
pub const GRAPH_FACTORS_MAX_TOKENS: usize = 2048;

impl Served {
    /// Whether a forward of `rows` rows `width` tokens wide is captured as a CUDA graph: any
    /// batch of a merged (small) model, whose forwards wait on the host's launches even at 32
    /// rows, and small batches of a large one.
    pub fn captures(&self, rows: usize, width: usize) -> bool {
        match self {
            Served::Merged(_) => true,
            Served::Factors(_) => rows * width <= GRAPH_FACTORS_MAX_TOKENS,
        }
    }

    /// The model and adapter a forward runs through, on `base`.
    pub fn parts<'a>(&'a self, base: &'a Llama, ctx: &'a LoraCtx) -> (&'a Llama, Option<(&'a Lora, &'a LoraCtx)>) {
        match self {
            Served::Merged(m) => (m, None),
            Served::Factors(l) => (base, Some((l, ctx))),
        }
    }
}

/// Largest copy of adapted weights merged per loaded adapter. Small models are bound by kernel
/// launches (merged, an adapted linear is one GEMM instead of three); a large model's copies
/// would cost gigabytes per hot adapter for little gain, its GEMMs dominating.
pub const MERGE_MAX_BYTES: usize = 256 << 20;

/// `lora` ready to serve on `base`: merged where the copies take at most `MERGE_MAX_BYTES` and
/// the adapted weights are dense, else prepared factors.
pub fn prepare(base: &Llama, lora: &Lora) -> Result<Served, MlError> {
    if base.merged_bytes(lora) <= MERGE_MAX_BYTES {
        if let Some(m) = base.merged(lora)? {
            return Ok(Served::Merged(m));
        }
    }
    Ok(Served::Factors(lora.for_inference(base.dtype())?))
}

impl LoadedAdapter {
    /// Encode one arena row with the base's tokenizer and template (CPU work: call it from a
    /// blocking context).
    pub fn encode(&self, row: &ArenaRow, max_length: usize) -> Encoded {
        self.base.encode_row(row, max_length)
    }
}

impl std::fmt::Debug for LoadedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedAdapter").field("key", &self.key).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Logits `[a, b, tie]` of each row of a request, in the request's order.
pub type Logits = Vec<[f32; 3]>;

/// Loads a base model from a path (a GGUF file or a Hugging Face directory).
pub type BaseLoader = dyn Fn(&Path) -> Result<BaseModel, MlError> + Send + Sync;

/// Counters shared by the handle and the engine thread.
struct Shared {
    queued_rows: AtomicUsize,
    queued_tokens: AtomicUsize,
    /// Exponential moving average of padded tokens per second (f64 bits; 0 = unknown).
    tokens_per_s: AtomicU64,
    batches: AtomicU64,
    rows_done: AtomicU64,
    /// Forwards captured as CUDA graphs, and forwards run by replaying one.
    graphs_captured: AtomicU64,
    graph_runs: AtomicU64,
}

impl Shared {
    fn retry_after_s(&self) -> u64 {
        let rate = f64::from_bits(self.tokens_per_s.load(Ordering::Relaxed));
        let tokens = self.queued_tokens.load(Ordering::Relaxed) as f64;
        if rate > 0.0 {
            (tokens / rate).ceil().clamp(1.0, 60.0) as u64
        } else {
            1
        }
    }

    fn record_rate(&self, padded_tokens: usize, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let now = padded_tokens as f64 / secs;
        let old = f64::from_bits(self.tokens_per_s.load(Ordering::Relaxed));
        let new = if old > 0.0 { 0.8 * old + 0.2 * now } else { now };
        self.tokens_per_s.store(new.to_bits(), Ordering::Relaxed);
    }
}

/// A reservation of queue room, released when the request is answered or dropped.
struct Permit {
    shared: Arc<Shared>,
    rows: usize,
    tokens: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.queued_rows.fetch_sub(self.rows, Ordering::AcqRel);
        self.shared.queued_tokens.fetch_sub(self.tokens, Ordering::AcqRel);
    }
}

struct Job {
    adapter: Arc<LoadedAdapter>,
    rows: Vec<Vec<u32>>,
    tokens: usize,
    reply: oneshot::Sender<Result<Logits, ServeError>>,
    span: tracing::Span,
    _permit: Permit,
}

/// A small LRU map (entries stamped with a use counter; eviction scans, as the maps hold a
/// handful of models).
struct Lru<V> {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (u64, V)>,
}

impl<V: Clone> Lru<V> {
    fn new(capacity: usize) -> Lru<V> {
        Lru { capacity: capacity.max(1), tick: 0, entries: HashMap::new() }
    }

    fn get(&mut self, key: &str) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(used, v)| {
            *used = tick;
            v.clone()
        })
    }

    /// Insert, returning what was evicted.
    fn insert(&mut self, key: String, v: V) -> Vec<V> {
        self.tick += 1;
        self.entries.insert(key, (self.tick, v));
        let mut evicted = Vec::new();
        while self.entries.len() > self.capacity {
            let oldest = self.entries.iter().min_by_key(|(_, (used, _))| *used).map(|(k, _)| k.clone());
            match oldest.and_then(|k| self.entries.remove(&k)) {
                Some((_, v)) => evicted.push(v),
                None => break,
            }
        }
        evicted
    }

    /// Keep only the entries `keep` accepts.
    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.entries.retain(|_, (_, v)| keep(v));
    }

    fn keys_by_recency(&self) -> Vec<String> {
        let mut v: Vec<(u64, &String)> = self.entries.iter().map(|(k, (t, _))| (*t, k)).collect();
        v.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        v.into_iter().map(|(_, k)| k.clone()).collect()
    }
}

/// Handle to the engine; cheap to clone. The engine thread stops once every handle is gone
/// and the requests already queued are answered.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
    cfg: EngineConfig,
    loader: Box<BaseLoader>,
    bases: Mutex<Lru<Arc<BaseModel>>>,
    adapters: Mutex<Lru<Arc<LoadedAdapter>>>,
    /// Serializes model loads so a burst of requests for a cold model loads it once.
    loading: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // the guarded maps stay consistent even if a holder panicked
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn path_key(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Engine {
    /// Start the engine thread. Base models are loaded with `loader` on first use.
    pub fn new<F>(cfg: EngineConfig, loader: F) -> Result<Engine, MlError>
    where
        F: Fn(&Path) -> Result<BaseModel, MlError> + Send + Sync + 'static,
    {
        if cfg.batch_tokens == 0 || cfg.queue_rows == 0 || cfg.adapter_cache == 0 || cfg.base_cache == 0 {
            return Err(MlError::Config("batch tokens, queue rows and cache sizes must be at least 1".into()));
        }
        let shared = Arc::new(Shared {
            queued_rows: AtomicUsize::new(0),
            queued_tokens: AtomicUsize::new(0),
            tokens_per_s: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            rows_done: AtomicU64::new(0),
            graphs_captured: AtomicU64::new(0),
            graph_runs: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_shared = shared.clone();
        let thread_cfg = cfg.clone();
        std::thread::Builder::new()
            .name("arbiter-engine".into())
            .spawn(move || run_engine(&thread_cfg, &thread_shared, rx))?;
        Ok(Engine {
            inner: Arc::new(Handle {
                shared,
                tx,
                bases: Mutex::new(Lru::new(cfg.base_cache)),
                adapters: Mutex::new(Lru::new(cfg.adapter_cache)),
                cfg,
                loader: Box::new(loader),
                loading: Mutex::new(()),
            }),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Make an already loaded base model the one served for `path` (sharing its weights).
    pub fn insert_base(&self, path: &Path, base: Arc<BaseModel>) {
        self.evict_bases(lock(&self.inner.bases).insert(path_key(path), base));
    }

    /// Load the base at `path` on a background thread, so the first request does not wait.
    pub fn preload(&self, path: &Path) {
        let engine = self.clone();
        let path = path.to_path_buf();
        let spawned = std::thread::Builder::new().name("arbiter-preload".into()).spawn(move || {
            if engine.base(&path).is_err() {
                tracing::warn!("preloading the base model failed; it will be retried on first use");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the preload thread");
        }
    }

    /// The base model at `path`, loading it on first use (blocking: seconds for a real model).
    /// A failed load is not remembered: the next request tries again.
    pub fn base(&self, path: &Path) -> Result<Arc<BaseModel>, ServeError> {
        if let Some(b) = lock(&self.inner.bases).get(&path_key(path)) {
            return Ok(b);
        }
        let loading = lock(&self.inner.loading);
        self.base_while_loading(path, &loading)
    }

    /// [`Engine::base`] for a caller that holds the loading lock.
    fn base_while_loading(&self, path: &Path, _loading: &MutexGuard<'_, ()>) -> Result<Arc<BaseModel>, ServeError> {
        let key = path_key(path);
        if let Some(b) = lock(&self.inner.bases).get(&key) {
            return Ok(b);
        }
        let started = Instant::now();
        let base = (self.inner.loader)(path).map_err(|e| {
            tracing::error!(model = %path.display(), error = %e, "cannot load base model");
            ServeError::BaseModel
        })?;
        let base = Arc::new(base);
        tracing::info!(model = %base.name, seconds = started.elapsed().as_secs_f64(), "base model loaded for serving");
        self.evict_bases(lock(&self.inner.bases).insert(key, base.clone()));
        Ok(base)
    }

    /// Adapters of evicted bases go too, so the base's memory is freed once in-flight
    /// requests finish.
    fn evict_bases(&self, evicted: Vec<Arc<BaseModel>>) {
        if evicted.is_empty() {
            return;
        }
        let mut adapters = lock(&self.inner.adapters);
        adapters.entries.retain(|_, (_, a)| !evicted.iter().any(|b| Arc::ptr_eq(b, &a.base)));
    }

    /// The adapter under `key`, loading it (and its base) on first use (blocking: file reads).
    pub fn adapter(&self, key: &str, dir: &Path, base_path: &Path) -> Result<Arc<LoadedAdapter>, ServeError> {
        let fresh = |a: &Arc<LoadedAdapter>| a.dir == dir && a.base.path == base_path;
        if let Some(a) = lock(&self.inner.adapters).get(key).filter(fresh) {
            return Ok(a);
        }
        // the base and the adapter in one hold of the loading lock: no other load can evict the
        // base in between, which would leave the adapter on a base outside the cache
        let loading = lock(&self.inner.loading);
        if let Some(a) = lock(&self.inner.adapters).get(key).filter(fresh) {
            return Ok(a);
        }
        let base = self.base_while_loading(base_path, &loading)?;
        let started = Instant::now();
        let (served, loaded) = adapter::load(dir, &base.llama)
            .and_then(|a| Ok((prepare(&base.llama, &a.lora)?, a)))
            .map_err(|e| {
                tracing::warn!(adapter = key, error = %e, "cannot load adapter");
                ServeError::Adapter { key: key.to_string() }
            })?;
        let a = Arc::new(LoadedAdapter {
            key: key.to_string(),
            dir: dir.to_path_buf(),
            meta: loaded.meta,
            base,
            served,
            head: loaded.head.detach(),
        });
        tracing::info!(adapter = key, seconds = started.elapsed().as_secs_f64(), "adapter loaded");
        lock(&self.inner.adapters).insert(key.to_string(), a.clone());
        Ok(a)
    }

    /// Drops the adapter under `key` from the cache (it was deleted); requests already holding
    /// it finish with it.
    pub fn forget_adapter(&self, key: &str) {
        lock(&self.inner.adapters).entries.remove(key);
    }

    /// Keys of the adapters loaded now, most recently used first.
    pub fn hot_adapters(&self) -> Vec<String> {
        lock(&self.inner.adapters).keys_by_recency()
    }

    /// Queue `rows` for scoring with `adapter`; fails at once when the queue is full. The
    /// returned future resolves to one logit triple per row, in order.
    pub fn submit(
        &self,
        adapter: Arc<LoadedAdapter>,
        rows: Vec<Vec<u32>>,
    ) -> Result<impl std::future::Future<Output = Result<Logits, ServeError>>, ServeError> {
        if rows.is_empty() {
            return Err(ServeError::Input("nothing to score".into()));
        }
        if rows.iter().any(Vec::is_empty) {
            return Err(ServeError::Input("every row needs at least one token".into()));
        }
        let shared = &self.inner.shared;
        let n = rows.len();
        if n > self.inner.cfg.queue_rows {
            return Err(ServeError::Input(format!(
                "{n} rows exceed the predictor's queue of {} rows",
                self.inner.cfg.queue_rows
            )));
        }
        let tokens: usize = rows.iter().map(Vec::len).sum();
        // reserve room: a compare-and-swap loop so concurrent callers never overshoot
        let mut cur = shared.queued_rows.load(Ordering::Acquire);
        loop {
            if cur + n > self.inner.cfg.queue_rows {
                return Err(ServeError::Overloaded { retry_after_s: shared.retry_after_s() });
            }
            match shared.queued_rows.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        shared.queued_tokens.fetch_add(tokens, Ordering::AcqRel);
        let permit = Permit { shared: shared.clone(), rows: n, tokens };
        let (reply, rx) = oneshot::channel();
        let job = Job { adapter, rows, tokens, reply, span: tracing::Span::current(), _permit: permit };
        self.inner.tx.send(job).map_err(|_| ServeError::Unavailable)?;
        Ok(async move {
            match rx.await {
                Ok(r) => r,
                // the engine dropped the request without answering: it stopped
                Err(_) => Err(ServeError::Unavailable),
            }
        })
    }

    /// Submit and wait.
    pub async fn score(&self, adapter: Arc<LoadedAdapter>, rows: Vec<Vec<u32>>) -> Result<Logits, ServeError> {
        self.submit(adapter, rows)?.await
    }

    /// Rows waiting or running now.
    pub fn queued_rows(&self) -> usize {
        self.inner.shared.queued_rows.load(Ordering::Relaxed)
    }

    /// Forward passes run and rows scored since start.
    pub fn counters(&self) -> (u64, u64) {
        (self.inner.shared.batches.load(Ordering::Relaxed), self.inner.shared.rows_done.load(Ordering::Relaxed))
    }

    /// Forwards captured as CUDA graphs so far, and forwards run by replaying one.
    pub fn graph_counters(&self) -> (u64, u64) {
        let s = &self.inner.shared;
        (s.graphs_captured.load(Ordering::Relaxed), s.graph_runs.load(Ordering::Relaxed))
    }
}

/// Padded widths of captured forwards are multiples of this many tokens, so rows of nearby
/// lengths share a capture (right padding changes no valid position's state).
pub const GRAPH_WIDTH_STEP: usize = 64;

/// The engine thread's captured forwards (`graph::ForwardGraph`) on a GPU, where
/// `Served::captures` says they pay, by adapter, rows and padded width, the least recently used
/// evicted. A shape is captured the second time it is seen, so one-off shapes cost no capture. An entry holds its adapter (its graph
/// reads the adapter's weights by address) until the adapter has left the adapter cache and
/// no request holds it. Graphs stay on the thread that captured them.
struct Graphs {
    captured: Lru<std::rc::Rc<Captured>>,
    seen: Lru<()>,
    capacity: usize,
    /// A capture failed: the engine launches kernel by kernel from then on.
    failed: bool,
}

/// A captured forward and the adapter whose weights it reads.
struct Captured {
    adapter: Arc<LoadedAdapter>,
    graph: ForwardGraph,
}

impl Graphs {
    fn new(capacity: usize) -> Graphs {
        Graphs { captured: Lru::new(capacity), seen: Lru::new(4 * capacity), capacity, failed: false }
    }

    /// Drop the graphs of adapters only they still hold.
    fn forget_unloaded(&mut self) {
        self.captured.retain(|g| Arc::strong_count(&g.adapter) > 1);
    }

    /// The captured forward for `ids` on `adapter` and the batch padded to its width, capturing
    /// it if this shape was seen before; `None` where graphs do not apply (the CPU, a large
    /// forward of a large model, graphs off or failed, a first sighting).
    fn find(
        &mut self,
        adapter: &Arc<LoadedAdapter>,
        ids: &[Vec<u32>],
        shared: &Shared,
    ) -> Result<Option<(std::rc::Rc<Captured>, Batch)>, MlError> {
        let ctx = LoraCtx::default();
        let (model, lora) = adapter.served.parts(&adapter.base.llama, &ctx);
        if self.capacity == 0 || self.failed || !model.device().is_cuda() {
            return Ok(None);
        }
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let width = graph_width(longest, model.config().max_position_embeddings);
        if !adapter.served.captures(ids.len(), width) {
            return Ok(None);
        }
        let key = format!("{:p}/{}x{width}", Arc::as_ptr(adapter), ids.len());
        let padded = || Batch::right_padded_to(ids, adapter.base.pad_id, width, model.device());
        if let Some(g) = self.captured.get(&key) {
            return Ok(Some((g, padded()?)));
        }
        if self.seen.get(&key).is_none() {
            self.seen.insert(key, ());
            return Ok(None);
        }
        let batch = padded()?;
        match ForwardGraph::capture(model, lora, &adapter.head, &batch) {
            Ok(Some(g)) => {
                shared.graphs_captured.fetch_add(1, Ordering::Relaxed);
                let g = std::rc::Rc::new(Captured { adapter: adapter.clone(), graph: g });
                self.captured.insert(key, g.clone());
                Ok(Some((g, batch)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "capturing a forward as a CUDA graph failed; forwards launch kernel by kernel from now on");
                self.failed = true;
                Ok(None)
            }
        }
    }
}

/// The padded width of a captured forward for rows of at most `longest` tokens: the next
/// multiple of `GRAPH_WIDTH_STEP`, within the model's positions where `longest` is.
fn graph_width(longest: usize, max_positions: usize) -> usize {
    let stepped = longest.div_ceil(GRAPH_WIDTH_STEP).max(1) * GRAPH_WIDTH_STEP;
    if stepped > max_positions { longest.max(1) } else { stepped }
}

/// The engine thread's loop: gather a round of requests, score it, repeat.
fn run_engine(cfg: &EngineConfig, shared: &Shared, rx: mpsc::Receiver<Job>) {
    let mut graphs = Graphs::new(cfg.graphs);
    let mut backlog: VecDeque<Job> = VecDeque::new();
    let mut backlog_tokens = 0usize;
    let mut open = true;
    loop {
        if backlog.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(j) => {
                    backlog_tokens += j.tokens;
                    backlog.push_back(j);
                }
                Err(_) => return,
            }
        }
        if cfg.batching && open {
            // the window opens when the oldest waiting request is first seen
            let deadline = Instant::now() + cfg.max_wait;
            while backlog_tokens < cfg.batch_tokens {
                let next = match rx.try_recv() {
                    Ok(j) => Ok(j),
                    Err(TryRecvError::Disconnected) => Err(true),
                    Err(TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(j) => Ok(j),
                            Err(RecvTimeoutError::Timeout) => Err(false),
                            Err(RecvTimeoutError::Disconnected) => Err(true),
                        }
                    }
                };
                match next {
                    Ok(j) => {
                        backlog_tokens += j.tokens;
                        backlog.push_back(j);
                    }
                    Err(closed) => {
                        open &= !closed;
                        break;
                    }
                }
            }
        }
        // a round: requests in arrival order until their tokens fill the budget (always one)
        let mut round = Vec::new();
        let mut tokens = 0usize;
        while let Some(j) = backlog.front() {
            if !round.is_empty() && (!cfg.batching || tokens + j.tokens > cfg.batch_tokens) {
                break;
            }
            tokens += j.tokens;
            backlog_tokens -= j.tokens;
            round.extend(backlog.pop_front());
        }
        run_round(cfg, shared, &mut graphs, round);
    }
}

/// Score every request of a round, answering each as soon as its rows are done.
fn run_round(cfg: &EngineConfig, shared: &Shared, graphs: &mut Graphs, round: Vec<Job>) {
    graphs.forget_unloaded();
    // requests whose caller has gone (timeout, disconnect) are not scored
    let mut jobs: Vec<Option<Job>> = round.into_iter().filter(|j| !j.reply.is_closed()).map(Some).collect();
    let mut results: Vec<Vec<[f32; 3]>> = jobs
        .iter()
        .map(|j| j.as_ref().map(|j| vec![[0f32; 3]; j.rows.len()]).unwrap_or_default())
        .collect();
    let mut remaining: Vec<usize> = jobs.iter().map(|j| j.as_ref().map_or(0, |j| j.rows.len())).collect();
    // group the rows (length, request, row) by adapter, in order of first appearance
    type Rows = Vec<(usize, usize, usize)>;
    let mut groups: Vec<(Arc<LoadedAdapter>, Rows)> = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        let Some(j) = j else { continue };
        let gi = match groups.iter().position(|(a, _)| Arc::ptr_eq(a, &j.adapter)) {
            Some(gi) => gi,
            None => {
                groups.push((j.adapter.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        groups[gi].1.extend(j.rows.iter().enumerate().map(|(ri, r)| (r.len(), ji, ri)));
    }
    let round_span = tracing::debug_span!("predict_round", requests = jobs.len(), batches = tracing::field::Empty);
    for j in jobs.iter().flatten() {
        round_span.follows_from(j.span.id());
    }
    let _enter = round_span.enter();
    let mut batches = 0usize;
    for (adapter, mut rows) in groups {
        // longest first: each micro-batch holds rows of similar length
        rows.sort_by_key(|&(len, ..)| std::cmp::Reverse(len));
        let mut start = 0;
        while start < rows.len() {
            let width = rows[start].0.max(1);
            let fit = (cfg.batch_tokens / width).max(1);
            let end = (start + fit).min(rows.len());
            // rows of a request that already failed are skipped
            let chunk: Vec<(usize, usize)> =
                rows[start..end].iter().filter(|(_, ji, _)| jobs[*ji].is_some()).map(|&(_, ji, ri)| (ji, ri)).collect();
            start = end;
            if chunk.is_empty() {
                continue;
            }
            let ids: Vec<Vec<u32>> =
                chunk.iter().filter_map(|&(ji, ri)| jobs[ji].as_ref().map(|j| j.rows[ri].clone())).collect();
            let padded = ids.len() * ids.iter().map(Vec::len).max().unwrap_or(0);
            let t0 = Instant::now();
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| forward(&adapter, &ids, graphs, shared)))
                .unwrap_or_else(|_| Err(MlError::Model("panic in the forward pass".into())));
            batches += 1;
            shared.batches.fetch_add(1, Ordering::Relaxed);
            match out {
                Ok(logits) if logits.len() == chunk.len() => {
                    shared.record_rate(padded, t0.elapsed());
                    shared.rows_done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    for (&(ji, ri), l) in chunk.iter().zip(logits) {
                        results[ji][ri] = l;
                        remaining[ji] -= 1;
                        if remaining[ji] == 0 {
                            if let Some(j) = jobs[ji].take() {
                                answer(j, Ok(std::mem::take(&mut results[ji])));
                            }
                        }
                    }
                }
                other => {
                    match other {
                        Err(e) => tracing::error!(error = %e, adapter = %adapter.key, rows = chunk.len(), "forward pass failed"),
                        Ok(l) => tracing::error!(got = l.len(), want = chunk.len(), "forward pass returned the wrong row count"),
                    }
                    for &(ji, _) in &chunk {
                        if let Some(j) = jobs[ji].take() {
                            answer(j, Err(ServeError::Internal));
                        }
                    }
                }
            }
        }
    }
    round_span.record("batches", batches);
}

/// Give the request's queue room back, then answer it (so a caller that sees the answer also
/// sees the room).
fn answer(job: Job, result: Result<Logits, ServeError>) {
    let Job { reply, _permit, .. } = job;
    drop(_permit);
    // the caller may have gone (timeout, disconnect): nothing to do then
    let _ = reply.send(result);
}

fn forward(adapter: &Arc<LoadedAdapter>, ids: &[Vec<u32>], graphs: &mut Graphs, shared: &Shared) -> Result<Vec<[f32; 3]>, MlError> {
    let base = &adapter.base;
    if let Some((captured, batch)) = graphs.find(adapter, ids, shared)? {
        shared.graph_runs.fetch_add(1, Ordering::Relaxed);
        return captured.graph.run(&batch);
    }
    let batch = Batch::right_padded(ids, base.pad_id, base.llama.device())?;
    let ctx = LoraCtx::default();
    let (llama, lora) = adapter.served.parts(&base.llama, &ctx);
    let logits = classifier::logits(llama, lora, &adapter.head, &batch)?;
    Ok(logits.to_vec2::<f32>()?.into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_widths_step_by_64_within_the_model() {
        assert_eq!(graph_width(1, 2048), 64);
        assert_eq!(graph_width(64, 2048), 64);
        assert_eq!(graph_width(65, 2048), 128);
        assert_eq!(graph_width(1000, 2048), 1024);
        assert_eq!(graph_width(2040, 2048), 2048);
        // no padding past the model's positions
        assert_eq!(graph_width(2040, 2047), 2040);
        assert_eq!(graph_width(2047, 2047), 2047);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut c: Lru<u32> = Lru::new(2);
        assert!(c.insert("a".into(), 1).is_empty());
        assert!(c.insert("b".into(), 2).is_empty());
        assert_eq!(c.get("a"), Some(1));
        assert_eq!(c.insert("c".into(), 3), vec![2], "b was least recently used");
        assert_eq!(c.get("b"), None);
        assert_eq!(c.keys_by_recency(), vec!["c".to_string(), "a".to_string()]);
    }
}
