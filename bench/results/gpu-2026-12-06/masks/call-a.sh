#!/usr/bin/env bash
# m0 (main's head) against n1 (the adapters' A gradients and input gradient from one pass, masks
# applied unscaled): n1's kernel checks, the 135M A/B with the adapters' dropout (0.05, the
# reference's) and without, three rounds, and Nsight Compute's sections for the adapter kernels
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
BENCH_XZ=$T/n1/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
( time timeout 100 $BIN kernels --device cuda > $R/kernels-n1.jsonl 2> $R/kernels-n1.err ) 2>> $R/times.txt
python3 - $R/kernels-n1.jsonl <<'PY' > $R/kernels-n1.txt
import json,sys
n=bad=0
for l in open(sys.argv[1]):
    try: a=json.loads(l)
    except Exception: continue
    n+=1
    if a.get("max_abs_diff",0)>a.get("tolerance",1e9): bad+=1; print("BAD",l.strip()[:300])
print("checks",n,"beyond",bad)
PY
cat $R/kernels-n1.txt; grep -h '"lora group' $R/kernels-n1.jsonl | head -3 | cut -c1-250; tail -2 $R/kernels-n1.err | cut -c1-300; save
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
( time ARGS="$A
$A --lora-dropout 0" ROUNDS=3 timeout 200 bench/gpu_ab.sh $R/ab "m0=$T/m0/arbiter-cuda.xz n1=$T/n1/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
for b in m0 n1; do
  cp $T/$b/bench-cuda.xz $T/bench-cuda.xz
  ( time timeout 100 bench/ncu_kernels.sh $R lora-$b "lora_down_wide,lora_grad_a_wide,lora_dx" "${A/--steps 5 --warmup 2/--steps 1 --warmup 1}" > $R/ncu-lora-$b-summary.txt ) 2>> $R/times.txt
done
save; grep -E "^  lora|Duration|Issue Slots Busy|Registers Per|Achieved Occ" $R/ncu-lora-*-summary.txt | cut -c1-150 | head -60
grep real $R/times.txt
