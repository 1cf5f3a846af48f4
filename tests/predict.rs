//! Prediction over HTTP on the real server: adapters trained here on a tiny random Llama
//! (config.json + safetensors + a word-level tokenizer) in well under a second, registered in
//! the store, then scored through `/v1/predict`, `/predict` (TEI bodies too) and
//! `/v1/predict/file`; adapter listing and file downloads; back-pressure; and one run on the
//! real default GGUF model when it has been fetched.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use arbiter::data::hyper::{Hyperparameters, LoraHyperparameters, LrSchedule};
use arbiter::data::{ArenaRow, Label};
use arbiter::ml::model::{BaseFormat, BaseModel};
use arbiter::ml::observe::{EvalMetrics, TrainObserver};
use arbiter::ml::train::{self, TrainSpec};
use arbiter::store::{now_ms, NewAdapter};
use candle_core::{Device, Tensor};
use common::{error_of, spawn, TestApp};
use serde_json::{json, Value};

#[path = "support/tiny_model.rs"]
mod tiny_model;
use tiny_model::write_tiny_model;

struct Quiet;

impl TrainObserver for Quiet {
    fn on_step(&self, _: u64, _: u64, _: f64, _: f64, _: f64) {}
    fn on_eval(&self, _: u64, _: &EvalMetrics) {}
    fn on_checkpoint(&self, _: u64, _: &Path, _: Option<&EvalMetrics>) {}
    fn on_log(&self, _: &str) {}
    fn should_stop(&self) -> bool {
        false
    }
}

/// A learnable task: the prompt holds a marker word (`w1`: A wins, `w2`: B wins, `w3`: tie);
/// `flip` swaps the A and B labels, so a second adapter learns the opposite answer.
fn synthetic_rows(n: usize, seed: u64, flip: bool) -> Vec<ArenaRow> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let mut filler = |k: usize| -> Vec<String> { (0..k).map(|_| format!("w{}", rng.random_range(10..70))).collect() };
            let (mut prompt, a, b) = (filler(4), filler(4), filler(4));
            let label = Label::from_index(rng.random_range(0..3)).unwrap();
            prompt.insert(rng.random_range(0..5), format!("w{}", label.index() + 1));
            let label = if flip { label.swapped() } else { label };
            ArenaRow {
                id: format!("r{i}"),
                prompt: vec![prompt.join(" ")],
                response_a: vec![a.join(" ")],
                response_b: vec![b.join(" ")],
                label: Some(label),
            }
        })
        .collect()
}

/// The tiny model and two adapters trained on it, made once per test binary.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapters: [PathBuf; 2],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny");
        std::fs::create_dir_all(&model).unwrap();
        write_tiny_model(&model, 1);
        let base = BaseModel::load(&model, BaseFormat::F32, &Device::Cpu).unwrap();
        let mut adapters = Vec::new();
        for (k, flip) in [false, true].into_iter().enumerate() {
            let hp = Hyperparameters {
                epochs: 3,
                batch_size: 8,
                learning_rate: 5e-3,
                max_length: 64,
                lr_schedule: LrSchedule::Linear,
                lora: LoraHyperparameters { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), "v_proj".into()] },
                eval_every_steps: 0,
                checkpoint_every_steps: 0,
                seed: 7 + k as u64,
                // these adapters are calibrated by temperature only; the length model has its
                // own test below
                length_calibration: false,
                ..Default::default()
            };
            let rows = synthetic_rows(64, 1 + k as u64, flip);
            let val = synthetic_rows(16, 100 + k as u64, flip);
            let work = dir.path().join(format!("work{k}"));
            let spec = TrainSpec { base: &base, hp: &hp, train_rows: &rows, validation_rows: &val, work_dir: &work, resume_from: None };
            adapters.push(train::train(&spec, &Quiet).unwrap().adapter_dir);
        }
        let adapters = [adapters[0].clone(), adapters[1].clone()];
        Fixture { _dir: dir, model, adapters }
    })
}

async fn register(app: &TestApp, id: &str, name: &str, base: &Path, dir: &Path) {
    let a = NewAdapter {
        id: id.into(),
        name: name.into(),
        job_id: None,
        base_model: base.display().to_string(),
        path: dir.display().to_string(),
        metrics: json!({"note": "test"}),
    };
    app.store.insert_adapter(&a, now_ms()).await.unwrap();
}

/// A server with the two tiny adapters registered as `ad-a` (`first`) and `ad-b` (`second`).
async fn app_with(extra: &[(&str, &str)]) -> TestApp {
    let f = fixture();
    let mut s = spawn();
    for (k, v) in extra {
        s = s.arg(k, v);
    }
    let app = s.start().await;
    register(&app, "ad-a", "first", &f.model, &f.adapters[0]).await;
    register(&app, "ad-b", "second", &f.model, &f.adapters[1]).await;
    app
}

fn pair(marker: usize, filler: &[usize], extra: usize) -> Value {
    let words = |off: usize, n: usize| -> String {
        (0..n).map(|i| format!("w{}", 10 + (filler[i % filler.len()] + off + i) % 60)).collect::<Vec<_>>().join(" ")
    };
    json!({
        "prompt": format!("{} w{marker} {}", words(0, 2), words(5, extra)),
        "response_a": words(11, 3 + extra % 4),
        "response_b": [words(23, 2), null, words(31, 1 + extra % 3)],
    })
}

fn probs(p: &Value) -> [f64; 3] {
    [p["winner_model_a"].as_f64().unwrap(), p["winner_model_b"].as_f64().unwrap(), p["winner_tie"].as_f64().unwrap()]
}

async fn predict_ok(app: &TestApp, body: &Value) -> Value {
    let res = app.post_json("/v1/predict", body).await;
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

fn assert_well_formed(p: [f64; 3]) {
    for x in p {
        assert!(x.is_finite() && (0.0..=1.0).contains(&x), "probability {x} out of range in {p:?}");
    }
    let s: f64 = p.iter().sum();
    assert!((s - 1.0).abs() < 1e-5, "probabilities sum to {s}");
}

fn max_diff(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|i| (a[i] - b[i]).abs()).fold(0.0, f64::max)
}

