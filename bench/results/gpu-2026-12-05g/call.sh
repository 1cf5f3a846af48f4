#!/usr/bin/env bash
# main's binary: the 135M step with and without LoRA dropout (the masks' cost), then Nsight
# Compute sections of one block's LoRA and attention kernels (forward, backward)
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
save() { tar czf $OUT/r.tgz -C $OUT r; }
A="train --shape smollm2-135m --random-init --device cuda --base-format bf16 --seq-len 1024 --batch-size 32 --steps 5 --warmup 2"
B="$A
$A --lora-dropout 0"
( time ARGS="$B" ROUNDS=2 timeout 200 bench/gpu_ab.sh $R/ab "m=$T/m0/arbiter-cuda.xz" > /dev/null ) 2>> $R/times.txt
save; cat $R/ab/ab.md
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
BENCH_XZ=$T/m0/arbiter-cuda.xz source bench/gpu_common.sh $T/arbiter-cuda.xz
K='regex:^(lora_(dx|grad_a|down_wide)_r16|flash_(fwd2|dq|dkv)_64)$'
S="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
P="${A/--steps 5 --warmup 2/--steps 1 --warmup 1}"
for part in "fwd 30 3" "bwd 120 6"; do
  set -- $part
  ( time timeout 150 $NCU --profile-from-start off -k "$K" --launch-skip $2 --launch-count $3 $S --csv --page details $BIN $P > $R/ncu-$1.csv 2> $R/ncu-$1.err ) 2>> $R/times.txt
  save
done
grep -c . $R/ncu-*.csv; tail -3 $R/ncu-bwd.err
grep real $R/times.txt
