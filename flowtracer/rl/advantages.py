"""Group-relative advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline), vectorised over
arbitrary group ids. The formulas and their papers: docs/rl-step.md (Advantage estimators)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise a ValueError naming `name` and the first bad index if `tensor` has NaN or inf.

    The advantage and loss functions do not guard their inputs themselves (a guard costs a
    device sync); the trainer calls this where a clear message beats a NaN loss.
    """
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s), first at index {first}: "
            f"{tensor[first].item()}. Check the verifier or reward function that produced it."
        )


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, mode: str = "grpo", eps: float = 1e-6,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Advantage of every response relative to the other responses to the same prompt.

    - ``"grpo"``: ``A_i = (r_i - mean_G r) / (std_G r + eps)``. ``std_G`` is the *unbiased* sample
      std (divides by n-1), as ``torch.std`` in TRL's GRPOTrainer, so numbers match TRL. A group of
      one response has std 0 (not NaN) and advantage 0.
    - ``"dr_grpo"``: ``A_i = r_i - mean_G r`` (Dr. GRPO drops the std normalisation).
    - ``"rloo"``: ``A_i = r_i - mean_{j != i} r_j`` (leave-one-out baseline, Ahmadian et al. 2024),
      which is ``n / (n - 1) * (r_i - mean_G r)``; a group of one has advantage 0.
    - ``"reinforce_pp"``: REINFORCE++ with a group baseline (Hu 2025, "REINFORCE++-baseline"):
      ``c_i = r_i - mean_G r``, then normalised over the whole batch,
      ``A_i = (c_i - mean_B c) / (std_B c + eps)`` (unbiased std over the B responses).
      `reduce_sum` (default: identity) sums a tensor over processes, so under DDP the batch
      statistics are those of the global batch; every process must then call this together.

    Group ids may be any integers in any order (responses of a group need not be contiguous).
    Non-finite rewards are not checked here (see `check_finite`); they propagate to their group.

    Returns the advantages (B,) in the rewards' float dtype (float32 for integer rewards) and stats:
    ``num_groups``, ``zero_variance_groups`` (groups whose rewards are all equal: they give no
    learning signal) and ``zero_variance_frac``.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; valid modes: {', '.join(ADVANTAGE_MODES)}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            "rewards and group_ids must both be (B,), "
            f"got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = r.new_zeros(num_groups)
    counts = zeros.index_add(0, inverse, torch.ones_like(r))
    mean = zeros.index_add(0, inverse, r) / counts
    centred = r - mean[inverse]
    if mode == "grpo":
        sq = zeros.index_add(0, inverse, centred * centred)
        std = (sq / (counts - 1).clamp(min=1)).sqrt()  # singleton: sq = 0 -> std 0, not NaN
        adv = centred / (std[inverse] + eps)
    elif mode == "rloo":
        n = counts[inverse]
        adv = torch.where(n > 1, centred * n / (n - 1).clamp(min=1), torch.zeros_like(centred))
    elif mode == "reinforce_pp":
        adv = batch_normalise(centred, eps=eps, reduce_sum=reduce_sum)
    else:
        adv = centred
    # "All rewards equal" is exact (max == min), not std < tol: 0/1 rewards make it unambiguous.
    gmax = zeros.scatter_reduce(0, inverse, r, reduce="amax", include_self=False)
    gmin = zeros.scatter_reduce(0, inverse, r, reduce="amin", include_self=False)
    zero_var = int((gmax == gmin).sum()) if num_groups else 0
    stats = {
        "num_groups": float(num_groups),
        "zero_variance_groups": float(zero_var),
        "zero_variance_frac": zero_var / max(num_groups, 1),
    }
    return adv, stats


def batch_normalise(x: Tensor, *, eps: float = 1e-6, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(x - mean) / (std + eps)`` over all entries of `x` (and of the other processes' `x` when
    `reduce_sum` sums over them); unbiased std, 0 for a single entry."""
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
    if reduce_sum is not None:
        stats = reduce_sum(stats).to(x)
    total, sq, n = stats.unbind()
    mean = total / n.clamp(min=1)
    var = (sq - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps)
