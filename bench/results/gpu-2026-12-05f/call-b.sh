#!/usr/bin/env bash
# parity with the last build, the 8B A/B (checkpointed and not), the 4-bit base
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
LAST=${LAST:-c5}
BENCH_XZ=$T/$LAST/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 200 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -h '"ok"' $R/parity.txt | cut -c1-200
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1
train --shape llama3-8b --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 220 bench/gpu_ab.sh $R/ab8 "main=$T/lt/arbiter-cuda.xz $LAST=$T/$LAST/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab8/ab.md
( time BENCH_XZ=$T/$LAST/arbiter-cuda.xz RUNS='llama3-8b q4 2 none' RUN_TIMEOUT=100 bench/gpu_fit.sh $R/q4 > /dev/null 2>&1 ) 2>> $R/times.txt
save; cat $R/q4/fit.md
grep real $R/times.txt
