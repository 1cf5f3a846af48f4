#!/usr/bin/env bash
# Peak resident memory of the server while it parses one hostile dataset upload: JSON lines
# whose size is in what a row does not use (a list of 32 million numbers in an unknown field,
# 64 MB) or in millions of empty turns (60 MB). Each binary named runs each file in a fresh
# server (no model needed); one line per run with the HTTP status, the time the upload took
# and the server's peak RSS (VmHWM, Linux).
#
#   bench/upload_memory.sh                               # target/debug/arbiter
#   bench/upload_memory.sh before=/tmp/old/arbiter after=target/debug/arbiter
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=bench/out/upload_memory
mkdir -p "$OUT"
PORT=${PORT:-18491}
[ $# -gt 0 ] || set -- "current=target/debug/arbiter"

python3 - "$OUT" <<'PY'
import sys
out = sys.argv[1]
row = '"prompt":"q","response_a":"a","response_b":"b","winner_model_a":1,"winner_model_b":0,"winner_tie":0'
with open(f"{out}/unknown-field.jsonl", "w") as f:
    n = 32_000_000
    f.write('{"id":1,' + row + ',"x":[' + "0," * (n - 1) + "0]}\n")
    f.write('{"id":2,' + row + "}\n")
with open(f"{out}/empty-turns.jsonl", "w") as f:
    n = 20_000_000
    f.write('{"id":1,"prompt":[' + '"",' * (n - 1) + '""],"response_a":"a","response_b":"b","label":"winner_tie"}\n')
PY

for named in "$@"; do
    label=${named%%=*}
    bin=${named#*=}
    for file in unknown-field empty-turns; do
        dir=$(mktemp -d)
        "$bin" serve --addr "127.0.0.1:$PORT" --data-dir "$dir" --model /nonexistent.gguf \
            --max-body-bytes 268435456 >"$dir/log" 2>&1 &
        pid=$!
        for _ in $(seq 100); do curl -s "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
        start=$(date +%s.%N)
        code=$(curl -s -o "$dir/answer" -w '%{http_code}' -H 'content-type: application/x-ndjson' \
            --data-binary "@$OUT/$file.jsonl" "127.0.0.1:$PORT/v1/datasets")
        end=$(date +%s.%N)
        peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        python3 -c "import json,sys; print(json.dumps({'binary': sys.argv[1], 'file': sys.argv[2], 'bytes': int(sys.argv[3]), 'status': int(sys.argv[4]), 'seconds': round(float(sys.argv[5]), 2), 'peak_rss_mb': round(int(sys.argv[6]) / 1024)}))" \
            "$label" "$file" "$(stat -c %s "$OUT/$file.jsonl")" "$code" "$(echo "$end - $start" | bc)" "$peak"
        rm -rf "$dir"
    done
done
