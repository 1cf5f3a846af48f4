#!/usr/bin/env bash
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
check() {  # build name: kernel checks; the last line says how many are beyond tolerance
  BENCH_XZ=$T/$1/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
  timeout 120 $BIN kernels --device cuda > $R/kernels-$1.jsonl 2> $R/kernels-$1.err
  python3 - $R/kernels-$1.jsonl <<'PY' > $R/kernels-$1.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if "lora" in a.get("kernel",""): print(l.strip()[:220])
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
}
check up; check pf
tail -1 $R/kernels-up.txt $R/kernels-pf.txt
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 240 bench/gpu_ab.sh $R/ab "main=$T/m/arbiter-cuda.xz lt=$T/lt/arbiter-cuda.xz up=$T/up/arbiter-cuda.xz pf=$T/pf/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/ab/ab.md
# the best build whose kernel checks all pass
P=$(python3 - $R <<'PY'
import json,sys,statistics,collections
R=sys.argv[1]
ok=[b for b in ("up","pf") if open(f"{R}/kernels-{b}.txt").read().strip().endswith("beyond 0")]
runs=collections.defaultdict(list)
for l in open(f"{R}/ab/ab.jsonl"):
    a=json.loads(l)
    if a["run"]: runs[a["build"]].append(a["run"]["tokens_per_s"] if "tokens_per_s" in a["run"] else a["run"].get("tok_per_s",0))
med={b:statistics.median(v) for b,v in runs.items() if v}
c=[b for b in ok if b in med]
print(max(c,key=lambda b:med[b]) if c else "lt")
PY
)
echo "best: $P" | tee $R/best.txt
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 150 bench/gpu_ab.sh $R/ab8 "lt=$T/lt/arbiter-cuda.xz $P=$T/$P/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/ab8/ab.md
BENCH_XZ=$T/$P/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
grep -h '"ok"' $R/parity.txt | cut -c1-200
( time STEPS=5 BENCH_XZ=$T/$P/arbiter-cuda.xz timeout 150 bench/gpu.sh $R/g smollm2-135m > $R/g.out 2>&1 ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/g/table.md
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
BENCH_XZ=$T/$P/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 $NCU --clock-control none --cache-control none --profile-from-start off --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size,dram__bytes_read.sum,dram__bytes_write.sum --csv --page raw $BIN ${A/--steps 5 --warmup 2/--steps 1 --warmup 1} > /tmp/ncu-seq.csv 2> $R/ncu.err ) 2>> $R/times.txt
xz -T4 -c /tmp/ncu-seq.csv > $R/ncu-seq-$P.csv.xz
tar czf $OUT/r.tgz -C $OUT r
grep real $R/times.txt
