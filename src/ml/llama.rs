//! Llama-family backbone over frozen weights: RoPE, GQA, RMSNorm, SwiGLU, causal attention
//! with per-row valid spans (left or right padding), returning hidden states rather than
//! next-token logits, with LoRA deltas added on the target linears.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use serde::Deserialize;

use super::causal_softmax::CausalSpans;
use super::host_table::HostTable;
use super::lora::{Lora, LoraCtx};
use super::ops::{self, FrozenLinear};
use super::MlError;

/// The seven linear layers of a Llama block, named as in Hugging Face checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Module path under `model.layers.{i}.`.
    pub fn hf_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Proj> {
        Self::ALL.into_iter().find(|p| p.hf_name() == name)
    }
}

/// `config.json` of a Hugging Face Llama checkpoint (the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// The RoPE base as transformers 4 writes it; transformers 5 writes `rope_parameters`.
    pub rope_theta: Option<f64>,
    /// RoPE base and type (transformers 5), or the RoPE scaling of transformers 4 configs.
    #[serde(default, alias = "rope_scaling")]
    pub rope_parameters: Option<RopeParameters>,
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub _name_or_path: Option<String>,
}

/// `rope_parameters` (or `rope_scaling`) of a `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
}

impl HfLlamaConfig {
    /// The RoPE base: `rope_parameters.rope_theta`, else `rope_theta`, else 10,000.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(self.rope_theta).unwrap_or_else(default_theta)
    }

    /// Refuses what the model would compute differently from transformers: scaled RoPE
    /// variants (`llama3`, `linear`, `dynamic`, `yarn`...) are not implemented.
    pub fn check_supported(&self) -> Result<(), MlError> {
        match self.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            None | Some("default") => Ok(()),
            Some(other) => Err(MlError::Model(format!(
                "config.json: RoPE type {other:?} is not supported (only the default rotary embedding)"
            ))),
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// Runtime configuration of the backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// GGUF files store Q/K rows permuted for interleaved RoPE; HF checkpoints do not.
    pub rope_interleaved: bool,
}

impl Config {
    pub fn from_hf(c: &HfLlamaConfig) -> Config {
        Config {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_base(),
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            rope_interleaved: false,
        }
    }

    /// A small shape for the device checks of whole blocks: hidden 256, four heads of 64 (two
    /// kv heads), MLP 512, vocabulary 1000.
    pub(crate) fn small(num_layers: usize) -> Config {
        Config {
            hidden_size: 256,
            intermediate_size: 512,
            num_layers,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            vocab_size: 1000,
            max_position_embeddings: 512,
            rope_interleaved: false,
        }
    }

    /// Input and output features of a projection.
    pub fn proj_shape(&self, p: Proj) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        match p {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, i),
            Proj::Down => (i, h),
        }
    }

    /// Frozen-base parameter count (embeddings included).
    pub fn param_count(&self) -> usize {
        let per_layer: usize = Proj::ALL.iter().map(|p| {
            let (i, o) = self.proj_shape(*p);
            i * o
        }).sum::<usize>() + 2 * self.hidden_size;
        self.vocab_size * self.hidden_size + self.num_layers * per_layer + self.hidden_size
    }
}

/// How the frozen linear weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dense weights of this dtype (GGUF weights are dequantized at load).
    Dense(DType),
    /// GGML block-quantized weights (GGUF weights kept as stored when `None`, otherwise
    /// re-quantized to the given type; dense checkpoints are quantized at load).
    Quantized(Option<GgmlDType>),
}

impl WeightFormat {
    /// The dtype activations run in: the weights' for dense weights; for quantized ones f32 on
    /// the CPU (candle's quantized CPU matmul) and bf16 on a GPU (each weight dequantized to
    /// bf16 as it is used, then a tensor-core GEMM, as bitsandbytes does).
    pub fn activation_dtype(self, device: &Device) -> DType {
        match self {
            WeightFormat::Dense(d) => d,
            WeightFormat::Quantized(_) if device.is_cpu() => DType::F32,
            WeightFormat::Quantized(_) => DType::BF16,
        }
    }
}

#[derive(Clone)]
pub(super) struct Block {
    pub(super) attn_norm: Tensor,
    pub(super) ffn_norm: Tensor,
    pub(super) proj: [FrozenLinear; 7],
    /// q, k and v's weights as one `[q_out + 2 kv_out, hidden]` matrix, whose row slices the
    /// three projections hold (`fuse_qkv`): the training backward's input gradient of the three
    /// is one GEMM over it, where three accumulating ones read and wrote the sum twice more and
    /// k's and v's, 192 columns wide at the 135M shape, ran at half the tensor cores' rate.
    /// `None` where the weights are not all dense, off CUDA, and where a projection's weight
    /// was replaced (`Llama::merged`).
    pub(super) qkv: Option<FrozenLinear>,
}

