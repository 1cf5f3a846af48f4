#!/usr/bin/env bash
# Train on a split of the real arena sample with the default model and score a held-out test
# split: log loss and accuracy of the notebook's recipe (uncalibrated), of Arbiter's default
# (temperature-calibrated) and with symmetric scoring, against the class-prior log loss.
# Usage: bench/real_data.sh OUTDIR [extra `arbiter train` flags...]   (CPU: keep --max-length short)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?outdir}; shift
mkdir -p "$OUT"
scripts/fetch-model.sh
cargo build --release --bin arbiter
BIN=target/release/arbiter
SAMPLE=${SAMPLE:-../shared/data/arena-sample.csv}
python3 - "$SAMPLE" "$OUT" <<'PY'
import csv, random, sys
rows = list(csv.reader(open(sys.argv[1], newline="")))
head, body = rows[0], rows[1:]
random.Random(1234).shuffle(body)
n = len(body); test = body[: n * 15 // 100]; rest = body[n * 15 // 100:]
for name, part in (("train", rest), ("test", test)):
    w = csv.writer(open(f"{sys.argv[2]}/{name}.csv", "w", newline=""))
    w.writerow(head); w.writerows(part)
print(f"train+validation {len(rest)} rows, test {len(test)} rows")
PY
/usr/bin/time -v $BIN train --data "$OUT/train.csv" --validation-fraction 0.15 --out "$OUT/run" "$@" \
  > "$OUT/train.json" 2> "$OUT/train.log" || { tail -20 "$OUT/train.log"; exit 1; }
grep -E "Maximum resident|Elapsed" "$OUT/train.log" || true
$BIN predict --adapter "$OUT/run/adapter" --data "$OUT/test.csv" --out "$OUT/uncalibrated.csv" --no-calibration 2>/dev/null
$BIN predict --adapter "$OUT/run/adapter" --data "$OUT/test.csv" --out "$OUT/calibrated.csv" 2>/dev/null
$BIN predict --adapter "$OUT/run/adapter" --data "$OUT/test.csv" --out "$OUT/symmetric.csv" --symmetric 2>/dev/null
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import csv, math, sys
out = sys.argv[1]
cols = ["winner_model_a", "winner_model_b", "winner_tie"]
def labels(path):
    return {r["id"]: [int(float(r[c])) for c in cols].index(1) for r in csv.DictReader(open(path, newline=""))}
test, train = labels(f"{out}/test.csv"), labels(f"{out}/train.csv")
prior = [sum(1 for y in train.values() if y == k) / len(train) for k in range(3)]
def score(probs):
    ll = -sum(math.log(max(probs[i][y], 1e-15)) for i, y in test.items()) / len(test)
    acc = sum(1 for i, y in test.items() if max(range(3), key=lambda k: probs[i][k]) == y) / len(test)
    return ll, acc
print(f"| scoring of {len(test)} held-out rows | log loss | accuracy |")
print("|---|---|---|")
ll, acc = score({i: prior for i in test})
print(f"| class prior of the training split | {ll:.4f} | {acc:.3f} |")
for name, label in (("uncalibrated", "adapter, temperature 1 (the notebook's recipe)"),
                    ("calibrated", "adapter + fitted temperature (Arbiter's default)"),
                    ("symmetric", "adapter + temperature + symmetric scoring")):
    probs = {r["id"]: [float(r[c]) for c in cols] for r in csv.DictReader(open(f"{out}/{name}.csv", newline=""))}
    ll, acc = score(probs)
    print(f"| {label} | {ll:.4f} | {acc:.3f} |")
PY
