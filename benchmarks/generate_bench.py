"""Rollout generation: which HF generate settings are fastest here? Prints a table.

    python benchmarks/generate_bench.py --reps 3

Bundled SmolLM2-135M-Instruct + LoRA r=8 (as in benchmarks/step_vs_trl.py), one-digit-addition
prompts, G=8 samples each, 48 new tokens at temperature 1, through `flowtracer.rollout.generate`
(what the trainer calls). Variants, run in turn (A B C A B C) so machine load drifts over all
alike, after one warm-up each:
  - adapters live (peft's extra adapter GEMMs every decoding step), dynamic KV cache, G prefills
  - adapters merged (`merged_lora`, what the trainer does), dynamic KV cache, G prefills
  - adapters merged, dynamic KV cache, one prefill per prompt (`sampling.share_prompt_prefill`,
    the default)
  - adapters merged, static KV cache (`sampling.cache_implementation: static`, G prefills)
Reports the median seconds per call and generated tokens per second.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=1, help="prompts per call (x G=8 rollouts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from flowtracer.config import LoraSpec, SamplingConfig
    from flowtracer.data import PromptDataModule
    from flowtracer.generation import generate
    from flowtracer.model.policy import load_policy, merged_lora

    policy, tok = load_policy("smollm2-135m-instruct", lora=LoraSpec(r=8, alpha=16))
    policy.eval()
    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_source=None, val_size=1,
                          prompts_per_step=args.prompts, seed=0, cache_dir=tempfile.mkdtemp())
    dm.setup()
    rows = dm.train_batch(0)
    formatted = [dm.format_prompt(tok, r["question"]) for r in rows]
    prompts, spans = [f[0] for f in formatted], [f[1] for f in formatted]

    variants = {  # name -> (context, cache_implementation, share_prompt_prefill)
        "adapters live, dynamic cache": (contextlib.nullcontext, None, False),
        "adapters merged, dynamic cache": (lambda: merged_lora(policy), None, False),
        "adapters merged, dynamic cache, shared prefill": (lambda: merged_lora(policy), None, True),
        "adapters merged, static cache": (lambda: merged_lora(policy), "static", False),
    }
    times = {k: [] for k in variants}
    tokens = {k: [] for k in variants}
    for rep in range(args.reps + 1):  # rep 0 warms up every variant
        for name, (ctx, cache, share) in variants.items():
            sampling = SamplingConfig(num_generations=8, max_new_tokens=48, temperature=1.0,
                                      cache_implementation=cache, share_prompt_prefill=share)
            torch.manual_seed(rep)
            t0 = time.perf_counter()
            with torch.no_grad(), ctx():
                gen = generate(policy, tok, prompts, spans, sampling)
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
                tokens[name].append(int(gen.response_mask.sum()))

    base = statistics.median(times["adapters live, dynamic cache"])
    print(f"| variant ({args.prompts} x 8 rollouts, 48 new tokens, {torch.get_num_threads()} threads) "
          "| median s | tokens/s | vs adapters live |")
    print("| --- | --- | --- | --- |")
    for name in variants:
        med = statistics.median(times[name])
        tps = statistics.median(n / t for n, t in zip(tokens[name], times[name]))
        print(f"| {name} | {med:.2f} | {tps:.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
