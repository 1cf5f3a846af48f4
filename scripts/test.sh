#!/usr/bin/env bash
# Set up and run the whole test suite from a clean clone: fetch the default model, run the Rust
# tests (unit, HTTP black-box on the real server, model parity, training), then the dashboard's
# end-to-end test in headless Chromium (which installs chromium and playwright-core itself),
# then the contract test: schemathesis against the real binary with openapi.yaml (which installs
# schemathesis from PyPI into a venv under target/ itself).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test --no-fail-fast "$@"
tests/browser/run.sh
scripts/contract.sh
