#!/usr/bin/env bash
# Set up and run the whole test suite from a clean clone: fetch the default model, run the Rust
# tests (unit, HTTP black-box, model parity), then the browser and contract tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test --no-fail-fast "$@"
