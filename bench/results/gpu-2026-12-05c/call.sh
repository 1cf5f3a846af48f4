#!/usr/bin/env bash
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
BENCH_XZ=$T/lt/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 120 $BIN kernels --device cuda > $R/kernels-lt.jsonl 2> $R/kernels.err ) 2>> $R/times.txt
echo "kernels rc=$? n=$(wc -l < $R/kernels-lt.jsonl)" >> $R/times.txt
python3 - $R/kernels-lt.jsonl <<'PY' | tee $R/kernels-summary.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if "product-plus" in l: print(l.strip()[:300])
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=2 timeout 200 bench/gpu_ab.sh $R/ab "main=$T/m/arbiter-cuda.xz lt=$T/lt/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 200 bench/gpu_ab.sh $R/ab8 "main=$T/m/arbiter-cuda.xz lt=$T/lt/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
BENCH_XZ=$T/lt/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
( time timeout 200 $NCU --clock-control none --cache-control none --profile-from-start off --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size,dram__bytes_read.sum,dram__bytes_write.sum --csv --page raw $BIN ${A/--steps 5 --warmup 2/--steps 1 --warmup 1} > /tmp/ncu-seq.csv 2> $R/ncu.err ) 2>> $R/times.txt
xz -T4 -c /tmp/ncu-seq.csv > $R/ncu-seq.csv.xz
tar czf $OUT/r.tgz -C $OUT r
cat $R/times.txt; cat $R/ab/ab.md; cat $R/ab8/ab.md; tail -15 $R/parity.txt; tail -3 $R/ncu.err; ls -la $R
