"""The knobs of one RL step's objective and optimisation (YAML: `model.loss`, `model.optim`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossConfig:
    """The GRPO objective.

    Args:
        advantage: "grpo" (group z-score) or "dr_grpo" (group mean only).
        eps_low: PPO clip below, ratio >= 1 - eps_low.
        eps_high: PPO clip above, ratio <= 1 + eps_high (DAPO's clip-higher uses 0.28).
        aggregation: "seq-mean-token-mean" (paper), "token-mean" (DAPO), "seq-mean-token-sum-norm" (Dr. GRPO).
        beta: KL (k3) coefficient against the reference (adapters off); 0 = no KL, as in the paper.
        correct_threshold: a reward at or above this counts as a correct answer for accuracy.
    """

    advantage: str = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "seq-mean-token-mean"
    beta: float = 0.0
    correct_threshold: float = 1.0


@dataclass
class OptimConfig:
    """Optimisation of one RL step.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up over this many optimizer steps, then constant.
        grad_clip: max global gradient norm (0 = off).
        ppo_epochs: passes over each step's rollouts (1 = on-policy, ratio is 1 at the first pass).
        mini_batches: optimizer steps per PPO epoch (rollouts split in this many mini-batches).
        micro_batch_size: sequences per forward/backward (gradient accumulation); 0 = whole mini-batch.
        max_consecutive_skips: updates skipped in a row for non-finite values (NaN/inf rewards,
            advantages, weights, loss or gradients) before the run stops with an error.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 0
    max_consecutive_skips: int = 5

    def build(self, params) -> dict:
        """AdamW and its linear warm-up, in the form LightningModule.configure_optimizers returns."""
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm = max(self.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def describe(self, prompts: int, g: int, callbacks) -> str:
        """One line saying what a step does with these settings (logged when training starts)."""
        rollouts = prompts * g
        micro = self.micro_batch_size or rollouts // self.mini_batches
        arms = ", ".join(type(c).__name__ for c in callbacks) or "uniform (none set)"
        return (f"[flowtracer] each step: {prompts} prompts x {g} responses = {rollouts} rollouts; "
                f"{self.ppo_epochs} PPO epoch(s) x {self.mini_batches} mini-batch(es) of "
                f"{rollouts // self.mini_batches} rollouts, accumulated in micro-batches of {micro}; credit: {arms}")

