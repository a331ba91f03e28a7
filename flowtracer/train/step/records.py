"""What a step leaves behind: its seed, its rollout records (rollouts.jsonl) and rollout metrics."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch


def seed_step(seed: int, step: int) -> None:
    """Seed python, numpy and torch from (run seed, step): step s samples and shuffles the same way
    whether the run was interrupted or not (exact resume, no RNG drift)."""
    s = (seed * 1_000_003 + step) % (2**31)
    random.seed(s)
    np.random.seed(s)  # no numpy draws today; seeded so a credit arm that adds some stays exact
    torch.manual_seed(s)


def rollout_records(rollouts: RolloutBatch, tokenizer, step: int) -> list[str]:
    """One JSON line per rollout: prompt, response, reward, advantage, tokens and their weights."""
    weights = rollouts.weights_or_ones()
    lines = []
    for i in range(rollouts.batch_size):
        m = rollouts.response_mask[i]
        lines.append(json.dumps({
            "step": step, "prompt": rollouts.prompts[i], "response": rollouts.responses[i],
            "answer": rollouts.answers[i], "reward": rollouts.rewards[i].item(),
            "advantage": rollouts.advantages[i].item(),
            "tokens": tokenizer.convert_ids_to_tokens(rollouts.input_ids[i][m].tolist()),
            "weights": [round(w, 4) for w in weights[i][m].tolist()]}))
    return lines


def rollout_metrics(rewards: Tensor, lengths: Tensor, truncated: Tensor, entropy_sum: Tensor | None,
                    n_tokens: Tensor, correct_threshold: float) -> dict[str, float]:
    """Reward, accuracy, length and entropy summaries of a step's rollouts (all processes' values)."""
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "accuracy": (rewards >= correct_threshold).float().mean().item(),
        "response/length": lengths.mean().item(),
        "response/truncated_frac": truncated.mean().item(),
        "entropy": (entropy_sum / n_tokens).item() if entropy_sum is not None else 0.0,
    }


FALLBACK_WARN = 0.5  # credit/fallback_frac above this: the arm is mostly plain GRPO


def step_warnings(metrics: dict[str, float], step: int) -> list[str]:
    """Warnings for the step line; each also sets a `warn/...` metric (1.0) in `metrics`, so it is logged.

    credit/fallback_frac > 0.5: most responses got uniform weights because no answer span was
    found, so the credit arm is mostly plain GRPO.
    """
    out = []
    frac = metrics.get("credit/fallback_frac", 0.0)
    if frac > FALLBACK_WARN:
        metrics["warn/credit_fallback"] = 1.0
        out.append(f"[flowtracer] step {step}: warning: credit/fallback_frac = {frac:.2f}: no answer span in most "
                   "responses, so they got uniform weights (plain GRPO); have the reward return a Score with "
                   "answer_span, or set data.answer_extraction to extractors that find the answer "
                   f"(answer/no_span = {metrics.get('answer/no_span', 0):.0f})")
    return out
