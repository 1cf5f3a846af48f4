#!/usr/bin/env bash
# End-to-end browser test of the dashboard: headless Debian chromium driven by playwright-core,
# against the real server binary (target/debug/arbiter, built here if missing or stale).
# Installs what it needs: the chromium package (apt) when /usr/bin/chromium is missing, and the
# pinned npm packages (npm ci). Screenshots land in tests/artifacts/.
#
#   tests/browser/run.sh            # full run, trains the default model for real
#   MOCK=1 tests/browser/run.sh     # the page against a fake API (no model, no build)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

if [[ -z "${CHROMIUM:-}" && ! -x /usr/bin/chromium ]]; then
  echo "installing chromium (apt)"
  sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium >/dev/null
fi
command -v node >/dev/null || { echo "node (>= 18) is needed: apt-get install nodejs npm" >&2; exit 1; }

if [[ ! -d "$here/node_modules/playwright-core" ]]; then
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

if [[ "${MOCK:-}" != "1" && -z "${ARBITER_URL:-}" ]]; then
  if [[ -z "${ARBITER_BIN:-}" ]]; then
    cargo build --bin arbiter
  fi
  model="${ARBITER_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
  if [[ ! -e "$model" && -x scripts/fetch-model.sh ]]; then
    scripts/fetch-model.sh
  fi
fi

mkdir -p tests/artifacts
exec node --test --test-reporter=spec "$here/dashboard.spec.mjs"
