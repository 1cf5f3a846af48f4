#!/usr/bin/env bash
# w7 (main now: the previous call's w7) and w8 (w7 with the embedding rows gathered from the device
# table by the 16-byte kernel, and the last query's attention as bf16 strided-batched GEMMs)
# against main before this stop (m1): kernel checks of w8 (and of w7 where one of w8's fails),
# the 135M A/B (five rounds), PEFT 135M in the same call, parity with w8, the 8B with and
# without checkpointing (m1 and w8), batch-1 prediction (m1 and w8), one step of w8 under Nsight Compute
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
kernels() {
BENCH_XZ=$T/$1/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 $BIN kernels --device cuda > $R/kernels-$1.jsonl 2> $R/kernels-$1.err ) 2>> $R/times.txt
python3 - $R/kernels-$1.jsonl <<'PY' > $R/kernels-$1.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    k=a.get("kernel","")
    if "wider" in k or "widened" in k: print(l.strip()[:200])
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
tail -30 $R/kernels-$1.txt; tail -3 $R/kernels-$1.err | cut -c1-300; save
}
kernels w8
grep -q "beyond 0" $R/kernels-w8.txt || kernels w7
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=5 timeout 300 bench/gpu_ab.sh $R/ab "m1=$T/m1/arbiter-cuda.xz w7=$T/w7/arbiter-cuda.xz w8=$T/w8/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md; tail -5 $R/ab/ab.err | cut -c1-300
( time PYTHONUNBUFFERED=1 timeout 150 python3 bench/reference/peft_reference_bench.py --configs smollm2-135m --seq 1024 --warmup 2 --iters 5 --skip-bf16-adapters --out $R/peft-135m.json > $R/peft.log 2>&1 ) 2>> $R/times.txt
save; grep "train" $R/peft.log | head -3 | cut -c1-300
BENCH_XZ=$T/w8/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 python3 bench/reference/parity.py --bin /tmp/arbiter-bench --device cuda --shapes smollm2-135m,llama3-8b:2 --train-steps 5 > $R/parity.txt 2>&1 ) 2>> $R/times.txt
save; grep -h '"ok"' $R/parity.txt | cut -c1-200; tail -3 $R/parity.txt | cut -c1-300
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1
train --shape llama3-8b --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 200 bench/gpu_ab.sh $R/ab8 "m1=$T/m1/arbiter-cuda.xz w8=$T/w8/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
P="predict --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 1 --steps 20 --warmup 3"
( time ARGS="$P" ROUNDS=3 timeout 120 bench/gpu_ab.sh $R/abp "m1=$T/m1/arbiter-cuda.xz w8=$T/w8/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab8/ab.md; cat $R/abp/ab.md; grep -o '"peak[^,]*' $R/ab8/ab.jsonl
BENCH_XZ=$T/w8/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
( time timeout 75 $NCU --clock-control none --cache-control none --profile-from-start off --metrics gpu__time_duration.sum,launch__grid_size,launch__registers_per_thread,dram__bytes_read.sum,dram__bytes_write.sum --csv --page raw $BIN ${A/--steps 5 --warmup 2/--steps 1 --warmup 1} > /tmp/ncu-seq.csv 2> $R/ncu.err ) 2>> $R/times.txt
xz -T4 -c /tmp/ncu-seq.csv > $R/ncu-seq-w8.csv.xz
python3 bench/profile_layers.py /tmp/ncu-seq.csv 10 > $R/profile-layers-w8.txt 2>&1
save; head -50 $R/profile-layers-w8.txt
grep real $R/times.txt
