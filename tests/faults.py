"""Fault injection for the guard tests: a rollout callback that plants NaN/inf at chosen RL steps."""

from __future__ import annotations

import torch

from flowtracer.credit.base import RolloutCallback


class InjectFaults(RolloutCallback):
    """faults[s] names what turns non-finite at RL step s: rewards, advantages, token_weights
    (before the update), grad (a gradient after backward), or "" (nothing)."""

    def __init__(self, faults: list[str]):
        self.faults = list(faults)

    def _kind(self, pl_module) -> str:
        s = pl_module.rl_step
        return self.faults[s] if s < len(self.faults) else ""

    def on_rollout_batch(self, trainer, pl_module, rollouts) -> None:
        kind = self._kind(pl_module)
        if kind in ("rewards", "advantages"):
            getattr(rollouts, kind)[0] = float("nan")
        elif kind == "token_weights":
            w = rollouts.response_mask.float()
            w[rollouts.response_mask.bool()] = float("inf")
            rollouts.token_weights = w

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._kind(pl_module) == "grad":
            p = next(p for p in pl_module.policy.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = torch.nan
