"""DAPO's sampling and overlong practices (arXiv 2503.14476), as pure functions; all off by default.

* Dynamic sampling: a group whose G rewards are all equal has zero advantage and gives no
  gradient. Drop such groups and refill the batch with groups sampled from more prompts, for at most
  `max_extra_rounds` extra generation rounds (flowtracer.train.refill runs the rounds). If the cap
  is reached first, the batch is topped up with dropped groups (zero advantage, no gradient) so its
  size and shape stay fixed: micro-batching and DDP see the batch they were planned for.
* Overlong handling of responses that hit max_new_tokens without EOS:
  "mask": their advantage is set to 0, so they give no gradient (they still count in the loss
  normaliser of token-mean aggregation; a documented simplification of DAPO's loss mask);
  "penalty": DAPO's soft overlong punishment added to the reward before the advantages,
  0 for length <= L - buffer, falling linearly to -factor at length L = max_new_tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowtracer.config import DapoConfig

OVERLONG_MODES = ("off", "mask", "penalty")




def informative_groups(rewards: Tensor, group_ids: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """(unique group ids in order of first appearance, (n_groups,) bool: reward spread > eps)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    n = len(uniq)
    hi = torch.full((n,), -torch.inf, dtype=rewards.dtype, device=rewards.device).scatter_reduce(
        0, inverse, rewards, "amax")
    lo = torch.full((n,), torch.inf, dtype=rewards.dtype, device=rewards.device).scatter_reduce(
        0, inverse, rewards, "amin")
    first = torch.full((n,), len(group_ids), device=group_ids.device).scatter_reduce(
        0, inverse, torch.arange(len(group_ids), device=group_ids.device), "amin")
    order = first.argsort()
    return uniq[order], ((hi - lo) > eps)[order]


def select_groups(informative: Tensor, target: int) -> Tensor:
    """Indices of `target` groups: informative ones first (in order), then uninformative ones."""
    idx = torch.arange(len(informative), device=informative.device)
    ranked = torch.cat([idx[informative], idx[~informative]])
    return ranked[:target]


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment per response: 0 up to max_len - buffer, then linear to
    -factor at max_len (and -factor beyond). `buffer` = 0: -factor exactly at max_len."""
    lengths = lengths.to(torch.float32)
    start = max_len - buffer
    if buffer <= 0:
        return torch.where(lengths >= max_len, -factor, 0.0)
    return (-(lengths - start).clamp(min=0) / buffer * factor).clamp(min=-factor)


def apply_overlong(rewards: Tensor, lengths: Tensor, truncated: Tensor, cfg: DapoConfig,
                   max_len: int) -> tuple[Tensor, Tensor]:
    """(rewards to use, (B,) bool: rows that keep their gradient) for `cfg.overlong`."""
    keep = torch.ones_like(truncated, dtype=torch.bool)
    if cfg.overlong == "penalty":
        return rewards + overlong_penalty(lengths, max_len, cfg.overlong_buffer, cfg.overlong_penalty).to(rewards), keep
    if cfg.overlong == "mask":
        return rewards, ~truncated.bool()
    return rewards, keep
