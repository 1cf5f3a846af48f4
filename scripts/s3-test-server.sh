#!/usr/bin/env bash
# A throwaway S3-compatible server on loopback for the artifact-store tests: moto's server
# (PyPI `moto[server]`, installed into a virtual environment if missing) on a free port.
#
#   eval "$(scripts/s3-test-server.sh start)"    # exports ARBITER_TEST_S3_ENDPOINT, ARBITER_TEST_S3_PID
#   scripts/s3-test-server.sh stop "$ARBITER_TEST_S3_PID"
set -euo pipefail

start() {
    local py=python3
    if ! "$py" -c 'import moto.server, flask, werkzeug' >/dev/null 2>&1; then
        # Not installed: a virtual environment of its own (works where the system Python is
        # externally managed).
        local venv="${XDG_CACHE_HOME:-$HOME/.cache}/arbiter-test-moto"
        py="$venv/bin/python"
        if ! "$py" -c 'import moto.server, flask, werkzeug' >/dev/null 2>&1; then
            echo "moto's server not found: installing moto[server] from PyPI into $venv" >&2
            python3 -m venv "$venv" >&2
            "$py" -m pip install --quiet 'moto[server]' >&2
        fi
    fi
    local port log
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log=$(mktemp "${TMPDIR:-/tmp}/arbiter-s3.XXXXXX.log")
    "$py" -m moto.server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do
        if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" >/dev/null 2>&1; then
            echo "export ARBITER_TEST_S3_ENDPOINT='http://127.0.0.1:$port'"
            echo "export ARBITER_TEST_S3_PID='$pid'"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
    cat "$log" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
}

stop() {
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:?process id to stop}" ;;
    *) echo "usage: $0 start | stop PID" >&2; exit 2 ;;
esac
