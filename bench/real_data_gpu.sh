#!/usr/bin/env bash
# Real arena rows on the GPU machine, k-fold (every row scored once by a run that never saw
# it) at max_length 1024. Recipe `notebook` trains with the notebook's hyperparameters, which are
# Arbiter's defaults: its runs score the rows both as the notebook does (temperature 1) and as
# Arbiter's default does (temperature + length model). Recipe `stronger` is the issue's PEFT
# recipe (lr 2e-4, all linear layers, A/B swap augmentation, EPOCHS epochs).
# Needs: models/SmolLM2-135M-Instruct.Q4_1.gguf, target-ship/arbiter-cuda.xz
# (scripts/build-cuda.sh), the sample CSV, python3 with the CUDA 13 runtime wheels.
# Usage: bench/real_data_gpu.sh OUTDIR [SAMPLE.csv]     RECIPES=notebook,stronger (default both)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?outdir}
export SAMPLE=${2:-${SAMPLE:-../shared/data/arena-sample.csv}}
CU=$(python3 -c 'import nvidia.cu13 as m; print(list(m.__path__)[0])' 2>/dev/null || true)
[ -n "$CU" ] && export LD_LIBRARY_PATH="$CU/lib:${LD_LIBRARY_PATH:-}"
export BIN=/tmp/arbiter-cuda
python3 -c 'import lzma,sys; open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' target-ship/arbiter-cuda.xz $BIN
chmod +x $BIN
export FOLDS=${FOLDS:-5} PARALLEL=${PARALLEL:-5}
COMMON=(--device cuda --max-length ${MAX_LENGTH:-1024} --checkpoint-every-steps 0)
RECIPES=${RECIPES:-notebook,stronger}
pids=()
# The notebook: r 16, alpha 8, dropout 0.05, q/k/v/o, lr 1e-4, batch 8, 1 epoch, weight decay 0.01.
if [[ ,$RECIPES, == *,notebook,* ]]; then
  bench/real_data.sh "$OUT/notebook" "${COMMON[@]}" --epochs 1 --learning-rate 1e-4 \
    --lora-target-modules q_proj,k_proj,v_proj,o_proj > "$OUT-notebook.log" 2>&1 &
  pids+=($!)
fi
# The stronger recipe: lr 2e-4, every linear layer, 3 epochs, A/B swap augmentation.
if [[ ,$RECIPES, == *,stronger,* ]]; then
  bench/real_data.sh "$OUT/stronger" "${COMMON[@]}" --epochs ${EPOCHS:-3} --learning-rate 2e-4 \
    --lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --swap-augmentation \
    > "$OUT-stronger.log" 2>&1 &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p" || echo "a recipe failed"; done
for r in ${RECIPES//,/ }; do echo "== $r"; cat "$OUT-$r.log"; done