#[tokio::test]
async fn predictions_are_well_formed_and_use_the_calibration_temperature() {
    let app = app_with(&[]).await;
    let body = json!({
        "adapter": "first",
        "pairs": [
            {"id": "x1", "prompt": "w5 w1 w20", "response_a": "w30 w31", "response_b": "w40"},
            {"id": 7, "prompt": ["w2 w12", "w13"], "response_a": ["w33"], "response_b": ["w44", null]},
            pair(3, &[1, 2, 3], 2),
        ]
    });
    let v = predict_ok(&app, &body).await;
    assert_eq!(v["adapter"]["id"], "ad-a");
    assert_eq!(v["adapter"]["name"], "first");
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    assert_eq!(preds[0]["id"], "x1");
    assert_eq!(preds[1]["id"], 7);
    assert_eq!(preds[2]["id"], 2, "a pair without id gets its position");
    for p in preds {
        assert_well_formed(probs(p));
        assert_eq!(p["truncated"], false);
    }
    assert!(v["usage"]["tokens"].as_u64().unwrap() > 10);

    // `/predict` answers the same; by id the same as by name
    let res = app.post_json("/predict", &body).await;
    assert_eq!(res.status(), 200);
    let w: Value = res.json().await.unwrap();
    assert_eq!(w["predictions"], v["predictions"]);
    let mut by_id = body.clone();
    by_id["adapter"] = json!("ad-a");
    assert_eq!(predict_ok(&app, &by_id).await["predictions"], v["predictions"]);

    // the same adapter with temperature 2: log-odds halve
    let f = fixture();
    let hot = app.data_dir().join("hot-adapter");
    std::fs::create_dir_all(&hot).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors", "arbiter.json"] {
        std::fs::copy(f.adapters[0].join(file), hot.join(file)).unwrap();
    }
    let mut meta: Value = serde_json::from_str(&std::fs::read_to_string(hot.join("arbiter.json")).unwrap()).unwrap();
    let t1 = meta["temperature"].as_f64().unwrap();
    meta["temperature"] = json!(2.0 * t1);
    std::fs::write(hot.join("arbiter.json"), meta.to_string()).unwrap();
    register(&app, "ad-hot", "hot", &f.model, &hot).await;
    by_id["adapter"] = json!("hot");
    let h = predict_ok(&app, &by_id).await;
    for (p, q) in preds.iter().zip(h["predictions"].as_array().unwrap()) {
        let (p, q) = (probs(p), probs(q));
        for (i, j) in [(0, 1), (0, 2), (1, 2)] {
            let lp = (p[i] / p[j]).ln();
            let lq = (q[i] / q[j]).ln();
            assert!((lq - lp / 2.0).abs() < 1e-4, "log-odds {lq} should be half of {lp}");
        }
    }

    // a short budget truncates and says so
    let mut short = body.clone();
    short["max_length"] = json!(8);
    let s = predict_ok(&app, &short).await;
    assert!(s["predictions"].as_array().unwrap().iter().all(|p| p["truncated"] == true));
    // a huge text is cut (first to a bounded number of characters, then by the policy)
    let huge = json!({"adapter": "first", "pairs": [{"prompt": "w1", "response_a": "w30 ".repeat(100_000), "response_b": ["w40", "w41 ".repeat(50_000)]}]});
    let h = predict_ok(&app, &huge).await;
    assert_eq!(h["predictions"][0]["truncated"], true);
    assert!(h["usage"]["tokens"].as_u64().unwrap() <= 64);
    app.assert_up().await;
}

/// An adapter with a response-length model stacked on its logits: the served probabilities are
/// `softmax(s·logits + c·length_logits)` with the lengths of the texts as sent (also when a
/// text is clipped before tokenizing), and symmetric scoring mirrors the features.
#[tokio::test]
async fn predictions_apply_the_stacked_length_model_to_the_texts_as_sent() {
    use arbiter::ml::calibrate::{self, LengthCalibration, LengthModel};
    let app = app_with(&[]).await;
    let f = fixture();
    let dir = app.data_dir().join("length-adapter");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors", "arbiter.json"] {
        std::fs::copy(f.adapters[0].join(file), dir.join(file)).unwrap();
    }
    let mut meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("arbiter.json")).unwrap()).unwrap();
    let t1 = meta["temperature"].as_f64().unwrap();
    let lc = LengthCalibration {
        logit_scale: 0.5,
        length_scale: 0.8,
        model: LengthModel {
            mean: [0.1, 0.8, 4.0],
            scale: [1.2, 0.7, 1.5],
            weights: [[0.1, -0.05, 0.2], [0.9, -0.9, 0.0], [-0.3, -0.2, 0.4], [0.05, 0.1, -0.3]],
        },
    };
    meta["length_calibration"] = serde_json::to_value(&lc).unwrap();
    std::fs::write(dir.join("arbiter.json"), meta.to_string()).unwrap();
    register(&app, "ad-len", "lengths", &f.model, &dir).await;

    let long = "w30 ".repeat(3_000); // 12,000 characters: clipped to 64 x 64 before tokenizing
    let pairs = json!([
        {"prompt": "w5 w1 w20", "response_a": "w30 w31", "response_b": "w40 w41 w42 w43 w44 w45 w46"},
        {"prompt": "w2", "response_a": long, "response_b": "w44"},
        {"prompt": ["w2 w12", "w13"], "response_a": ["w33", "w34 w35"], "response_b": ["w44"]},
    ]);
    let row = |p: &Value| {
        let turns = |v: &Value| match v {
            Value::Array(a) => a.iter().map(|t| t.as_str().unwrap_or("").to_string()).collect(),
            v => vec![v.as_str().unwrap().to_string()],
        };
        ArenaRow { id: String::new(), prompt: turns(&p["prompt"]), response_a: turns(&p["response_a"]), response_b: turns(&p["response_b"]), label: None }
    };
    for symmetric in [false, true] {
        let plain = predict_ok(&app, &json!({"adapter": "first", "pairs": pairs, "symmetric": symmetric})).await;
        let stacked = predict_ok(&app, &json!({"adapter": "lengths", "pairs": pairs, "symmetric": symmetric})).await;
        for (i, p) in pairs.as_array().unwrap().iter().enumerate() {
            let got = probs(&stacked["predictions"][i]);
            assert_well_formed(got);
            if symmetric {
                // the length part alone is symmetric: A's and B's columns trade places with the pair
                let mut swapped = p.clone();
                swapped["response_a"] = p["response_b"].clone();
                swapped["response_b"] = p["response_a"].clone();
                let s = predict_ok(&app, &json!({"adapter": "lengths", "pairs": [swapped], "symmetric": true})).await;
                let s = probs(&s["predictions"][0]);
                assert!(max_diff(got, [s[1], s[0], s[2]]) < 1e-5, "pair {i}: {got:?} vs swapped {s:?}");
                continue;
            }
            // the plain adapter's probabilities give its logits up to a constant: t1 * ln p
            let q = probs(&plain["predictions"][i]);
            let logits: [f32; 3] = std::array::from_fn(|k| (t1 * q[k].ln()) as f32);
            let feats = calibrate::length_features(&row(p));
            let z = lc.apply(&logits, &feats);
            let want = arbiter::ml::classifier::softmax3(&z, 1.0).map(f64::from);
            assert!(max_diff(got, want) < 1e-4, "pair {i}: served {got:?}, expected {want:?}");
            assert!(max_diff(got, q) > 1e-3, "pair {i}: the length model changed nothing");
        }
    }
    app.assert_up().await;
}

