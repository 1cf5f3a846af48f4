#!/usr/bin/env bash
# Load test of POST /v1/predict on loopback with the real default model (SmolLM2-135M GGUF,
# dense f32 on CPU): many concurrent keep-alive clients sending short pairs for a bounded
# time, once with the engine's dynamic batching on and once with it off (one request at a
# time), same server build, same adapter, same request stream. Prints one JSON line per mode
# (pairs/s, p50/p90/p99 latency, errors) and exits non-zero on any error.
#
#   bench/predict_load.sh                      # 32 clients, 30 s per mode, 1 pair per request
#   CLIENTS=64 DURATION=60 PAIRS=2 bench/predict_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-32}
SECONDS_PER_MODE=${DURATION:-30}
PAIRS=${PAIRS:-1}
PORT=${PORT:-18431}
BATCH_TOKENS=${BATCH_TOKENS:-2048}
MAX_WAIT_MS=${MAX_WAIT_MS:-5}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=bench/out/predict_load
BIN=${BIN:-}

[ -f "$MODEL" ] || scripts/fetch-model.sh
if [ -z "$BIN" ]; then
    cargo build --release --bin arbiter
    BIN=target/release/arbiter
fi
rm -rf "$OUT"
mkdir -p "$OUT"
python3 bench/predict_load.py adapter "$OUT/adapter"

SERVER_PID=
stop() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
trap stop EXIT

run_mode() {
    local label=$1 batching=$2
    RUST_LOG=warn "$BIN" serve --addr "127.0.0.1:$PORT" --data-dir "$OUT/data" --no-worker \
        --model "$MODEL" --predict-batching "$batching" --predict-batch-tokens "$BATCH_TOKENS" \
        --predict-max-wait-ms "$MAX_WAIT_MS" --predict-queue-rows 4096 \
        >"$OUT/server-$label.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
        sleep 0.1
    done
    python3 bench/predict_load.py register "$OUT/data/arbiter.db" bench "$PWD/$OUT/adapter" "$PWD/$MODEL"
    # warm-up: loads the base model and the adapter, not timed
    curl -sf -X POST "http://127.0.0.1:$PORT/v1/predict" -H 'content-type: application/json' \
        -d '{"adapter":"bench","pairs":[{"prompt":"hi","response_a":"hello","response_b":"hey"}]}' >/dev/null
    python3 bench/predict_load.py load "http://127.0.0.1:$PORT" bench --clients "$CLIENTS" \
        --seconds "$SECONDS_PER_MODE" --pairs-per-request "$PAIRS" --label "$label" | tee -a "$OUT/results.jsonl"
    stop
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $CLIENTS clients, ${SECONDS_PER_MODE}s per mode, $PAIRS pair(s) per request, batch $BATCH_TOKENS tokens, wait ${MAX_WAIT_MS}ms"
status=0
run_mode batching true || status=1
run_mode no-batching false || status=1
exit $status
