#!/usr/bin/env bash
# Interop with transformers + PEFT on the default GGUF base, both ways (CPU, f32). Installs a
# Python with torch, transformers, peft and gguf into VENV (default /opt/peft-venv; ~3 GB, not
# part of CI), then runs tests/peft_interop.rs against it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/opt/peft-venv}
scripts/fetch-model.sh
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, transformers, peft, gguf' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers peft gguf safetensors
fi
"$VENV/bin/python" -c 'import torch, transformers, peft, gguf; import importlib.metadata as m; print(*[f'{p} {m.version(p)}' for p in ('torch','transformers','peft','gguf')])'
ARBITER_PEFT_PYTHON="$VENV/bin/python" cargo test --release --test peft_interop -- --nocapture 2>&1 | grep -E "max \|dp\||test result|panicked"