#[tokio::test]
async fn a_pair_scores_the_same_alone_and_inside_large_concurrent_batches() {
    let app = app_with(&[]).await;
    let target = pair(2, &[4, 9, 17], 3);
    let alone = predict_ok(&app, &json!({"adapter": "first", "pairs": [target.clone()]})).await;
    let alone = probs(&alone["predictions"][0]);
    assert_well_formed(alone);

    // 24 concurrent requests of 1..16 pairs of varied lengths, with the target in some of them
    let mut handles = Vec::new();
    for r in 0..24usize {
        let client = app.client.clone();
        let url = app.url("/v1/predict");
        let n = 1 + (r * 7) % 16;
        let mut pairs: Vec<Value> = (0..n).map(|i| pair(1 + (i + r) % 3, &[r, i, 3], (i * 5 + r) % 14)).collect();
        let pos = if r % 3 == 0 {
            let pos = r % n;
            pairs.insert(pos, target.clone());
            Some(pos)
        } else {
            None
        };
        handles.push(tokio::spawn(async move {
            let res = client.post(url).json(&json!({"adapter": "first", "pairs": pairs})).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.unwrap();
            (pos, v, n + usize::from(pos.is_some()))
        }));
    }
    let mut seen = 0;
    for h in handles {
        let (pos, v, n) = h.await.unwrap();
        let preds = v["predictions"].as_array().unwrap();
        assert_eq!(preds.len(), n, "one prediction per pair");
        preds.iter().for_each(|p| assert_well_formed(probs(p)));
        if let Some(pos) = pos {
            let d = max_diff(probs(&preds[pos]), alone);
            assert!(d < 1e-4, "the pair scored {d} apart inside a batch");
            seen += 1;
        }
    }
    assert_eq!(seen, 8);
    app.assert_up().await;
}

#[tokio::test]
async fn symmetric_scoring_is_exactly_symmetric() {
    let app = app_with(&[]).await;
    let pairs: Vec<Value> = (0..5).map(|i| pair(1 + i % 3, &[i, 2 * i + 1], i * 2)).collect();
    let swapped: Vec<Value> = pairs
        .iter()
        .map(|p| json!({"prompt": p["prompt"], "response_a": p["response_b"], "response_b": p["response_a"]}))
        .collect();
    let v = predict_ok(&app, &json!({"adapter": "first", "pairs": pairs, "symmetric": true})).await;
    let w = predict_ok(&app, &json!({"adapter": "first", "pairs": swapped, "symmetric": true})).await;
    let plain = predict_ok(&app, &json!({"adapter": "first", "pairs": pairs})).await;
    assert!(v["usage"]["tokens"].as_u64().unwrap() > plain["usage"]["tokens"].as_u64().unwrap(), "both directions are scored");
    for (p, q) in v["predictions"].as_array().unwrap().iter().zip(w["predictions"].as_array().unwrap()) {
        let (p, q) = (probs(p), probs(q));
        assert_well_formed(p);
        assert!((p[0] - q[1]).abs() <= 1e-6 && (p[1] - q[0]).abs() <= 1e-6 && (p[2] - q[2]).abs() <= 1e-6, "{p:?} vs swapped {q:?}");
    }
}

#[tokio::test]
async fn two_adapters_served_concurrently_each_answer_their_own() {
    let app = app_with(&[]).await;
    let pairs: Vec<Value> = (0..6).map(|i| pair(1 + i % 2, &[i + 3, 5], i)).collect();
    let mut reference = HashMap::new();
    for name in ["first", "second"] {
        let v = predict_ok(&app, &json!({"adapter": name, "pairs": pairs})).await;
        reference.insert(name, v["predictions"].as_array().unwrap().iter().map(probs).collect::<Vec<_>>());
    }
    let apart = reference["first"].iter().zip(&reference["second"]).map(|(a, b)| max_diff(*a, *b)).fold(0.0, f64::max);
    assert!(apart > 1e-2, "the two adapters should disagree (max difference {apart})");

    let mut handles = Vec::new();
    for r in 0..20 {
        let name = if r % 2 == 0 { "first" } else { "second" };
        let client = app.client.clone();
        let url = app.url("/v1/predict");
        let body = json!({"adapter": name, "pairs": pairs});
        handles.push(tokio::spawn(async move {
            let v: Value = client.post(url).json(&body).send().await.unwrap().json().await.unwrap();
            (name, v)
        }));
    }
    for h in handles {
        let (name, v) = h.await.unwrap();
        assert_eq!(v["adapter"]["name"], name);
        for (p, want) in v["predictions"].as_array().unwrap().iter().zip(&reference[name]) {
            let d = max_diff(probs(p), *want);
            assert!(d < 1e-4, "{name}: answer {d} away from its own adapter's");
        }
    }
    // both are hot in the engine's cache now
    let list = app.get_json("/v1/adapters").await;
    let hot: Vec<bool> = list["data"].as_array().unwrap().iter().map(|a| a["hot"].as_bool().unwrap()).collect();
    assert_eq!(hot, vec![true, true]);
}

