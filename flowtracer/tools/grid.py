"""`flowtracer grid`: run a base config over axes (credit arm, seed, any dotted key), one `fit` per cell.

    flowtracer grid --config experiments/grids/quickstart.yaml              # sequential, resumable
    flowtracer grid --config experiments/grids/quickstart.yaml --parallel 2
    flowtracer grid --config experiments/grids/quickstart.yaml --report-only

Grid file (paths relative to it):

    base: [quickstart.yaml]            # --config files every cell starts from
    out: ../lightning_logs/grid_quickstart
    parallel: 1                        # cells at a time (--launcher local)
    results: ../results/grid_quickstart # optional: commit-sized per-cell summaries go here
    overrides: {trainer.max_steps: 12} # dotted keys set in every cell
    env: {OMP_NUM_THREADS: 1}          # environment variables of every cell's `fit`
    axes:                              # the cross product of these is the grid
      arm: {uniform: ablations/uniform.yaml, flow: ablations/flow.yaml}   # name -> config file (or a dict)
      seed: [0, 1]                     # sets seed_everything, model.seed and data.seed
      model.optim.lr: [1.0e-4, 2.0e-4] # any dotted key
    launcher: local                    # local | ray | slurm (--launcher overrides it)
    gpus_per_cell: 1                   # default: 1 where the launcher sees GPUs, else 0
    cpus_per_cell: 1                   # Ray num_cpus / Slurm cpus_per_task of a cell
    devices: [0, 1, 2, 3]              # local: the GPUs the cells share (default: all visible)
    max_retries: 2                     # ray/slurm: reruns of a cell whose worker, node or job died
    worker_out: /scratch/grid          # ray/slurm: cell folders on the workers when `out` is not shared
    ray: {address: auto}               # ray.init arguments (default: RAY_ADDRESS, else a local cluster)
    slurm: {partition: gpu, time: 240, mem_gb: 64, array_parallelism: 8}   # submitit/Slurm job options

Launchers (docs/scale-out.md): `local` runs `--parallel N` cells as subprocesses of this command,
each with its own CUDA_VISIBLE_DEVICES (gpus_per_cell of the devices; N above devices/gpus_per_cell
is refused); `ray` runs each cell as a Ray task anywhere on a Ray cluster; `slurm` submits the
cells as a Slurm job array through submitit (flowtracer.tools.launchers).

Each cell lives in <out>/cells/<cell name>/: cell.yaml (its own overrides, logger included),
fit.log, where.json (node, devices), run/version_0/ (metrics.csv, config.yaml, ...) and done.json
once `fit` exited cleanly and the grid has its summary. A cell that ran on a worker whose disk is
not the grid's (`worker_out`) gets done.json and summary.csv (the report's columns) here instead.
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
import itertools
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from flowtracer.errors import InputError
from flowtracer.runs.csvlog import atomic_write_text
from flowtracer.tools.cells import DevicePool, finish_fit, start_fit
from flowtracer.tools.launchers import import_engine, run_ray, run_slurm
from flowtracer.tools.report import read_metrics, write_report

SEED_KEYS = ("seed_everything", "model.seed", "data.seed")
LAUNCHERS = ("local", "ray", "slurm")


@dataclass
class Cell:
    name: str
    axes: dict  # axis -> value label (what the report groups by)
    configs: list[Path]  # --config files after the base ones
    overrides: dict  # dotted key -> value
    dir: Path
    state: str = "pending"  # pending | done (earlier) | queued | running | finished | failed
    results: Path | None = None  # folder of the committed per-cell summaries (grid `results:`)
    proc: object = field(default=None, repr=False)  # the local launcher's `fit` (subprocess.Popen)
    started: float = 0.0
    seconds: float = 0.0
    node: str = ""  # where it runs or ran
    devices: str = ""  # its CUDA_VISIBLE_DEVICES
    attempts: int = 0
    queue: str = ""  # the engine's word for it (Slurm: PENDING, RUNNING, ...)
    error: str = ""

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
        """The run's metrics.csv, else a summary (the same columns, fewer of them): the committed
        one, else the one a worker sent back (the cell ran on a disk that is not the grid's)."""
        local = self.run_dir / "metrics.csv"
        for path in (local, self.summary_csv, self.dir / "summary.csv"):
            if path is not None and path.exists():
                return path
        return local


@dataclass
class Grid:
    base: list[Path]
    out: Path
    parallel: int
    cells: list[Cell]
    env: dict = field(default_factory=dict)
    launcher: str = "local"
    gpus_per_cell: int | None = None  # None: 1 where the launcher sees GPUs, else 0
    cpus_per_cell: float = 1
    devices: list[str] | None = None  # local: the GPUs the cells share (None: all visible)
    max_retries: int = 2
    worker_out: Path | None = None  # ray/slurm: where workers keep the cell folders (None: out)
    ray: dict = field(default_factory=dict)  # ray.init arguments
    slurm: dict = field(default_factory=dict)  # submitit/Slurm job options


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


def _axis_choices(path: Path, axes: dict) -> list[list[tuple[str, str, list[Path], dict]]]:
    """Each axis as a list of (axis, label, configs, overrides) choices."""
    here = path.parent
    choices = []
    for axis, values in axes.items():
        opts = []
        if axis == "arm":
            if not isinstance(values, dict):
                raise InputError("axis `arm` maps arm names to config files, e.g. {flow: ablations/flow.yaml}")
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
    return choices


def _launch_keys(path: Path, spec: dict, launcher: str | None) -> dict:
    """The grid file's launcher keys as Grid fields."""
    launcher = launcher or spec.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise InputError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS)} (`launcher:` in {path})")
    for key in ("ray", "slurm"):
        if not isinstance(spec.get(key) or {}, dict):
            raise InputError(f"`{key}:` in {path} maps option names to values, e.g. {key}: {{address: auto}}")
    devices = spec.get("devices")
    worker_out = spec.get("worker_out")
    gpus = spec.get("gpus_per_cell")
    return {"launcher": launcher, "gpus_per_cell": None if gpus is None else int(gpus),
            "cpus_per_cell": float(spec.get("cpus_per_cell", 1)), "max_retries": int(spec.get("max_retries", 2)),
            "devices": None if devices is None else [str(d) for d in devices],
            "worker_out": None if worker_out is None else (path.parent / worker_out).resolve(),
            "ray": dict(spec.get("ray") or {}), "slurm": dict(spec.get("slurm") or {})}


