//! The frozen base: backbone + tokenizer, loaded once from a GGUF file or a Hugging Face
//! model directory, shared by training and serving.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device};
use sha2::Digest;
use tokenizers::Tokenizer;

use super::llama::{Llama, WeightFormat};
use super::MlError;

/// How to hold the frozen weights. `Auto` picks dense f32 on CPU (candle's quantized CPU
/// matmul is built for single-token decoding and is ~9x slower on prompt-sized batches) and
/// 4-bit elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BaseFormat {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    /// Keep GGUF weights as stored; quantize dense checkpoints to Q4_0.
    Q4,
    Q4_1,
    Q8,
}

impl BaseFormat {
    pub fn weight_format(self, device: &Device) -> WeightFormat {
        match self {
            BaseFormat::Auto if device.is_cpu() => WeightFormat::Dense(DType::F32),
            BaseFormat::Auto => WeightFormat::Dense(DType::BF16),
            BaseFormat::F32 => WeightFormat::Dense(DType::F32),
            BaseFormat::Bf16 => WeightFormat::Dense(DType::BF16),
            BaseFormat::F16 => WeightFormat::Dense(DType::F16),
            BaseFormat::Q4 => WeightFormat::Quantized(None),
            BaseFormat::Q4_1 => WeightFormat::Quantized(Some(GgmlDType::Q4_1)),
            BaseFormat::Q8 => WeightFormat::Quantized(Some(GgmlDType::Q8_0)),
        }
    }
}

/// A loaded base model.
pub struct BaseModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    /// A human name for the base (the GGUF `general.name` or the directory name).
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Token prepended to every row, if the model's tokenizer adds one.
    pub bos_id: Option<u32>,
    /// Filler for padded positions (never attended to by real tokens).
    pub pad_id: u32,
}

impl BaseModel {
    /// Load a `.gguf` file or a Hugging Face directory.
    pub fn load(path: &Path, format: BaseFormat, device: &Device) -> Result<BaseModel, MlError> {
        let model = if path.is_dir() { Self::load_hf(path, format, device)? } else { Self::load_gguf(path, format, device)? };
        super::pool::settle(device)?;
        Ok(model)
    }

    fn load_gguf(path: &Path, format: BaseFormat, device: &Device) -> Result<BaseModel, MlError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| MlError::Model(format!("cannot open {}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| MlError::Model(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        let tokenizer = super::tokenizer::from_gguf(&ct).map_err(|e| MlError::Tokenizer(e.to_string()))?;
        let llama = Llama::from_gguf(&ct, &mut file, format.weight_format(device), device)?;
        let meta_u32 = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
        let add_bos = ct.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let bos = meta_u32("tokenizer.ggml.bos_token_id");
        let pad_id = meta_u32("tokenizer.ggml.padding_token_id").or(meta_u32("tokenizer.ggml.eos_token_id")).unwrap_or(0);
        let name = ct
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| file_stem(path));
        Ok(BaseModel { llama, tokenizer, name, path: path.to_path_buf(), bos_id: bos.filter(|_| add_bos), pad_id })
    }

    fn load_hf(dir: &Path, format: BaseFormat, device: &Device) -> Result<BaseModel, MlError> {
        let tokenizer = super::tokenizer::from_file(&dir.join("tokenizer.json"))
            .map_err(|e| MlError::Tokenizer(e.to_string()))?;
        let llama = Llama::from_hf_dir(dir, format.weight_format(device), device)?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .unwrap_or(0);
        let bos_id = leading_special_token(&tokenizer);
        Ok(BaseModel { llama, tokenizer, name: file_stem(dir), path: dir.to_path_buf(), bos_id, pad_id })
    }

    /// Token ids of `text` (no special tokens added; special-token text is matched).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        match self.tokenizer.encode_fast(text, false) {
            Ok(enc) => enc.get_ids().to_vec(),
            // the tokenizer only fails on inputs it cannot represent; fall back to nothing
            Err(_) => Vec::new(),
        }
    }

    /// Tokens every encoded row spends on the template around its texts (the BOS token too).
    pub fn template_tokens(&self) -> usize {
        let pieces: usize = crate::data::template::TEMPLATE_PIECES.iter().map(|p| self.tokenize(p).len()).sum();
        usize::from(self.bos_id.is_some()) + pieces
    }

    /// Encode an arena row into at most `max_length` tokens with the balanced truncation.
    pub fn encode_row(&self, row: &crate::data::ArenaRow, max_length: usize) -> crate::data::template::Encoded {
        crate::data::template::encode_pair(row, max_length, |s| self.tokenize(s), self.bos_id)
    }
}

/// The token the tokenizer's post-processor puts before a text (`<|begin_of_text|>` for Llama
/// 3), as `tokenizer(text)` in transformers adds it, and so as models and adapters trained in
/// Python saw every input; None when it adds none.
fn leading_special_token(tokenizer: &Tokenizer) -> Option<u32> {
    let plain = tokenizer.encode_fast("a", false).ok()?;
    let special = tokenizer.encode_fast("a", true).ok()?;
    let (plain, special) = (plain.get_ids(), special.get_ids());
    (special.len() > plain.len() && special[1..].starts_with(plain)).then(|| special[0])
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "base".into())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, MlError> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