#[tokio::test]
async fn bad_requests_get_4xx_naming_the_field_and_the_server_stays_up() {
    let app = app_with(&[("--predict-max-pairs", "4")]).await;
    let ok_pair = pair(1, &[1], 1);

    let err = error_of(app.post_json("/v1/predict", &json!({"adapter": "nope", "pairs": [ok_pair]})).await, 404).await;
    assert_eq!(err["code"], "adapter_not_found");
    assert_eq!(err["field"], "adapter");

    let err = error_of(app.post_json("/v1/predict", &json!({"adapter": "first"})).await, 422).await;
    assert!(err["message"].as_str().unwrap().contains("pairs"), "{err}");

    let err = error_of(app.post_json("/v1/predict", &json!({"adapter": "first", "pairs": []})).await, 422).await;
    assert_eq!(err["field"], "pairs");

    let bad = json!({"adapter": "first", "pairs": [ok_pair, {"prompt": 5, "response_a": "a", "response_b": "b"}]});
    let err = error_of(app.post_json("/v1/predict", &bad).await, 422).await;
    assert_eq!(err["field"], "pairs[1].prompt");

    let bad = json!({"adapter": "first", "pairs": [{"prompt": "p", "response_a": "a"}]});
    let err = error_of(app.post_json("/v1/predict", &bad).await, 422).await;
    assert!(err["message"].as_str().unwrap().contains("response_b"), "{err}");

    let bad = json!({"adapter": "first", "pairs": [ok_pair], "colour": 1});
    let err = error_of(app.post_json("/v1/predict", &bad).await, 422).await;
    assert!(err["message"].as_str().unwrap().contains("colour"), "{err}");

    let five: Vec<Value> = (0..5).map(|_| ok_pair.clone()).collect();
    let err = error_of(app.post_json("/v1/predict", &json!({"adapter": "first", "pairs": five})).await, 422).await;
    assert_eq!(err["code"], "too_many_pairs");
    assert_eq!(err["field"], "pairs");

    for n in [0, 3, 1_000_000] {
        let err = error_of(app.post_json("/v1/predict", &json!({"adapter": "first", "pairs": [ok_pair], "max_length": n})).await, 422).await;
        assert_eq!(err["field"], "max_length");
    }

    let err = error_of(app.post_raw("/v1/predict", "application/json", "{\"pairs\": [").await, 400).await;
    assert_eq!(err["code"], "invalid_json");
    let err = error_of(app.post_raw("/predict", "application/json", "{\"inputs\": [").await, 400).await;
    assert_eq!(err["code"], "invalid_json");
    error_of(app.post_raw("/v1/predict", "text/plain", "hello").await, 415).await;
    error_of(app.post_raw("/predict", "text/plain", "hello").await, 415).await;
    let err = error_of(app.post_json("/predict", &json!({"inputs": [["a", "b"]]})).await, 422).await;
    assert!(err["field"].as_str().unwrap_or("").starts_with("inputs") || err["message"].as_str().unwrap().contains("inputs"), "{err}");

    // an adapter whose files are gone: 409, not 5xx
    register(&app, "ad-gone", "gone", &fixture().model, &app.data_dir().join("missing")).await;
    let err = error_of(app.post_json("/v1/predict", &json!({"adapter": "gone", "pairs": [ok_pair]})).await, 409).await;
    assert_eq!(err["code"], "adapter_unusable");
    // an adapter whose base model is gone: 503 with Retry-After
    register(&app, "ad-nobase", "nobase", &app.data_dir().join("no-model"), &fixture().adapters[0]).await;
    let res = app.post_json("/v1/predict", &json!({"adapter": "nobase", "pairs": [ok_pair]})).await;
    assert!(res.headers().get("retry-after").is_some());
    let err = error_of(res, 503).await;
    assert_eq!(err["code"], "model_unavailable");

    app.assert_up().await;
    predict_ok(&app, &json!({"adapter": "first", "pairs": [ok_pair]})).await;
}

#[tokio::test]
async fn an_adapter_missing_from_the_shared_store_is_a_409() {
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    let app = app_with(&[("--artifact-store", url.as_str())]).await;
    // a record whose files were never published: in neither this node's directory nor the store
    register(&app, "ad-unpublished", "unpublished", &fixture().model, &app.data_dir().join("adapters").join("ad-unpublished")).await;
    let body = json!({"adapter": "unpublished", "pairs": [{"prompt": "w1", "response_a": "w30", "response_b": "w40"}]});
    let err = error_of(app.post_json("/v1/predict", &body).await, 409).await;
    assert_eq!(err["code"], "adapter_unusable");
    assert_eq!(err["field"], "adapter");
    app.assert_up().await;
}

