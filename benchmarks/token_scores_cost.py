"""What `model.log_token_scores: true` costs: rollouts.jsonl size and the time to write a step's records,
and the step time of a short quickstart run with and without it. Prints two tables.

    python benchmarks/token_scores_cost.py [--steps 3] [--skip-fit]

1. Records: `rollout_records` (flowtracer.train.step.records) of a synthetic step with the bundled
   SmolLM2 tokenizer, B rollouts x T response tokens, without and with the scores and entropies:
   milliseconds (median of 5) and bytes a rollout.
2. Fit: `flowtracer fit --config experiments/quickstart.yaml --trainer.max_steps N` with validation
   off, once with model.log_token_scores false and once true: median time/step (metrics.csv; it
   covers generation, credit and the update, and the records are written after it, so the
   records' own cost is table 1) and the wall time of the whole run, rollouts.jsonl size.
Run it from the repository root, under /work/tools/measure.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flowtracer.batch import RolloutBatch  # noqa: E402
from flowtracer.train.step.records import rollout_records  # noqa: E402

TOKENIZER = Path.home() / ".cache/flowtracer/models/smollm2-135m-instruct"


def synthetic_step(B: int, T: int, prompt_len: int = 60) -> tuple[RolloutBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    L = prompt_len + T
    ids = torch.randint(100, 40000, (B, L), generator=g)
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, prompt_len:] = True
    q = torch.zeros(B, L, dtype=torch.bool)
    q[:, 20:40] = True
    ans = torch.zeros(B, L, dtype=torch.bool)
    ans[:, L - 4:L - 2] = True
    rb = RolloutBatch(input_ids=ids, attention_mask=torch.ones(B, L, dtype=torch.long), prompt_mask=~resp,
                      response_mask=resp, question_mask=q, answer_mask=ans, rewards=torch.rand(B, generator=g),
                      advantages=torch.randn(B, generator=g), group_ids=torch.arange(B) // 8,
                      prompts=["p" * 300] * B, responses=["r" * (4 * T)] * B, answers=["16"] * B)
    rb.token_weights = torch.where(torch.rand(B, L, generator=g) < 0.4, 1.5, 1.0) * resp
    rb.token_scores = torch.rand(B, L, generator=g, dtype=torch.float64) * resp
    rb.entropies = torch.rand(B, L, generator=g) * 3 * resp
    return rb, torch.zeros(B, dtype=torch.bool)


def records_table(tokenizer) -> None:
    print("| rollouts x response tokens | records ms, off | records ms, on | bytes/rollout, off | bytes/rollout, on |")
    print("|---|---|---|---|---|")
    for B, T in ((32, 32), (64, 512), (256, 1024)):
        rb, trunc = synthetic_step(B, T)
        row = []
        for on in (False, True):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                lines = rollout_records(rb, tokenizer, 0, truncated=trunc, token_scores=on, arm="FlowCredit")
                times.append(time.perf_counter() - t0)
            row.append((statistics.median(times) * 1000, sum(len(x) + 1 for x in lines) / B))
        print(f"| {B} x {T} | {row[0][0]:.1f} | {row[1][0]:.1f} | {row[0][1]:.0f} | {row[1][1]:.0f} |")


def fit_table(steps: int) -> None:
    print("\n| log_token_scores | median time/step s | run wall s | rollouts.jsonl KiB |")
    print("|---|---|---|---|")
    for on in ("false", "true"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "flowtracer.cli", "fit", "--config", "experiments/quickstart.yaml",
                   "--trainer.max_steps", str(steps), "--model.val_before_training", "false",
                   "--trainer.limit_val_batches", "0",
                   "--model.log_token_scores", on, "--trainer.logger.init_args.save_dir", tmp]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            run = Path(tmp) / "quickstart" / "version_0"
            rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("time/step")]
            step_s = statistics.median(float(r["time/step"]) for r in rows)
            size = os.path.getsize(run / "rollouts.jsonl") / 1024
        print(f"| {on} | {step_s:.2f} | {wall:.1f} | {size:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-fit", action="store_true", help="only the records table")
    args = p.parse_args()
    from transformers import AutoTokenizer

    records_table(AutoTokenizer.from_pretrained(TOKENIZER))
    if not args.skip_fit:
        fit_table(args.steps)


if __name__ == "__main__":
    main()
