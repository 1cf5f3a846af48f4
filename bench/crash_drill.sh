#!/usr/bin/env bash
# Crash drill with the real model on CPU: an API node and worker processes on one SQLite file,
# workers killed with SIGKILL (half of the kills while a checkpoint is being written) and
# restarted; checks every job succeeds once, resumes exactly and leaves no corrupt checkpoint.
# Usage: bench/crash_drill.sh [OUT.json] [bench/crash_drill.py flags: --jobs --workers --kills ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/crash-drill.json}; shift || true
mkdir -p "$(dirname "$OUT")"
scripts/fetch-model.sh
cargo build --release --bin arbiter
python3 bench/crash_drill.py --bin target/release/arbiter --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --sample "${SAMPLE:-../shared/data/arena-sample.csv}" "$@" | tee "$OUT"
