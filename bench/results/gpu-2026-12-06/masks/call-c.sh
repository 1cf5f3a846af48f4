#!/usr/bin/env bash
# n3 (n2 with the fused backward and the per-tile forward held to five blocks per SM): kernel
# checks, the 135M A/B m0/n2/n3 over three rounds, PEFT in the same call, parity with n3,
# batch-1 prediction m0/n3, and one step of n3 under Nsight Compute
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/n3/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 $BIN kernels --device cuda > $R/kernels-n3.jsonl 2> $R/kernels-n3.err ) 2>> $R/times.txt
python3 - $R/kernels-n3.jsonl <<'PY' > $R/kernels-n3.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
cat $R/kernels-n3.txt; tail -2 $R/kernels-n3.err | cut -c1-300; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 200 bench/gpu_ab.sh $R/ab "m0=$T/m0/arbiter-cuda.xz n2=$T/n2/arbiter-cuda.xz n3=$T/n3/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
( time PYTHONUNBUFFERED=1 timeout 150 python3 bench/reference/peft_reference_bench.py --configs smollm2-135m --seq 1024 --warmup 2 --iters 5 --skip-bf16-adapters --out $R/peft-135m.json > $R/peft.log 2>&1 ) 2>> $R/times.txt
save; grep '"train"' $R/peft.log | head -1 | cut -c1-300
BENCH_XZ=$T/n3/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -h '"ok"' $R/parity.txt | cut -c1-200; tail -2 $R/parity.txt | cut -c1-300
P="predict --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 1 --steps 20 --warmup 3"
( time ARGS="$P" ROUNDS=3 timeout 100 bench/gpu_ab.sh $R/abp "m0=$T/m0/arbiter-cuda.xz n3=$T/n3/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/abp/ab.md
BENCH_XZ=$T/n3/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
( time timeout 75 $NCU --clock-control none --cache-control none --profile-from-start off --metrics gpu__time_duration.sum,launch__grid_size,launch__registers_per_thread,dram__bytes_read.sum,dram__bytes_write.sum --csv --page raw $BIN ${A/--steps 5 --warmup 2/--steps 1 --warmup 1} > /tmp/ncu-seq.csv 2> $R/ncu.err ) 2>> $R/times.txt
xz -T4 -c /tmp/ncu-seq.csv > $R/ncu-seq-n3.csv.xz
python3 bench/profile_layers.py /tmp/ncu-seq.csv 10 > $R/profile-layers-n3.txt 2>&1
save; head -40 $R/profile-layers-n3.txt
grep real $R/times.txt