#[tokio::test]
async fn tei_bodies_get_tei_answers() {
    let app = app_with(&[("--default-adapter", "second")]).await;
    let v = predict_ok(&app, &json!({"adapter": "second", "pairs": [
        {"prompt": "w1 w20", "response_a": "w30", "response_b": "w40"},
        {"prompt": "w3 w21", "response_a": "w31", "response_b": "w41 w42"},
    ]}))
    .await;
    let res = app.post_json("/predict", &json!({"inputs": [["w1 w20", "w30", "w40"], ["w3 w21", "w31", "w41 w42"]]})).await;
    assert_eq!(res.status(), 200);
    let t: Value = res.json().await.unwrap();
    let lists = t.as_array().unwrap();
    assert_eq!(lists.len(), 2);
    for (list, p) in lists.iter().zip(v["predictions"].as_array().unwrap()) {
        let scores: Vec<f64> = list.as_array().unwrap().iter().map(|s| s["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted by score: {scores:?}");
        let by_label: HashMap<String, f64> =
            list.as_array().unwrap().iter().map(|s| (s["label"].as_str().unwrap().to_string(), s["score"].as_f64().unwrap())).collect();
        let want = probs(p);
        assert!((by_label["winner_model_a"] - want[0]).abs() < 1e-6);
        assert!((by_label["winner_model_b"] - want[1]).abs() < 1e-6);
        assert!((by_label["winner_tie"] - want[2]).abs() < 1e-6);
    }
    // one input: one flat list
    let res = app.post_json("/predict", &json!({"inputs": ["w1 w20", "w30", "w40"]})).await;
    let one: Value = res.json().await.unwrap();
    assert_eq!(one.as_array().unwrap().len(), 3);
    assert!(one[0]["label"].is_string());

    // three inputs of three texts each are a batch of three, not one input of three turns
    let three = json!({"inputs": [["w1 w20", "w30", "w40"], ["w3 w21", "w31", "w41 w42"], ["w2", "w32", "w43"]]});
    let res = app.post_json("/predict", &three).await;
    assert_eq!(res.status(), 200);
    let lists: Value = res.json().await.unwrap();
    assert_eq!(lists.as_array().unwrap().len(), 3, "{lists}");
    assert!(lists.as_array().unwrap().iter().all(Value::is_array), "one list of scores per input: {lists}");
    for (list, p) in lists.as_array().unwrap().iter().zip(v["predictions"].as_array().unwrap()) {
        let a = list.as_array().unwrap().iter().find(|s| s["label"] == "winner_model_a").unwrap();
        assert!((a["score"].as_f64().unwrap() - probs(p)[0]).abs() < 1e-6);
    }
    // one input of three turns each, sent as a batch of one, is the same as the pair API's turns
    let turns = json!({"prompt": ["w1", "w2", "w3"], "response_a": ["w30", "w31", "w32"], "response_b": ["w40", "w41", "w42"]});
    let want = predict_ok(&app, &json!({"adapter": "second", "pairs": [turns]})).await;
    let res = app
        .post_json("/predict", &json!({"inputs": [[["w1", "w2", "w3"], ["w30", "w31", "w32"], ["w40", "w41", "w42"]]]}))
        .await;
    assert_eq!(res.status(), 200);
    let lists: Value = res.json().await.unwrap();
    assert_eq!(lists.as_array().unwrap().len(), 1, "{lists}");
    let a = lists[0].as_array().unwrap().iter().find(|s| s["label"] == "winner_model_a").unwrap();
    assert!((a["score"].as_f64().unwrap() - probs(&want["predictions"][0])[0]).abs() < 1e-6);

    // raw scores of a symmetric call: their softmax is the symmetric probabilities, and the pair
    // with its responses swapped gets them mirrored
    let by_label = |v: &Value| -> HashMap<String, f64> {
        v.as_array().unwrap().iter().map(|s| (s["label"].as_str().unwrap().to_string(), s["score"].as_f64().unwrap())).collect()
    };
    let app = &app;
    let call = |inputs: Value, raw: bool| {
        let body = json!({"inputs": inputs, "symmetric": true, "raw_scores": raw});
        async move { app.post_json("/predict", &body).await.json::<Value>().await.unwrap() }
    };
    let raw = by_label(&call(json!(["w1 w20", "w30", "w40 w41"]), true).await);
    let swapped = by_label(&call(json!(["w1 w20", "w40 w41", "w30"]), true).await);
    let probs = by_label(&call(json!(["w1 w20", "w30", "w40 w41"]), false).await);
    let z: f64 = raw.values().map(|l| l.exp()).sum();
    for label in ["winner_model_a", "winner_model_b", "winner_tie"] {
        assert!((raw[label].exp() / z - probs[label]).abs() < 1e-5, "{raw:?} vs {probs:?}");
    }
    assert!((raw["winner_model_a"] - swapped["winner_model_b"]).abs() < 1e-5, "{raw:?} vs {swapped:?}");
    assert!((raw["winner_tie"] - swapped["winner_tie"]).abs() < 1e-5);
}

#[tokio::test]
async fn a_test_csv_becomes_a_submission_csv() {
    let app = app_with(&[]).await;
    let csv = "id,prompt,response_a,response_b\n\
               11,\"[\"\"w1 w20\"\"]\",\"[\"\"w30\"\"]\",\"[\"\"w40\"\"]\"\n\
               12,\"[\"\"w2 w21\"\", null]\",\"[null]\",\"[null]\"\n\
               13,plain w3 text,\"[\"\"w31\"\"]\",w41\n";
    let res = app.post_raw("/v1/predict/file?adapter=first&symmetric=true", "text/csv", csv).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = res.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "id,winner_model_a,winner_model_b,winner_tie");
    assert_eq!(lines.len(), 4, "every row is scored, even one with two empty responses: {text}");
    let v = predict_ok(&app, &json!({"adapter": "first", "symmetric": true, "pairs": [{"prompt": ["w1 w20"], "response_a": ["w30"], "response_b": ["w40"]}]})).await;
    let cells: Vec<f64> = lines[1].split(',').skip(1).map(|c| c.parse().unwrap()).collect();
    assert!(lines[1].starts_with("11,"));
    assert!(lines[2].starts_with("12,") && lines[3].starts_with("13,"), "file order: {text}");
    assert!(max_diff([cells[0], cells[1], cells[2]], probs(&v["predictions"][0])) < 1e-6);
    for l in &lines[1..] {
        let c: Vec<f64> = l.split(',').skip(1).map(|c| c.parse().unwrap()).collect();
        assert_well_formed([c[0], c[1], c[2]]);
    }
    // multipart works too; a file without the prompt column names it
    let part = reqwest::multipart::Part::bytes(csv.as_bytes().to_vec()).file_name("test.csv");
    let form = reqwest::multipart::Form::new().part("file", part);
    let res = app.client.post(app.url("/v1/predict/file?adapter=first")).multipart(form).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let err = error_of(app.post_raw("/v1/predict/file?adapter=first", "text/csv", "id,response_a,response_b\n1,a,b\n").await, 422).await;
    assert_eq!(err["column"], "prompt");
}

