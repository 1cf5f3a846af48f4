//! Tokenizers: rebuilt from GGUF metadata (byte-level BPE) or read from `tokenizer.json`.
//!
//! The GGUF path starts from candle's `TokenizerFromGguf` (vocabulary, merges, special tokens,
//! BOS/EOS post-processing) and replaces the pieces where candle 0.11.1 differs from llama.cpp,
//! checked against llama.cpp's own tokenization in `tests/parity_tokenizer.rs`:
//! - `tokenizer.ggml.pre` values that llama.cpp splits with "each digit alone, then the GPT-2
//!   regex" (`smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`):
//!   candle falls back to a plain GPT-2 byte-level pre-tokenizer, whose ` ?\p{N}+` lets a space
//!   join the digits after it; llama.cpp splits every digit off first. We use
//!   `Digits(individual) + ByteLevel(regex)`, as those models' `tokenizer.json` do.
//! - The GPT-2 fallback in candle adds a prefix space (`ByteLevel::default()`), so with this
//!   model `"Hello world"` encodes as `[38699, 905]` (`" Hello world"`) where llama.cpp gives
//!   `[19556, 905]`, and decoding returns the extra space. llama.cpp never adds one for BPE
//!   vocabularies; we turn it off (pre-tokenizer, decoder and post-processor).
//!
//! Special-token text (`<|im_start|>`...) is matched inside the input, as llama.cpp does with
//! `special = true`; to treat it as plain text (llama.cpp's `special = false`) call
//! `tokenizer.set_encode_special_tokens(true)`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot rebuild the tokenizer from GGUF metadata: {0}")]
    Gguf(String),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
}

/// `tokenizer.ggml.pre` values for which llama.cpp splits digits one by one, then applies the
/// GPT-2 regex (llama.cpp `llama-vocab.cpp`, the `STARCODER ... SMOLLM ...` case).
const DIGITS_THEN_GPT2: [&str; 7] = ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"];

/// `tokenizer.ggml.pre` values candle 0.11.1 handles itself and llama.cpp agrees with.
const CANDLE_PRE: [&str; 5] = ["qwen2", "smaug-bpe", "lfm2", "llama3", "llama-bpe"];

/// The pre-tokenizer value of a GGUF file (`gpt2` when absent, as llama.cpp assumes).
pub fn pre_type(content: &gguf_file::Content) -> String {
    content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "gpt2".to_string())
}

/// Rebuild the tokenizer stored in a GGUF file's metadata, matching llama.cpp's tokenization
/// (see the module docs for what is changed from candle's).
pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer, TokenizerError> {
    let mut tokenizer = Tokenizer::from_gguf(content).map_err(|e| TokenizerError::Gguf(e.to_string()))?;
    let pre = pre_type(content);
    if CANDLE_PRE.contains(&pre.as_str()) {
        return Ok(tokenizer);
    }
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = if DIGITS_THEN_GPT2.contains(&pre.as_str()) {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        // "gpt2", and the fallback for values we do not know: GPT-2 regex, no prefix space.
        byte_level.into()
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    // Only replace the byte-level post-processor; keep a BOS/EOS template if candle built one.
    if matches!(tokenizer.get_post_processor(), Some(tokenizers::PostProcessorWrapper::ByteLevel(_))) {
        tokenizer.with_post_processor(Some(ByteLevelProcessor::new(false, true, true)));
    }
    Ok(tokenizer)
}

/// Read a GGUF file's metadata and rebuild its tokenizer.
pub fn from_gguf_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let file_err = |reason: String| TokenizerError::File { path: path.display().to_string(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| file_err(e.to_string()))?;
    from_gguf(&content)
}

/// Read a Hugging Face `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_file(path)
        .map_err(|e| TokenizerError::File { path: path.display().to_string(), reason: e.to_string() })
}
