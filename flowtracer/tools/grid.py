"""`flowtracer grid`: run a base config over axes (credit arm, seed, any dotted key), one `fit` per cell.

    flowtracer grid --config experiments/grid_quickstart.yaml              # sequential, resumable
    flowtracer grid --config experiments/grid_quickstart.yaml --parallel 2
    flowtracer grid --config experiments/grid_quickstart.yaml --report-only

Grid file (paths relative to it):

    base: [quickstart.yaml]            # --config files every cell starts from
    out: ../lightning_logs/grid_quickstart
    parallel: 1                        # cells at a time
    results: ../results/grid_quickstart # optional: commit-sized per-cell summaries go here
    overrides: {trainer.max_steps: 12} # dotted keys set in every cell
    env: {OMP_NUM_THREADS: 1}          # environment variables of every cell's `fit`
    axes:                              # the cross product of these is the grid
      arm: {uniform: ablation_uniform.yaml, flow: ablation_flow.yaml}   # name -> config file (or a dict)
      seed: [0, 1]                     # sets seed_everything, model.seed and data.seed
      model.optim.lr: [1.0e-4, 2.0e-4] # any dotted key

Each cell lives in <out>/cells/<cell name>/: cell.yaml (its own overrides, logger included),
fit.log, run/version_0/ (metrics.csv, config.yaml, ...) and done.json once `fit` exited cleanly.
A rerun skips cells with done.json and starts any other cell afresh (a crashed or killed cell
leaves no done.json). After the cells, the report (summary.csv, report.md, report.html, PNGs) is
written to <out>/ by flowtracer.tools.report.

With `results:` set, a cell that finishes also writes <results>/<cell name>.csv (its metrics.csv
rows, only the columns the report reads: steps, reward, accuracy, validation, timings, credit
stats) and <cell name>.json (its done.json): small files meant to be committed. A cell whose run
folder is gone (another machine, a fresh clone) but whose summary is there counts as done and the
report reads the summary instead, so `flowtracer grid --config <grid> --report-only` rebuilds the
report from the repository alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from flowtracer.errors import InputError
from flowtracer.runs.csvlog import atomic_write_text
from flowtracer.tools.report import read_metrics, write_report

SEED_KEYS = ("seed_everything", "model.seed", "data.seed")


@dataclass
class Cell:
    name: str
    axes: dict  # axis -> value label (what the report groups by)
    configs: list[Path]  # --config files after the base ones
    overrides: dict  # dotted key -> value
    dir: Path
    state: str = "pending"  # pending | done (earlier) | running | finished | failed
    results: Path | None = None  # folder of the committed per-cell summaries (grid `results:`)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    seconds: float = 0.0

    @property
    def run_dir(self) -> Path:
        return self.dir / "run" / "version_0"

    @property
    def done_file(self) -> Path:
        return self.dir / "done.json"

    @property
    def summary_csv(self) -> Path | None:
        return self.results / f"{self.name}.csv" if self.results else None

    @property
    def metrics_path(self) -> Path:
        """The run's metrics.csv, else the committed summary (the same columns, fewer of them)."""
        local = self.run_dir / "metrics.csv"
        if local.exists() or self.summary_csv is None or not self.summary_csv.exists():
            return local
        return self.summary_csv


@dataclass
class Grid:
    base: list[Path]
    out: Path
    parallel: int
    cells: list[Cell]
    env: dict = field(default_factory=dict)


