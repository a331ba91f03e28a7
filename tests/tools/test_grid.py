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
from conftest import ROOT
from grids import write_grid

from flowtracer.cli import main
from flowtracer.tools.grid import load_grid


def test_grid_cells_are_the_cross_product(tmp_path, tiny_model_dir):
    grid = load_grid(write_grid(tmp_path, tiny_model_dir))
    assert [c.name for c in grid.cells] == ["arm=uniform,seed=0", "arm=uniform,seed=1",
                                            "arm=random,seed=0", "arm=random,seed=1"]
    cell = grid.cells[3]
    assert cell.overrides["model.seed"] == 1 and cell.overrides["seed_everything"] == 1
    assert cell.configs[-1].parts[-2:] == ("ablations", "random.yaml")


def test_only_picks_cells_by_axis_value():
    from flowtracer.errors import InputError
    from flowtracer.tools.grid import select_cells

    grid = load_grid(V2)
    assert select_cells(grid, ["seed=0"]) == {f"arm={a},seed=0" for a in ARMS_V2}
    assert select_cells(grid, ["seed=0", "seed=1", "arm=flow"]) == {"arm=flow,seed=0", "arm=flow,seed=1"}
    with pytest.raises(InputError, match=r"--only lr=1: expected AXIS=VALUE with an axis of the grid \(arm, seed\)"):
        select_cells(grid, ["lr=1"])
    with pytest.raises(InputError, match=r"seed has no value '9'; it has 0, 1, 2"):
        select_cells(grid, ["seed=9"])


@pytest.mark.slow
def test_only_runs_the_picked_cells_and_reports_them_all(tmp_path, tiny_model_dir):
    cfg = write_grid(tmp_path, tiny_model_dir)
    assert main(["grid", "--config", str(cfg), "--no-live", "--only", "arm=uniform", "--only", "seed=1"]) == 0
    cells = tmp_path / "grid" / "cells"
    assert sorted(d.parent.name for d in cells.glob("*/done.json")) == ["arm=uniform,seed=1"]
    assert "1/4 cells finished" in (tmp_path / "grid" / "report.md").read_text()


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "experiments" / "grids").glob("*.yaml")))
def test_shipped_grids_load(config):
    grid = load_grid(ROOT / "experiments" / "grids" / config)  # checks every base and arm file exists
    assert len(grid.cells) == len({c.name for c in grid.cells}) >= 2
    arms = {c.axes.get("arm") for c in grid.cells}
    if not any(axis.startswith("model.") for axis in grid.cells[0].axes):  # an arm grid (no knob axis)
        assert arms >= {"uniform", "random", "flow"} or arms == {None}  # the controls every credit grid needs
    else:  # a knob grid (e.g. estimators) may run a subset of the known arms
        assert arms <= {"uniform", "random", "entropy", "attention", "flow"}


V2 = ROOT / "experiments" / "grids" / "chains_v2.yaml"
ARMS_V2 = {"uniform": "UniformCredit", "random": "RandomCredit", "flow": "FlowCredit", "flow_reach": "FlowCredit"}


def test_chains_v2_expands_to_the_preregistered_cells():
    """results/grid_chains_v2/PLAN.md fixes 4 arms x 8 seeds, 40 steps, 200 x 4 validation after
    0/20/40 updates on the held-out split, two cells at a time with one thread each."""
    grid = load_grid(V2)
    assert [c.name for c in grid.cells] == [f"arm={a},seed={s}" for a in ARMS_V2 for s in range(8)]
    assert grid.parallel == 2 and grid.env == {"OMP_NUM_THREADS": "1"}
    assert {c.results for c in grid.cells} == {ROOT / "results" / "grid_chains_v2"}
    fixed = {"trainer.max_steps": 40, "trainer.val_check_interval": 20, "model.val_before_training": True,
             "data.val_source": "data/chains_heldout.jsonl", "data.val_size": 200,
             "model.val_sampling.num_generations": 4,
             "model.sampling.engine": "fast", "model.val_sampling.engine": "fast"}  # one decode path for every cell
    assert all(c.overrides.items() >= fixed.items() for c in grid.cells)
    assert len(open(ROOT / "data" / "chains_heldout.jsonl").readlines()) == 200