impl Block {
    /// This block with q, k and v's weights in one matrix (`qkv`) where they are dense, of
    /// one dtype, on a CUDA device; as it is elsewhere. The separate weights are freed.
    fn fuse_qkv(mut self) -> candle_core::Result<Block> {
        let dense = |p: Proj| match self.proj[p as usize].weight() {
            ops::FrozenWeight::Dense(w) if w.device().is_cuda() && w.is_contiguous() => Some(w.clone()),
            _ => None,
        };
        let (Some(q), Some(k), Some(v)) = (dense(Proj::Q), dense(Proj::K), dense(Proj::V)) else { return Ok(self) };
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() || k.dim(1)? != q.dim(1)? || v.dim(1)? != q.dim(1)? {
            return Ok(self);
        }
        let (nq, nk, nv) = (q.dim(0)?, k.dim(0)?, v.dim(0)?);
        let fused = Tensor::cat(&[&q, &k, &v], 0)?;
        drop((q, k, v));
        self.proj[Proj::Q as usize] = FrozenLinear::dense(fused.narrow(0, 0, nq)?)?;
        self.proj[Proj::K as usize] = FrozenLinear::dense(fused.narrow(0, nq, nk)?)?;
        self.proj[Proj::V as usize] = FrozenLinear::dense(fused.narrow(0, nq + nk, nv)?)?;
        self.qkv = Some(FrozenLinear::dense(fused)?);
        Ok(self)
    }
}

/// The frozen backbone.
#[derive(Clone)]
pub struct Llama {
    cfg: Config,
    embed: Tensor,
    /// The embedding table in host memory (`embeddings_to_host`); `embed` is then its tensor.
    host_table: Option<Arc<HostTable>>,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: FrozenLinear,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

/// A batch of token rows. Row `i`'s tokens occupy `spans[i] = (start, end)` of its padded row;
/// everything outside is padding (right padding: start 0; left padding: end = width).
pub struct Batch {
    pub ids: Tensor,
    pub spans: Vec<(usize, usize)>,
}

impl Batch {
    /// Right-padded batch of the given rows.
    pub fn right_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Batch, MlError> {
        Self::padded(rows, pad_id, device, false)
    }

    /// Right-padded batch of the given rows, `width` tokens wide (at least the longest row).
    pub fn right_padded_to(rows: &[Vec<u32>], pad_id: u32, width: usize, device: &Device) -> Result<Batch, MlError> {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        if width < longest {
            return Err(MlError::Input(format!("a width of {width} tokens is narrower than the longest row ({longest})")));
        }
        Self::padded_within(rows, pad_id, width, device, false)
    }

    /// Left-padded batch of the given rows.
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Batch, MlError> {
        Self::padded(rows, pad_id, device, true)
    }

    fn padded(rows: &[Vec<u32>], pad_id: u32, device: &Device, left: bool) -> Result<Batch, MlError> {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        Self::padded_within(rows, pad_id, width, device, left)
    }

    fn padded_within(rows: &[Vec<u32>], pad_id: u32, width: usize, device: &Device, left: bool) -> Result<Batch, MlError> {
        if width == 0 || rows.iter().any(Vec::is_empty) {
            return Err(MlError::Input("every row needs at least one token".into()));
        }
        let mut flat = Vec::with_capacity(rows.len() * width);
        let mut spans = Vec::with_capacity(rows.len());
        for r in rows {
            let pad = std::iter::repeat_n(pad_id, width - r.len());
            if left {
                flat.extend(pad);
                flat.extend_from_slice(r);
                spans.push((width - r.len(), width));
            } else {
                flat.extend_from_slice(r);
                flat.extend(pad);
                spans.push((0, r.len()));
            }
        }
        let ids = Tensor::from_vec(flat, (rows.len(), width), device)?;
        Ok(Batch { ids, spans })
    }

    /// Where each row's tokens start (after its left padding).
    pub fn starts(&self) -> Vec<usize> {
        self.spans.iter().map(|(s, _)| *s).collect()
    }

    pub fn tokens(&self) -> usize {
        self.spans.iter().map(|(s, e)| e - s).sum()
    }
}

fn gguf_u32(ct: &gguf_file::Content, key: &str) -> Result<usize, MlError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| MlError::Model(format!("GGUF metadata lacks `{key}`")))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(|e| MlError::Model(format!("GGUF metadata `{key}`: {e}")))
}

fn gguf_f32(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok()).map(f64::from)
}

