#!/usr/bin/env python3
"""Logit parity between Arbiter and transformers on the same random weights.

transformers builds a random LlamaForSequenceClassification (num_labels 3) of a known shape,
saves it as safetensors, and scores random token rows (right-padded, ragged lengths); Arbiter
loads the same directory (`arbiter bench logits`) and scores the same rows. One JSON line per
(shape, dtype) with the largest difference and the verdict.

Tolerances, relative to the largest |logit| of the reference:
  f32   1e-4   (summation order only)
  bf16  2^-5   (a few bf16 roundings, 2^-8 each, accumulated over the layers)

Usage: parity.py --bin ARBITER [--device cuda] [--shapes smollm2-135m,llama3-8b:2]
                 [--dtypes f32,bf16] [--seq 256] [--rows 4] [--workdir DIR]
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


def check(bin_path, device, shape, layers, dtype, rows, seq, workdir):
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, max_position_embeddings=8192, rms_norm_eps=1e-5, num_labels=3,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = LlamaForSequenceClassification(config).to(TORCH_DTYPE[dtype]).to(device).eval()
    out = os.path.join(workdir, f"{shape}-{cfg['num_hidden_layers']}-{dtype}")
    model.save_pretrained(out, safe_serialization=True)
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
    del model
    ids_path = os.path.join(workdir, "ids.json")
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
    return {
        "shape": shape, "layers": cfg["num_hidden_layers"], "dtype": dtype, "device": device,
        "rows": len(ids), "seq": seq, "max_abs_diff": diff, "max_abs_logit": scale,
        "relative": diff / max(scale, 1e-12), "tolerance": tol,
        "argmax_agree": int((got.argmax(1) == want.argmax(1)).sum().item()),
        "ok": diff <= tol,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2-135m,llama3-8b:2")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="parity-")
    failed = 0
    for spec in a.shapes.split(","):
        shape, _, layers = spec.partition(":")
        for dtype in a.dtypes.split(","):
            r = check(a.bin, a.device, shape, int(layers) if layers else None, dtype, a.rows, a.seq, workdir)
            print(json.dumps(r), flush=True)
            failed += not r["ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
