"""Each credit arm's share of a real quickstart step (CPU by default), measured in one run.

Runs `flowtracer fit` for every ablation arm on top of experiments/quickstart.yaml for a few steps
(no validation), reads each run's metrics.csv and prints the median phase times. The credit cost of
an arm is its time/credit (callback, plus the attention recompute when the map is captured inside
the training forward, the one-PPO-epoch default) plus what its capture adds to a separate
teacher-forced pass when there is one (old_pass of the arm minus old_pass of the uniform arm).

    python benchmarks/arm_step_share.py --steps 3
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["uniform", "random", "entropy", "attention", "flow"]


def run_arm(arm: str, steps: int, out: Path, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "flowtracer.cli", "fit", "--config", str(ROOT / "experiments/quickstart.yaml"),
           "--config", str(ROOT / f"experiments/ablation_{arm}.yaml"),
           "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(10**6),
           "--model.val_before_training", "false", "--model.log_rollouts", "false",
           "--trainer.logger.init_args.save_dir", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = next(out.glob(f"ablation_{arm}/version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("time/step")]
    keys = ("time/step", "time/generate", "time/score", "time/old_pass", "time/credit", "time/update")
    return {k: statistics.median(float(r[k]) for r in rows) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="RL steps per arm (median over them)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("extra", nargs="*", help="more CLI overrides, e.g. --model.sampling.max_new_tokens=64")
    args = p.parse_args()
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        results = {arm: run_arm(arm, args.steps, Path(tmp), args.extra) for arm in arms}
    base_pass = results.get("uniform", {}).get("time/old_pass")
    print(f"quickstart, {args.steps} steps per arm, median seconds per step")
    print(f"{'arm':<10} {'step':>7} {'generate':>9} {'old_pass':>9} {'capture+':>9} {'callback':>9} "
          f"{'update':>8} {'credit share':>13}")
    for arm, r in results.items():
        capture = max(r["time/old_pass"] - base_pass, 0.0) if base_pass is not None else 0.0
        share = (capture + r["time/credit"]) / r["time/step"]
        print(f"{arm:<10} {r['time/step']:>7.2f} {r['time/generate']:>9.2f} {r['time/old_pass']:>9.2f} "
              f"{capture:>9.2f} {r['time/credit']:>9.3f} {r['time/update']:>8.2f} {share:>12.1%}")
    print("capture+ = old_pass minus the uniform arm's (the attention recompute); credit share = "
          "(capture+ + callback) / step")


if __name__ == "__main__":
    main()