impl Llama {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Move the token embedding table to host memory, freeing `vocab × hidden` weights on the
    /// device (1 GiB of bf16 for Llama-3-8B). A GPU reads the looked-up rows there in place
    /// (`HostTable`). The table is read nowhere else in a classifier's forward; a tied output
    /// matrix (the same tensor) goes with it, so `next_token_logits` then multiplies on the host.
    /// A no-op on the CPU.
    pub fn embeddings_to_host(&mut self) -> Result<(), MlError> {
        if self.device.is_cpu() || self.host_table.is_some() {
            return Ok(());
        }
        let table = Arc::new(HostTable::new(&self.embed, &self.device)?);
        if self.lm_head.shares_weight(&self.embed) {
            self.lm_head = FrozenLinear::dense(table.tensor().clone())?;
        }
        self.embed = table.tensor().clone();
        self.host_table = Some(table);
        Ok(())
    }

    /// Whether the embedding table lives in host memory (`embeddings_to_host`), and whether
    /// the device reads it there in place.
    pub fn host_embeddings(&self) -> Option<bool> {
        self.host_table.as_ref().map(|t| t.mapped())
    }

    /// The embeddings of `ids` (`[b, t]`, on the model's device) as `[b, t, hidden]`.
    fn embed_ids(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.flatten_all()?;
        let x = match &self.host_table {
            Some(table) => table.rows(&ids, &self.device)?,
            None => match super::host_table::device_rows(&self.embed, &ids)? {
                Some(rows) => rows,
                None => self.embed.index_select(&ids, 0)?,
            },
        };
        x.reshape((b, t, self.cfg.hidden_size))
    }

    /// Whether some block holds q, k and v's weights in one matrix (`Block::qkv`).
    pub(super) fn has_fused_qkv(&self) -> bool {
        self.blocks.iter().any(|b| b.qkv.is_some())
    }

    /// This model with each block's q, k and v used apart (the same weights, without their
    /// matrix): the reference of the fused path's check (`block::check_device`).
    pub(super) fn with_qkv_apart(&self) -> Llama {
        let blocks = self.blocks.iter().map(|b| Block { qkv: None, ..b.clone() }).collect();
        Llama { blocks, ..self.clone() }
    }

    /// Bytes held by the frozen weights (the embedding table counted wherever it lives).
    pub fn weight_bytes(&self) -> usize {
        let lin: usize = self.blocks.iter().flat_map(|b| b.proj.iter()).map(|l| l.weight_bytes()).sum();
        lin + self.embed.elem_count() * self.embed.dtype().size_in_bytes()
    }

    /// This model with `lora` merged into its weights (`W + scale B A`, computed in f32 and
    /// rounded once to the weights' dtype), sharing every other tensor; `None` when an adapted
    /// linear is quantized. The merged copies take `merged_bytes(lora)`.
    pub fn merged(&self, lora: &Lora) -> Result<Option<Llama>, MlError> {
        let dense = |layer: usize, p: Proj| match self.blocks[layer].proj[p as usize].weight() {
            ops::FrozenWeight::Dense(w) => Some(w),
            ops::FrozenWeight::Quantized(_) => None,
        };
        if lora.factors().any(|((layer, p), _)| dense(*layer, *p).is_none()) {
            return Ok(None);
        }
        let mut blocks = self.blocks.clone();
        for ((layer, p), delta) in lora.deltas()? {
            let w = dense(layer, p).ok_or_else(|| MlError::Model("merged weight not dense".into()))?;
            let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
            blocks[layer].proj[p as usize] = FrozenLinear::dense(merged)?;
            if matches!(p, Proj::Q | Proj::K | Proj::V) {
                // the fused matrix holds the weight as it was
                blocks[layer].qkv = None;
            }
        }
        Ok(Some(Llama { blocks, ..self.clone() }))
    }

    /// Bytes of the weight copies `merged` makes for `lora`.
    pub fn merged_bytes(&self, lora: &Lora) -> usize {
        lora.factors()
            .map(|((layer, p), _)| {
                let l = &self.blocks[*layer].proj[*p as usize];
                l.out_features() * l.in_features() * self.dtype.size_in_bytes()
            })
            .sum()
    }

    pub fn proj(&self, layer: usize, p: Proj) -> &FrozenLinear {
        &self.blocks[layer].proj[p as usize]
    }

