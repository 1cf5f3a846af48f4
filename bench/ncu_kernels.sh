#!/usr/bin/env bash
# Nsight Compute's detailed sections (speed of light, occupancy, warp stall reasons, scheduler,
# pipes, memory) for the first launches of the kernels matching each regex, during one Arbiter
# bench step; clocks left alone. Usage:
#   bench/ncu_kernels.sh OUTDIR NAME "REGEX[,REGEX...]" "<bench args>"
# writes OUTDIR/ncu-NAME.txt (two launches of each regex's kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1 NAME=$2 REGEXES=$3 ARGS=$4
source bench/gpu_common.sh target-ship/bench-cuda.xz
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
: > "$OUT/ncu-$NAME.txt"
IFS=, read -ra RS <<< "$REGEXES"
for re in "${RS[@]}"; do
  $NCU --clock-control none -k "regex:$re" --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    $BIN $ARGS >> "$OUT/ncu-$NAME.txt" 2>> "$OUT/ncu-$NAME.err"
done
grep -E "^  [a-z_]+[0-9]*(_[0-9]+)? |Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|No Eligible|Registers Per|Stall|Warp Cycles Per Issued" "$OUT/ncu-$NAME.txt" | head -120