def _nest(dotted: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: the shape jsonargparse reads from a --config file."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _label(value) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def load_grid(path: str | Path, out: str | None = None, parallel: int | None = None) -> Grid:
    path = Path(path).resolve()
    if not path.exists():
        raise InputError(f"grid config {path} not found; pass --config experiments/grid_<name>.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    here = path.parent
    base = spec.get("base") or []
    base = [here / b for b in ([base] if isinstance(base, str) else base)]
    for b in base:
        if not b.exists():
            raise InputError(f"grid base config {b} not found; fix `base:` in {path}")
    axes = spec.get("axes") or {}
    if not axes:
        raise InputError(f"{path} has no `axes:`; add e.g. `axes: {{seed: [0, 1]}}`")
    out_dir = (Path(out) if out else here / spec.get("out", f"../lightning_logs/grid_{path.stem}")).resolve()
    shared = dict(spec.get("overrides") or {})

    # Each axis becomes a list of (label, configs, overrides) choices.
    choices: list[list[tuple[str, str, list[Path], dict]]] = []
    for axis, values in axes.items():
        opts = []
        if axis == "arm":
            if not isinstance(values, dict):
                raise InputError("axis `arm` maps arm names to config files, e.g. {flow: ablation_flow.yaml}")
            for name, cfg in values.items():
                if isinstance(cfg, dict):  # inline overrides, e.g. {trainer.callbacks: [...]}
                    opts.append((axis, str(name), [], cfg))
                else:
                    f = here / cfg
                    if not f.exists():
                        raise InputError(f"arm {name}: {f} not found; fix axes.arm in {path}")
                    opts.append((axis, str(name), [f], {}))
        elif axis == "seed":
            opts = [(axis, str(s), [], {k: s for k in SEED_KEYS}) for s in values]
        else:
            if not isinstance(values, list):
                raise InputError(f"axis {axis}: give a list of values, e.g. {axis}: [1, 2]")
            opts = [(axis, _label(v), [], {axis: v}) for v in values]
        choices.append(opts)

    cells = []
    for combo in itertools.product(*choices):
        labels = {axis: label for axis, label, _, _ in combo}
        name = ",".join(f"{a}={v}" for a, v in labels.items())
        configs = [c for _, _, cs, _ in combo for c in cs]
        overrides = dict(shared)
        for _, _, _, ov in combo:
            overrides.update(ov)
        cells.append(Cell(name, labels, configs, overrides, out_dir / "cells" / name))
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    if spec.get("results"):
        for cell in cells:
            cell.results = (here / spec["results"]).resolve()
    return Grid(base, out_dir, int(parallel or spec.get("parallel", 1)), cells, env)


def _write_cell_config(cell: Cell) -> Path:
    # The logger is pinned to <cell>/run/version_0 so the report finds every cell's metrics at a
    # fixed place, whatever the arm files name their runs.
    cfg = _nest(cell.overrides)
    cfg.setdefault("trainer", {})["logger"] = [{
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(cell.dir), "name": "run", "version": 0}}]
    path = cell.dir / "cell.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fit_command(grid: Grid, cell: Cell) -> list[str]:
    cmd = [sys.executable, "-m", "flowtracer.cli", "fit"]
    for c in [*grid.base, *cell.configs, cell.dir / "cell.yaml"]:
        cmd += ["--config", str(c)]
    return cmd


def _start(grid: Grid, cell: Cell) -> None:
    if cell.dir.exists():  # a crashed or killed attempt: start this cell afresh
        shutil.rmtree(cell.dir)
    cell.dir.mkdir(parents=True)
    _write_cell_config(cell)
    log = open(cell.dir / "fit.log", "w")
    # Same process group as the grid: killing the grid's group (Ctrl-C, kill -- -PGID) stops the
    # cells too, so no orphan keeps writing into a folder a rerun is about to clear.
    cell.proc = subprocess.Popen(fit_command(grid, cell), stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                 env={**os.environ, **grid.env})
    log.close()
    cell.state, cell.started = "running", time.time()


def _poll(cell: Cell) -> None:
    rc = cell.proc.poll()
    if rc is None:
        return
    cell.seconds = time.time() - cell.started
    cell.proc = None
    if rc == 0 and (cell.run_dir / "metrics.csv").exists():
        cell.state = "finished"
        cell.done_file.write_text(json.dumps({"seconds": cell.seconds, "axes": cell.axes}))
        if cell.results:
            write_cell_summary(cell)
    else:
        cell.state = "failed"


def _progress(cell: Cell) -> tuple[str, str]:
    """(last rl_step, last reward/mean) from the cell's metrics.csv, '' if none yet."""

    try:
        train, _ = read_metrics(cell.metrics_path)
    except (FileNotFoundError, ValueError, KeyError):
        return "", ""
    if not train:
        return "", ""
    last = train[-1]
    return str(int(last["rl_step"])), f"{last.get('reward/mean', float('nan')):.3f}"


def _table(grid: Grid):

    colours = {"pending": "dim", "done": "green", "finished": "bold green", "running": "yellow",
               "failed": "bold red"}
    table = Table(title=f"grid {grid.out}", expand=False)
    for col in ("cell", "state", "rl_step", "reward", "seconds"):
        table.add_column(col)
    now = time.time()
    for cell in grid.cells:
        step, reward = _progress(cell) if cell.state in ("running", "finished", "done", "failed") else ("", "")
        secs = now - cell.started if cell.state == "running" else cell.seconds
        table.add_row(cell.name, f"[{colours[cell.state]}]{cell.state}[/]", step, reward,
                      f"{secs:.0f}" if secs else "")
    return table


SUMMARY_KEYS = ("rl_step", "step", "epoch", "reward/", "accuracy", "val/", "time/", "credit/", "train/loss",
                "entropy", "response/length")


def write_cell_summary(cell: Cell) -> None:
    """<results>/<cell>.csv (metrics.csv, report columns only) and <cell>.json, each written atomically."""


    rows = list(csv.DictReader(open(cell.run_dir / "metrics.csv")))
    cols = [c for c in (rows[0] if rows else {}) if c.startswith(SUMMARY_KEYS)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(r for r in rows if any(r.get(c) for c in cols if c not in ("step", "epoch")))
    cell.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(cell.summary_csv), buf.getvalue())
    atomic_write_text(str(cell.summary_csv.with_suffix(".json")), cell.done_file.read_text())


def mark_done(grid: Grid) -> None:
    """Cells with done.json (finished by an earlier run), or only a committed summary, are `done`."""
    for cell in grid.cells:
        done = cell.done_file
        if not done.exists() and cell.summary_csv is not None and cell.summary_csv.exists():
            done = cell.summary_csv.with_suffix(".json")
        if done.exists():
            cell.state = "done"
            cell.seconds = json.loads(done.read_text()).get("seconds", 0.0)


def run_grid(grid: Grid, *, live: bool = True, poll_s: float = 1.0) -> list[Cell]:
    """Run every unfinished cell, `grid.parallel` at a time; returns the cells with their states."""

    mark_done(grid)
    grid.out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in grid.cells if c.state == "pending"]
    running: list[Cell] = []
    view = Live(_table(grid), console=Console(stderr=True), auto_refresh=False) if live else None
    say = (lambda c: None) if live else (lambda c: print(f"{c.state:>9}  {c.name}", file=sys.stderr, flush=True))
    try:
        if view:
            view.start()
        while todo or running:
            while todo and len(running) < grid.parallel:
                cell = todo.pop(0)
                _start(grid, cell)
                running.append(cell)
                say(cell)
            time.sleep(poll_s)
            for cell in list(running):
                _poll(cell)
                if cell.state != "running":
                    running.remove(cell)
                    say(cell)
            if view:
                view.update(_table(grid), refresh=True)
    finally:
        if view:
            view.stop()
        for cell in running:  # interrupted: stop the children; their cells stay unfinished
            if cell.proc is not None and cell.proc.poll() is None:
                cell.proc.terminate()
    return grid.cells


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flowtracer grid", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="grid YAML (base + axes)")
    p.add_argument("--out", help="output folder (default: the grid file's `out:`)")
    p.add_argument("--parallel", type=int, help="cells at a time (default: the grid file's, else 1)")
    p.add_argument("--report-only", action="store_true", help="skip running; (re)write the report")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live table")
    args = p.parse_args(argv)
    grid = load_grid(args.config, args.out, args.parallel)
    if args.report_only:
        mark_done(grid)
    else:
        run_grid(grid, live=not args.no_live and sys.stderr.isatty())

    paths = write_report(grid)
    print(f"report: {paths['md']}  {paths['html']}")
    failed = [c.name for c in grid.cells if c.state == "failed"]
    if failed:
        print(f"flowtracer: error: {len(failed)} cell(s) failed ({', '.join(failed)}); see "
              f"<cell>/fit.log, fix, and rerun the same command (finished cells are skipped)", file=sys.stderr)
        return 1
    return 0
