#!/usr/bin/env bash
# Train on the real arena sample with the default model and score rows never seen in training
# or calibration: log loss and accuracy of the adapter uncalibrated (temperature 1, as the
# notebook scores it), with its temperature only, with its full calibration (temperature and
# the stacked response-length model, Arbiter's default), and fully calibrated + symmetric,
# against the class prior of the training split.
#
# Usage: bench/real_data.sh OUTDIR [extra `arbiter train` flags...]
#   FOLDS=k     k-fold cross-validation: every row is scored once, by the run that did not see it
#               (default 1: one split, 15% of rows held out)
#   PARALLEL=n  runs at once (default 1; on a GPU several small runs share the device)
#   BIN=path    a prebuilt binary (default: build the release binary here)
#   SAMPLE=csv  the data (default ../shared/data/arena-sample.csv)
# Extra flags go to every `arbiter train` run (e.g. --max-length 128 on CPU, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?outdir}; shift
mkdir -p "$OUT"
if [ -z "${BIN:-}" ]; then
  scripts/fetch-model.sh
  cargo build --release --bin arbiter
  BIN=target/release/arbiter
fi
SAMPLE=${SAMPLE:-../shared/data/arena-sample.csv}
FOLDS=${FOLDS:-1}
PARALLEL=${PARALLEL:-1}
PREDICT_FLAGS=()
for a in "$@"; do case "$a" in --device=*|--model=*|--base-format=*) PREDICT_FLAGS+=("$a") ;; esac; done
# --device X / --model X / --base-format X as two words also apply to prediction
prev=
for a in "$@"; do
  case "$prev" in --device|--model|--base-format) PREDICT_FLAGS+=("$prev" "$a") ;; esac
  prev=$a
done

python3 - "$SAMPLE" "$OUT" "$FOLDS" <<'PY'
import csv, random, sys
sample, out, folds = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.reader(open(sample, newline="")))
head, body = rows[0], rows[1:]
random.Random(1234).shuffle(body)
n = len(body)
if folds == 1:
    parts = [(body[n * 15 // 100:], body[: n * 15 // 100])]
else:
    parts = [([r for i, r in enumerate(body) if i % folds != k], body[k::folds]) for k in range(folds)]
for k, (train, test) in enumerate(parts):
    for name, part in (("train", train), ("test", test)):
        with open(f"{out}/fold{k}-{name}.csv", "w", newline="") as f:
            w = csv.writer(f); w.writerow(head); w.writerows(part)
    print(f"fold {k}: train+validation {len(train)} rows, test {len(test)} rows")
PY

run_fold() {
  local k=$1; shift
  local d="$OUT/fold$k"
  mkdir -p "$d"
  /usr/bin/time -v "$BIN" train --data "$OUT/fold$k-train.csv" --validation-fraction 0.15 --out "$d/run" "$@" \
    > "$d/train.json" 2> "$d/train.log" || { echo "fold $k failed:"; tail -20 "$d/train.log"; return 1; }
  "$BIN" predict "${PREDICT_FLAGS[@]}" --adapter "$d/run/adapter" --data "$OUT/fold$k-test.csv" --out "$d/uncalibrated.csv" --no-calibration 2>>"$d/predict.log"
  "$BIN" predict "${PREDICT_FLAGS[@]}" --adapter "$d/run/adapter" --data "$OUT/fold$k-test.csv" --out "$d/temperature.csv" --no-length-calibration 2>>"$d/predict.log"
  "$BIN" predict "${PREDICT_FLAGS[@]}" --adapter "$d/run/adapter" --data "$OUT/fold$k-test.csv" --out "$d/calibrated.csv" 2>>"$d/predict.log"
  "$BIN" predict "${PREDICT_FLAGS[@]}" --adapter "$d/run/adapter" --data "$OUT/fold$k-test.csv" --out "$d/symmetric.csv" --symmetric 2>>"$d/predict.log"
  echo "fold $k: $(grep -E 'Elapsed' "$d/train.log" | sed 's/.*: //') wall, peak RSS $(grep -E 'Maximum resident' "$d/train.log" | sed 's/.*: //') kB"
}

pids=()
status=0
for ((k = 0; k < FOLDS; k++)); do
  run_fold "$k" "$@" &
  pids+=($!)
  if (( ${#pids[@]} >= PARALLEL )); then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || exit 1

python3 - "$OUT" "$FOLDS" <<'PY' | tee "$OUT/summary.md"
import csv, json, math, sys
out, folds = sys.argv[1], int(sys.argv[2])
cols = ["winner_model_a", "winner_model_b", "winner_tie"]
def labels(path):
    return {r["id"]: [int(float(r[c])) for c in cols].index(1) for r in csv.DictReader(open(path, newline=""))}
names = ["uncalibrated", "temperature", "calibrated", "symmetric"]
scored = {"prior": {}, **{n: {} for n in names}}
truth, temps, mix = {}, [], []
for k in range(folds):
    test, train = labels(f"{out}/fold{k}-test.csv"), labels(f"{out}/fold{k}-train.csv")
    truth.update(test)
    prior = [sum(1 for y in train.values() if y == c) / len(train) for c in range(3)]
    scored["prior"].update({i: prior for i in test})
    for name in names:
        for r in csv.DictReader(open(f"{out}/fold{k}/{name}.csv", newline="")):
            scored[name][r["id"]] = [float(r[c]) for c in cols]
    meta = json.load(open(f"{out}/fold{k}/run/adapter/arbiter.json"))
    temps.append(round(meta.get("temperature"), 2))
    lc = meta.get("length_calibration")
    if lc:
        mix.append((round(lc["logit_scale"], 3), round(lc["length_scale"], 2)))
def score(probs):
    lls = [-math.log(max(probs[i][y], 1e-15)) for i, y in truth.items()]
    ll = sum(lls) / len(lls)
    se = math.sqrt(sum((x - ll) ** 2 for x in lls) / (len(lls) - 1) / len(lls))
    acc = sum(1 for i, y in truth.items() if max(range(3), key=lambda c: probs[i][c]) == y) / len(truth)
    return ll, se, acc
def paired(a, b):
    d = [math.log(max(scored[a][i][y], 1e-15)) - math.log(max(scored[b][i][y], 1e-15)) for i, y in truth.items()]  # loss(b) - loss(a)
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
print(f"{len(truth)} held-out rows over {folds} fold(s); fitted temperatures {temps}")
if mix:
    print(f"length calibration (logit weight, length weight) per fold: {mix}")
print()
print("| scoring of held-out rows | log loss (± s.e.) | vs prior (± paired s.e.) | accuracy |")
print("|---|---|---|---|")
for name, label in (("prior", "class prior of the training split"),
                    ("uncalibrated", "adapter, temperature 1 (as the notebook scores it)"),
                    ("temperature", "adapter + fitted temperature only"),
                    ("calibrated", "adapter + temperature + length model (default)"),
                    ("symmetric", "adapter + full calibration + symmetric scoring")):
    ll, se, acc = score(scored[name])
    diff = "" if name == "prior" else "{:+.4f} ± {:.4f}".format(*paired("prior", name))
    print(f"| {label} | {ll:.4f} ± {se:.4f} | {diff} | {acc:.3f} |")
PY
