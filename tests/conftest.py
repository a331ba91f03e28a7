"""Shared fixtures and helpers: a tiny random model saved as a local HF folder, a tiny run config
(`write_config`), a run's metrics (`read_metrics`), the brute-force pass@k reference.

`make test` runs 2 xdist workers (-n 2 --dist loadgroup). Mark a test that launches a Python subprocess
or runs over ~5 s `@pytest.mark.slow` (its file is then started first); tests that share a module
fixture worth keeping once also get `pytest.mark.xdist_group("<name>")`. Prefer the CLI's `main([...])`
in this process to a subprocess: each `python -m flowtracer.cli` pays ~10 s of imports."""

from __future__ import annotations

import csv
import itertools
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.path.dirname(__file__))  # the helper modules (tiny, faults, ...) from any subfolder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a small or busy CPU they oversubscribe the
# cores (several times slower). Subprocess tests (fit, DDP, grid, SIGKILL) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402


def pytest_collection_modifyitems(session, config, items):
    """Under xdist (`make test`: -n 2 --dist loadgroup) the files that hold a `slow` test come first,
    so the long tests start early and the two workers finish together instead of one waiting on a
    late 60 s test. Whole files move, in their own order, so module fixtures are built once. A plain
    serial run keeps pytest's order."""
    if not hasattr(config, "workerinput"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file stays


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + char tokenizer written with save_pretrained (a local model folder)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reference_grid(tmp_path_factory, tiny_model_dir) -> Path:
    """The finished reference 2x2 grid's file (grids.build_reference_grid), built once per session: the
    launcher tests compare every launcher's report with it, the committed-summaries test rebuilds its
    report from its per-cell files. Its tests share the xdist group "launchers" (one worker builds it)."""
    from grids import build_reference_grid

    return build_reference_grid(tmp_path_factory.mktemp("reference_grid"), tiny_model_dir)


def write_config(tmp_path: Path, model_dir: str, *, steps: int = 2, callbacks=None, **data) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": steps, "accelerator": "cpu", "val_check_interval": 2,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "logs"), "name": "tiny"}},
            "enable_model_summary": False,
        },
        "model": {
            "model": model_dir, "lora": {"r": 4, "alpha": 8},
            "sampling": {"num_generations": 4, "max_new_tokens": 10, "temperature": 1.0},
            "val_sampling": {"num_generations": 2, "max_new_tokens": 6, "temperature": 1.0},
            "optim": {"lr": 1e-3},
        },
        "data": {"train_source": str(ROOT / "data/arith_train.jsonl"), "val_size": 4,
                 "prompts_per_step": 2, "val_batch_size": 4, "cache_dir": str(tmp_path / "cache"), **data},
    }
    if callbacks:
        cfg["trainer"]["callbacks"] = callbacks
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(version_dir: Path) -> dict[int, dict[str, float]]:
    """rl_step -> training metrics of that step (rows that carry `rl_step`)."""
    rows = list(csv.DictReader(open(version_dir / "metrics.csv")))
    out = {}
    for r in rows:
        if r.get("rl_step"):
            out[int(float(r["rl_step"]))] = {k: float(v) for k, v in r.items() if v != "" and not k.startswith("time/")
                                             and not k.startswith("throughput/")}
    return out


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """Share of the size-k subsets of the n samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
