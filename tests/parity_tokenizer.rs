//! Tokenizer parity with llama.cpp: the tokenizer rebuilt from the default GGUF must give the
//! token ids llama.cpp gives (fixture made by `scripts/llama_cpp_reference.py`), and decoding
//! must give the input back. Skipped, with a message, when the model file is absent
//! (`scripts/fetch-model.sh` fetches it).

use std::path::{Path, PathBuf};

use arbiter::ml::tokenizer;
use serde_json::Value;
use tokenizers::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> Value {
    let path = root().join("tests/fixtures/llama_cpp_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_path() -> Option<PathBuf> {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: {} is absent (run scripts/fetch-model.sh)", p.display());
        None
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap_or_else(|e| panic!("encode {text:?}: {e}")).get_ids().to_vec()
}

/// Every fixture string, with and without special-token matching.
fn check_all(tok: &mut Tokenizer, fx: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    let cases = fx["tokenization"].as_array().expect("tokenization").iter().chain(fx["forward"].as_array().expect("forward"));
    for case in cases {
        let text = case["text"].as_str().expect("text");
        tok.set_encode_special_tokens(false);
        let ours = encode(tok, text);
        let theirs = ids_of(&case["ids"]);
        if ours != theirs {
            failures.push(format!("{text:?}: ours {ours:?} llama.cpp {theirs:?}"));
        }
        if let Some(no_special) = case.get("ids_no_special") {
            tok.set_encode_special_tokens(true);
            let ours = encode(tok, text);
            let theirs = ids_of(no_special);
            if ours != theirs {
                failures.push(format!("(special=false) {text:?}: ours {ours:?} llama.cpp {theirs:?}"));
            }
            tok.set_encode_special_tokens(false);
        }
        let back = tok.decode(&encode(tok, text), false).unwrap_or_else(|e| panic!("decode {text:?}: {e}"));
        if back != text {
            failures.push(format!("decode(encode(s)) != s: {text:?} -> {back:?}"));
        }
    }
    failures
}

#[test]
fn parity_tokenizer_gguf_matches_llama_cpp() {
    let Some(path) = model_path() else { return };
    let fx = fixture();
    let mut tok = tokenizer::from_gguf_file(&path).expect("tokenizer from GGUF");
    let mut file = std::fs::File::open(&path).expect("open model");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("GGUF metadata");
    assert_eq!(fx["tokenizer"]["pre"].as_str(), Some(tokenizer::pre_type(&content).as_str()));
    assert_eq!(fx["metadata"]["n_vocab"].as_u64(), Some(tok.get_vocab_size(true) as u64));
    for (key, name) in [("bos_id", "<|im_start|>"), ("eos_id", "<|im_end|>")] {
        let id = fx["tokenizer"][key].as_u64().expect(key) as u32;
        assert_eq!(tok.id_to_token(id).as_deref(), Some(name), "{key}");
    }
    let failures = check_all(&mut tok, &fx);
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn parity_tokenizer_json_round_trip_matches_llama_cpp() {
    let Some(path) = model_path() else { return };
    let fx = fixture();
    let tok = tokenizer::from_gguf_file(&path).expect("tokenizer from GGUF");
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("tokenizer.json");
    tok.save(&json, false).expect("save tokenizer.json");
    let mut loaded = tokenizer::from_file(&json).expect("load tokenizer.json");
    let failures = check_all(&mut loaded, &fx);
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn tokenizer_file_errors_name_the_path() {
    let err = tokenizer::from_file(Path::new("no/such/tokenizer.json")).expect_err("missing file");
    assert!(err.to_string().contains("no/such/tokenizer.json"));
}
