#!/usr/bin/env bash
# kernel checks of the last build, the 135M A/B of every build, PEFT 135M in the same call
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
LAST=${LAST:-c5}
BENCH_XZ=$T/$LAST/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 120 $BIN kernels --device cuda > $R/kernels-$LAST.jsonl 2> $R/kernels-$LAST.err ) 2>> $R/times.txt
python3 - $R/kernels-$LAST.jsonl <<'PY' > $R/kernels-$LAST.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    k=a.get("kernel","")
    if any(w in k for w in ("packed","strided","factor","alone","rotated")): print(l.strip()[:200])
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
tail -6 $R/kernels-$LAST.txt; tail -2 $R/kernels-$LAST.err; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
B=""; for b in lt c1 c3 c4 c5; do B="$B $b=$T/$b/arbiter-cuda.xz"; done
( time ARGS="$A" ROUNDS=2 timeout 300 bench/gpu_ab.sh $R/ab "$B" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
( time PYTHONUNBUFFERED=1 timeout 150 python3 bench/reference/peft_reference_bench.py --configs smollm2-135m --seq 1024 --warmup 2 --iters 5 --skip-bf16-adapters --out $R/peft-135m.json > $R/peft.log 2>&1 ) 2>> $R/times.txt
save; tail -3 $R/peft.log
grep real $R/times.txt
