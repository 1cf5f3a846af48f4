#!/usr/bin/env bash
# n5 (n4 after the review: shared operand loads and stores in the adapter kernels, lora_dx's
# scale applied without masks too, the forward's launches from one argument list): kernel
# checks, the 135M A/B m0/n4/n5 over two rounds, parity with n5
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/n5/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 $BIN kernels --device cuda > $R/kernels-n5.jsonl 2> $R/kernels-n5.err ) 2>> $R/times.txt
python3 - $R/kernels-n5.jsonl <<'PY' > $R/kernels-n5.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
cat $R/kernels-n5.txt; tail -2 $R/kernels-n5.err | cut -c1-300; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=2 timeout 150 bench/gpu_ab.sh $R/ab "m0=$T/m0/arbiter-cuda.xz n4=$T/n4/arbiter-cuda.xz n5=$T/n5/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
BENCH_XZ=$T/n5/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -c '"ok": true' $R/parity.txt
grep real $R/times.txt
