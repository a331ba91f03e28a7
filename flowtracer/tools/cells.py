"""One grid cell where it runs: its folder, its `fit` subprocess and what comes back to the grid.

The same code runs a cell for every launcher: in the grid's own process (`--launcher local`), in a
Ray worker (`--launcher ray`) or in a Slurm job (`--launcher slurm`). A cell is a plain dict (its
spec: name, folder, config files, cell.yaml text, environment, devices) so it pickles to any
worker; `run_cell` returns a plain dict too (the payload: exit code, seconds, node, devices, the
done record and the per-cell summary), which is all the grid needs to finish the cell, whether or
not the worker's disk is the grid's.

Also here, because it is what a launcher on one machine needs: `DevicePool`, the disjoint
CUDA_VISIBLE_DEVICES of the cells running at once.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flowtracer.errors import InputError

# Columns of metrics.csv that the report reads: what a per-cell summary keeps.
SUMMARY_KEYS = ("rl_step", "step", "epoch", "reward/", "accuracy", "val/", "time/", "credit/", "train/loss",
                "entropy", "response/length")
LOG_TAIL = 4000  # characters of fit.log sent back with a failed cell (its worker's disk may be elsewhere)
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the forked child: the kernel kills `fit` when the process that started it dies, so a
    worker killed with SIGKILL (node lost, OOM killer, Ray cancel) leaves no `fit` writing into a
    folder that the cell's retry is about to clear."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def fit_command(spec: dict) -> list[str]:
    cmd = [sys.executable, "-m", "flowtracer.cli", "fit"]
    for c in [*spec["configs"], str(Path(spec["dir"]) / "cell.yaml")]:
        cmd += ["--config", c]
    return cmd


def start_fit(spec: dict, devices: str | None = None, report=None) -> subprocess.Popen:
    """A fresh cell folder (an earlier attempt's is removed), cell.yaml, and `fit` started into fit.log.

    `devices`: CUDA_VISIBLE_DEVICES of this cell; None keeps the environment's (Ray and Slurm set it
    for the worker already). `report(name, where)` is told where the fit runs before where.json is
    written, so a cell whose where.json exists has been counted (an attempt) by whoever listens."""
    cell_dir = Path(spec["dir"])
    if cell_dir.exists():  # a crashed or killed attempt: start this cell afresh
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    (cell_dir / "cell.yaml").write_text(spec["cell_yaml"])
    env = {**os.environ, **spec.get("env", {})}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    log = open(cell_dir / "fit.log", "w")
    try:
        # Same process group as the caller: killing the grid's group (Ctrl-C, kill -- -PGID) stops
        # the cells too.
        proc = subprocess.Popen(fit_command(spec), stdout=log, stderr=subprocess.STDOUT, cwd=spec["cwd"], env=env,
                                preexec_fn=_die_with_parent if _LIBC is not None else None)
    finally:
        log.close()
    where = {"node": socket.gethostname(), "devices": env.get("CUDA_VISIBLE_DEVICES", ""), "pid": os.getpid(),
             "fit_pid": proc.pid, "started": time.time()}
    if report is not None:
        report(spec["name"], where)
    (cell_dir / "where.json").write_text(json.dumps(where))
    return proc


def summary_text(metrics_csv: Path) -> str:
    """metrics.csv with only the report's columns (and only rows that carry one of them)."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in (rows[0] if rows else {}) if c.startswith(SUMMARY_KEYS)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(r for r in rows if any(r.get(c) for c in cols if c not in ("step", "epoch")))
    return buf.getvalue()


def finish_fit(spec: dict, rc: int, seconds: float) -> dict:
    """The payload of a cell whose `fit` exited with `rc`: done record and summary when it succeeded."""
    cell_dir = Path(spec["dir"])
    where = json.loads((cell_dir / "where.json").read_text())
    metrics = cell_dir / "run" / "version_0" / "metrics.csv"
    ok = rc == 0 and metrics.exists()
    out = {"rc": rc, "seconds": seconds, "node": where["node"], "devices": where["devices"], "done": None,
           "summary": None, "log_tail": ""}
    if ok:
        out["done"] = {"seconds": seconds, "axes": spec["axes"], "node": where["node"], "devices": where["devices"]}
        out["summary"] = summary_text(metrics)
    else:
        log = cell_dir / "fit.log"
        out["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:] if log.exists() else ""
    return out


def run_cell(spec: dict, report=None) -> dict:
    """Run one cell to its end here (a Ray task's or a Slurm job's body); returns its payload.

    `report(name, where)`, when given, is told where the cell runs (node, devices, pid) once `fit`
    has started: the grid's live table; what it returns (did the listener answer) comes back as the
    payload's "board_answered". A `fit` that fails returns its exit code (no exception: the launcher
    retries only a cell whose worker or node died, never one that failed on its own)."""
    started = time.time()
    answers = []
    proc = start_fit(spec, report=None if report is None else lambda *a: answers.append(report(*a)))
    rc = proc.wait()
    out = finish_fit(spec, rc, time.time() - started)
    if answers:
        out["board_answered"] = answers[0]
    return out


class DevicePool:
    """Disjoint GPU sets for the cells running at once on one machine.

    `devices` are CUDA_VISIBLE_DEVICES entries (indices or UUIDs); each running cell holds `per_cell`
    of them until it ends. `per_cell` 0 gives every cell "" (no GPU)."""

    def __init__(self, devices: list[str], per_cell: int):
        self.free = list(devices)
        self.per_cell = per_cell

    @staticmethod
    def check(devices: list[str], per_cell: int, parallel: int) -> None:
        need = parallel * per_cell
        if per_cell and need > len(devices):
            raise InputError(
                f"--parallel {parallel} x gpus_per_cell {per_cell} needs {need} GPUs, {len(devices)} visible "
                f"({','.join(devices) or 'none'}); lower --parallel to {len(devices) // per_cell} or gpus_per_cell")

    def take(self) -> str:
        if len(self.free) < self.per_cell:
            raise RuntimeError(f"no {self.per_cell} free GPUs left ({self.free}); a cell was not given back")
        got, self.free = self.free[:self.per_cell], self.free[self.per_cell:]
        return ",".join(got)

    def give(self, devices: str) -> None:
        if self.per_cell and devices:
            self.free += devices.split(",")
