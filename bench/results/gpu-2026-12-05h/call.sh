#!/usr/bin/env bash
# the A-gradient kernel reading 16 bytes a lane (g1) against main (m0): kernel checks of g1, the
# 135M A/B (three rounds), PEFT 135M in the same call, parity with g1, the 8B A/B
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/g1/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 120 $BIN kernels --device cuda > $R/kernels-g1.jsonl 2> $R/kernels-g1.err ) 2>> $R/times.txt
python3 - $R/kernels-g1.jsonl <<'PY' > $R/kernels-g1.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if "lora group dA" in a.get("kernel",""): print(l.strip()[:220])
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
tail -9 $R/kernels-g1.txt; tail -2 $R/kernels-g1.err; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 200 bench/gpu_ab.sh $R/ab "m0=$T/m0/arbiter-cuda.xz g1=$T/g1/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
( time PYTHONUNBUFFERED=1 timeout 150 python3 bench/reference/peft_reference_bench.py --configs smollm2-135m --seq 1024 --warmup 2 --iters 5 --skip-bf16-adapters --out $R/peft-135m.json > $R/peft.log 2>&1 ) 2>> $R/times.txt
save; grep "train" $R/peft.log | head -3
BENCH_XZ=$T/g1/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 200 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -h '"ok"' $R/parity.txt | cut -c1-160
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 120 bench/gpu_ab.sh $R/ab8 "m0=$T/m0/arbiter-cuda.xz g1=$T/g1/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab8/ab.md
grep real $R/times.txt