    /// Load a GGUF file (Llama architecture).
    pub fn from_gguf(
        ct: &gguf_file::Content,
        reader: &mut std::fs::File,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Llama, MlError> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(MlError::Model(format!("unsupported GGUF architecture {arch:?} (expected llama)")));
        }
        let hidden = gguf_u32(ct, "llama.embedding_length")?;
        let num_heads = gguf_u32(ct, "llama.attention.head_count")?;
        let num_kv_heads = gguf_u32(ct, "llama.attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = gguf_u32(ct, "llama.rope.dimension_count").unwrap_or(hidden / num_heads);
        let embed_q = ct.tensor(reader, "token_embd.weight", device)?;
        let vocab_size = embed_q.shape().dims2()?.0;
        let cfg = Config {
            hidden_size: hidden,
            intermediate_size: gguf_u32(ct, "llama.feed_forward_length")?,
            num_layers: gguf_u32(ct, "llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: gguf_f32(ct, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: gguf_f32(ct, "llama.rope.freq_base").unwrap_or(10_000.0),
            vocab_size,
            max_position_embeddings: gguf_u32(ct, "llama.context_length").unwrap_or(2048),
            rope_interleaved: true,
        };
        let act_dtype = format.activation_dtype(device);
        let linear = |q: QTensor| -> Result<FrozenLinear, MlError> {
            Ok(match format {
                WeightFormat::Dense(d) => FrozenLinear::dense(q.dequantize(device)?.to_dtype(d)?)?,
                WeightFormat::Quantized(None) => FrozenLinear::quantized(Arc::new(q))?,
                WeightFormat::Quantized(Some(t)) if t == q.dtype() => FrozenLinear::quantized(Arc::new(q))?,
                WeightFormat::Quantized(Some(t)) => {
                    FrozenLinear::quantized(Arc::new(QTensor::quantize(&q.dequantize(device)?, t)?))?
                }
            })
        };
        let norm = |name: &str, reader: &mut std::fs::File| -> Result<Tensor, MlError> {
            Ok(ct.tensor(reader, name, device)?.dequantize(device)?.to_dtype(act_dtype)?)
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                proj.push(linear(ct.tensor(reader, &format!("blk.{i}.{}.weight", p.gguf_name()), device)?)?);
            }
            blocks.push(Block {
                attn_norm: norm(&format!("blk.{i}.attn_norm.weight"), reader)?,
                ffn_norm: norm(&format!("blk.{i}.ffn_norm.weight"), reader)?,
                proj: proj.try_into().map_err(|_| MlError::Model("block has 7 projections".into()))?,
                qkv: None,
            });
        }
        let embed = embed_q.dequantize(device)?.to_dtype(act_dtype)?;
        let lm_head = match ct.tensor(reader, "output.weight", device) {
            Ok(q) => linear(q)?,
            // tied embeddings: no separate output matrix
            Err(_) => FrozenLinear::dense(embed.clone())?,
        };
        let norm_w = norm("output_norm.weight", reader)?;
        Self::assemble(cfg, embed, blocks, norm_w, lm_head, device, act_dtype)
    }

