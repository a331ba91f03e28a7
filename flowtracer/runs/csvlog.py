"""A crash-safe CSVLogger: metrics.csv is never truncated mid-line and survives a resume.

Lightning's CSVLogger buffers 100 steps, rewrites metrics.csv in place when a new column appears
(a kill then leaves it truncated) and deletes an existing metrics.csv when a run resumes into its
folder. This drop-in (same arguments; `flowtracer.runs.csvlog.CSVLogger`) instead:
  - writes every step (flush_logs_every_n_steps defaults to 1), so a checkpoint never runs ahead
    of the metrics on disk;
  - appends whole rows with one write + fsync; a header change is a rewrite to a temporary file,
    fsync and an atomic rename;
  - keeps metrics.csv when it reopens a folder (resume) and continues its columns.
The CLI uses it for every CSVLogger (`lightning.pytorch.loggers.CSVLogger` in a config maps here).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Optional, Union

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Replace `path` with `text` all at once: temp file in the same folder, fsync, rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def print_and_write(lines: list[str], out: str | None) -> str:
    """A benchmark's or script's results table: printed, and with `out` (its --out) written atomically."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        atomic_write_text(out, text)
        print(f"wrote {out}")
    return text


def append_lines(path: str, text: str) -> None:
    """Append complete lines with a single write() and fsync: a kill leaves all or none of them."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # regular files write everything at once; be safe anyway
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


class _SafeWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        # Not super().__init__: Lightning's deletes an existing metrics.csv (a resumed run keeps it).
        self.metrics: list[dict] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict = {}
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)

        self._fs = get_filesystem(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = set().union(*self.metrics) - set(self.metrics_keys)
        exists = os.path.isfile(self.metrics_file_path)
        if new_keys or not exists:
            old = []
            if exists:
                with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                    old = list(csv.DictReader(f))
            self.metrics_keys = sorted(set(self.metrics_keys) | new_keys)
            atomic_write_text(self.metrics_file_path, self._rows(old + self.metrics, header=True))
        else:
            append_lines(self.metrics_file_path, self._rows(self.metrics, header=False))
        self.metrics = []

    def _rows(self, rows: list[dict], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, made crash-safe (see the module docstring); same arguments."""

    def __init__(self, save_dir: _PATH, name: Optional[str] = "lightning_logs",
                 version: Optional[Union[int, str]] = None, prefix: str = "",
                 flush_logs_every_n_steps: int = 1):
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> _SafeWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _SafeWriter(log_dir=self.log_dir)
        return self._experiment
