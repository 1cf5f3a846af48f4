#!/usr/bin/env bash
set -u
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/gpu.txt
date -u > $R/date.txt
T=target-ship
for b in lt m; do
  ( time BENCH_XZ=$T/$b/arbiter-cuda.xz RUNS='llama3-8b q4 2 none' RUN_TIMEOUT=100 bench/gpu_fit.sh $R/q4-$b > /dev/null 2>&1 ) 2>> $R/times.txt
  tar czf $OUT/r.tgz -C $OUT r
done
cat $R/q4-*/fit.md
date -u >> $R/date.txt
( time STEPS=5 BENCH_XZ=$T/lt/arbiter-cuda.xz timeout 380 bench/gpu.sh $R/g llama3-8b > $R/g.out 2>&1 ) 2>> $R/times.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/g/table.md
grep real $R/times.txt
