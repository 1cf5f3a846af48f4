#!/usr/bin/env bash
# Training speed against memory on one GPU machine: each line of RUNS is one `bench train`
# process ("SHAPE FORMAT MICRO_BATCH CHECKPOINTED_LAYERS [MLP_LAYERS [host|device [offload]]]",
# layers: none, all or a count; MLP_LAYERS: the next blocks that recompute only gate and up, 0
# for none; host: the embedding table in host memory; offload: those MLP blocks park gate and up
# in host memory instead of recomputing them), at seq 1024 and batch 8 rows per optimizer step
# (micro-batches accumulate into it). One JSON line per run into OUT/fit.jsonl, then a table.
# Usage: bench/gpu_fit.sh OUTDIR (RUNS in the env).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
mkdir -p "$OUT"
source bench/gpu_common.sh target-ship/arbiter-cuda.xz
: > "$OUT/fit.jsonl"
while read -r shape fmt micro layers mlp host park; do
  [ -z "$shape" ] && continue
  ck=""
  case "$layers" in none) ;; all) ck="--gradient-checkpointing" ;; *) ck="--gradient-checkpointing --checkpointed-layers $layers" ;; esac
  case "${mlp:-0}" in 0) ;; *) ck="$ck --mlp-checkpointed-layers $mlp" ;; esac
  [ "${host:-}" = host ] && ck="$ck --host-embeddings"
  [ "${park:-}" = offload ] && ck="$ck --mlp-offload"
  timeout ${RUN_TIMEOUT:-150} $BIN train --shape "$shape" --random-init --device cuda --base-format "$fmt" $ck \
    --micro-batch "$micro" --seq-len 1024 --batch-size ${BATCH:-8} --steps ${STEPS:-4} --warmup ${WARMUP:-1} \
    2>>"$OUT/fit.err" | tee -a "$OUT/fit.jsonl"
done <<< "$RUNS"
python3 - "$OUT/fit.jsonl" <<'PY' | tee "$OUT/fit.md"
import json, sys
print("| shape | base | micro-batch | recomputed blocks | MLP-recomputed blocks | embeddings | tok/s | ms/step (host queued) | peak GiB in use (less context) | peak GiB allocated | last loss |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for l in open(sys.argv[1]):
    if not l.startswith("{"):
        continue
    a = json.loads(l)
    peak, ctx = a.get("peak_gpu_bytes") or 0, a.get("gpu_context_bytes") or 0
    print(f"| {a['shape']} | {a['base_format']} | {a['micro_batch']} | {a['checkpointed_layers'] or 0} "
          f"| {a.get('mlp_checkpointed_layers') or 0}{' parked in host memory' if a.get('mlp_offload') else ''} | {('host' if a.get('host_embeddings_mapped') else 'host, copied') if a.get('host_embeddings') else 'device'} "
          f"| {a['tokens_per_s']:,.0f} | {a['ms_per_step']:.1f} ({a.get('host_queue_ms_per_step') or 0:.1f}) | {peak / 2**30:.2f} ({(peak - ctx) / 2**30:.2f}) "
          f"| {(a.get('peak_allocated_bytes') or 0) / 2**30:.2f} | {a.get('last_loss') or 0:.6f} |")
PY
