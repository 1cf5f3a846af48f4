#!/usr/bin/env bash
# n2 (n1 with the next tile's gh read ahead in the fused backward, and a forward kernel giving
# each row tile its own warp): kernel checks, the 135M A/B m0/n1/n2 over three rounds, the
# adapter kernels under Nsight Compute, and the 8B checkpointed m0/n2
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/n2/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 $BIN kernels --device cuda > $R/kernels-n2.jsonl 2> $R/kernels-n2.err ) 2>> $R/times.txt
python3 - $R/kernels-n2.jsonl <<'PY' > $R/kernels-n2.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
cat $R/kernels-n2.txt; tail -2 $R/kernels-n2.err | cut -c1-300; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A" ROUNDS=3 timeout 200 bench/gpu_ab.sh $R/ab "m0=$T/m0/arbiter-cuda.xz n1=$T/n1/arbiter-cuda.xz n2=$T/n2/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
cp $T/n2/bench-cuda.xz $T/bench-cuda.xz
( time timeout 100 bench/ncu_kernels.sh $R lora-n2 "lora_down_tiles,lora_down_wide,lora_grad_a_wide" "${A/--steps 5 --warmup 2/--steps 1 --warmup 1}" > $R/ncu-lora-n2-summary.txt ) 2>> $R/times.txt
save; grep -E "^  lora|Duration|Issue Slots Busy|Registers Per|Achieved Occ" $R/ncu-lora-n2-summary.txt | cut -c1-150 | head -40
B="train --shape llama3-8b --random-init --device cuda --base-format bf16 --gradient-checkpointing --seq-len 1024 --batch-size 8 --steps 3 --warmup 1"
( time ARGS="$B" ROUNDS=1 timeout 150 bench/gpu_ab.sh $R/ab8b "m0=$T/m0/arbiter-cuda.xz n2=$T/n2/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab8b/ab.md
grep real $R/times.txt