    /// Load a Hugging Face model directory (`config.json`, `*.safetensors`).
    pub fn from_hf_dir(dir: &Path, format: WeightFormat, device: &Device) -> Result<Llama, MlError> {
        let cfg_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| MlError::Model(format!("{}: {e}", dir.join("config.json").display())))?;
        let hf: HfLlamaConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| MlError::Model(format!("config.json: {e}")))?;
        hf.check_supported()?;
        let cfg = Config::from_hf(&hf);
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| MlError::Model(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(MlError::Model(format!("no *.safetensors in {}", dir.display())));
        }
        // SAFETY: the files are memory-mapped read-only and not modified while loaded.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let act_dtype = format.activation_dtype(device);
        let get = |name: &str| -> Result<Tensor, MlError> {
            st.load(name, device).map_err(|e| MlError::Model(format!("tensor {name}: {e}")))
        };
        let linear = |name: &str| -> Result<FrozenLinear, MlError> {
            let w = get(name)?;
            Ok(match format {
                WeightFormat::Dense(d) => FrozenLinear::dense(w.to_dtype(d)?)?,
                WeightFormat::Quantized(t) => {
                    let t = t.unwrap_or(GgmlDType::Q4_0);
                    FrozenLinear::quantized(Arc::new(QTensor::quantize(&w.to_dtype(DType::F32)?, t)?))?
                }
            })
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                proj.push(linear(&format!("model.layers.{i}.{}.weight", p.hf_path()))?);
            }
            blocks.push(Block {
                attn_norm: get(&format!("model.layers.{i}.input_layernorm.weight"))?.to_dtype(act_dtype)?,
                ffn_norm: get(&format!("model.layers.{i}.post_attention_layernorm.weight"))?.to_dtype(act_dtype)?,
                proj: proj.try_into().map_err(|_| MlError::Model("block has 7 projections".into()))?,
                qkv: None,
            });
        }
        let embed = get("model.embed_tokens.weight")?.to_dtype(act_dtype)?;
        let lm_head = if hf.tie_word_embeddings {
            FrozenLinear::dense(embed.clone())?
        } else {
            match get("lm_head.weight") {
                Ok(w) => FrozenLinear::dense(w.to_dtype(act_dtype)?)?,
                Err(_) => FrozenLinear::dense(embed.clone())?,
            }
        };
        let norm = get("model.norm.weight")?.to_dtype(act_dtype)?;
        Self::assemble(cfg, embed, blocks, norm, lm_head, device, act_dtype)
    }

    /// Random weights of a given shape (benchmarks and tests), drawn on the device (uniform
    /// with standard deviation 0.02), the linears held in `format` (quantized at load).
    pub fn random(cfg: Config, format: WeightFormat, seed: u64, device: &Device) -> Result<Llama, MlError> {
        // CPU has no seedable generator in candle: CPU draws are unseeded (benchmarks only)
        let _ = device.set_seed(seed);
        let dtype = format.activation_dtype(device);
        let a = 0.02 * 3f64.sqrt();
        let draw = |shape: (usize, usize)| Tensor::rand(-a as f32, a as f32, shape, device);
        let randn = |shape: (usize, usize)| -> Result<Tensor, MlError> { Ok(draw(shape)?.to_dtype(dtype)?) };
        let linear = |shape: (usize, usize)| -> Result<FrozenLinear, MlError> {
            Ok(match format {
                WeightFormat::Dense(_) => FrozenLinear::dense(randn(shape)?)?,
                WeightFormat::Quantized(t) => {
                    FrozenLinear::quantized(Arc::new(QTensor::quantize(&draw(shape)?, t.unwrap_or(GgmlDType::Q4_0))?))?
                }
            })
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (i, o) = cfg.proj_shape(p);
                proj.push(linear((o, i))?);
            }
            blocks.push(Block {
                attn_norm: Tensor::ones(cfg.hidden_size, dtype, device)?,
                ffn_norm: Tensor::ones(cfg.hidden_size, dtype, device)?,
                proj: proj.try_into().map_err(|_| MlError::Model("block has 7 projections".into()))?,
                qkv: None,
            });
        }
        let embed = randn((cfg.vocab_size, cfg.hidden_size))?;
        let lm_head = FrozenLinear::dense(embed.clone())?;
        let norm = Tensor::ones(cfg.hidden_size, dtype, device)?;
        Self::assemble(cfg, embed, blocks, norm, lm_head, device, dtype)
    }

    fn assemble(
        cfg: Config,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: FrozenLinear,
        device: &Device,
        dtype: DType,
    ) -> Result<Llama, MlError> {
        let blocks = blocks.into_iter().map(Block::fuse_qkv).collect::<candle_core::Result<Vec<_>>>()?;
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        Ok(Llama { cfg, embed, host_table: None, blocks, norm, lm_head, inv_freq, device: device.clone(), dtype })
    }

    /// cos/sin tables for the batch: `[t, d/2]` when every row starts at 0, else `[b, t, d/2]`.
    fn rope_tables(&self, batch: &Batch, t: usize) -> Result<(Tensor, Tensor), MlError> {
        let half = self.inv_freq.len();
        let same = batch.spans.iter().all(|(s, _)| *s == 0);
        let starts: Vec<usize> = if same { vec![0] } else { batch.starts() };
        let mut ang = Vec::with_capacity(starts.len() * t * half);
        for s in &starts {
            for pos in 0..t {
                let p = pos.saturating_sub(*s) as f32;
                ang.extend(self.inv_freq.iter().map(|f| p * f));
            }
        }
        let ang = if same {
            Tensor::from_vec(ang, (t, half), &self.device)?
        } else {
            Tensor::from_vec(ang, (starts.len(), t, half), &self.device)?
        };
        Ok((ang.cos()?.to_dtype(self.dtype)?, ang.sin()?.to_dtype(self.dtype)?))
    }

    /// What a forward of `batch` reads besides the weights, made on the device: the ids, the
    /// RoPE tables and causal spans every block shares, and with `last_only` each row's last
    /// valid position (`LastRows`).
    pub fn inputs(&self, batch: &Batch, last_only: bool) -> Result<ForwardInputs, MlError> {
        let (b, t) = batch.ids.dims2()?;
        let nh = self.cfg.num_heads;
        let (cos, sin) = self.rope_tables(batch, t)?;
        // query chunks small enough that one chunk's scores stay around 256 MB
        let elem = self.dtype.size_in_bytes();
        // (at most 256 queries, so later chunks skip the keys after their last query)
        let chunk = ((256usize << 20) / (b * nh * t * elem).max(1)).clamp(16, 256).min(t);
        let spans = CausalSpans::new(&batch.starts(), &self.device)?;
        let last = if last_only { Some(LastRows::new(batch, &self.inv_freq, self.dtype, &self.device)?) } else { None };
        let blocks = Arc::new(BlockInputs { cfg: self.cfg.clone(), b, t, cos, sin, spans, chunk, last });
        Ok(ForwardInputs { ids: batch.ids.clone(), blocks })
    }

    /// Final-norm hidden states `[b, t, hidden]` for every position, or only the last valid
    /// position of each row (`[b, hidden]`) when `last_only`.
    pub fn forward(
        &self,
        batch: &Batch,
        lora: Option<(&Lora, &LoraCtx)>,
        last_only: bool,
    ) -> Result<Tensor, MlError> {
        self.forward_inputs(&self.inputs(batch, last_only)?, lora)
    }

    /// `forward` from inputs already on the device (`inputs`): only device work, no copies from
    /// the host, so a CUDA graph can capture it (`graph`).
    pub fn forward_inputs(&self, inputs: &ForwardInputs, lora: Option<(&Lora, &LoraCtx)>) -> Result<Tensor, MlError> {
        let _span = tracing::trace_span!("llama").entered();
        let cfg = &self.cfg;
        let (b, t) = (inputs.blocks.b, inputs.blocks.t);
        let eps = cfg.rms_norm_eps as f32;
        let mut x = self.embed_ids(&inputs.ids)?;
        let trained = lora.and_then(|(l, ctx)| ctx.block_grads.clone().map(|grads| (l, ctx, grads)));
        // whether a gradient of the first block's input is read: only where it was tracked
        // already; else it is tracked only for the blocks' node to be recorded (the embeddings
        // are frozen), and the blocks' backward leaves it out
        let input_grad = x.track_op();
        if trained.is_some() && !input_grad {
            x = Var::from_tensor(&x)?.as_tensor().clone();
        }
        // outside autograd (no tracked factors, an untracked input): the inference blocks
        let untracked = (!x.track_op() && lora.is_none_or(|(l, _)| !l.tracked())).then(|| match lora {
            Some((l, ctx)) => (l.detached(), ctx.dropout),
            None => (Lora::none(), None),
        });
        // with `last`, the last block computes only each row's last position (`LastRows`)
        let last_only = inputs.blocks.last.is_some();
        if let Some((l, ctx, grads)) = &trained {
            x = super::block::trained_blocks(&self.blocks, &x, l, ctx, grads, &inputs.blocks, input_grad)?;
        } else {
            for (li, blk) in self.blocks.iter().enumerate() {
                let _span = tracing::trace_span!("block", layer = li).entered();
                let pruned = last_only && li + 1 == self.blocks.len();
                x = match (&untracked, &inputs.blocks.last) {
                    (Some((l, dropout)), _) => super::block::inference_block(blk, li, &x, l, *dropout, &inputs.blocks, pruned)?,
                    (None, Some(last)) if pruned => last_block(blk, li, &x, lora, &inputs.blocks, last)?,
                    (None, _) => block(blk, li, &x, lora, &inputs.blocks)?,
                };
            }
        }
        if last_only && self.blocks.is_empty() {
            if let Some(last) = &inputs.blocks.last {
                x = x.reshape((b * t, cfg.hidden_size))?.index_select(&last.idx, 0)?;
            }
        }
        Ok(ops::rms_norm(&x, &self.norm, eps)?)
    }

    /// Next-token logits at the last valid position of each row: `[b, vocab]` (f32).
    pub fn next_token_logits(&self, batch: &Batch) -> Result<Tensor, MlError> {
        let h = self.forward(batch, None, true)?;
        // a tied matrix moved to host memory with the table is multiplied there
        let h = if self.lm_head.shares_weight(&self.embed) { h.to_device(self.embed.device())? } else { h };
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    /// Convert this model's Q/K LoRA-B rows (output features) between the GGUF interleaved
    /// layout and the Hugging Face layout. `to_hf` selects the direction.
    pub fn permute_qk_rows(&self, p: Proj, b: &Tensor, to_hf: bool) -> candle_core::Result<Tensor> {
        if !self.cfg.rope_interleaved || !matches!(p, Proj::Q | Proj::K) {
            return Ok(b.clone());
        }
        let heads = if p == Proj::Q { self.cfg.num_heads } else { self.cfg.num_kv_heads };
        let (rows, cols) = b.dims2()?;
        let hd = rows / heads;
        if to_hf {
            // GGUF row (h, i, j) with i in 0..hd/2, j in 0..2 -> HF row (h, j, i)
            b.reshape((heads, hd / 2, 2, cols))?.transpose(1, 2)?.reshape((rows, cols))
        } else {
            b.reshape((heads, 2, hd / 2, cols))?.transpose(1, 2)?.reshape((rows, cols))
        }
    }

    /// Index of a tensor dimension used by tests.
    pub fn embed_row(&self, token: u32) -> candle_core::Result<Tensor> {
        self.embed.i(token as usize)
    }
}

