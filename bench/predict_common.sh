# Shared by bench/predict_load.sh and bench/predict_soak.sh (sourced, from the repository root):
# the model, the adapter fixture, the server's stop trap, and its start-up (health, adapter
# registration, an untimed warm-up request).
#   predict_prepare OUT MODEL     fetch the model if missing; fresh OUT with a test adapter
#   wait_ready PORT OUT MODEL [KEY]
#                                 wait for /healthz, register OUT/adapter as `bench`, warm up
# SERVER_PID holds the running server; `stop` (also on exit) ends it.

predict_prepare() {
    local out=$1 model=$2
    [ -f "$model" ] || scripts/fetch-model.sh
    rm -rf "$out"
    mkdir -p "$out"
    python3 bench/predict_load.py adapter "$out/adapter"
}

SERVER_PID=
stop() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
trap stop EXIT

wait_ready() {
    local port=$1 out=$2 model=$3 key=${4:-}
    local auth=()
    [ -n "$key" ] && auth=(-H "authorization: Bearer $key")
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.1
    done
    python3 bench/predict_load.py register "$out/data/arbiter.db" bench "$PWD/$out/adapter" "$PWD/$model"
    # warm-up: loads the base model and the adapter, not timed
    curl -sf -X POST "http://127.0.0.1:$port/v1/predict" -H 'content-type: application/json' "${auth[@]}" \
        -d '{"adapter":"bench","pairs":[{"prompt":"hi","response_a":"hello","response_b":"hey"}]}' >/dev/null
}
