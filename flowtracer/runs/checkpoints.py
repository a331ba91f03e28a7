"""Crash safety: atomic checkpoints, checkpoints after the step's logs, rewinding logs on resume.

A run SIGKILLed at any moment resumes with `--ckpt_path last` and logs what an uninterrupted run
logs, because:
  - `AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder, fsyncs it and
    renames it over the old one: a kill mid-write leaves the last good checkpoint in place;
  - `StepCheckpoint` (the CLI's `checkpoint.*`) saves a step's checkpoint only after that step's
    metrics and rollouts are on disk (Lightning's ModelCheckpoint saves before the logger writes);
  - `rewind_run_dir` drops, on resume, the metrics.csv rows and rollouts.jsonl records of steps
    past the checkpoint (written after it, and about to be redone), and any torn last line;
  - the prompts and sampling of step s are functions of (seed, s) (GRPOModule._seed_everything),
    and the checkpoint holds the weights, optimizer, scheduler, loop counters and guard counts.
Reading one: `load_checkpoint_file` unpickles tensors, containers, numbers, strings and the
project's settings dataclasses only (``weights_only=True``); a file holding anything else is
refused, because unpickling it could run code the file carries.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from flowtracer.config import ChainSpec, DapoConfig, EvalSet, LoraSpec, LossConfig, OptimConfig, SamplingConfig
from flowtracer.errors import InputError
from flowtracer.runs.csvlog import atomic_write_text, fsync_dir

# What a checkpoint may hold besides tensors and plain containers: the hyper-parameters of a module
# built in Python (the CLI stores them as plain dicts).
SAFE_TYPES = (SamplingConfig, LossConfig, OptimConfig, DapoConfig, LoraSpec, EvalSet, ChainSpec)


class UnsafeCheckpointError(InputError):
    """A checkpoint file that holds objects other than weights and settings."""


def load_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with the project's settings types allowed.

    UnsafeCheckpointError (one line naming the risk) when the file pickles any other object;
    other failures (not a torch file, truncated) propagate for the caller to describe.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_TYPES)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError (or RuntimeError) for a refused global
        if "Weights only load failed" not in str(exc):
            raise
        found = str(exc).split("Unsupported global: GLOBAL ")[-1].split(" ")[0] if "GLOBAL" in str(exc) else "objects"
        raise UnsafeCheckpointError(
            f"{path} holds {found} besides weights and settings; unpickling it could run code the file "
            "carries, so it is refused (only checkpoints written by `flowtracer fit` or `sft` load; if you "
            "wrote this file yourself, save tensors and plain values only)") from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<dir>/.<name>.tmp-<pid>`, fsync, then an atomic rename onto `path`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in glob.glob(str(path.parent / f".{path.name}.tmp-*")):  # left by a killed save
            Path(stale).unlink(missing_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(str(path.parent))


def install_atomic_io(trainer) -> None:
    """Use AtomicCheckpointIO unless the strategy already has a special one (FSDP, async...)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves a training step's checkpoint once the step's logs are written.

    Lightning calls `on_train_batch_end` before the logger receives the step's metrics, so a kill
    in between would resume after a step whose metrics were never written. The save is deferred to
    the next `on_train_batch_start` (or the end of the epoch / of training), by which point the
    step's metrics, rollouts and validation are on disk. Arguments are ModelCheckpoint's.
    """

    _pending: tuple | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._pending = (batch, batch_idx)

    _deferred = False

    def _flush(self, trainer, pl_module) -> None:
        if self._pending is not None:
            batch, batch_idx = self._pending
            self._pending = None
            self._deferred = True
            try:
                super().on_train_batch_end(trainer, pl_module, None, batch, batch_idx)
            finally:
                self._deferred = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> dict:
        out = super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._deferred:
            # Lightning adds 1 to the logger step on restart, assuming the save happened before the
            # step's increment; this save came after it, so store the pre-increment value.
            loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            if "_batches_that_stepped" in loop:
                loop["_batches_that_stepped"] -= 1
        return out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module)
        super().on_train_end(trainer, pl_module)


def truncate_torn_line(path: str) -> None:
    """Cut a last line that has no newline (a write interrupted by a kill)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


def rewind_run_dir(log_dir: str | None, steps_done: int) -> dict[str, int]:
    """Drop the logs of RL steps >= `steps_done` (0-based) from metrics.csv and rollouts.jsonl.

    Those steps ran after the checkpoint being resumed and are about to run again. metrics.csv
    rows carry the logger `step` (= the 0-based RL step of a training row); rollout records their
    0-based `step`. Returns how many rows/records were dropped.
    """
    dropped = {"metrics": 0, "rollouts": 0}
    if not log_dir or not os.path.isdir(log_dir):
        return dropped
    metrics = os.path.join(log_dir, "metrics.csv")
    truncate_torn_line(metrics)
    if os.path.isfile(metrics):
        with open(metrics, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < steps_done]
        if len(keep) < len(rows):

            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            w.writerows(keep)
            atomic_write_text(metrics, buf.getvalue())
            dropped["metrics"] = len(rows) - len(keep)
    rollouts = os.path.join(log_dir, "rollouts.jsonl")
    truncate_torn_line(rollouts)
    if os.path.isfile(rollouts):
        offset, n_drop = None, 0
        with open(rollouts, "rb") as f:
            pos = 0
            for line in f:  # records are in step order: cut at the first one to redo
                if offset is None and json.loads(line).get("step", -1) >= steps_done:
                    offset = pos
                n_drop += offset is not None
                pos += len(line)
        if offset is not None:
            with open(rollouts, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        dropped["rollouts"] = n_drop
    return dropped
