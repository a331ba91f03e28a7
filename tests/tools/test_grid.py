"""`flowtracer grid` on a tiny model: a 2x2 grid runs, a killed grid resumes (finished cells
skipped, the interrupted cell rerun), and the report is written."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_config

from flowtracer.cli import main
from flowtracer.tools.grid import load_grid


def write_grid(tmp_path: Path, model_dir: str, name: str = "grid", **keys) -> Path:
    """A 2x2 grid (uniform/random x seeds 0/1) of 1-step tiny fits; `keys` are more grid-file keys."""
    base = write_config(tmp_path, model_dir, steps=1)
    grid = {
        "base": [str(base)],
        "out": str(tmp_path / name),
        "overrides": {"trainer.val_check_interval": 1, "model.log_rollouts": False},
        "axes": {
            "arm": {"uniform": str(ROOT / "experiments/ablations/uniform.yaml"),
                    "random": str(ROOT / "experiments/ablations/random.yaml")},
            "seed": [0, 1],
        },
        **keys,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_grid_cells_are_the_cross_product(tmp_path, tiny_model_dir):
    grid = load_grid(write_grid(tmp_path, tiny_model_dir))
    assert [c.name for c in grid.cells] == ["arm=uniform,seed=0", "arm=uniform,seed=1",
                                            "arm=random,seed=0", "arm=random,seed=1"]
    cell = grid.cells[3]
    assert cell.overrides["model.seed"] == 1 and cell.overrides["seed_everything"] == 1
    assert cell.configs[-1].parts[-2:] == ("ablations", "random.yaml")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "experiments" / "grids").glob("*.yaml")))
def test_shipped_grids_load(config):
    grid = load_grid(ROOT / "experiments" / "grids" / config)  # checks every base and arm file exists
    assert len(grid.cells) == len({c.name for c in grid.cells}) >= 2
    arms = {c.axes.get("arm") for c in grid.cells}
    every = {"uniform", "random", "entropy", "attention", "flow"}
    assert arms <= every or arms == {None}
    if not any(axis.startswith("model.") for axis in grid.cells[0].axes):  # an arm grid (no knob axis) has them all
        assert arms == every or arms == {None}


@pytest.mark.slow
def test_grid_killed_midway_resumes_and_reports(tmp_path, tiny_model_dir):
    cfg = write_grid(tmp_path, tiny_model_dir)
    cells = tmp_path / "grid" / "cells"
    first, second = cells / "arm=uniform,seed=0", cells / "arm=uniform,seed=1"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    grid = subprocess.Popen([sys.executable, "-m", "flowtracer.cli", "grid", "--config", str(cfg), "--no-live"],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((first / "done.json").exists() and (second / "fit.log").exists()):  # 2nd cell started
        assert grid.poll() is None and time.time() < deadline, "grid ended before the kill"
        time.sleep(0.2)
    os.killpg(grid.pid, signal.SIGKILL)  # the grid and its running cell, like a lost machine
    grid.wait()
    assert (first / "done.json").exists() and not (second / "done.json").exists()
    first_stamp = (first / "run/version_0/metrics.csv").stat().st_mtime_ns

    os.chdir(tmp_path)
    try:
        main(["grid", "--config", str(cfg), "--no-live"])
    finally:
        os.chdir(ROOT)
    assert (first / "run/version_0/metrics.csv").stat().st_mtime_ns == first_stamp  # skipped
    for cell in cells.iterdir():
        assert (cell / "done.json").exists(), cell
        assert json.loads((cell / "done.json").read_text())["axes"]["arm"] in ("uniform", "random")

    out = tmp_path / "grid"
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4 and all(r["final_val"] not in ("", "nan") for r in rows)
    md = (out / "report.md").read_text()
    assert "| arm=uniform | 2 |" in md and "| arm=random | 2 |" in md and "4/4 cells finished" in md
    for png in ("reward_mean.png", "accuracy.png", "val_pass1.png"):
        assert (out / png).stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.slow
def test_committed_cell_summaries_rebuild_the_report(tmp_path, tiny_model_dir):
    """A finished cell writes <results>/<cell>.csv/.json; with the run folders gone (a fresh clone),
    --report-only rebuilds the same table from those files alone."""
    import shutil

    cfg = write_grid(tmp_path, tiny_model_dir)
    spec = yaml.safe_load(cfg.read_text())
    spec["axes"]["seed"] = [0]
    spec["results"] = str(tmp_path / "results" / "grid_tiny")
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    main(["grid", "--config", str(cfg), "--no-live"])
    res = tmp_path / "results" / "grid_tiny"
    assert sorted(p.name for p in res.iterdir()) == ["arm=random,seed=0.csv", "arm=random,seed=0.json",
                                                     "arm=uniform,seed=0.csv", "arm=uniform,seed=0.json"]
    header = open(res / "arm=uniform,seed=0.csv").readline().strip().split(",")
    assert "val/pass@1" in header and "reward/mean" in header and "time/step" in header
    assert not any(h.startswith("throughput/") for h in header)  # only the report's columns
    before = list(csv.DictReader(open(tmp_path / "grid" / "summary.csv")))
    shutil.rmtree(tmp_path / "grid")  # the machine is gone; only the committed files remain
    main(["grid", "--config", str(cfg), "--report-only"])
    after = list(csv.DictReader(open(tmp_path / "grid" / "summary.csv")))
    keys = ("cell", "state", "final_val", "auc_val", "mean_reward", "steps")
    assert [{k: r[k] for k in keys} for r in after] == [{k: r[k] for k in keys} for r in before]
    assert all(r["state"] == "done" for r in after)
    assert "2/2 cells finished" in (tmp_path / "grid" / "report.md").read_text()


def test_report_auc_and_interval():
    from flowtracer.tools.report import _auc, ci95_halfwidth

    assert _auc([(0, 0.2), (10, 0.4), (20, 0.4)]) == pytest.approx((10 * 0.3 + 10 * 0.4) / 20)
    assert _auc([(0, 0.5)]) == 0.5
    assert ci95_halfwidth(1.0, 3) == pytest.approx(4.303 / 3 ** 0.5)
    assert math.isnan(ci95_halfwidth(1.0, 1))


def test_paired_differences_use_only_the_shared_seeds():
    from flowtracer.tools.report import ci95_halfwidth, paired_markdown, paired_vs

    def rows(vals):  # seed -> (final, auc)
        return [{"seed": s, "final_val": f, "auc_val": a} for s, (f, a) in vals.items()]

    table = [{"group": "arm=uniform", "_rows": rows({"0": (0.5, 0.4), "1": (0.6, 0.5), "2": (0.7, 0.6)})},
             {"group": "arm=flow", "_rows": rows({"0": (0.6, 0.4), "1": (0.8, 0.6), "3": (0.9, 0.9)})}]
    (flow,) = paired_vs(table)
    assert flow["group"] == "arm=flow" and flow["seeds"] == 2  # seed 3 has no uniform twin, seed 2 no flow
    assert flow["final_val"][0] == pytest.approx(0.15) and flow["final_val"][1] == pytest.approx(0.0707, abs=1e-4)
    assert flow["auc_val"][0] == pytest.approx(0.05)
    half = ci95_halfwidth(flow["final_val"][1], 2)
    assert f"[{0.15 - half:.3f}, {0.15 + half:.3f}]" in "\n".join(paired_markdown(table))
    assert paired_vs(table, base="arm=none") == [] and paired_markdown(table, "arm=none") == []
    (uniform,) = paired_vs(table, base="arm=flow")  # any arm can be the reference
    assert uniform["group"] == "arm=uniform" and uniform["final_val"][0] == pytest.approx(-0.15)
    assert "## Paired differences vs arm=flow" in "\n".join(paired_markdown(table, "arm=flow"))
