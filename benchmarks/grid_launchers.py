"""Wall time of one 2x2 grid of quickstart cells through `--launcher local --parallel 2` and
`--launcher ray` (a local Ray cluster the grid starts, 2 CPUs, so 2 cells at a time as well).

    python benchmarks/grid_launchers.py                      # max_steps 2, writes nothing but the table
    python benchmarks/grid_launchers.py --steps 2 --out results/grid_launchers.md

A cell is experiments/quickstart.yaml (SmolLM2-135M + LoRA, arithmetic) with trainer.max_steps set
to --steps; the grid is arm {uniform, flow} x seed {0, 1}. Both launchers run the same `fit`
subprocesses, so the difference of the two wall times is what Ray adds: starting its cluster
(`ray.init`, timed here on its own too), a worker process per cell and the scheduling round trips.
"cell s" is the mean time of one cell's `fit` as the cell itself measured it (done.json);
"overhead s" is the wall time not spent inside a cell's `fit` with 2 running at a time (wall - sum of
cell s / 2): process starts, imports, Ray's workers and scheduling. On a shared machine the cells' own
times move with the load, so compare the overheads, not the walls; --order ray,local runs Ray first
(two runs in both orders cancel a load that drifts). The metrics of the two reports are compared
as a control: the same seeds must give the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("cell", "steps", "init_val", "final_val", "mean_reward")


def write_grid(tmp: Path, launcher: str, steps: int) -> Path:
    exp = ROOT / "experiments"
    grid = {"base": [str(exp / "quickstart.yaml")], "out": str(tmp / launcher), "parallel": 2,
            "overrides": {"trainer.max_steps": steps, "model.log_rollouts": False},
            "env": {"OMP_NUM_THREADS": 1}, "launcher": launcher,
            "ray": {"num_cpus": 2, "include_dashboard": False},
            "axes": {"arm": {"uniform": str(exp / "ablations/uniform.yaml"), "flow": str(exp / "ablations/flow.yaml")},
                     "seed": [0, 1]}}
    path = tmp / f"{launcher}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run(tmp: Path, launcher: str, steps: int) -> dict:
    cfg = write_grid(tmp, launcher, steps)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flowtracer.cli", "grid", "--config", str(cfg), "--no-live"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = tmp / launcher
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/done.json"))]
    rows = [{k: r[k] for k in METRICS} for r in csv.DictReader(open(out / "summary.csv"))]
    return {"wall": wall, "cell": statistics.fmean(c["seconds"] for c in cells), "n": len(cells), "metrics": rows,
            "attempts": sum(c.get("attempts", 1) for c in cells)}


def ray_init_seconds() -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False); "
            "print(time.perf_counter() - t); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="trainer.max_steps of each quickstart cell")
    p.add_argument("--out", help="also write the table (and the command) to this markdown file")
    p.add_argument("--order", default="local,ray", choices=["local,ray", "ray,local"], help="which launcher runs first")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run(Path(tmp), name, args.steps) for name in args.order.split(",")}
    local, ray = res["local"], res["ray"]
    init = ray_init_seconds()
    over = {name: r["wall"] - r["cell"] * r["n"] / 2 for name, r in (("local", local), ("ray", ray))}
    extra = over["ray"] - over["local"]
    lines = [f"Order: {args.order}.", "",
             "| launcher | cells | attempts | wall s | mean cell s (its fit) | overhead s |",
             "|---|---|---|---|---|---|",
             f"| local --parallel 2 | {local['n']} | {local['attempts']} | {local['wall']:.1f} | {local['cell']:.1f} | "
             f"{over['local']:.1f} |",
             f"| ray (local cluster, 2 CPUs) | {ray['n']} | {ray['attempts']} | {ray['wall']:.1f} | "
             f"{ray['cell']:.1f} | {over['ray']:.1f} |", "",
             f"Ray's overhead minus local's: {extra:+.1f} s for {ray['n']} cells ({extra / ray['n']:+.1f} s per cell); "
             f"ray.init alone: {init:.1f} s.",
             f"Same metrics from the same seeds: {'yes' if ray['metrics'] == local['metrics'] else 'NO'} "
             f"({', '.join(METRICS[1:])} of every cell)."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = f"flock /work/locks/measure.lock nice -n 5 python benchmarks/grid_launchers.py --steps {args.steps} " \
              f"--order {args.order} --out {args.out}"
        Path(args.out).write_text(f"# Grid launchers: local vs Ray on one machine\n\n`{cmd}`\n\n"
                                  f"quickstart.yaml cells, trainer.max_steps={args.steps}, arm {{uniform, flow}} x "
                                  f"seed {{0, 1}}.\n\n{table}\n")


if __name__ == "__main__":
    main()