@pytest.mark.parametrize("arm", list(ARMS_V2))
def test_chains_v2_cells_resolve_to_the_planned_fit(arm, tmp_path, capsys):
    """Each arm's cell, composed as the grid starts it (base, arm, cell.yaml), parses to the plan's
    knobs and exactly one credit callback (the arm's, not the base recipe's), without running."""
    from flowtracer.tools.cells import fit_command
    from flowtracer.tools.grid import cell_spec

    grid = load_grid(V2, out=str(tmp_path))
    cell = next(c for c in grid.cells if c.axes == {"arm": arm, "seed": "3"})
    spec = cell_spec(grid, cell)
    Path(spec["dir"]).mkdir(parents=True)
    (Path(spec["dir"]) / "cell.yaml").write_text(spec["cell_yaml"])
    with pytest.raises(SystemExit) as done:
        main([*fit_command(spec)[3:], "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["trainer"]["max_steps"], cfg["trainer"]["val_check_interval"]) == (40, 20)
    assert cfg["seed_everything"] == cfg["model"]["seed"] == cfg["data"]["seed"] == 3
    assert (cfg["data"]["val_source"], cfg["data"]["val_size"]) == ("data/chains_heldout.jsonl", 200)
    assert cfg["model"]["val_sampling"]["num_generations"] == 4 and cfg["model"]["val_before_training"]
    assert cfg["model"]["sampling"]["engine"] == cfg["model"]["val_sampling"]["engine"] == "fast"
    assert cfg["trainer"]["logger"][0]["init_args"]["save_dir"] == spec["dir"]
    (callback,) = cfg["trainer"]["callbacks"]
    assert callback["class_path"] == f"flowtracer.credit.{ARMS_V2[arm]}"
    args = callback.get("init_args") or {}
    if arm == "flow":  # the paper's FlowTracer
        assert (args["layers"], args["heads"], args["inject"]) == ("middle", "mean", "uniform")
    if arm == "flow_reach":  # the attribution sweep's choice (results/attribution_chains_sweep.md)
        assert (args["layers"], args["heads"], args["inject"]) == ([17], "mean", "reachability")
    if arm != "uniform":
        assert (args["top_frac"], args["gamma"]) == (0.4, 1.5)


@pytest.mark.slow
def test_grid_killed_midway_resumes_and_reports(tmp_path, tiny_model_dir):
    cfg = write_grid(tmp_path, tiny_model_dir, seeds=[0])  # two cells: one done before the kill, one cut mid-fit
    cells = tmp_path / "grid" / "cells"
    first, second = cells / "arm=uniform,seed=0", cells / "arm=random,seed=0"
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
    assert len(rows) == 2 and all(r["final_val"] not in ("", "nan") for r in rows)
    md = (out / "report.md").read_text()
    assert "| arm=uniform | 1 |" in md and "| arm=random | 1 |" in md and "2/2 cells finished" in md
    for png in ("reward_mean.png", "accuracy.png", "val_pass1.png"):
        assert (out / png).stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.xdist_group("launchers")  # shares the session's reference grid (conftest.py)
def test_committed_cell_summaries_rebuild_the_report(reference_grid, tmp_path):
    """A finished cell writes <results>/<cell>.csv/.json; with the run folders gone (a fresh clone),
    --report-only rebuilds the same table from those files alone."""
    spec = yaml.safe_load(reference_grid.read_text())
    res = Path(spec["results"])
    cells = ["arm=random,seed=0", "arm=random,seed=1", "arm=uniform,seed=0", "arm=uniform,seed=1"]
    assert sorted(p.name for p in res.iterdir()) == sorted(f"{c}.{ext}" for c in cells for ext in ("csv", "json"))
    header = open(res / "arm=uniform,seed=0.csv").readline().strip().split(",")
    assert "val/pass@1" in header and "reward/mean" in header and "time/step" in header
    assert not any(h.startswith("throughput/") for h in header)  # only the report's columns
    before = list(csv.DictReader(open(reference_grid.parent / "local" / "summary.csv")))
    # a fresh clone: the same grid file, whose grid folder (run folders, summary) never existed here
    spec["out"] = str(tmp_path / "fresh")
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    main(["grid", "--config", str(cfg), "--report-only"])
    assert not list((tmp_path / "fresh").rglob("metrics.csv"))  # no run folder was read or made
    after = list(csv.DictReader(open(tmp_path / "fresh" / "summary.csv")))
    keys = ("cell", "state", "final_val", "auc_val", "mean_reward", "steps")
    assert len(after) == 4 and all(r["state"] == "done" for r in after)
    assert [{k: r[k] for k in keys} for r in after] == [{k: r[k] for k in keys} for r in before]


def test_report_auc_and_interval():
    from flowtracer.tools.report import _auc, ci95_halfwidth

    assert _auc([(0, 0.2), (10, 0.4), (20, 0.4)]) == pytest.approx((10 * 0.3 + 10 * 0.4) / 20)
    assert _auc([(0, 0.5)]) == 0.5
    assert ci95_halfwidth(1.0, 3) == pytest.approx(4.303 / 3 ** 0.5)
    assert math.isnan(ci95_halfwidth(1.0, 1))
    # beyond the table: published t quantiles (df 40, 60, 120), not the normal 1.96
    for n, t in ((41, 2.021), (61, 2.000), (121, 1.980)):
        assert ci95_halfwidth(1.0, n) * n ** 0.5 == pytest.approx(t, abs=1e-3)


def test_paired_differences_use_only_the_shared_seeds():
    from flowtracer.tools.report import ci95_halfwidth, paired_markdown, paired_sections, paired_vs

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
    # the report holds all three references; a flow variant gets its difference to flow
    table.append({"group": "arm=flow_reach", "_rows": rows({"0": (0.8, 0.5), "1": (0.7, 0.7)})})
    md = "\n".join(paired_sections(table))
    assert md.count("## Paired differences vs") == 2  # no random arm here: no section vs random
    vs_flow = md.split("## Paired differences vs arm=flow")[1]
    assert "| arm=flow_reach | 2 | 0.050 ± 0.212" in vs_flow
