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


def group_scores(scores: Tensor, groups: Tensor, n_groups: int, reduce: str = "sum") -> tuple[Tensor, Tensor]:
    """Scores of token groups (statements, lines): ((B, G) float64, (B, G) bool present).

    groups (B, T) long: the group of each token, -1 for none. A group's score is the sum ("sum") or
    the max ("max") of its tokens' scores; `present` marks the groups that hold at least one token
    (absent ones score 0 and must be left out, e.g. `auroc(g, pos & present, neg & present)`).
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce = {reduce!r}; use 'sum' or 'max'")
    B = scores.shape[0]
    s = scores.double().nan_to_num(0.0)
    inside = groups >= 0
    idx = torch.where(inside, groups, n_groups)  # a spill-over column for tokens in no group
    count = torch.zeros(B, n_groups + 1, dtype=torch.long, device=s.device).scatter_add_(1, idx, inside.long())
    if reduce == "sum":
        out = torch.zeros(B, n_groups + 1, dtype=s.dtype, device=s.device).scatter_add_(1, idx, s * inside)
    else:
        out = torch.full((B, n_groups + 1), -torch.inf, dtype=s.dtype, device=s.device)
        out = out.scatter_reduce(1, idx, torch.where(inside, s, -torch.inf), reduce="amax")
    present = count[:, :n_groups] > 0
    return torch.where(present, out[:, :n_groups], 0.0), present
