"""What a step leaves behind: its seed, its rollout records (rollouts.jsonl) and rollout statistics."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from flowtracer.batch import RolloutBatch


def seed_step(seed: int, step: int) -> None:
    """Seed python, numpy and torch from (run seed, step): step s samples and shuffles the same way
    whether the run was interrupted or not (exact resume, no RNG drift)."""
    s = (seed * 1_000_003 + step) % (2**31)
    random.seed(s)
    np.random.seed(s)  # no numpy draws today; seeded so a credit arm that adds some stays exact
    torch.manual_seed(s)


def rollout_records(rollouts: RolloutBatch, tokenizer, step: int, *, truncated: Tensor | None = None,
                    token_scores: bool = False, arm: str | None = None) -> list[str]:
    """One JSON line per rollout: prompt, response, reward, advantage, tokens and their weights; the
    question text (as it sits in the prompt), the answer span (indices into `tokens`) and truncation.
    With `token_scores`: the credit arm's score of each token (`scores`, named by `arm`; absent when
    the arm scores nothing) and the entropy of each token's distribution (`entropy`), where computed."""
    weights = rollouts.weights_or_ones()
    scores = rollouts.token_scores if token_scores else None
    entropies = rollouts.entropies if token_scores else None
    lines = []
    for i in range(rollouts.batch_size):
        m = rollouts.response_mask[i]
        rec = {
            "step": step, "prompt": rollouts.prompts[i], "response": rollouts.responses[i],
            "answer": rollouts.answers[i], "reward": rollouts.rewards[i].item(),
            "advantage": rollouts.advantages[i].item(),
            "tokens": tokenizer.convert_ids_to_tokens(rollouts.input_ids[i][m].tolist()),
            "weights": [round(w, 4) for w in weights[i][m].tolist()],
            "question": tokenizer.decode(rollouts.input_ids[i][rollouts.question_mask[i]].tolist()),
            "answer_span": rollouts.answer_mask[i][m].nonzero().squeeze(-1).tolist(),
        }
        if truncated is not None:
            rec["truncated"] = bool(truncated[i])
        if scores is not None:
            rec["scores"], rec["arm"] = [float(f"{x:.4g}") for x in scores[i][m].tolist()], arm
        if entropies is not None:
            rec["entropy"] = [round(x, 4) for x in entropies[i][m].tolist()]
        lines.append(json.dumps(rec))
    return lines


class RolloutStats(Metric):
    """Reward, accuracy, length and entropy summaries of a step's rollouts, over every process.

    `update(rewards, lengths, truncated, entropy_sum, n_tokens)` with this process's rollouts
    (entropy_sum = the entropies summed over response tokens, None when none were computed);
    `compute()` reduces across processes through torchmetrics (per-rollout values gathered in rank
    order, token sums summed), so a DDP step logs the values of one process with the same global
    batch. Reset after each step.
    """

    full_state_update = False

    def __init__(self, correct_threshold: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.correct_threshold = correct_threshold
        for state in ("rewards", "lengths", "truncated"):
            self.add_state(state, default=[], dist_reduce_fx="cat")
        for state in ("entropy_sum", "entropy_tokens", "tokens"):
            self.add_state(state, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, rewards: Tensor, lengths: Tensor, truncated: Tensor, entropy_sum: Tensor | None,
               n_tokens: Tensor) -> None:
        self.rewards.append(rewards.detach().float())
        self.lengths.append(lengths.detach().float())
        self.truncated.append(truncated.detach().float())
        self.tokens += n_tokens.detach().float()
        if entropy_sum is not None:
            self.entropy_sum += entropy_sum.detach().float()
            self.entropy_tokens += n_tokens.detach().float()

    def compute(self) -> dict[str, float]:
        rewards, lengths, truncated = (dim_zero_cat(s) for s in (self.rewards, self.lengths, self.truncated))
        return {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "accuracy": (rewards >= self.correct_threshold).float().mean().item(),
            "response/length": lengths.mean().item(),
            "response/truncated_frac": truncated.mean().item(),
            "entropy": (self.entropy_sum / self.tokens.clamp(min=1)).item() if self.entropy_tokens > 0 else 0.0,
        }

    def of_step(self, rollouts: RolloutBatch, truncated: Tensor) -> dict[str, float]:
        """This step's statistics (all processes), then reset for the next step."""
        resp, ent = rollouts.response_mask, rollouts.entropies
        self.update(rollouts.rewards, resp.sum(1), truncated, (ent * resp).sum() if ent is not None else None,
                    resp.sum())
        out = self.compute()
        self.reset()
        return out


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