def load_grid(path: str | Path, out: str | None = None, parallel: int | None = None,
              launcher: str | None = None) -> Grid:
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

    cells = []
    for combo in itertools.product(*_axis_choices(path, axes)):
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
    return Grid(base, out_dir, int(parallel or spec.get("parallel", 1)), cells, env,
                **_launch_keys(path, spec, launcher))


def cell_spec(grid: Grid, cell: Cell) -> dict:
    """What a worker needs to run `cell` (flowtracer.tools.cells): plain data, picklable anywhere."""
    remote = grid.launcher != "local" and grid.worker_out is not None
    cell_dir = grid.worker_out / "cells" / cell.name if remote else cell.dir
    # The logger is pinned to <cell>/run/version_0 so the report finds every cell's metrics at a
    # fixed place, whatever the arm files name their runs.
    cfg = _nest(cell.overrides)
    cfg.setdefault("trainer", {})["logger"] = [{
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(cell_dir), "name": "run", "version": 0}}]
    return {"name": cell.name, "axes": cell.axes, "dir": str(cell_dir), "cwd": os.getcwd(), "env": grid.env,
            "configs": [str(c) for c in [*grid.base, *cell.configs]],
            "cell_yaml": yaml.safe_dump(cfg, sort_keys=False)}


def land(grid: Grid, cell: Cell, payload: dict) -> None:
    """Finish a cell from its payload (flowtracer.tools.cells.finish_fit), wherever it ran: the
    summaries first, done.json last (it is what marks the cell finished)."""
    cell.seconds, cell.node, cell.devices = payload["seconds"], payload["node"], payload["devices"]
    cell.dir.mkdir(parents=True, exist_ok=True)
    if payload["done"] is None:
        cell.state, cell.error = "failed", cell.error or f"fit exited with {payload['rc']}"
        if not (cell.dir / "fit.log").exists():  # ran elsewhere: keep the end of its log here
            (cell.dir / "fit.log").write_text(payload["log_tail"])
        return
    if not (cell.run_dir / "metrics.csv").exists():  # ran on another disk: keep what came back
        atomic_write_text(str(cell.dir / "summary.csv"), payload["summary"])
    done = json.dumps({**payload["done"], "attempts": max(cell.attempts, 1), "launcher": grid.launcher})
    if cell.results:
        cell.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(cell.summary_csv), payload["summary"])
        atomic_write_text(str(cell.summary_csv.with_suffix(".json")), done)
    atomic_write_text(str(cell.done_file), done)
    cell.state = "finished"


