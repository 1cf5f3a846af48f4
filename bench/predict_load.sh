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

source bench/predict_common.sh
if [ -z "$BIN" ]; then
    cargo build --release --bin arbiter
    BIN=target/release/arbiter
fi
predict_prepare "$OUT" "$MODEL"

run_mode() {
    local label=$1 batching=$2
    RUST_LOG=warn "$BIN" serve --addr "127.0.0.1:$PORT" --data-dir "$OUT/data" --no-worker \
        --model "$MODEL" --predict-batching "$batching" --predict-batch-tokens "$BATCH_TOKENS" \
        --predict-max-wait-ms "$MAX_WAIT_MS" --predict-queue-rows 4096 \
        >"$OUT/server-$label.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "$PORT" "$OUT" "$MODEL"
    python3 bench/predict_load.py load "http://127.0.0.1:$PORT" bench --clients "$CLIENTS" \
        --seconds "$SECONDS_PER_MODE" --pairs-per-request "$PAIRS" --label "$label" | tee -a "$OUT/results.jsonl"
    stop
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $CLIENTS clients, ${SECONDS_PER_MODE}s per mode, $PAIRS pair(s) per request, batch $BATCH_TOKENS tokens, wait ${MAX_WAIT_MS}ms"
status=0
run_mode batching true || status=1
run_mode no-batching false || status=1
exit $status
