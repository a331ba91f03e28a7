#!/usr/bin/env bash
# Issue 31's measurements on this machine's CPU kind, in one locked run, each into a results file named
# by the kind (flowtracer.generation.precision.cpu_kind: intel-avx512, intel-avx512-amx, amd-avx2, ...):
#   results/decode_<kind>.md       decode step per engine vs the bandwidth floor (target: fast <= 3x at 8 rows)
#   results/prefill_<kind>.md      prefill block size (fast.PREFILL_TOKENS) on an eval and a validation batch
#   results/step_vs_trl_<kind>.md  our GRPO step vs TRL's (target: uniform and FlowCredit <= 0.5x TRL; + uniform with
#                                  model.share_prefix off, the padded forward, for that lever's effect)
#   results/demo_<kind>.md         `make demo`, first line to last (target: <= 4 min; README states it per kind)
# About 35-45 minutes on 2 cores. Nothing else may run meanwhile (the lock keeps other timed work out;
# a grid's cells do not take it: stop them first). TRL comes from requirements-bench.txt, pinned with torch.
#   flock /work/locks/measure.lock bash scripts/cpu_targets.sh           # or DRY_RUN=1 to print the steps
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{ read -r KIND; read -r CPU; } < <("$PY" -c "from flowtracer.generation.precision import cpu_kind, describe_cpu
print(cpu_kind()); print(describe_cpu())")
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# val/pass@1 at the first and last validation of the newest quickstart run
VAL_PASS='import csv, glob, os; f = max(glob.glob("lightning_logs/quickstart/version_*/metrics.csv"), key=os.path.getmtime)
v = [r["val/pass@1"] for r in csv.DictReader(open(f)) if r.get("val/pass@1")]; print(f"{float(v[0]):.3f} -> {float(v[-1]):.3f} ({f})")'
run() { if [ -n "${DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }

echo "CPU kind: $KIND ($CPU), commit $COMMIT"
run "$PY" -m pip install -q trl==1.16.0 -c requirements-bench.txt
run "$PY" benchmarks/decode.py --threads 2 --out "results/decode_$KIND.md"
run "$PY" benchmarks/prefill.py --threads 2 --shapes 64x400,25x120 --blocks whole,1024 --reps 2 \
  --out "results/prefill_$KIND.md"
STEP="results/step_vs_trl_$KIND.md"
TRL_ARGS=(--steps 5 --threads 2 --sides trl,uniform,flow,padded)
if [ -n "${DRY_RUN:-}" ]; then
  echo "+ $PY benchmarks/step_vs_trl.py ${TRL_ARGS[*]} > $STEP"
else
  { echo "# GRPO step vs TRL: $CPU"; echo; echo "Commit $COMMIT. Command: \`python benchmarks/step_vs_trl.py ${TRL_ARGS[*]}\`"
    echo; echo '```'; "$PY" benchmarks/step_vs_trl.py "${TRL_ARGS[@]}"; echo '```'; } > "$STEP.tmp"
  mv "$STEP.tmp" "$STEP"
fi
DEMO="results/demo_$KIND.md"
if [ -n "${DRY_RUN:-}" ]; then
  echo "+ /usr/bin/time -v make demo > $DEMO"
else
  LOG=$(mktemp)
  start=$(date +%s)
  /usr/bin/time -v make demo > "$LOG" 2>&1 || { tail -40 "$LOG"; echo "make demo failed: full log $LOG" >&2; exit 1; }
  wall=$(( $(date +%s) - start ))
  { echo "# \`make demo\`: $CPU"; echo; echo "Commit $COMMIT, model cached, nothing else running."
    echo "Command: \`/usr/bin/time -v make demo\`"; echo
    echo "- wall, first line to last: **$(( wall / 60 )) min $(( wall % 60 )) s**"
    echo "- max RSS: $(awk -F': ' '/Maximum resident/ {printf "%.1f GiB", $2 / 1048576}' "$LOG")"
    echo "- validation pass@1, before -> after (README: 0.325 -> 0.700 for seed 0): $("$PY" -c "$VAL_PASS")"
    echo "- $(grep -m1 -o "generation: engine.*" "$LOG" || echo "engine line not printed")"
    echo "- $(grep -m1 -o "forward: .*" "$LOG" || echo "forward line not printed")"; } > "$DEMO"
  rm -f "$LOG"
fi
echo "done: results/{decode,prefill,step_vs_trl,demo}_$KIND.md"
