#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests: a temporary data directory, a free
# port, trust authentication on 127.0.0.1 only, a superuser named `arbiter`.
#
#   eval "$(scripts/postgres-test-server.sh start)"   # exports ARBITER_TEST_POSTGRES_URL
#   ...                                               # and ARBITER_TEST_POSTGRES_DIR
#   scripts/postgres-test-server.sh stop "$ARBITER_TEST_POSTGRES_DIR"
#
# Uses Debian's PostgreSQL binaries (installs the `postgresql` package if none are found).
# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
set -euo pipefail

find_bin() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
        return
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return
        fi
    done
    return 1
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local bin
    if ! bin=$(find_bin); then
        echo "PostgreSQL not found: installing Debian's postgresql package" >&2
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
        bin=$(find_bin)
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
    local dir port
    dir=$(mktemp -d "${TMPDIR:-/tmp}/arbiter-pg.XXXXXX")
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U arbiter --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    # Loopback only, sockets in the temporary directory; enough connections for many test
    # processes; durability traded for speed (the cluster is thrown away).
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=400 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2 || { cat "$dir/server.log" >&2; exit 1; }
    echo "export ARBITER_TEST_POSTGRES_URL='postgres://arbiter@127.0.0.1:$port/postgres'"
    echo "export ARBITER_TEST_POSTGRES_DIR='$dir'"
}

stop() {
    local dir=$1 bin
    bin=$(find_bin)
    if [ -d "$dir/data" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:?data directory to stop}" ;;
    *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