def visible_devices() -> list[str]:
    """CUDA_VISIBLE_DEVICES entries when set (indices or UUIDs), else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def device_pool(grid: Grid) -> DevicePool | None:
    """The local launcher's GPUs; None where there are none and none are asked for (env untouched)."""
    devices = grid.devices if grid.devices is not None else visible_devices()
    per_cell = grid.gpus_per_cell if grid.gpus_per_cell is not None else int(bool(devices))
    if not devices and not per_cell:
        return None
    DevicePool.check(devices, per_cell, grid.parallel)
    return DevicePool(devices, per_cell)


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


COLOURS = {"pending": "dim", "done": "green", "finished": "bold green", "queued": "cyan", "running": "yellow",
           "failed": "bold red"}


def _table(grid: Grid):
    table = Table(title=f"grid {grid.out} ({grid.launcher})", expand=False)
    cols = ["cell", "state", "node", "devices", "try", "rl_step", "reward", "seconds"]
    cols += ["queue"] if grid.launcher == "slurm" else []
    for col in cols:
        table.add_column(col)
    now = time.time()
    for cell in grid.cells:
        step, reward = _progress(cell) if cell.state in ("running", "finished", "done", "failed") else ("", "")
        secs = now - cell.started if cell.state == "running" else cell.seconds
        row = [cell.name, f"[{COLOURS[cell.state]}]{cell.state}[/]", cell.node, cell.devices,
               str(cell.attempts or ""), step, reward, f"{secs:.0f}" if secs else ""]
        table.add_row(*row, *([cell.queue] if grid.launcher == "slurm" else []))
    return table


class View:
    """The live table (a terminal), or one log line per cell whose state changed (--no-live)."""

    def __init__(self, grid: Grid, live: bool):
        self.grid = grid
        self.live = Live(_table(grid), console=Console(stderr=True), auto_refresh=False) if live else None
        self.seen: dict[str, str] = {c.name: c.state for c in grid.cells}

    def __enter__(self):
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.stop()

    def refresh(self) -> None:
        if self.live:
            self.live.update(_table(self.grid), refresh=True)
            return
        for cell in self.grid.cells:
            if self.seen[cell.name] != cell.state:
                self.seen[cell.name] = cell.state
                where = f"  {cell.node} [{cell.devices}]" if cell.node else ""
                print(f"{cell.state:>9}  {cell.name}{where}{'  ' + cell.error if cell.error else ''}",
                      file=sys.stderr, flush=True)


def mark_done(grid: Grid) -> None:
    """Cells with done.json (finished by an earlier run), or only a committed summary, are `done`."""
    for cell in grid.cells:
        done = cell.done_file
        if not done.exists() and cell.summary_csv is not None and cell.summary_csv.exists():
            done = cell.summary_csv.with_suffix(".json")
        if done.exists():
            cell.state = "done"
            cell.seconds = json.loads(done.read_text()).get("seconds", 0.0)


