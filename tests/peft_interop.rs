//! Interop with the Python stack, both ways, on the default GGUF base: PEFT loads an adapter
//! written by Arbiter and gives the same probabilities; an adapter written by PEFT is served
//! by Arbiter with the same probabilities. Needs a Python with torch, transformers, peft and
//! gguf: set `ARBITER_PEFT_PYTHON` to it (`bench/peft_interop.sh` installs one); skipped
//! otherwise. Tolerance: 1e-4 absolute on every probability (both sides f32, same weights).

use std::path::Path;

use arbiter::data::ArenaRow;
use arbiter::ml::adapter::{self, AdapterMeta};
use arbiter::ml::classifier;
use arbiter::ml::lora::{Lora, LoraConfig};
use arbiter::ml::model::{BaseFormat, BaseModel};
use arbiter::ml::train;
use candle_core::{Device, Tensor, Var};

fn rows() -> Vec<ArenaRow> {
    let row = |id: &str, p: &str, a: &str, b: &str| ArenaRow {
        id: id.into(),
        prompt: vec![p.into()],
        response_a: vec![a.into()],
        response_b: vec![b.into()],
        label: None,
    };
    vec![
        row("1", "What is the capital of France?", "Paris.", "The capital of France is Lyon."),
        row("2", "Write a haiku about rain", "Rain taps the window\nsoft drums on a sleeping town\nmorning smells of earth", "Rain is wet."),
        row("3", "2+2?", "4", "It is 5, trust me."),
        row("4", "Explain recursion in one sentence.", "A function that calls itself on a smaller input until a base case stops it.", "Recursion: see recursion."),
        row("5", "¿Qué hora es?", "No tengo acceso a la hora actual.", "Son las 3 😀"),
    ]
}

#[test]
fn peft_loads_arbiter_adapters_and_arbiter_serves_peft_adapters() {
    let Ok(python) = std::env::var("ARBITER_PEFT_PYTHON") else {
        eprintln!("skipped: set ARBITER_PEFT_PYTHON to a python with torch, transformers, peft and gguf");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let base = BaseModel::load(&gguf, BaseFormat::F32, &Device::Cpu).expect("base model");
    let case = tempfile::tempdir().unwrap();

    // an Arbiter adapter with non-trivial weights on every projection
    let names: Vec<String> =
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec();
    let cfg = LoraConfig::from_names(8, 16.0, 0.0, &names).unwrap();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let lora = Lora::init(cfg, base.llama.config(), 3, &Device::Cpu, &mut vars).unwrap();
    for (name, v) in &vars {
        if name.contains("lora_B") {
            v.set(&Tensor::randn(0f32, 0.02, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let head = Tensor::randn(0f32, 0.05, (3, base.llama.config().hidden_size), &Device::Cpu).unwrap();
    let meta = AdapterMeta { temperature: 1.0, max_length: 96, base_model: base.name.clone(), ..Default::default() };
    adapter::save(&case.path().join("arbiter_adapter"), &base.llama, &lora, &head, &meta).unwrap();

    let ids: Vec<Vec<u32>> = rows().iter().map(|r| base.encode_row(r, 96).ids).collect();
    let probs = |lora: &Lora, head: &Tensor| -> Vec<[f32; 3]> {
        let logits = train::predict_logits(&base, Some(lora), head, &ids, 1).unwrap();
        logits.iter().map(|l| classifier::softmax3(l, 1.0)).collect()
    };
    let ours = probs(&lora, &head);
    let json = serde_json::json!({ "ids": ids, "arbiter_probs": ours });
    std::fs::write(case.path().join("rows.json"), json.to_string()).unwrap();

    let status = std::process::Command::new(&python)
        .arg(root.join("scripts/peft_interop.py"))
        .arg(&gguf)
        .arg(case.path())
        .status()
        .expect("run python");
    assert!(status.success(), "the PEFT side failed");
    let peft: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.path().join("peft.json")).unwrap()).unwrap();
    let as_rows = |v: &serde_json::Value| -> Vec<[f32; 3]> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let r: Vec<f32> = r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
                [r[0], r[1], r[2]]
            })
            .collect()
    };
    let max_diff = |a: &[[f32; 3]], b: &[[f32; 3]]| {
        a.iter().zip(b).flat_map(|(x, y)| (0..3).map(move |i| (x[i] - y[i]).abs())).fold(0f32, f32::max)
    };

    let forward = as_rows(&peft["forward_probs"]);
    let d = max_diff(&ours, &forward);
    eprintln!("forward (PEFT serves Arbiter's adapter): max |dp| = {d:.2e}; arbiter {ours:?} peft {forward:?}");
    assert!(d < 1e-4, "PEFT's probabilities for Arbiter's adapter differ by {d}");

    let reverse = as_rows(&peft["reverse_probs"]);
    let theirs = adapter::load(&case.path().join("peft_adapter"), &base.llama).expect("load the PEFT adapter");
    let served = probs(&theirs.lora, &theirs.head);
    let d = max_diff(&served, &reverse);
    eprintln!("reverse (Arbiter serves PEFT's adapter): max |dp| = {d:.2e}");
    assert!(d < 1e-4, "Arbiter's probabilities for PEFT's adapter differ by {d}");
}
