//! The inference engine: one thread owns the forward passes of the frozen base and is reached
//! through a channel.
//!
//! - **Requests** carry already-tokenized rows, the adapter to score them with and a oneshot
//!   reply. Tokenizing happens in the caller (the HTTP handler, on the blocking pool): it is
//!   CPU work that needs no model weights, so it runs in parallel with the forward pass of the
//!   previous batch instead of stalling the one thread that owns the model. The caller also
//!   needs the token counts before it submits (for the queue bound and `usage`).
//! - **Dynamic batching**: the engine waits at most `max_wait` after the oldest pending
//!   request for more to arrive, then takes requests in arrival order until their tokens fill
//!   `batch_tokens`. The rows of one round are grouped by adapter, sorted by length (to cut
//!   padding) and packed into micro-batches whose *padded* size stays under `batch_tokens`.
//!   Every request gets its own rows' logits back, in its own order, as soon as its last
//!   micro-batch is done. With batching off, requests are run one at a time (a request's own
//!   rows still share forwards), which is the baseline of the load benchmark.
//! - **Back-pressure**: the rows waiting or running are counted; a request that would push the
//!   count over `queue_rows` is refused at once with [`ServeError::Overloaded`], which carries
//!   a retry hint from the measured throughput. Memory never grows without bound.
//! - **Adapters**: an LRU cache of loaded adapters (`adapter_cache` of them hot at once),
//!   loaded on first use from the directory given by the caller, off the engine thread. A
//!   request holds its adapter through an `Arc`, so an eviction never pulls an adapter from
//!   under a running batch. The base model is loaded once (on the engine thread, so the
//!   server can bind while it loads) and shared.
//! - **Errors** are `Clone`: when a micro-batch fails every request in it gets the error.
//!   A panic inside a forward is caught; its requests get an internal error and the engine
//!   keeps serving.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::adapter::{self, AdapterMeta};
use super::classifier;
use super::llama::Batch;
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
    /// Longest wait after the oldest pending request for others to join its batch.
    pub max_wait: Duration,
    /// Rows waiting or running at once; beyond it requests are refused as overloaded.
    pub queue_rows: usize,
    /// Adapters kept loaded at once (least recently used evicted first).
    pub adapter_cache: usize,
    /// Merge requests into shared batches (off: one request at a time).
    pub batching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_tokens: 4096,
            max_wait: Duration::from_millis(5),
            queue_rows: 1024,
            adapter_cache: 4,
            batching: true,
        }
    }
}

/// Why a request was not scored. Cloned to every request of a failed batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The queue is full; try again after about `retry_after_s` seconds.
    #[error("the predictor is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    /// The base model is still loading.
    #[error("the model is still loading")]
    Loading,
    /// The base model failed to load or the engine has stopped.
    #[error("the predictor is unavailable")]
    Unavailable,
    /// The adapter's files are missing, unreadable or do not fit the base model.
    #[error("adapter {key} cannot be loaded for this base model")]
    Adapter { key: String },
    /// The request cannot be scored as given (empty row, more rows than the queue holds).
    #[error("{0}")]
    Input(String),
    /// A forward pass failed (the cause is logged, not returned).
    #[error("inference failed")]
    Internal,
}

/// An adapter ready for inference (factors detached from any autograd graph).
pub struct LoadedAdapter {
    /// The caller's key (the adapter's id in the store).
    pub key: String,
    pub dir: PathBuf,
    pub meta: AdapterMeta,
    lora: Lora,
    head: Tensor,
}

impl std::fmt::Debug for LoadedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedAdapter").field("key", &self.key).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Logits `[a, b, tie]` of each row of a request, in the request's order.
pub type Logits = Vec<[f32; 3]>;

/// Counters shared by the handle and the engine thread.
struct Shared {
    base: OnceLock<Result<Arc<BaseModel>, ServeError>>,
    queued_rows: AtomicUsize,
    queued_tokens: AtomicUsize,
    /// Exponential moving average of padded tokens per second (f64 bits; 0 = unknown).
    tokens_per_s: AtomicU64,
    batches: AtomicU64,
    rows_done: AtomicU64,
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

struct AdapterCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (u64, Arc<LoadedAdapter>)>,
}

impl AdapterCache {
    fn get(&mut self, key: &str, dir: &Path) -> Option<Arc<LoadedAdapter>> {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(key) {
            Some((used, a)) if a.dir == dir => {
                *used = tick;
                Some(a.clone())
            }
            _ => None,
        }
    }

