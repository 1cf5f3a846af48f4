#!/usr/bin/env bash
# q/k/v over widened operands (w1) against the build before (g3): kernel checks of w1, the 135M
# A/B (three rounds), parity with w1
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/w1/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 $BIN kernels --device cuda > $R/kernels-w1.jsonl 2> $R/kernels-w1.err ) 2>> $R/times.txt
python3 - $R/kernels-w1.jsonl <<'PY' > $R/kernels-w1.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    k=a.get("kernel","")
    if "into" in k or "widened" in k or "rows of" in a.get("dtype",""): print(l.strip()[:200])
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
tail -40 $R/kernels-w1.txt; tail -3 $R/kernels-w1.err; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 200 bench/gpu_ab.sh $R/ab "g3=$T/g3/arbiter-cuda.xz w1=$T/w1/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md; tail -5 $R/ab/ab.err
( time timeout 200 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -h '"ok"' $R/parity.txt | cut -c1-200; tail -3 $R/parity.txt | cut -c1-300
grep real $R/times.txt
