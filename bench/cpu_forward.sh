#!/usr/bin/env bash
# CPU classifier forward throughput, Arbiter vs llama.cpp prompt processing on the same GGUF
# and the same 2 threads, in one run. Needs a Python with llama-cpp-python
# (scripts/requirements-reference.txt); PY defaults to python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
scripts/fetch-model.sh
cargo build --release --bin arbiter
target/release/arbiter bench predict --seq-len 512 --batch-size 1,8 --steps 2 --warmup 1 --lora-r 0
target/release/arbiter bench predict --seq-len 1024 --batch-size 1,8 --steps 2 --warmup 1 --lora-r 0
$PY bench/llama_cpp_forward.py --threads 2 --seq-lens 512,1024 --batches 1,8 --repeats 2
