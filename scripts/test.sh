#!/usr/bin/env bash
# Set up and run the whole test suite from a clean clone: fetch the default model, start a
# throwaway PostgreSQL server and an S3-compatible server (moto) on loopback, run the Rust tests
# (unit, HTTP black-box on the real server, model parity, training; the queue suite and the
# multi-process test on SQLite and on Postgres; the artifact-store suite on S3 and on a local
# object store), the HTTP suites a second time on Postgres, then the dashboard's end-to-end test
# in headless Chromium (which installs chromium and playwright-core itself), then the contract
# test: schemathesis against the real binary with openapi.yaml (installed from PyPI into a venv
# under target/ by the script). The servers are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cleanup() {
    [ -n "${ARBITER_TEST_S3_PID:-}" ] && scripts/s3-test-server.sh stop "$ARBITER_TEST_S3_PID"
    [ -n "${ARBITER_TEST_POSTGRES_DIR:-}" ] && scripts/postgres-test-server.sh stop "$ARBITER_TEST_POSTGRES_DIR"
    true
}
trap cleanup EXIT
pg_env=$(scripts/postgres-test-server.sh start)
eval "$pg_env"
s3_env=$(scripts/s3-test-server.sh start)
eval "$s3_env"
# Tests that need these servers fail, rather than skip, when their address is missing.
export ARBITER_TEST_REQUIRE_POSTGRES=1 ARBITER_TEST_REQUIRE_S3=1
cargo test --no-fail-fast "$@"
# The HTTP black-box suites that go through the store (and the artifact-store suite), again with
# every app on Postgres.
ARBITER_TEST_DATABASE=postgres cargo test --no-fail-fast --test jobs --test datasets --test health --test predict --test artifacts "$@"
tests/browser/run.sh
scripts/contract.sh
