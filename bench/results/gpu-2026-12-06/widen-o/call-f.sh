#!/usr/bin/env bash
# main's head after the review's mends (w9, host-side guards and docs over w8): kernel checks,
# the 135M A/B against w8 and main before this stop (m1), three rounds, PEFT in the same call,
# parity
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/w9/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 $BIN kernels --device cuda > $R/kernels-w9.jsonl 2> $R/kernels-w9.err ) 2>> $R/times.txt
python3 - $R/kernels-w9.jsonl <<'PY' > $R/kernels-w9.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
cat $R/kernels-w9.txt; tail -2 $R/kernels-w9.err | cut -c1-300; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 150 bench/gpu_ab.sh $R/ab "m1=$T/m1/arbiter-cuda.xz w8=$T/w8/arbiter-cuda.xz w9=$T/w9/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
( time PYTHONUNBUFFERED=1 timeout 100 python3 bench/reference/peft_reference_bench.py --configs smollm2-135m --seq 1024 --warmup 2 --iters 5 --skip-bf16-adapters --out $R/peft-135m.json > $R/peft.log 2>&1 ) 2>> $R/times.txt
save; grep '"train"' $R/peft.log | head -1 | cut -c1-300
BENCH_XZ=$T/w9/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -h '"ok"' $R/parity.txt | cut -c1-200
grep real $R/times.txt
