#!/usr/bin/env bash
# Fuzz the dataset parser and the predict request decoder with cargo-fuzz (libFuzzer, nightly
# toolchain), each for a bounded time; fails on any crash, panic or broken invariant. Prints
# the executions run per target (the numbers in bench/RESULTS.md). Not part of CI.
#
#   bench/fuzz.sh                 # 120 s per target
#   FUZZ_SECONDS=600 bench/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-120}"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
rustup toolchain list | grep -q nightly || { echo "the nightly toolchain is needed: rustup toolchain install nightly" >&2; exit 1; }

cargo +nightly fuzz build --release dataset_parser
cargo +nightly fuzz build --release predict_request

# Seeds: the shipped fixtures and a few hand-made bodies.
mkdir -p fuzz/corpus/dataset_parser fuzz/corpus/predict_request
for f in tests/fixtures/*.csv tests/fixtures/*.jsonl; do
  [[ -f "$f" ]] && head -c 65536 "$f" >"fuzz/corpus/dataset_parser/seed-$(basename "$f")"
done
printf 'id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n1,"[""hi""]","[""a"",null]",b,1,0,0\n' >fuzz/corpus/dataset_parser/seed-min.csv
printf '{"id":1,"prompt":["p",null],"response_a":"a","response_b":"b","label":"winner_tie"}\n' >fuzz/corpus/dataset_parser/seed-min.jsonl
printf '{"adapter":"a","symmetric":true,"max_length":64,"pairs":[{"id":"1","prompt":"2+2?","response_a":["4",null],"response_b":"5"}]}' >fuzz/corpus/predict_request/seed-native.json
printf '{"inputs":[["p","a","b"]],"raw_scores":true}' >fuzz/corpus/predict_request/seed-tei.json
printf '{"inputs":["p",["a"],"b"]}' >fuzz/corpus/predict_request/seed-tei-one.json

for target in dataset_parser predict_request; do
  log="fuzz/artifacts/$target.log"
  mkdir -p fuzz/artifacts/"$target"
  echo "== $target: ${seconds}s"
  cargo +nightly fuzz run --release "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    2>&1 | tee "$log" | grep -E "^(#[0-9]+\s+DONE|stat::|==[0-9]+==|thread .* panicked|SUMMARY)" || true
  if grep -qE "panicked|ERROR: libFuzzer|SUMMARY: .*Sanitizer" "$log"; then
    echo "$target: a crash was found (see $log and fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  runs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{s+=$2} END {print s+0}')"
  echo "$target: $runs executions in ${seconds}s, no crash"
done
