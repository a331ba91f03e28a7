#!/usr/bin/env bash
# Quickstart seeds 0-2 in float32 and in bf16 (bf16-mixed training + bf16 rollouts + TIS), the two
# precisions interleaved per seed so machine load drifts over both alike; validation in float32
# for both (only training and rollouts differ). Then the comparison table (scripts/precision_compare.py).
# The bf16 arm samples in bf16 on every CPU (BF16_SAMPLING, default bfloat16): `auto` would pick
# float32 rollouts where bf16 is emulated, and the arm would no longer be the one measured before.
# Run under the shared measurement lock, all seeds at once or one seed per locked call (SEEDS):
#   flock /work/locks/measure.lock nice -n 5 bash scripts/quickstart_precision.sh lightning_logs/precision
#   SEEDS=1 flock /work/locks/measure.lock nice -n 5 bash scripts/quickstart_precision.sh lightning_logs/precision
set -euo pipefail
OUT=${1:-lightning_logs/precision}
SEEDS=${SEEDS:-0 1 2}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for S in $SEEDS; do
  for P in f32 bf16; do
    if [ "$P" = f32 ]; then ARGS=(--trainer.precision 32-true --model.sampling.dtype float32)
    else ARGS=(--trainer.precision bf16-mixed --model.sampling.dtype "${BF16_SAMPLING:-bfloat16}" --model.loss.tis_cap 2.0); fi
    t0=$(date +%s)
    "$PY" -m flowtracer.cli fit --config experiments/quickstart.yaml --model.seed "$S" --seed_everything "$S" \
      --data.seed "$S" --model.val_sampling.dtype float32 "${ARGS[@]}" \
      --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "qs_${P}_s$S" > "$OUT/qs_${P}_s$S.log" 2>&1
    echo "$P $S $(( $(date +%s) - t0 ))" >> "$OUT/wall.txt"
  done
done
"$PY" scripts/precision_compare.py "$OUT"