def run_local(grid: Grid, todo: list[Cell], refresh, poll_s: float = 1.0) -> None:
    """`grid.parallel` cells at a time as subprocesses of this process, each on its own GPUs."""
    pool = device_pool(grid)
    running: list[Cell] = []
    try:
        while todo or running:
            while todo and len(running) < grid.parallel:
                cell = todo.pop(0)
                devices = pool.take() if pool else None
                cell.proc = start_fit(cell_spec(grid, cell), devices)
                cell.state, cell.started, cell.attempts = "running", time.time(), 1
                cell.node, cell.devices = socket.gethostname(), devices or ""
                running.append(cell)
            refresh()
            time.sleep(poll_s)
            for cell in list(running):
                rc = cell.proc.poll()
                if rc is None:
                    continue
                running.remove(cell)
                cell.proc = None
                if pool:
                    pool.give(cell.devices)
                land(grid, cell, finish_fit(cell_spec(grid, cell), rc, time.time() - cell.started))
            refresh()
    finally:
        for cell in running:  # interrupted: stop the children; their cells stay unfinished
            if cell.proc is not None and cell.proc.poll() is None:
                cell.proc.terminate()


def select_cells(grid: Grid, only: list[str]) -> set[str]:
    """Names of the cells `--only AXIS=VALUE ...` picks: a cell matches every axis named, and any of the
    values given for an axis (`--only seed=0 --only seed=1 --only arm=flow`: seeds 0 or 1 of arm flow)."""
    wanted: dict[str, set[str]] = {}
    for item in only:
        axis, sep, value = item.partition("=")
        values = {str(c.axes.get(axis)) for c in grid.cells if axis in c.axes}
        if not sep or not values:
            axes = ", ".join(grid.cells[0].axes) if grid.cells else "none"
            raise InputError(f"--only {item}: expected AXIS=VALUE with an axis of the grid ({axes})")
        if value not in values:
            raise InputError(f"--only {item}: {axis} has no value {value!r}; it has {', '.join(sorted(values))}")
        wanted.setdefault(axis, set()).add(value)
    return {c.name for c in grid.cells if all(str(c.axes[a]) in vs for a, vs in wanted.items())}


def run_grid(grid: Grid, *, live: bool = True, poll_s: float = 1.0, only: list[str] | None = None) -> list[Cell]:
    """Run every unfinished cell with `grid.launcher` (those `only` picks, see `select_cells`, if given);
    returns all the cells with their states (a cell left out stays pending)."""
    mark_done(grid)
    picked = select_cells(grid, only) if only else {c.name for c in grid.cells}
    todo = [c for c in grid.cells if c.state == "pending" and c.name in picked]
    if grid.launcher != "local":
        import_engine(grid.launcher)  # not installed: one line naming the extra, before anything is written
    with View(grid, live) as view:
        if grid.launcher == "local":
            run_local(grid, todo, view.refresh, poll_s)
        elif todo:
            run = run_ray if grid.launcher == "ray" else run_slurm
            run(grid, todo, lambda c: cell_spec(grid, c), lambda c, p: land(grid, c, p), view.refresh, poll_s)
        view.refresh()
    return grid.cells


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flowtracer grid", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="grid YAML (base + axes)")
    p.add_argument("--out", help="output folder (default: the grid file's `out:`)")
    p.add_argument("--parallel", type=int, help="cells at a time (default: the grid file's, else 1)")
    p.add_argument("--launcher", choices=LAUNCHERS, help="where cells run (default: the grid file's, else local)")
    p.add_argument("--report-only", action="store_true", help="skip running; (re)write the report")
    p.add_argument("--no-live", action="store_true", help="plain log lines instead of the live table")
    p.add_argument("--only", action="append", default=None, metavar="AXIS=VALUE",
                   help="run only the cells with this axis value (repeat: values of one axis OR, axes AND); "
                        "the report still lists every cell")
    args = p.parse_args(argv)
    grid = load_grid(args.config, args.out, args.parallel, args.launcher)
    if args.report_only:
        mark_done(grid)
    else:
        run_grid(grid, live=not args.no_live and sys.stderr.isatty(), only=args.only)

    paths = write_report(grid)
    print(f"report: {paths['md']}  {paths['html']}")
    failed = [c for c in grid.cells if c.state == "failed"]
    if failed:
        names = ", ".join(f"{c.name}: {c.error}" if c.error else c.name for c in failed)
        print(f"flowtracer: error: {len(failed)} cell(s) failed ({names}); see <cell>/fit.log, fix, and rerun "
              f"the same command (finished cells are skipped)", file=sys.stderr)
        return 1
    return 0
