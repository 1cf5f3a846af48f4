#!/usr/bin/env bash
# Build the CUDA binary on a machine without a GPU: CUDA 13.0 compiler, headers and libraries
# come from PyPI wheels (scripts/setup-cuda-toolkit.sh). Output: target/cuda/release/arbiter
# and its xz-compressed copy target-ship/arbiter-cuda.xz, ready to carry to a GPU machine.
# With TESTS="predict ..." it also builds those integration tests and ships each as
# target-ship/test-NAME-cuda.xz (run them there with ARBITER_TEST_DEVICE=cuda).
# Usage: scripts/build-cuda.sh [toolkit prefix, default /opt/arbiter-cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-/opt/arbiter-cuda}
CU="$PREFIX/nvidia/cu13"
if [ ! -x "$CU/bin/nvcc" ]; then
  scripts/setup-cuda-toolkit.sh "$PREFIX"
fi
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_PATH="$CU" NVCC="$CU/bin/nvcc" CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$CU/lib:$CU/lib/stubs:${LIBRARY_PATH:-}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --features cuda --bin arbiter --example bench
mkdir -p target-ship
strip -o target-ship/arbiter-cuda "$CARGO_TARGET_DIR/release/arbiter"
strip -o target-ship/bench-cuda "$CARGO_TARGET_DIR/release/examples/bench"
xz -T2 -6 -f target-ship/arbiter-cuda target-ship/bench-cuda
for t in ${TESTS:-}; do
  exe=$(cargo test --release --features cuda --test "$t" --no-run 2>&1 | sed -n "s|.*Executable tests/$t.rs (\(.*\))|\1|p")
  [ -n "$exe" ] || { echo "no test binary for $t" >&2; exit 1; }
  strip -o "target-ship/test-$t-cuda" "$exe"
  xz -T2 -6 -f "target-ship/test-$t-cuda"
done
ls -la target-ship/
