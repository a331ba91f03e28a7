"""Scale-out helpers for GRPOModule under Lightning's DDP/FSDP strategies.

Each process takes a contiguous block of the step's prompts (whole groups: group statistics stay
within a process), generates and scores its own rollouts, and the gradients are averaged by the
strategy. The rollout statistics and the validation metrics are torchmetrics `Metric`s that reduce
their own states across processes (flowtracer.train.step.records.RolloutStats,
flowtracer.evaluation.metrics.BenchmarkAccuracy), so they are the ones a 1-process run with the
same global batch logs; the other step metrics are averaged by Lightning (counts summed); rank 0
writes the logs. With one process every helper is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Metrics that are counts over the rollouts of a process: summed across processes, not averaged.
SUM_METRICS = frozenset({"reward/errors", "answer/no_span", "answer/truncated_fallback", "adv/num_groups",
                         "adv/zero_variance_groups"})


def rank_world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def attached_trainer(module):
    """The module's trainer, or None when it runs outside one (a bare module in a test or a tool)."""
    try:
        return module.trainer
    except RuntimeError:  # Lightning raises when no trainer is attached
        return None


def shard(rows: list, rank: int, world: int) -> tuple[list, list[int]]:
    """This process's block of `rows` and their positions in the full list."""
    n = len(rows) // world
    lo = rank * n
    return rows[lo:lo + n], list(range(lo, lo + n))


def all_sum(module, t: Tensor) -> Tensor:
    _, world = rank_world(attached_trainer(module))
    if world == 1:
        return t
    return module.trainer.strategy.reduce(t.detach().clone().float(), reduce_op="sum")


def gather_to_zero(module, items: list) -> list | None:
    """Every process's `items`, concatenated in rank order, on rank 0 (None on the others)."""
    rank, world = rank_world(attached_trainer(module))
    if world == 1:
        return list(items)
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(items, out, dst=0)
    return [x for part in out for x in part] if rank == 0 else None


def log_synced(module, metrics: dict[str, float], batch_size: int, reduced=()) -> None:
    """Log step metrics reduced over processes (mean, or sum for SUM_METRICS); rank 0 writes them.
    Keys in `reduced` are already the values over all processes (a Metric's compute) and are logged as they are."""
    _, world = rank_world(attached_trainer(module))
    sync = world > 1
    done = {k: v for k, v in metrics.items() if k in reduced}
    means = {k: v for k, v in metrics.items() if k not in SUM_METRICS and k not in reduced}
    sums = {k: v for k, v in metrics.items() if k in SUM_METRICS and k not in reduced}
    if done:
        module.log_dict(done, on_step=True, on_epoch=False, batch_size=batch_size)
    module.log_dict(means, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=sync)
    if sums:
        module.log_dict(sums, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=sync,
                        reduce_fx="sum")
