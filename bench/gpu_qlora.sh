#!/usr/bin/env bash
# Arbiter's 4-bit base (Q4_0, dequantized to bf16 per GEMM) vs the notebook's QLoRA
# (bitsandbytes nf4 + double quant, PEFT, bf16 compute) on one GPU machine, side by side in one
# run: Llama-3-8B shape, seq 1024, batch 8, LoRA r16 on q,k,v,o, checkpointing on and off, and
# (Arbiter) micro-batches of 2 without it.
# Usage: bench/gpu_qlora.sh [OUTDIR] [SHAPE]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
SHAPE=${2:-llama3-8b}
mkdir -p "$OUT"
source bench/gpu_common.sh target-ship/arbiter-cuda.xz
bs=8; [ "$SHAPE" = smollm2-135m ] && bs=32
# checkpointing on and off over the whole batch, then the batch as micro-batches of 2 rows
# accumulated into one optimizer step, checkpointing off (the trainer's gradient_accumulation)
: > "$OUT/arbiter-q4.jsonl"
for run in "--gradient-checkpointing" "" "--micro-batch 2"; do
  $BIN train --shape "$SHAPE" --random-init --device cuda --base-format q4 $run \
    --seq-len 1024 --batch-size $bs --steps ${STEPS:-5} --warmup 2 2>>"$OUT/arbiter-q4.err" | tee -a "$OUT/arbiter-q4.jsonl"
done
tail -3 "$OUT/arbiter-q4.err"
if [ -z "${SKIP_PEFT:-}" ] && ! python3 -c 'import bitsandbytes' 2>/dev/null; then
  echo "bitsandbytes is not installed here: the QLoRA reference is skipped (its figures: bench/RESULTS.md)"
  SKIP_PEFT=1
fi
if [ -z "${SKIP_PEFT:-}" ]; then
  OUT="$OUT" PYTHONUNBUFFERED=1 python3 bench/reference/qlora_reference_bench.py "$SHAPE" > "$OUT/qlora.log" 2>&1
  tail -5 "$OUT/qlora.log"
fi
python3 - "$OUT/arbiter-q4.jsonl" "$OUT/qlora.json" "$SHAPE" <<'PY' | tee "$OUT/table-q4.md"
import json, sys
arb = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
try:
    ref = json.load(open(sys.argv[2]))
except Exception:
    ref = {}
# Arbiter's peak as in gpu_table.py: in use, and in parentheses less the CUDA context
# Arbiter's peaks as in gpu_table.py: on the device (in parentheses less the CUDA context),
# and allocated, which is what QLoRA's figure is (torch.cuda.max_memory_allocated). The
# micro-batched run is compared with the checkpointed reference: the same memory budget.
print("| shape | checkpointing | micro-batch | Arbiter Q4_0 tok/s | QLoRA nf4 tok/s | ratio | Arbiter peak GiB on device (less context) | Arbiter peak GiB allocated | QLoRA peak GiB allocated |")
print("|---|---|---|---|---|---|---|---|---|")
for a in arb:
    ck = bool(a["gradient_checkpointing"])
    micro = a.get("micro_batch") or a["batch_size"]
    r = ref.get(f"{sys.argv[3]}/ckpt={ck or micro < a['batch_size']}", {})
    pv = r.get("tok_s")
    ratio = f"{a['tokens_per_s'] / pv:.2f}x" if pv else "n/a"
    pg = r.get("peak_gib")
    dev, ctx, alloc = (a.get(k) or 0 for k in ("peak_gpu_bytes", "gpu_context_bytes", "peak_allocated_bytes"))
    print(f"| {sys.argv[3]} | {'on' if ck else 'off'} | {micro} | {a['tokens_per_s']:,.0f} | {f'{pv:,.0f}' if pv else 'n/a'} | {ratio} "
          f"| {dev / 2**30:.1f} ({(dev - ctx) / 2**30:.1f}) | {alloc / 2**30:.1f} "
          f"| {f'{pg:.1f}' if pg is not None else 'n/a'} |")
PY
