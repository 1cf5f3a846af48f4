#!/usr/bin/env python3
"""Logit and training-loss parity between Arbiter and transformers + PEFT on the same weights.

transformers builds a random LlamaForSequenceClassification (num_labels 3) of a known shape,
saves it as safetensors, and scores random token rows (right-padded, ragged lengths); Arbiter
loads the same directory (`arbiter bench logits`) and scores the same rows. One JSON line per
(shape, dtype) with the largest difference and the verdict.

With --train-steps N, the same model also gets a PEFT LoRA adapter (r 8, alpha 16, every
linear of every block, the score head trained, no dropout; B drawn at random rather than zero
so the first step moves A too), saved as the initial adapter; both sides then take N AdamW
steps (lr --lr, no weight decay) on the rows with fixed labels (`arbiter bench losses`), and
the N losses are compared.

Tolerances, relative to the largest |logit| of the reference (losses: to max(1, |loss|)):
  f32   1e-4   (summation order only)
  bf16  2^-5   (a few bf16 roundings, 2^-8 each, accumulated over the layers)
In bf16 both sides also run against the exact computation on the same (bf16) weights, in f32
(transformers on an f32 copy): `ok` then holds when Arbiter is within the tolerance of
transformers' bf16, or no farther (x1.25) from that f32 computation than transformers' own bf16
is: two bf16 implementations that round differently may each be off by the geometry's bf16
error, and the reference's own error measures it.

Usage: parity.py --bin ARBITER [--device cuda] [--shapes smollm2-135m,llama3-8b:2]
                 [--dtypes f32,bf16] [--seq 256] [--rows 4] [--workdir DIR]
                 [--train-steps N] [--lr 1e-3]
A shape may carry a layer count (`llama3-8b:2`: the 8B geometry with 2 decoder layers).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=10000.0),
}
TOLERANCE = {"f32": 1e-4, "bf16": 2.0 ** -5}
TORCH_DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16}


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ALPHA = 16


def with_adapter(model):
    """`model` with the check's PEFT adapter (r 8, every linear, no dropout, the head trained)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="SEQ_CLS"))


def peft_losses(model, init, device, padded, mask, labels, steps, lr):
    """N AdamW steps of PEFT from the adapter `init` (a PEFT state dict); the losses."""
    from peft import set_peft_model_state_dict

    pm = with_adapter(model)
    set_peft_model_state_dict(pm, init)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-8)
    pm.train()
    losses = []
    for _ in range(steps):
        logits = pm(input_ids=padded.to(device), attention_mask=mask.to(device)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels.to(device))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def train_check(bin_path, device, model, out, ids, padded, mask, dtype, steps, lr):
    """N AdamW steps of PEFT and of Arbiter from the same initial adapter; their losses."""
    import copy
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    probe = with_adapter(copy.deepcopy(model))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in probe.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * 0.05)
    init = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(probe).items()}
    del probe
    adapter = out + "-init-adapter.safetensors"
    save_file(init, adapter)
    labels = torch.tensor([i % 3 for i in range(len(ids))])
    exact = None
    if dtype != "f32":
        exact = peft_losses(copy.deepcopy(model).float(), init, device, padded, mask, labels, steps, lr)
    want = peft_losses(model, init, device, padded, mask, labels, steps, lr)
    ids_path = os.path.join(out, "ids.json")
    res = subprocess.run([bin_path, "bench", "losses", "--model", out, "--adapter", adapter,
                          "--lora-alpha", str(LORA_ALPHA), "--ids", ids_path,
                          "--labels", ",".join(str(int(x)) for x in labels), "--steps", str(steps),
                          "--lr", str(lr), "--device", device, "--base-format", dtype],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"arbiter failed: {res.stderr[-2000:]}")
    got = json.loads(res.stdout)["losses"]
    rel = lambda a, b: max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))
    r = {"losses_peft": want, "losses_arbiter": got, "max_relative": rel(got, want)}
    r["ok"] = r["max_relative"] <= TOLERANCE[dtype]
    if exact is not None:
        r.update(losses_exact_f32=exact, losses_arbiter_vs_exact=rel(got, exact), losses_peft_vs_exact=rel(want, exact))
        r["ok"] = r["ok"] or r["losses_arbiter_vs_exact"] <= 1.25 * r["losses_peft_vs_exact"]
    return r


def check(bin_path, device, shape, layers, dtype, rows, seq, workdir, steps=0, lr=1e-3):
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, max_position_embeddings=8192, rms_norm_eps=1e-5, num_labels=3,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(1234)
    out = os.path.join(workdir, f"{shape}-{cfg['num_hidden_layers']}-{dtype}")
    LlamaForSequenceClassification(config).to(TORCH_DTYPE[dtype]).save_pretrained(out, safe_serialization=True)
    # reloaded as a user loads it: `.to(bfloat16)` on a built model also rounds the RoPE
    # frequencies (a non-persistent buffer) to bf16, which shifts positions by up to a radian
    load = lambda dt: LlamaForSequenceClassification.from_pretrained(out, dtype=dt).to(device).eval()
    model = load(TORCH_DTYPE[dtype])
    gen = torch.Generator().manual_seed(99)
    lengths = [seq, seq - 7, seq // 2, 5][:rows] + [seq] * max(0, rows - 4)
    ids = [torch.randint(1, cfg["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    padded = torch.zeros(len(ids), seq, dtype=torch.long)
    mask = torch.zeros(len(ids), seq, dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        want = model(input_ids=padded.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        exact = None
        if dtype != "f32":
            upcast = load(torch.float32)
            exact = upcast(input_ids=padded.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            del upcast
    ids_path = os.path.join(out, "ids.json")
    with open(ids_path, "w") as f:
        json.dump(ids, f)
    res = subprocess.run([bin_path, "bench", "logits", "--model", out, "--ids", ids_path,
                          "--device", device, "--base-format", dtype],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"arbiter failed: {res.stderr[-2000:]}")
    got = torch.tensor(json.loads(res.stdout)["logits"])
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    tol = TOLERANCE[dtype] * max(scale, 1e-6)
    result = {
        "shape": shape, "layers": cfg["num_hidden_layers"], "dtype": dtype, "device": device,
        "rows": len(ids), "seq": seq, "max_abs_diff": diff, "max_abs_logit": scale,
        "relative": diff / max(scale, 1e-12), "tolerance": tol,
        "argmax_agree": int((got.argmax(1) == want.argmax(1)).sum().item()),
        "ok": diff <= tol,
    }
    if exact is not None:
        result["arbiter_vs_exact"] = (got - exact).abs().max().item()
        result["transformers_vs_exact"] = (want - exact).abs().max().item()
        result["ok"] = result["ok"] or result["arbiter_vs_exact"] <= 1.25 * result["transformers_vs_exact"]
    if steps:
        training = train_check(bin_path, device, model, out, ids, padded, mask, dtype, steps, lr)
        training_ok = training.pop("ok")
        result["ok"] = result["ok"] and training_ok
        result.update(training)
    del model
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2-135m,llama3-8b:2")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--workdir")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="parity-")
    failed = 0
    for spec in a.shapes.split(","):
        shape, _, layers = spec.partition(":")
        for dtype in a.dtypes.split(","):
            r = check(a.bin, a.device, shape, int(layers) if layers else None, dtype, a.rows, a.seq, workdir,
                      a.train_steps, a.lr)
            print(json.dumps(r), flush=True)
            failed += not r["ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
