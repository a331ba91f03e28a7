#!/usr/bin/env bash
# SFT on chains (experiments/sft/chains.yaml, full fine-tuning), the first N steps in float32 and in
# bf16-mixed from the same seed, one after the other; prints train/val loss per run and the wall times.
# Run under the shared measurement lock:
#   flock /work/locks/measure.lock nice -n 5 bash scripts/sft_precision.sh lightning_logs/sft_precision 30
set -euo pipefail
OUT=${1:-lightning_logs/sft_precision}
STEPS=${2:-30}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for P in 32-true bf16-mixed; do
  t0=$(date +%s)
  "$PY" -m flowtracer.cli sft --config experiments/sft/chains.yaml --trainer.max_steps "$STEPS" \
    --trainer.val_check_interval "$STEPS" --model.export_dir null --trainer.precision "$P" \
    --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "sft_$P" > "$OUT/sft_$P.log" 2>&1
  echo "$P $(( $(date +%s) - t0 ))" >> "$OUT/wall.txt"
done
"$PY" - "$OUT" <<'PYEOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
walls = dict(line.split() for line in open(out / "wall.txt"))
runs = {}
for p in ("32-true", "bf16-mixed"):
    rows = list(csv.DictReader(open(out / f"sft_{p}" / "version_0" / "metrics.csv")))
    runs[p] = ([float(r["train/loss"]) for r in rows if r.get("train/loss")],
               [float(r["val/loss"]) for r in rows if r.get("val/loss")])
a, b = runs["32-true"], runs["bf16-mixed"]
d = [abs(x - y) for x, y in zip(a[0], b[0])]
print("| precision | wall s | train loss step 1 | last 5 steps (mean) | val loss at the end |")
print("|---|---|---|---|---|")
for p, (tr, va) in runs.items():
    print(f"| {p} | {walls[p]} | {tr[0]:.4f} | {sum(tr[-5:]) / 5:.4f} | {va[-1]:.4f} |")
print(f"\ntrain loss |bf16 - float32| per step: max {max(d):.4f}, mean {sum(d) / len(d):.4f} over {len(d)} steps")
print(f"wall time ratio bf16 / float32: {int(walls['bf16-mixed']) / int(walls['32-true']):.3f}")
PYEOF
