"""Tiny grids for the grid and launcher tests: `write_grid` (a 2x2 grid file of 1-step tiny fits) and
the reference grid the session builds once (conftest.py's `reference_grid`)."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import ROOT, write_config


def write_grid(tmp_path: Path, model_dir: str, name: str = "grid", seeds=(0, 1), **keys) -> Path:
    """A grid of 1-step tiny fits, arms uniform/random x `seeds` (2x2 by default); `keys` are more grid-file keys."""
    base = write_config(tmp_path, model_dir, steps=1)
    grid = {
        "base": [str(base)],
        "out": str(tmp_path / name),
        "overrides": {"trainer.val_check_interval": 1, "model.log_rollouts": False},
        "axes": {
            "arm": {"uniform": str(ROOT / "experiments/ablations/uniform.yaml"),
                    "random": str(ROOT / "experiments/ablations/random.yaml")},
            "seed": list(seeds),
        },
        **keys,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def build_reference_grid(tmp: Path, model_dir: str) -> Path:
    """The reference: the 2x2 grid on `--launcher local`, two cells at a time on four fake GPUs (2 each),
    per-cell summaries under <tmp>/results/grid_tiny. Returns its grid file (its folder: <tmp>/local)."""
    from flowtracer.cli import main

    cfg = write_grid(tmp, model_dir, name="local", env={"OMP_NUM_THREADS": 1}, devices=[0, 1, 2, 3],
                     gpus_per_cell=2, parallel=2, results=str(tmp / "results" / "grid_tiny"))
    assert main(["grid", "--config", str(cfg), "--no-live"]) == 0
    return cfg