/// What one forward reads besides the weights, on the device (`Llama::inputs`).
pub struct ForwardInputs {
    ids: Tensor,
    blocks: Arc<BlockInputs>,
}

impl ForwardInputs {
    /// Rows and padded width.
    pub fn shape(&self) -> (usize, usize) {
        (self.blocks.b, self.blocks.t)
    }

    /// Copy `batch` into these inputs' device buffers in place, for a captured forward that
    /// reads them at fixed addresses. `batch` must have the same shape and the same starts
    /// (so the same RoPE tables and spans); only the ids and last positions change.
    pub fn refill(&self, batch: &Batch) -> Result<(), MlError> {
        let (b, t) = batch.ids.dims2()?;
        if (b, t) != self.shape() || !self.blocks.spans.starts_are(&batch.starts()) {
            return Err(MlError::Input(format!(
                "a batch of {b} x {t} tokens does not fit inputs made for {:?} with these starts",
                self.shape()
            )));
        }
        self.ids.slice_set(&batch.ids, 0, 0)?;
        if let Some(last) = &self.blocks.last {
            let inv_freq = last.inv_freq.clone();
            let fresh = LastRows::new(batch, &inv_freq, last.cos.dtype(), batch.ids.device())?;
            for (to, from) in [(&last.idx, &fresh.idx), (&last.cos, &fresh.cos), (&last.sin, &fresh.sin), (&last.mask, &fresh.mask)] {
                to.slice_set(from, 0, 0)?;
            }
        }
        Ok(())
    }
}

