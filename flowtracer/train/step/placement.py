"""Where each rollout callback (credit arm) of a step runs, decided once per step.

A callback declares what it reads: `needs_attention` (the map of `capture_layers` / `capture_heads`),
`needs_entropy`, `batch_global` (its result depends on the whole batch at once), `sets_weights`.
Three placements:

* BEFORE_UPDATE: it reads no forward output (uniform, random): once, on the whole batch, before
  the update.
* IN_FORWARD: one PPO epoch and one mini-batch (the old policy is the current one) and `fuse`:
  inside each micro-batch's training forward, on that micro-batch only (no extra pass).
* PRE_PASS: otherwise: a no-grad teacher-forced pass runs micro-batch by micro-batch before the
  update; a per-row callback runs on each micro-batch of it, a batch-global one once afterwards on
  the whole batch (it may then read entropies and log-probs, never the (B, T, T) map).

Every forward and every flow solve therefore holds at most one micro-batch.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass


class Placement(enum.Enum):
    BEFORE_UPDATE = "before_update"
    IN_FORWARD = "in_forward"
    PRE_PASS = "pre_pass"


@dataclass(frozen=True)
class CreditPlan:
    """The step's placement of every callback, and what each pass must capture."""

    placements: tuple  # ((callback, Placement), ...) in callback order
    pre_pass: bool  # a no-grad pass runs before the update (old log-probs then come from it)
    pre_pass_layers: object  # layers the pre-pass captures (None = no map)
    forward_layers: object  # layers each training forward captures (None = no map)
    heads: str = "mean"  # how each captured layer's query heads are aggregated

    def at(self, placement: Placement, batch_global: bool | None = None) -> list:
        """The callbacks placed at `placement` (optionally only the batch-global or per-row ones)."""
        return [cb for cb, p in self.placements if p is placement
                and (batch_global is None or bool(cb.batch_global) == batch_global)]


def _needs_forward(cb) -> bool:
    return bool(cb.needs_attention or cb.needs_entropy)


def capture_layers(callbacks) -> object:
    """The one layer selection the attention-needing callbacks share (None when none needs it)."""
    layer_sets = {json.dumps(cb.capture_layers) for cb in callbacks if cb.needs_attention}
    if len(layer_sets) > 1:
        raise ValueError(f"credit callbacks ask for different attention layers {sorted(layer_sets)}; "
                         "give them the same `layers`")
    return json.loads(layer_sets.pop()) if layer_sets else None


def capture_heads(callbacks) -> str:
    """The one head aggregation ("mean" | "max") the attention-needing callbacks share."""
    heads = {getattr(cb, "capture_heads", "mean") for cb in callbacks if cb.needs_attention}
    if len(heads) > 1:
        raise ValueError(f"credit callbacks ask for different head aggregations {sorted(heads)}; "
                         "give them the same `heads`")
    return heads.pop() if heads else "mean"


def check_callbacks(callbacks) -> None:
    """Refuse combinations that have no single meaning (called before anything is written)."""
    setters = [type(cb).__name__ for cb in callbacks if getattr(cb, "sets_weights", False)]
    if len(setters) > 1:
        raise ValueError(f"trainer.callbacks holds {len(setters)} credit arms that set token weights "
                         f"({', '.join(setters)}); one would silently overwrite the other: keep one")
    both = [type(cb).__name__ for cb in callbacks if cb.batch_global and cb.needs_attention]
    if both:
        raise ValueError(f"{', '.join(both)}: a batch-global callback cannot read the attention map "
                         "(the map exists one micro-batch at a time)")
    capture_layers(callbacks)
    capture_heads(callbacks)


def plan_credit(callbacks, *, ppo_epochs: int, mini_batches: int, micro_batch_size: int,
                batch_size: int, fuse: bool = True) -> CreditPlan:
    """Place every callback (see the module docstring); `micro_batch_size` 0 = the whole mini-batch."""
    check_callbacks(callbacks)
    fused = fuse and ppo_epochs == 1 and mini_batches == 1
    several = 0 < micro_batch_size < batch_size
    placements = []
    for cb in callbacks:
        if not _needs_forward(cb):
            placements.append((cb, Placement.BEFORE_UPDATE))
        elif fused and not (cb.batch_global and several):
            placements.append((cb, Placement.IN_FORWARD))
        else:
            placements.append((cb, Placement.PRE_PASS))
    in_pre = [cb for cb, p in placements if p is Placement.PRE_PASS]
    in_fwd = [cb for cb, p in placements if p is Placement.IN_FORWARD]
    return CreditPlan(tuple(placements), pre_pass=not fused or bool(in_pre),
                      pre_pass_layers=capture_layers(in_pre), forward_layers=capture_layers(in_fwd),
                      heads=capture_heads(callbacks))
