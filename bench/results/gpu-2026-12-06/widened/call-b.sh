#!/usr/bin/env bash
# q/k/v over widened operands (w1b: w1 with the check mended) against the build before (g3):
# kernel checks of w1b, the 135M A/B (three rounds), PEFT 135M in the same call, the 8B A/B
# (checkpointed; its weights are not widened), one step of w1b under Nsight Compute
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/w1b/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 150 $BIN kernels --device cuda > $R/kernels.jsonl 2> $R/kernels.err ) 2>> $R/times.txt
python3 - $R/kernels.jsonl <<'PY' > $R/kernels.txt
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
tail -45 $R/kernels.txt; tail -3 $R/kernels.err | cut -c1-300; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 200 bench/gpu_ab.sh $R/ab "g3=$T/g3/arbiter-cuda.xz w1b=$T/w1b/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
( time PYTHONUNBUFFERED=1 timeout 150 python3 bench/reference/peft_reference_bench.py --configs smollm2-135m --seq 1024 --warmup 2 --iters 5 --skip-bf16-adapters --out $R/peft-135m.json > $R/peft.log 2>&1 ) 2>> $R/times.txt
save; grep "train" $R/peft.log | head -3 | cut -c1-300
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 120 bench/gpu_ab.sh $R/ab8 "g3=$T/g3/arbiter-cuda.xz w1b=$T/w1b/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab8/ab.md
BENCH_XZ=$T/w1b/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
( time timeout 100 $NCU --clock-control none --cache-control none --profile-from-start off --metrics gpu__time_duration.sum,launch__grid_size,launch__registers_per_thread,dram__bytes_read.sum,dram__bytes_write.sum --csv --page raw $BIN ${A/--steps 5 --warmup 2/--steps 1 --warmup 1} > /tmp/ncu-seq.csv 2> $R/ncu.err ) 2>> $R/times.txt
xz -T4 -c /tmp/ncu-seq.csv > $R/ncu-seq-w1b.csv.xz
python3 bench/profile_layers.py /tmp/ncu-seq.csv 10 > $R/profile-layers-w1b.txt 2>&1
save; head -24 $R/profile-layers-w1b.txt
grep real $R/times.txt