/// Each row's last valid position, the only one a classifier (or next-token) forward reads: the
/// last decoder block computes its query, attention output and MLP for these rows alone, its
/// keys and values for every position. Everything a later row would need from that block is
/// skipped: about one block's work and activations.
pub(super) struct LastRows {
    /// Row indices (into the `[b * t]` positions) `[b]` (u32).
    pub(super) idx: Tensor,
    /// RoPE tables at each row's last position `[b, 1, head_dim / 2]`.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// Additive key mask `[b, 1, 1, t]` (f32): 0 over the row's tokens, `-inf` over its padding.
    pub(super) mask: Tensor,
    inv_freq: Vec<f32>,
}

impl LastRows {
    fn new(batch: &Batch, inv_freq: &[f32], dtype: DType, device: &Device) -> Result<LastRows, MlError> {
        let t = batch.ids.dim(1)?;
        let b = batch.spans.len();
        let idx: Vec<u32> = batch.spans.iter().enumerate().map(|(r, (_, e))| (r * t + e - 1) as u32).collect();
        // the last token's position counts from the row's first token, as the tables do
        let ang: Vec<f32> = batch.spans.iter().flat_map(|(s, e)| inv_freq.iter().map(move |f| (e - 1 - s) as f32 * f)).collect();
        let ang = Tensor::from_vec(ang, (b, 1, inv_freq.len()), device)?;
        let mask: Vec<f32> = batch.spans.iter().flat_map(|&(s, e)| (0..t).map(move |j| if (s..e).contains(&j) { 0.0 } else { f32::NEG_INFINITY })).collect();
        Ok(LastRows {
            idx: Tensor::from_vec(idx, b, device)?,
            cos: ang.cos()?.to_dtype(dtype)?,
            sin: ang.sin()?.to_dtype(dtype)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, t), device)?,
            inv_freq: inv_freq.to_vec(),
        })
    }
}

/// What every decoder block of one forward shares.
pub(super) struct BlockInputs {
    pub(super) cfg: Config,
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) spans: CausalSpans,
    /// Query rows per attention chunk.
    pub(super) chunk: usize,
    /// Where only each row's last position is read: the last block computes just those rows.
    pub(super) last: Option<LastRows>,
}

fn linear(blk: &Block, layer: usize, p: Proj, x: &Tensor, lora: Option<(&Lora, &LoraCtx)>) -> candle_core::Result<Tensor> {
    let base = &blk.proj[p as usize];
    match lora {
        Some((l, ctx)) => l.linear(base, layer, p, x, ctx),
        None => base.forward(x),
    }
}

/// A transposed view made contiguous: by coalesced row copies outside autograd, by candle's
/// (differentiable) copy inside it.
fn contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        x.contiguous()
    } else {
        super::fused::contiguous_rows(x)
    }
}

/// `[b, t, heads * hd]` -> `[b, heads, t, hd]`, contiguous (`contiguous`).
fn by_head(x: &Tensor, b: usize, t: usize, heads: usize, hd: usize) -> candle_core::Result<Tensor> {
    contiguous(&x.reshape((b, t, heads, hd))?.transpose(1, 2)?)
}

/// `x + down(silu(gate(h)) * up(h))` with `h` the MLP's norm of `x`: the MLP half of `block` and
/// `last_block`, every op a node of candle's graph.
fn residual_mlp(blk: &Block, li: usize, x: &Tensor, lora: Option<(&Lora, &LoraCtx)>, eps: f32) -> candle_core::Result<Tensor> {
    let h = ops::rms_norm(x, &blk.ffn_norm, eps)?;
    let g = linear(blk, li, Proj::Gate, &h, lora)?;
    let u = linear(blk, li, Proj::Up, &h, lora)?;
    let s = if g.track_op() || u.track_op() { (ops::silu(&g)? * u)? } else { super::fused::swiglu(&g, &u)? };
    let y = linear(blk, li, Proj::Down, &s, lora)?;
    x + y
}

