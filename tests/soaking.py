"""Soak helper shared by tests/test_soak.py and benchmarks/soak.py: N RL steps on a tiny model.

Runs `flowtracer fit` in this process (tiny Llama, FlowCredit, LoRA, 2 prompts x G=4, 16 new
tokens, validation every 50 steps) with a callback that reads the process's resident set size after
every step. The slope is a least-squares fit of RSS (MiB) against the step over the second half of
the run (the first half includes allocator warm-up); a leak shows as a steady positive slope.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Resident MiB after a GC pass and malloc_trim: freed heap pages the allocator keeps for reuse
    are returned first, so the series follows live memory, not allocator retention."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include retained free pages
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSRecorder(Callback):
    """Appends (rl step, RSS MiB) after every training step to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([pl_module.rl_step, rss_mib()]) + "\n")


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def soak(steps: int, workdir: str, max_new_tokens: int = 16) -> dict:
    import yaml
    from tiny import tiny_model, tiny_tokenizer

    from flowtracer.cli import main

    model_dir = os.path.join(workdir, "model")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rss_file = os.path.join(workdir, "rss.jsonl")
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_steps": steps, "accelerator": "cpu", "val_check_interval": 50,
                    "enable_model_summary": False,
                    "logger": {"class_path": "flowtracer.runs.csvlog.CSVLogger",
                               "init_args": {"save_dir": os.path.join(workdir, "logs"), "name": "soak"}},
                    "callbacks": [{"class_path": "flowtracer.credit.FlowCredit",
                                   "init_args": {"fallback": "last_token"}},
                                  {"class_path": "soaking.RSSRecorder", "init_args": {"path": rss_file}}]},
        "model": {"model": model_dir, "lora": {"r": 4, "alpha": 8}, "val_before_training": False,
                  "sampling": {"num_generations": 4, "max_new_tokens": max_new_tokens},
                  "val_sampling": {"num_generations": 2, "max_new_tokens": 8}, "optim": {"lr": 1e-3}},
        "data": {"train_source": str(ROOT / "data/arith_train.jsonl"), "val_source": str(ROOT / "data/arith_val.jsonl"),
                 "val_size": 4, "prompts_per_step": 2, "val_batch_size": 4},
    }
    path = os.path.join(workdir, "soak.yaml")
    Path(path).write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", path])
    points = [tuple(json.loads(line)) for line in open(rss_file)]
    half = points[len(points) // 2:]
    return {"steps": len(points), "rss_start_mib": points[0][1], "rss_end_mib": points[-1][1],
            "slope_mib_per_step": slope(half), "slope_mib_per_100_steps": 100 * slope(half)}