    fn insert(&mut self, a: Arc<LoadedAdapter>) {
        self.tick += 1;
        self.entries.insert(a.key.clone(), (self.tick, a));
        while self.entries.len() > self.capacity.max(1) {
            let oldest = self.entries.iter().min_by_key(|(_, (used, _))| *used).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
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
    cache: Mutex<AdapterCache>,
    /// Serializes adapter loads so a burst of requests for a cold adapter loads it once.
    loading: Mutex<()>,
}

impl Engine {
    /// Start the engine thread; it first runs `load` to get the base model. Until that
    /// finishes requests are answered with [`ServeError::Loading`].
    pub fn start<F>(cfg: EngineConfig, load: F) -> Result<Engine, MlError>
    where
        F: FnOnce() -> Result<BaseModel, MlError> + Send + 'static,
    {
        Self::start_shared(cfg, move || load().map(Arc::new))
    }

    /// Start the engine on a base model that is already loaded (and maybe shared).
    pub fn with_model(cfg: EngineConfig, base: Arc<BaseModel>) -> Result<Engine, MlError> {
        let engine = Self::start_shared(cfg, move || Ok(base))?;
        // loading is immediate: wait for it so the first request never sees `Loading`
        while engine.inner.shared.base.get().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(engine)
    }

    fn start_shared<F>(cfg: EngineConfig, load: F) -> Result<Engine, MlError>
    where
        F: FnOnce() -> Result<Arc<BaseModel>, MlError> + Send + 'static,
    {
        if cfg.batch_tokens == 0 || cfg.queue_rows == 0 || cfg.adapter_cache == 0 {
            return Err(MlError::Config("batch tokens, queue rows and adapter cache must be at least 1".into()));
        }
        let shared = Arc::new(Shared {
            base: OnceLock::new(),
            queued_rows: AtomicUsize::new(0),
            queued_tokens: AtomicUsize::new(0),
            tokens_per_s: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            rows_done: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_shared = shared.clone();
        let thread_cfg = cfg.clone();
        std::thread::Builder::new().name("arbiter-engine".into()).spawn(move || {
            let started = Instant::now();
            let base = match load() {
                Ok(b) => {
                    tracing::info!(model = %b.name, seconds = started.elapsed().as_secs_f64(), "inference engine ready");
                    Ok(b)
                }
                Err(e) => {
                    tracing::error!(error = %e, "the inference engine cannot load its base model");
                    Err(ServeError::Unavailable)
                }
            };
            let base = thread_shared.base.get_or_init(|| base).clone();
            match base {
                Ok(b) => run_engine(&b, &thread_cfg, &thread_shared, rx),
                // answer whatever is sent with the load error until every handle is gone
                Err(e) => {
                    while let Ok(job) = rx.recv() {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        })?;
        let cache = AdapterCache { capacity: cfg.adapter_cache, tick: 0, entries: HashMap::new() };
        Ok(Engine { inner: Arc::new(Handle { shared, tx, cfg, cache: Mutex::new(cache), loading: Mutex::new(()) }) })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// The base model, once loaded.
    pub fn base(&self) -> Result<Arc<BaseModel>, ServeError> {
        match self.inner.shared.base.get() {
            Some(r) => r.clone(),
            None => Err(ServeError::Loading),
        }
    }

    /// Encode one arena row with the base model's tokenizer and template (CPU work: call it
    /// from a blocking context).
    pub fn encode(&self, row: &ArenaRow, max_length: usize) -> Result<Encoded, ServeError> {
        Ok(self.base()?.encode_row(row, max_length))
    }

    /// The adapter under `key`, loading it from `dir` on first use (blocking: file reads).
    pub fn adapter(&self, key: &str, dir: &Path) -> Result<Arc<LoadedAdapter>, ServeError> {
        let base = self.base()?;
        if let Some(a) = self.lock_cache().get(key, dir) {
            return Ok(a);
        }
        let _loading = self.inner.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = self.lock_cache().get(key, dir) {
            return Ok(a);
        }
        let started = Instant::now();
        let loaded = adapter::load(dir, &base.llama).map_err(|e| {
            tracing::warn!(adapter = key, error = %e, "cannot load adapter");
            ServeError::Adapter { key: key.to_string() }
        })?;
        let a = Arc::new(LoadedAdapter {
            key: key.to_string(),
            dir: dir.to_path_buf(),
            meta: loaded.meta,
            lora: loaded.lora.detached(),
            head: loaded.head.detach(),
        });
        tracing::info!(adapter = key, seconds = started.elapsed().as_secs_f64(), "adapter loaded");
        self.lock_cache().insert(a.clone());
        Ok(a)
    }

    /// Keys of the adapters loaded now, most recently used first.
    pub fn hot_adapters(&self) -> Vec<String> {
        let cache = self.lock_cache();
        let mut v: Vec<(u64, String)> = cache.entries.iter().map(|(k, (t, _))| (*t, k.clone())).collect();
        v.sort_by(|a, b| b.0.cmp(&a.0));
        v.into_iter().map(|(_, k)| k).collect()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, AdapterCache> {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `rows` for scoring with `adapter`; fails at once when the queue is full. The
    /// returned future resolves to one logit triple per row, in order.
    pub fn submit(
        &self,
        adapter: Arc<LoadedAdapter>,
        rows: Vec<Vec<u32>>,
    ) -> Result<impl std::future::Future<Output = Result<Logits, ServeError>>, ServeError> {
        self.base()?;
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
}

/// The engine thread's loop: gather a round of requests, score it, repeat.
fn run_engine(base: &BaseModel, cfg: &EngineConfig, shared: &Shared, rx: mpsc::Receiver<Job>) {
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
        run_round(base, cfg, shared, round);
    }
}

/// Score every request of a round, answering each as soon as its rows are done.
fn run_round(base: &BaseModel, cfg: &EngineConfig, shared: &Shared, round: Vec<Job>) {
    // requests whose caller has gone (timeout, disconnect) are not scored
    let mut jobs: Vec<Option<Job>> = round.into_iter().filter(|j| !j.reply.is_closed()).map(Some).collect();
    let mut results: Vec<Vec<[f32; 3]>> = jobs
        .iter()
        .map(|j| j.as_ref().map(|j| vec![[0f32; 3]; j.rows.len()]).unwrap_or_default())
        .collect();
    let mut remaining: Vec<usize> = jobs.iter().map(|j| j.as_ref().map_or(0, |j| j.rows.len())).collect();
    // group the rows by adapter, in order of first appearance
    let mut groups: Vec<(Arc<LoadedAdapter>, Vec<(usize, usize, usize)>)> = Vec::new();
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
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| forward(base, &adapter, &ids)))
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
                                let _ = j.reply.send(Ok(std::mem::take(&mut results[ji])));
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
                            let _ = j.reply.send(Err(ServeError::Internal));
                        }
                    }
                }
            }
        }
    }
    round_span.record("batches", batches);
}

fn forward(base: &BaseModel, adapter: &LoadedAdapter, ids: &[Vec<u32>]) -> Result<Vec<[f32; 3]>, MlError> {
    let batch = Batch::right_padded(ids, base.pad_id, base.llama.device())?;
    let ctx = LoraCtx::default();
    let logits = classifier::logits(&base.llama, Some((&adapter.lora, &ctx)), &adapter.head, &batch)?;
    Ok(logits.to_vec2::<f32>()?.into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mk = |k: &str| {
            Arc::new(LoadedAdapter {
                key: k.into(),
                dir: PathBuf::from(k),
                meta: AdapterMeta::default(),
                lora: Lora::from_tensors_exact(
                    super::super::lora::LoraConfig { r: 1, alpha: 1.0, dropout: 0.0, targets: vec![] },
                    &super::super::llama::Config::from_hf(&serde_json::from_value(serde_json::json!({
                        "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 8
                    })).expect("config literal")),
                    &Default::default(),
                )
                .expect("empty lora"),
                head: Tensor::zeros((3, 4), candle_core::DType::F32, &candle_core::Device::Cpu).expect("zeros"),
            })
        };
        let mut c = AdapterCache { capacity: 2, tick: 0, entries: HashMap::new() };
        c.insert(mk("a"));
        c.insert(mk("b"));
        assert!(c.get("a", Path::new("a")).is_some());
        c.insert(mk("c"));
        assert!(c.get("b", Path::new("b")).is_none(), "b was least recently used");
        assert!(c.get("a", Path::new("a")).is_some());
        assert!(c.get("c", Path::new("c")).is_some());
        assert!(c.get("a", Path::new("elsewhere")).is_none(), "a different directory is a miss");
    }
}
