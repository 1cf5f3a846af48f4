#!/usr/bin/env bash
# Builds compared on one GPU machine in one call: every line of ARGS (`bench` arguments) runs
# under each build in turn, ROUNDS times, alternating, so that a difference between builds is
# not one between machines or calls. One JSON line per run, tagged with its build, into
# OUT/ab.jsonl, then a table of each build's median tokens/s per line of ARGS.
# Usage: bench/gpu_ab.sh OUTDIR "NAME=DIR/arbiter-cuda.xz NAME=DIR/arbiter-cuda.xz ..." (ARGS, ROUNDS
# in the env). A build may carry environment settings for its runs after the path, separated by
# commas: NAME=DIR/arbiter-cuda.xz,VAR=VALUE (one binary run two ways).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1 BUILDS=$2
mkdir -p "$OUT"
: > "$OUT/ab.jsonl"
for round in $(seq 1 "${ROUNDS:-2}"); do
  while read -r args; do
    [ -z "$args" ] && continue
    for build in $BUILDS; do
      name=${build%%=*} spec=${build#*=}
      IFS=, read -ra parts <<< "$spec"
      BENCH_XZ=${parts[0]} source bench/gpu_common.sh target-ship/arbiter-cuda.xz
      line=$(env "${parts[@]:1}" timeout ${RUN_TIMEOUT:-150} $BIN $args 2>>"$OUT/ab.err" | tail -1)
      echo "{\"build\":\"$name\",\"round\":$round,\"args\":\"$args\",\"run\":${line:-null}}" | tee -a "$OUT/ab.jsonl" >/dev/null
    done
  done <<< "$ARGS"
done
python3 - "$OUT/ab.jsonl" <<'PY' | tee "$OUT/ab.md"
import json, sys, statistics, collections
runs = collections.defaultdict(list)
builds, argss = [], []
for l in open(sys.argv[1]):
    a = json.loads(l)
    if a["build"] not in builds: builds.append(a["build"])
    if a["args"] not in argss: argss.append(a["args"])
    if a["run"]: runs[(a["args"], a["build"])].append(a["run"])
print("| run | " + " | ".join(f"{b} tok/s (each)" for b in builds) + " |")
print("|---|" + "---|" * len(builds))
for args in argss:
    cells = []
    for b in builds:
        rs = runs[(args, b)]
        tps = [r["tokens_per_s"] for r in rs]
        cells.append(f"{statistics.median(tps):,.0f} ({', '.join(f'{t:,.0f}' for t in tps)}; loss {rs[-1].get('last_loss') or 0:.6f}; {max(r.get('peak_allocated_bytes') or 0 for r in rs) / 2**30:.3f} GiB)" if rs else "failed")
    print(f"| `{args}` | " + " | ".join(cells) + " |")
PY
