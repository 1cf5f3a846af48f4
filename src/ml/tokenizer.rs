//! Tokenizers: rebuilt from GGUF metadata (byte-level BPE) or read from `tokenizer.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot rebuild the tokenizer from GGUF metadata: {0}")]
    Gguf(String),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
}

/// Rebuild the tokenizer stored in a GGUF file's metadata.
pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(content).map_err(|e| TokenizerError::Gguf(e.to_string()))
}

/// Read a Hugging Face `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_file(path)
        .map_err(|e| TokenizerError::File { path: path.display().to_string(), reason: e.to_string() })
}
