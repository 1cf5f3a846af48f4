#!/usr/bin/env bash
# Soak test of POST /v1/predict: sustained concurrent load on loopback for a bounded time with
# API keys on and a small predictor queue, so that part of the load is turned away. Every
# answer must be 200 (checked predictions) or 429 (overloaded, Retry-After); the server's
# resident memory is sampled every second and must stay flat (end within 10 % + 32 MB of the
# value at 10 s, once the model is warm). One JSON line with statuses, throughput, latency and
# the RSS samples; exits non-zero on any other status or on growth.
#
#   bench/predict_soak.sh                        # 64 clients, 60 s, queue of 32 rows (16 pairs max)
#   CLIENTS=128 DURATION=120 QUEUE_ROWS=16 bench/predict_soak.sh
#   BIN=target/release/arbiter bench/predict_soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-64}
DURATION=${DURATION:-60}
PAIRS=${PAIRS:-1}
QUEUE_ROWS=${QUEUE_ROWS:-32}
MAX_PAIRS=${MAX_PAIRS:-16}
PORT=${PORT:-18432}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=bench/out/predict_soak
BIN=${BIN:-}
KEY="soak-predict-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"

source bench/predict_common.sh
if [ -z "$BIN" ]; then
    # the dev profile builds dependencies (candle) with full optimisation
    cargo build --bin arbiter
    BIN=target/debug/arbiter
fi
predict_prepare "$OUT" "$MODEL"

ARBITER_API_KEYS="predict:$KEY" RUST_LOG=warn "$BIN" serve --addr "127.0.0.1:$PORT" --data-dir "$OUT/data" --no-worker \
    --model "$MODEL" --predict-queue-rows "$QUEUE_ROWS" --predict-max-pairs "$MAX_PAIRS" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
wait_ready "$PORT" "$OUT" "$MODEL" "$KEY"

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $BIN, $CLIENTS clients, ${DURATION}s, $PAIRS pair(s) per request, queue $QUEUE_ROWS rows, at most $MAX_PAIRS pairs per request"
status=0
python3 bench/predict_load.py load "http://127.0.0.1:$PORT" bench --clients "$CLIENTS" --seconds "$DURATION" \
    --pairs-per-request "$PAIRS" --label soak --key "$KEY" --accept-429 --rss-pid "$SERVER_PID" \
    | tee "$OUT/result.json" || status=1
curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null || { echo "the server no longer answers" >&2; status=1; }
python3 - "$OUT/result.json" <<'PY' || status=1
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
bad = {k: v for k, v in r["statuses"].items() if k not in ("200", "429")}
rss = r["rss_mb"]
grown = rss["last"] > rss["at_10s"] * 1.10 + 32
print("statuses %s; RSS at 10 s %.1f MB, max %.1f MB, end %.1f MB" % (r["statuses"], rss["at_10s"], rss["max"], rss["last"]))
if bad or r["errors"] or grown:
    print("FAIL: other statuses %s, errors %d, memory grew %s" % (bad, r["errors"], grown))
    sys.exit(1)
PY
exit $status