/// One decoder block: attention and MLP, each pre-normed and residual, every op a node of
/// candle's graph (through tracked LoRA factors: the reference the hand-written block backward
/// is tested against). Training uses `block::trained_blocks`, forwards outside autograd
/// `block::inference_block`.
fn block(blk: &Block, li: usize, x: &Tensor, lora: Option<(&Lora, &LoraCtx)>, inp: &BlockInputs) -> candle_core::Result<Tensor> {
    let cfg = &inp.cfg;
    let (b, t) = (inp.b, inp.t);
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let eps = cfg.rms_norm_eps as f32;
    let h = ops::rms_norm(x, &blk.attn_norm, eps)?;
    let q = linear(blk, li, Proj::Q, &h, lora)?;
    let k = linear(blk, li, Proj::K, &h, lora)?;
    let v = linear(blk, li, Proj::V, &h, lora)?;
    let q = by_head(&q, b, t, nh, hd)?;
    let k = by_head(&k, b, t, nkv, hd)?;
    let v = by_head(&v, b, t, nkv, hd)?;
    let q = ops::rope(&q, &inp.cos, &inp.sin, cfg.rope_interleaved)?;
    let k = ops::rope(&k, &inp.cos, &inp.sin, cfg.rope_interleaved)?;
    let y = ops::causal_attention(&q, &k, &v, &inp.spans, inp.chunk, 1.0 / (hd as f64).sqrt())?;
    let y = contiguous(&y.transpose(1, 2)?)?.reshape((b, t, nh * hd))?;
    let y = linear(blk, li, Proj::O, &y, lora)?;
    let x = (x + y)?;
    residual_mlp(blk, li, &x, lora, eps)
}

/// The last decoder block where only each row's last position is read (`LastRows`), every op a
/// node of candle's graph as in `block`: keys and values of every position, the query,
/// attention, o_proj and MLP of the last rows alone. Returns `[b, hidden]`.
fn last_block(blk: &Block, li: usize, x: &Tensor, lora: Option<(&Lora, &LoraCtx)>, inp: &BlockInputs, last: &LastRows) -> candle_core::Result<Tensor> {
    let cfg = &inp.cfg;
    let (b, t) = (inp.b, inp.t);
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let eps = cfg.rms_norm_eps as f32;
    let h = ops::rms_norm(x, &blk.attn_norm, eps)?;
    let k = linear(blk, li, Proj::K, &h, lora)?;
    let v = linear(blk, li, Proj::V, &h, lora)?;
    let h_last = h.reshape((b * t, cfg.hidden_size))?.index_select(&last.idx, 0)?;
    let q = linear(blk, li, Proj::Q, &h_last, lora)?;
    let k = by_head(&k, b, t, nkv, hd)?;
    let v = by_head(&v, b, t, nkv, hd)?;
    let k = ops::rope(&k, &inp.cos, &inp.sin, cfg.rope_interleaved)?;
    let q = ops::rope(&q.reshape((b, nh, 1, hd))?, &last.cos, &last.sin, cfg.rope_interleaved)?;
    let (y, _) = ops::last_query_attention(&q, &k, &v, &last.mask, 1.0 / (hd as f64).sqrt())?;
    let y = linear(blk, li, Proj::O, &y, lora)?;
    let x = (x.reshape((b * t, cfg.hidden_size))?.index_select(&last.idx, 0)? + y)?;
    residual_mlp(blk, li, &x, lora, eps)
}

/// Shapes of well-known Llama-family models, for benchmarks with random weights.
pub fn known_shape(name: &str) -> Option<Config> {
    let base = |hidden, inter, layers, heads, kv, vocab, theta| Config {
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        vocab_size: vocab,
        max_position_embeddings: 8192,
        rope_interleaved: false,
    };
    match name {
        "llama3-8b" => Some(base(4096, 14336, 32, 32, 8, 128_256, 500_000.0)),
        "smollm2-135m" => Some(base(576, 1536, 30, 9, 3, 49_152, 100_000.0)),
        _ => None,
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> HfLlamaConfig {
        let text = format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 100{extra}}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_rope_base_is_read_from_either_config_layout() {
        // transformers 5 nests it; transformers 4 has it at the top; neither: Llama's 10,000
        let v5 = config(r#", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}"#);
        assert_eq!(Config::from_hf(&v5).rope_theta, 100_000.0);
        assert!(v5.check_supported().is_ok());
        let v4 = config(r#", "rope_theta": 500000.0, "rope_scaling": null"#);
        assert_eq!(Config::from_hf(&v4).rope_theta, 500_000.0);
        assert_eq!(Config::from_hf(&config("")).rope_theta, 10_000.0);
    }

    #[test]
    fn scaled_rope_is_refused_not_silently_ignored() {
        let llama31 = config(
            r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let err = llama31.check_supported().unwrap_err().to_string();
        assert!(err.contains("llama3"), "{err}");
        let v5 = config(r#", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}"#);
        assert!(v5.check_supported().is_err());
    }
}