#[tokio::test]
async fn adapters_are_listed_newest_first_and_their_files_download() {
    let app = app_with(&[]).await;
    let list = app.get_json("/v1/adapters").await;
    let names: Vec<&str> = list["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["second", "first"], "newest first");
    assert!(list["data"][0].get("path").is_none(), "server paths are not shown");

    let one = app.get_json("/v1/adapters/ad-a").await;
    assert_eq!(one["name"], "first");
    assert!(one["temperature"].as_f64().unwrap() > 0.0);
    assert_eq!(one["max_length"], 64);
    assert_eq!(one["files"].as_array().unwrap().len(), 3);
    assert_eq!(app.get_json("/v1/adapters/second").await["id"], "ad-b", "by name too");
    error_of(app.get("/v1/adapters/nope").await, 404).await;

    for name in ["adapter_config.json", "adapter_model.safetensors", "arbiter.json"] {
        let res = app.get(&format!("/v1/adapters/ad-a/files/{name}")).await;
        assert_eq!(res.status(), 200, "{name}");
        let bytes = res.bytes().await.unwrap();
        assert_eq!(bytes.as_ref(), std::fs::read(fixture().adapters[0].join(name)).unwrap().as_slice(), "{name}");
    }
    for bad in ["..%2F..%2Fetc%2Fpasswd", "..", "trainable.safetensors", "%2Fetc%2Fpasswd"] {
        let res = app.get(&format!("/v1/adapters/ad-a/files/{bad}")).await;
        assert_eq!(res.status(), 404, "{bad}");
    }
}

/// A multipart import form with the files of adapter directory `dir` (`files` as given, each
/// replaced by `replace` where it names it) and text fields.
fn import_form(dir: &Path, files: &[&str], replace: &[(&str, Vec<u8>)], text: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for f in files {
        let bytes = replace.iter().find(|(n, _)| n == f).map(|(_, b)| b.clone()).unwrap_or_else(|| std::fs::read(dir.join(f)).unwrap());
        form = form.part(f.to_string(), reqwest::multipart::Part::bytes(bytes).file_name(f.to_string()));
    }
    for (k, v) in text {
        form = form.text(k.to_string(), v.to_string());
    }
    form
}

#[tokio::test]
async fn an_adapter_trained_elsewhere_is_imported_served_and_deleted() {
    let f = fixture();
    let app = spawn().arg("--model", f.model.to_str().unwrap()).start().await;
    register(&app, "ad-a", "first", &f.model, &f.adapters[0]).await;
    let all = ["adapter_config.json", "adapter_model.safetensors", "arbiter.json"];
    let import = |form: reqwest::multipart::Form| app.client.post(app.url("/v1/adapters")).multipart(form).send();

    let res = import(import_form(&f.adapters[0], &all, &[], &[("name", "imported")])).await.unwrap();
    assert_eq!(res.status(), 201);
    let imported: Value = res.json().await.unwrap();
    assert_eq!((imported["name"].as_str(), imported["job_id"].is_null()), (Some("imported"), true));
    assert_eq!(imported["files"].as_array().unwrap().len(), 3);
    let id = imported["id"].as_str().unwrap().to_string();
    // the same files on the same base answer as the registered original does
    let pairs = json!([pair(1, &[2, 3], 1), pair(2, &[4, 5], 3)]);
    let theirs = predict_ok(&app, &json!({"adapter": "first", "pairs": pairs})).await;
    let ours = predict_ok(&app, &json!({"adapter": "imported", "pairs": pairs})).await;
    for k in 0..2 {
        assert!(max_diff(probs(&theirs["predictions"][k]), probs(&ours["predictions"][k])) < 1e-6, "{theirs} vs {ours}");
    }
    // a PEFT adapter without Arbiter's file: served at temperature 1, named by default
    let res = import(import_form(&f.adapters[1], &all[..2], &[], &[])).await.unwrap();
    assert_eq!(res.status(), 201);
    let plain: Value = res.json().await.unwrap();
    assert!(plain["name"].as_str().unwrap().starts_with("peft:"), "{plain}");
    assert_eq!(app.get_json(&format!("/v1/adapters/{}", plain["id"].as_str().unwrap())).await["temperature"], 1.0);

    // bad uploads: a 4xx naming the file or field, nothing stored
    let config: Value = serde_json::from_slice(&std::fs::read(f.adapters[0].join("adapter_config.json")).unwrap()).unwrap();
    let mut patterned = config.clone();
    patterned["rank_pattern"] = json!({"q_proj": 8});
    let mut weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(f.adapters[0].join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let a0 = weights.keys().find(|k| k.contains("layers.0.") && k.contains("lora_A")).unwrap().clone();
    weights.insert(a0, Tensor::zeros((3, 7), candle_core::DType::F32, &Device::Cpu).unwrap());
    let reshaped = work_file(|p| candle_core::safetensors::save(&weights, p).unwrap());
    let cases: Vec<(reqwest::multipart::Form, u16, &str, &str)> = vec![
        (import_form(&f.adapters[0], &all[..1], &[], &[]), 422, "missing_file", "adapter_model.safetensors"),
        (import_form(&f.adapters[0], &all[1..2], &[], &[]), 422, "missing_file", "adapter_config.json"),
        (import_form(&f.adapters[0], &all, &[("adapter_config.json", patterned.to_string().into_bytes())], &[]), 422, "adapter_invalid", "adapter_config.json"),
        (import_form(&f.adapters[0], &all, &[("adapter_config.json", b"{not json".to_vec())], &[]), 422, "adapter_invalid", "adapter_config.json"),
        (import_form(&f.adapters[0], &all, &[("adapter_model.safetensors", b"not safetensors".to_vec())], &[]), 422, "adapter_invalid", "adapter_model.safetensors"),
        (import_form(&f.adapters[0], &all, &[("adapter_model.safetensors", reshaped)], &[]), 422, "adapter_invalid", "adapter_model.safetensors"),
        (import_form(&f.adapters[0], &all, &[], &[("name", "imported")]), 409, "name_taken", "name"),
        (import_form(&f.adapters[0], &all, &[], &[("name", "bad name!")]), 422, "invalid_request", "name"),
        (import_form(&f.adapters[0], &all, &[], &[("base_model", "../elsewhere")]), 422, "invalid_request", "base_model"),
        (import_form(&f.adapters[0], &all, &[], &[("colour", "blue")]), 422, "invalid_request", "colour"),
    ];
    for (form, status, code, field) in cases {
        let err = error_of(import(form).await.unwrap(), status).await;
        assert_eq!((err["code"].as_str(), err["field"].as_str()), (Some(code), Some(field)), "{err}");
    }
    let names = |list: Value| list["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(names(app.get_json("/v1/adapters").await).len(), 3, "nothing registered by the bad uploads");
    let stored = || std::fs::read_dir(app.data_dir().join("adapters")).unwrap().count();
    assert_eq!(stored(), 2, "and nothing left on disk");

    // deleting: by name, then it is gone everywhere; files the service did not make stay
    let res = app.client.delete(app.url("/v1/adapters/imported")).send().await.unwrap();
    assert_eq!(res.status(), 204);
    error_of(app.post_json("/v1/predict", &json!({"adapter": "imported", "pairs": pairs})).await, 404).await;
    error_of(app.get(&format!("/v1/adapters/{id}")).await, 404).await;
    assert!(!app.data_dir().join("adapters").join(&id).exists());
    error_of(app.client.delete(app.url(&format!("/v1/adapters/{id}"))).send().await.unwrap(), 404).await;
    assert_eq!(app.client.delete(app.url("/v1/adapters/ad-a")).send().await.unwrap().status(), 204);
    assert!(f.adapters[0].join("adapter_model.safetensors").is_file(), "registered from elsewhere: its files stay");
    assert_eq!(names(app.get_json("/v1/adapters").await).len(), 1);
    app.assert_up().await;
}

#[tokio::test]
async fn an_import_is_checked_before_its_base_model_is_loaded() {
    // A server whose model file cannot be loaded: files that are no adapter are refused for
    // what they are, and only a well-formed adapter meets the unavailable base.
    let f = fixture();
    let app = spawn().start().await;
    let all = ["adapter_config.json", "adapter_model.safetensors"];
    let import = |form: reqwest::multipart::Form| app.client.post(app.url("/v1/adapters")).multipart(form).send();
    let png = b"\x89PNG\r\n\x1a\n".to_vec();
    let garbage = import_form(&f.adapters[0], &all, &[("adapter_config.json", png.clone()), ("adapter_model.safetensors", png)], &[]);
    let err = error_of(import(garbage).await.unwrap(), 422).await;
    assert_eq!((err["code"].as_str(), err["field"].as_str()), (Some("adapter_invalid"), Some("adapter_config.json")), "{err}");
    let weights_only = import_form(&f.adapters[0], &all, &[("adapter_model.safetensors", b"{}".to_vec())], &[]);
    let err = error_of(import(weights_only).await.unwrap(), 422).await;
    assert_eq!(err["field"], "adapter_model.safetensors", "{err}");
    let err = error_of(import(import_form(&f.adapters[0], &all, &[], &[])).await.unwrap(), 503).await;
    assert_eq!(err["code"], "model_unavailable");
    assert_eq!(std::fs::read_dir(app.data_dir().join("adapters")).unwrap().count(), 0, "nothing stored");
    app.assert_up().await;
}

/// The bytes of a file that `write` makes in a temporary directory.
fn work_file(write: impl FnOnce(&Path)) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file");
    write(&path);
    std::fs::read(path).unwrap()
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_nothing_else_fails() {
    let app = app_with(&[("--predict-max-pairs", "2"), ("--predict-queue-rows", "4"), ("--predict-batching", "false")]).await;
    let pairs: Vec<Value> = (0..2).map(|i| pair(1, &[i, 4, 9], 60)).collect();
    let body = json!({"adapter": "first", "pairs": pairs, "symmetric": true});
    predict_ok(&app, &body).await; // warm: adapter loaded
    let mut handles = Vec::new();
    for _ in 0..40 {
        let client = app.client.clone();
        let url = app.url("/v1/predict");
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            let res = client.post(url).json(&body).send().await.unwrap();
            let retry = res.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (res.status().as_u16(), retry, res.json::<Value>().await.unwrap())
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let (status, retry, body) = h.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                busy += 1;
                assert!(retry.is_some_and(|s| s >= 1), "429 without Retry-After");
                assert_eq!(body["error"]["code"], "overloaded");
            }
            s => panic!("unexpected status {s}: {body}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, refused {busy}");
    app.assert_up().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    predict_ok(&app, &body).await;

    // a file scored symmetrically in chunks of two pairs, whose queue holds only one chunk at a
    // time: its chunks go one after the other, none refused
    let mut csv = String::from("id,prompt,response_a,response_b\n");
    for i in 0..9 {
        csv.push_str(&format!("{i},w1 w2{i},w3{i} w40,w41\n"));
    }
    for _ in 0..3 {
        let res = app.post_raw("/v1/predict/file?adapter=first&symmetric=true", "text/csv", csv.clone()).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap().lines().count(), 10);
    }
}

/// The real default model (SmolLM2-135M GGUF), when `scripts/fetch-model.sh` has fetched it: an
/// adapter with random LoRA factors and head on the real base, scored over HTTP.
#[tokio::test]
async fn the_real_default_model_scores_short_pairs() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!("skipped: {} is missing (run scripts/fetch-model.sh)", gguf.display());
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let adapter_dir = work.path().join("real-adapter");
    {
        // only shapes and the Q/K layout matter for writing the adapter: keep weights 4-bit
        let base = BaseModel::load(&gguf, BaseFormat::Q4_1, &Device::Cpu).unwrap();
        let cfg = arbiter::ml::lora::LoraConfig::from_names(4, 8.0, 0.0, &["q_proj".into(), "v_proj".into()]).unwrap();
        let mut vars = Vec::new();
        let lora = arbiter::ml::lora::Lora::init(cfg, base.llama.config(), 3, &Device::Cpu, &mut vars).unwrap();
        for (name, v) in &vars {
            if name.contains("lora_B") {
                v.set(&Tensor::randn(0f32, 0.02, v.dims(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        let hidden = base.llama.config().hidden_size;
        let head = Tensor::randn(0f32, 0.05, (3, hidden), &Device::Cpu).unwrap();
        let meta = arbiter::ml::adapter::AdapterMeta {
            labels: vec![],
            temperature: 1.0,
            max_length: 256,
            base_model: base.name.clone(),
            metrics: Value::Null,
            length_calibration: None,
        };
        arbiter::ml::adapter::save(&adapter_dir, &base.llama, &lora, &head, &meta).unwrap();
    }
    let app = spawn().start().await;
    register(&app, "real", "real", &gguf, &adapter_dir).await;
    let pairs = json!([
        {"prompt": "What is the capital of France?", "response_a": "Paris.", "response_b": "It is Paris, on the Seine."},
        {"prompt": "Say hi", "response_a": "Hi!", "response_b": "Hello there, how can I help?"},
        {"prompt": ["Two plus two?", "And times three?"], "response_a": ["4", "12"], "response_b": ["5", "15"]},
    ]);
    let v = predict_ok(&app, &json!({"adapter": "real", "pairs": pairs, "symmetric": true})).await;
    let preds: Vec<[f64; 3]> = v["predictions"].as_array().unwrap().iter().map(probs).collect();
    preds.iter().for_each(|p| assert_well_formed(*p));
    // each alone gives the same answer as inside the batch
    for (i, p) in pairs.as_array().unwrap().iter().enumerate() {
        let one = predict_ok(&app, &json!({"adapter": "real", "pairs": [p], "symmetric": true})).await;
        let d = max_diff(probs(&one["predictions"][0]), preds[i]);
        assert!(d < 1e-4, "pair {i}: {d} apart alone and in a batch");
    }
    app.assert_up().await;
}

/// An adapter loaded while another base replaces its own in the cache (one base kept) is loaded
/// on a base that is in the cache, not on the evicted one, which would stay in memory unseen.
#[test]
fn an_adapter_is_never_cached_on_an_evicted_base() {
    use arbiter::ml::serve::{Engine, EngineConfig};
    use std::sync::mpsc;
    let f = fixture();
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&f.model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
    }
    let (a_path, b_path) = (f.model.clone(), copy.path().to_path_buf());
    // loading base B tells the test it started, then waits for the test's go (a second load of
    // B, which the test does not expect, goes on after a while instead of hanging)
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (go, go_rx) = mpsc::channel::<()>();
    let (entered_tx, go_rx) = (std::sync::Mutex::new(entered_tx), std::sync::Mutex::new(go_rx));
    let slow = b_path.clone();
    let cfg = EngineConfig { base_cache: 1, ..EngineConfig::default() };
    let engine = Engine::new(cfg, move |p: &Path| {
        if p == slow {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
        }
        BaseModel::load(p, BaseFormat::F32, &Device::Cpu)
    })
    .unwrap();
    engine.base(&a_path).unwrap();
    let on_b = {
        let (engine, dir, b) = (engine.clone(), f.adapters[1].clone(), b_path.clone());
        std::thread::spawn(move || engine.adapter("y", &dir, &b).unwrap())
    };
    entered.recv().unwrap();
    // base A is cached: this thread takes it, then waits while B loads
    let on_a = {
        let (engine, dir, a) = (engine.clone(), f.adapters[0].clone(), a_path.clone());
        std::thread::spawn(move || engine.adapter("x", &dir, &a).unwrap())
    };
    std::thread::sleep(Duration::from_millis(300));
    go.send(()).unwrap();
    on_b.join().unwrap();
    let x = on_a.join().unwrap();
    let cached = engine.base(&a_path).unwrap();
    assert!(std::sync::Arc::ptr_eq(&x.base, &cached), "adapter x sits on a base the cache no longer holds");
}

/// The engine itself: concurrent requests are merged into few forwards when batching is on and
/// run one per forward when it is off, with the same logits; a full queue refuses at once.
#[tokio::test]
async fn the_engine_merges_concurrent_requests_and_bounds_its_queue() {
    use arbiter::ml::serve::{Engine, EngineConfig, ServeError};
    let f = fixture();
    let mut answers = Vec::new();
    for batching in [true, false] {
        let cfg = EngineConfig { batching, max_wait: Duration::from_millis(20), ..EngineConfig::default() };
        let engine = Engine::new(cfg, |p: &Path| BaseModel::load(p, BaseFormat::F32, &Device::Cpu)).unwrap();
        let adapter = engine.adapter("a", &f.adapters[0], &f.model).unwrap();
        let rows = synthetic_rows(20, 55, false);
        let mut pending = Vec::new();
        for r in &rows {
            // requests of one or two rows of different lengths, all queued before any answer
            let ids = vec![adapter.encode(r, 64).ids, adapter.encode(&r.swapped(), 40).ids];
            pending.push(engine.submit(adapter.clone(), ids).unwrap());
        }
        let mut logits = Vec::new();
        for p in pending {
            logits.push(p.await.unwrap());
        }
        let (batches, scored) = engine.counters();
        assert_eq!(scored, 40);
        if batching {
            assert!(batches <= 3, "20 queued requests took {batches} forwards with batching on");
        } else {
            assert_eq!(batches, 20, "one forward per request with batching off");
        }
        answers.push(logits);
    }
    for (a, b) in answers[0].iter().flatten().zip(answers[1].iter().flatten()) {
        for i in 0..3 {
            assert!((a[i] - b[i]).abs() < 1e-4, "batched {a:?} vs alone {b:?}");
        }
    }

    // a queue of 4 rows: two requests of 2 rows fit, the third is refused at once
    let cfg = EngineConfig { queue_rows: 4, max_wait: Duration::from_millis(200), ..EngineConfig::default() };
    let engine = Engine::new(cfg, |p: &Path| BaseModel::load(p, BaseFormat::F32, &Device::Cpu)).unwrap();
    let adapter = engine.adapter("a", &f.adapters[0], &f.model).unwrap();
    let row = adapter.encode(&synthetic_rows(1, 3, false)[0], 64).ids;
    let first = engine.submit(adapter.clone(), vec![row.clone(), row.clone()]).unwrap();
    let second = engine.submit(adapter.clone(), vec![row.clone(), row.clone()]).unwrap();
    match engine.submit(adapter.clone(), vec![row.clone()]) {
        Err(ServeError::Overloaded { retry_after_s }) => assert!(retry_after_s >= 1),
        Err(e) => panic!("expected overloaded, got {e}"),
        Ok(_) => panic!("expected overloaded, the request was queued"),
    }
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(engine.queued_rows(), 0, "answered requests give their room back");
    engine.score(adapter, vec![row]).await.unwrap();
}

/// Captured forwards (CUDA graphs) answer as the kernel-by-kernel forward does. On a GPU
/// (`ARBITER_TEST_DEVICE=cuda`), single-row requests of one padded width are captured the
/// second time their shape is seen and replayed with each later request's ids; on the CPU
/// nothing is captured.
#[tokio::test]
async fn captured_forwards_answer_as_launched_ones() {
    use arbiter::ml::serve::{Engine, EngineConfig};
    let f = fixture();
    let device = arbiter::bench::parse_device(&std::env::var("ARBITER_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap();
    let format = if device.is_cuda() { BaseFormat::Bf16 } else { BaseFormat::F32 };
    // rows of 20 to 64 tokens: one padded width of 64
    let rows = synthetic_rows(6, 77, false);
    let mut answers = Vec::new();
    for graphs in [16, 0] {
        let cfg = EngineConfig { batching: false, graphs, ..EngineConfig::default() };
        let d = device.clone();
        let engine = Engine::new(cfg, move |p: &Path| BaseModel::load(p, format, &d)).unwrap();
        let adapter = engine.adapter("a", &f.adapters[0], &f.model).unwrap();
        let mut logits = Vec::new();
        for r in &rows {
            let ids = adapter.encode(r, 64).ids;
            assert!((20..=64).contains(&ids.len()), "a row of {} tokens", ids.len());
            logits.push(engine.score(adapter.clone(), vec![ids]).await.unwrap()[0]);
        }
        let (captured, replayed) = engine.graph_counters();
        if graphs > 0 && device.is_cuda() {
            assert_eq!((captured, replayed), (1, rows.len() as u64 - 1), "captured at the second row, replayed from then on");
        } else {
            assert_eq!((captured, replayed), (0, 0));
        }
        answers.push(logits);
    }
    let diff = |a: &[f32; 3], b: &[f32; 3]| (0..3).map(|i| (a[i] - b[i]).abs()).fold(0f32, f32::max);
    let tolerance = 0.02;
    for (i, (g, e)) in answers[0].iter().zip(&answers[1]).enumerate() {
        assert!(diff(g, e) <= tolerance, "row {i}: captured {g:?}, launched {e:?}");
    }
    // the rows' logits differ by more than the tolerance, so a replay that kept another row's
    // ids would fail above
    let apart = answers[1].windows(2).map(|w| diff(&w[0], &w[1])).fold(f32::INFINITY, f32::min);
    assert!(apart > 5.0 * tolerance, "consecutive rows' logits only {apart} apart");
}
