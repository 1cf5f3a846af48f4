#!/usr/bin/env bash
# Set up and run the whole test suite from a clean clone: fetch the default model, start a
# throwaway PostgreSQL server on loopback, run the Rust tests (unit, HTTP black-box on the real
# server, model parity, training; the queue suite and the multi-process test on SQLite and on
# Postgres), the HTTP suites a second time on Postgres, then the dashboard's end-to-end test in
# headless Chromium (which installs chromium and playwright-core itself). The Postgres server
# is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
eval "$(scripts/postgres-test-server.sh start)"
trap 'scripts/postgres-test-server.sh stop "$ARBITER_TEST_POSTGRES_DIR"' EXIT
# Tests that need Postgres fail, rather than skip, when the URL is missing.
export ARBITER_TEST_REQUIRE_POSTGRES=1
cargo test --no-fail-fast "$@"
# The HTTP black-box suites that go through the store, again with every app on Postgres.
ARBITER_TEST_DATABASE=postgres cargo test --no-fail-fast --test jobs --test datasets --test health --test predict "$@"
tests/browser/run.sh
