"""Ranking metrics of token scores against ground-truth token sets, batched over rows (pure torch).

Every function takes scores (B, T), a positive mask and a negative mask (B, T) bool (disjoint;
tokens in neither are ignored) and returns one value per row, NaN where it is undefined (a row
without positives or without negatives).
"""

from __future__ import annotations

import torch
from torch import Tensor


def auroc(scores: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """(B,) float64: P(score of a random positive > score of a random negative), ties counting 1/2.

    Mann-Whitney U from tie-averaged ranks among the row's positive and negative tokens: a token's
    rank is (#valid tokens below it) + (#valid tokens equal to it + 1) / 2, found by binary search in
    the row's sorted valid scores (invalid ones sorted to +inf, past every valid score).
    """
    s = scores.double().nan_to_num(0.0)
    valid = pos | neg
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    keyed = torch.where(valid, s, inf)
    srt = keyed.sort(-1).values
    below = torch.searchsorted(srt, s.contiguous(), right=False).double()
    upto = torch.searchsorted(srt, s.contiguous(), right=True).double()
    rank = (below + upto + 1) / 2  # 1-based average rank among valid tokens
    n_pos, n_neg = pos.sum(-1).double(), neg.sum(-1).double()
    u = (rank * pos).sum(-1) - n_pos * (n_pos + 1) / 2
    out = u / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), out, torch.nan)


def precision_at_k(scores: Tensor, pos: Tensor, neg: Tensor, k: Tensor | None = None) -> Tensor:
    """(B,) float64: share of positives among the k highest-scored valid tokens (k = #positives by
    default: R-precision). Ties at the k-th score are broken at random in expectation: the tied
    tokens fill the remaining slots in proportion to their positives."""
    s = scores.double().nan_to_num(0.0)
    valid = pos | neg
    n_pos, n_valid = pos.sum(-1), valid.sum(-1)
    k = (n_pos if k is None else k).clamp(max=n_valid).clamp(min=1)
    srt = torch.where(valid, s, -torch.inf).sort(-1, descending=True).values
    kth = srt.gather(-1, (k - 1).unsqueeze(-1))  # (B, 1) the k-th largest valid score
    above, at = valid & (s > kth), valid & (s == kth)
    slots = (k - above.sum(-1)).double()
    hits = (pos & above).sum(-1) + slots * (pos & at).sum(-1) / at.sum(-1).clamp(min=1)
    out = hits / k.double()
    return torch.where((n_pos > 0) & (neg.sum(-1) > 0), out, torch.nan)


def covers_all(selected: Tensor, pos: Tensor) -> Tensor:
    """(B,) float64: 1 where every positive token is selected, 0 otherwise, NaN with no positives."""
    ok = (~pos | selected).all(-1).double()
    return torch.where(pos.any(-1), ok, torch.nan)
