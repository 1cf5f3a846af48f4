//! A tiny random Llama written as a Hugging Face model directory (config.json, random
//! safetensors, a word-level tokenizer.json), for tests that need a real model in milliseconds.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

pub const HIDDEN: usize = 64;
pub const VOCAB: usize = 96;

/// Words of the tiny tokenizer: `w0` .. `w89` plus the template's words.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["<pad>", "<unk>", "User", "prompt:", "Model", "A", ":", "B:", "--------"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in 0..(VOCAB - v.len()) {
        v.push(format!("w{i}"));
    }
    v
}

pub fn write_tiny_model(dir: &Path, seed: u64) {
    let cfg = serde_json::json!({
        "hidden_size": HIDDEN, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": VOCAB, "max_position_embeddings": 512,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut randn = |shape: &[usize], std: f64| {
        let n: usize = shape.iter().product();
        let a = (std * 3f64.sqrt()) as f32;
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    t.insert("model.embed_tokens.weight".into(), randn(&[VOCAB, HIDDEN], 1.0));
    t.insert("model.norm.weight".into(), (randn(&[HIDDEN], 0.1) + 1.0).unwrap());
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (name, o, i) in [
            ("self_attn.q_proj", 64, 64),
            ("self_attn.k_proj", 32, 64),
            ("self_attn.v_proj", 32, 64),
            ("self_attn.o_proj", 64, 64),
            ("mlp.gate_proj", 96, 64),
            ("mlp.up_proj", 96, 64),
            ("mlp.down_proj", 64, 96),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(&[o, i], 0.15));
        }
        t.insert(format!("{p}.input_layernorm.weight"), (randn(&[HIDDEN], 0.1) + 1.0).unwrap());
        t.insert(format!("{p}.post_attention_layernorm.weight"), (randn(&[HIDDEN], 0.1) + 1.0).unwrap());
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab().into_iter().enumerate().map(|(i, w)| (w, serde_json::json!(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

