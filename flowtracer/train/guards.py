"""Numerical guards: a NaN or inf never reaches the weights.

Before the update the module checks the rollouts (rewards, advantages, credit weights, old
log-probs); before every optimizer step it checks the loss and the gradients. Anything non-finite
skips that update (no optimizer or scheduler step), is logged (`guard/skipped_updates`,
`guard/skipped_total`) and counted; `max_consecutive_skips` skips in a row stop the run with a
`NumericalError`. Checkpoints refuse non-finite weights (`assert_finite_state`).
Pure torch, no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.errors import InputError, UserError


class NumericalError(UserError, RuntimeError):
    """Training produced non-finite values too often to go on; the message says what to change."""


def _bad(t: Tensor | None, mask: Tensor | None = None) -> bool:
    if t is None:
        return False
    if mask is not None:
        t = t[mask.bool()]
    return bool((~torch.isfinite(t)).any())


def nonfinite_fields(rollouts) -> list[str]:
    """Names of the RolloutBatch fields holding a NaN or inf where the loss reads them."""
    resp = rollouts.response_mask
    checks = {
        "rewards": (rollouts.rewards, None),
        "advantages": (rollouts.advantages, None),
        "token_weights": (rollouts.token_weights, resp),
        "old_logprobs": (rollouts.old_logprobs, resp),
    }
    return [name for name, (t, m) in checks.items() if _bad(t, m)]


def grads_finite(params) -> bool:
    """True when every gradient of `params` is finite (params without a gradient are ignored)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # one fused pass; a NaN or inf anywhere makes its norm non-finite
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def assert_finite_state(state: dict[str, Tensor], where: str = "checkpoint") -> None:
    """Raise NumericalError if a floating tensor of `state` holds a NaN or inf."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and _bad(v)]
    if bad:
        raise NumericalError(f"refusing to save a {where} with non-finite weights ({', '.join(bad[:3])}); "
                             "the last good checkpoint is kept. Lower model.optim.lr or keep optim.grad_clip > 0")


class SkipCounter:
    """Counts skipped updates; `max_consecutive` skips in a row raise NumericalError."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise InputError(f"optim.max_consecutive_skips must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def record(self, ok: bool, what: str = "", step: int | None = None) -> bool:
        """Record one update (True = applied); returns `ok`. Raises after too many skips in a row."""
        if ok:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            at = f" at RL step {step}" if step is not None else ""
            raise NumericalError(
                f"{self.consecutive} updates in a row were skipped because of non-finite values "
                f"(last: {what}{at}), so the run stopped before a NaN could reach the weights; "
                "lower model.optim.lr, keep model.optim.grad_clip > 0, check the reward function and "
                "the credit arm, then resume with --ckpt_path last (or raise "
                "model.optim.max_consecutive_skips)")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state.get("total", 0)), int(state.get("consecutive", 0))


class UpdateGuard:
    """The module's per-step guard state: why the current mini-batch must be skipped, and counts.

    `flag(reason)` marks the mini-batch being accumulated (a non-finite loss or attention map);
    `decide(grads_ok, agree)` closes it: True = step, False = skip (recorded, with the reason).
    `agree` makes every process take the same decision (DDP).
    """

    def __init__(self, max_consecutive: int, log=print):
        self.skips = SkipCounter(max_consecutive)
        self.step_skips = 0  # skips in the current RL step
        self.reasons: list[str] = []
        self._log = log

    def flag(self, reason: str) -> None:
        self.reasons.append(reason)

    def skip(self, what: str, step: int) -> None:
        self.step_skips += 1
        self._log(f"[flowtracer] step {step}: update skipped ({what})")
        self.skips.record(False, what, step)

    def decide(self, grads_ok: bool, agree, step: int) -> bool:
        ok = agree(grads_ok and not self.reasons)
        what = ", ".join(sorted(set(self.reasons))) or "non-finite loss or gradients"
        self.reasons = []
        if ok:
            self.skips.record(True)
        else:
            self.skip(what, step)
        return ok

    def metrics(self) -> dict[str, float]:
        return {"guard/skipped_updates": float(self.step_skips), "guard/skipped_total": float(self.skips.total)}
