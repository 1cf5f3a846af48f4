#!/usr/bin/env bash
# Per-kernel GPU time of one Arbiter bench step (Nsight Compute, clocks left alone), summed by
# kernel name. Usage: bench/profile_gpu.sh OUTDIR "<bench args>". Nsight Compute flushes the caches
# before each kernel unless CACHE=none (then a kernel finds what the one before left in L2, as in
# a plain run). With STEPS_ONLY=1 only the measured steps are profiled (the bench starts the
# profiler's collection after the warm-up and stops it after the steps), not the model's
# initialisation.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}; ARGS=${2:-"predict --shape llama3-8b --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 8 --steps 1 --warmup 0"}
source bench/gpu_common.sh target-ship/bench-cuda.xz
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
name=$(echo "$ARGS" | tr ' ' '\n' | grep -A1 -- --shape | tail -1)-$(echo "$ARGS" | cut -d' ' -f1)
FROM=""; [ -n "${STEPS_ONLY:-}" ] && FROM="--profile-from-start off"
$NCU --clock-control none --cache-control ${CACHE:-all} $FROM --metrics gpu__time_duration.sum --csv --page raw $BIN $ARGS > "/tmp/ncu-$name.csv" 2> "$OUT/ncu-$name.err"
python3 - "/tmp/ncu-$name.csv" <<'PY' | tee "$OUT/profile-$name.txt"
import csv, sys, collections
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
r = csv.DictReader(rows)
tot = collections.Counter(); cnt = collections.Counter()
for row in r:
    try:
        t = float(row["gpu__time_duration.sum"].replace(",", ""))
    except (KeyError, ValueError, AttributeError):
        continue
    k = row.get("Kernel Name", "?").split("(")[0][:70]
    tot[k] += t; cnt[k] += 1
s = sum(tot.values())
print(f"total kernel time {s/1e6:.2f} ms over {sum(cnt.values())} launches")
for k, t in tot.most_common(40):
    print(f"{t/1e6:9.2f} ms {100*t/s:5.1f}% {cnt[k]:6d}x  {k}")
PY
