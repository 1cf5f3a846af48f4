#!/usr/bin/env bash
# Arbiter vs PyTorch + PEFT on one GPU machine, side by side in one run, one table of ratios.
# Needs: target-ship/arbiter-cuda.xz (scripts/build-cuda.sh), python3 with torch, transformers
# and peft on the GPU machine. Usage: bench/gpu.sh [OUTDIR] [CONFIGS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
CONFIGS=${2:-smollm2-135m,llama3-8b}
SEQ=${SEQ:-1024}
mkdir -p "$OUT"
source bench/gpu_common.sh target-ship/arbiter-cuda.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

: > "$OUT/arbiter.jsonl"
IFS=, read -ra NAMES <<< "$CONFIGS"
for shape in "${NAMES[@]}"; do
  bs=32; [ "$shape" = llama3-8b ] && bs=8
  for ckpt in "" --gradient-checkpointing; do
    $BIN train --shape "$shape" --random-init --device cuda --base-format bf16 $ckpt \
      --seq-len "$SEQ" --batch-size $bs --steps ${STEPS:-5} --warmup 2 2>>"$OUT/arbiter.err" | tee -a "$OUT/arbiter.jsonl"
  done
  $BIN predict --shape "$shape" --random-init --device cuda --base-format bf16 \
    --seq-len "$SEQ" --batch-size 1,8,32 --steps ${STEPS:-5} --warmup 2 2>>"$OUT/arbiter.err" | tee -a "$OUT/arbiter.jsonl"
done
tail -5 "$OUT/arbiter.err"

if [ -z "${SKIP_PEFT:-}" ]; then
  PYTHONUNBUFFERED=1 python3 bench/reference/peft_reference_bench.py --configs "$CONFIGS" --seq "$SEQ" \
    --warmup 2 --iters ${STEPS:-5} --skip-bf16-adapters --out "$OUT/peft.json" > "$OUT/peft.log" 2>&1
  tail -20 "$OUT/peft.log"
fi
python3 bench/gpu_table.py "$OUT/arbiter.jsonl" "$OUT/peft.json" | tee "$OUT/table.md"
