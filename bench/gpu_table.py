#!/usr/bin/env python3
"""One table: Arbiter (bench JSON lines) vs PEFT (reference JSON), with ratios."""
import json, sys

arb = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
try:
    peft = json.load(open(sys.argv[2]))["results"]
except Exception:
    peft = []

def peft_row(config, kind, batch, ckpt=False, variant=None):
    for r in peft:
        if r["config"] == config and r["kind"] == kind and r["batch"] == batch and r.get("ckpt") == ckpt \
                and (variant is None or r["variant"] == variant) and "error" not in r:
            return r
    return None

# Arbiter's peak is device memory in use (total - free, polled through the step), with in
# parentheses the same less what the CUDA context held before any weight was loaded; PEFT's is
# torch.cuda.max_memory_allocated, which counts neither the context nor the allocator's cache;
# Arbiter's counterpart of that is the allocated column (the CUDA pool's high watermark, plus
# what captured forwards reserve in the graphs' own pool, marked "+ graphs").
print("| shape | mode | batch | checkpointing | Arbiter | PEFT | ratio | Arbiter peak GiB (less context) | Arbiter allocated GiB | PEFT peak GiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for a in arb:
    shape, mode, b = a["shape"], a["mode"], a["batch_size"]
    if mode == "train":
        ckpt = bool(a.get("gradient_checkpointing"))
        p = peft_row(shape, "train", b, ckpt=ckpt)
        av, pv, unit = a["tokens_per_s"], (p or {}).get("tokens_per_s"), "tok/s"
    else:
        p = peft_row(shape, "infer", b, variant="merged-bf16")
        av, pv, unit = a["sequences_per_s"], (p or {}).get("seq_per_s"), "seq/s"
    ratio = f"{av / pv:.2f}x" if pv else "n/a"
    ag = (a.get("peak_gpu_bytes") or 0) / 2**30
    al = a.get("peak_allocated_bytes")
    gr = a.get("graph_reserved_bytes")
    al_s = f"{al / 2**30:.1f}" if al is not None else "n/a"
    if al is not None and gr:
        al_s = f"{(al + gr) / 2**30:.1f} (+ graphs)"
    ctx = (a.get("gpu_context_bytes") or 0) / 2**30
    pg = (p or {}).get("peak_gib")
    pv_s = f"{pv:,.1f} {unit}" if pv else "n/a"
    pg_s = f"{pg:.1f}" if pg is not None else "n/a"
    ck = ("on" if a.get("gradient_checkpointing") else "off") if mode == "train" else ""
    print(f"| {shape} | {mode} | {b} | {ck} | {av:,.1f} {unit} | {pv_s} | {ratio} | {ag:.1f} ({ag - ctx:.1f}) | {al_s} | {pg_s} |")
