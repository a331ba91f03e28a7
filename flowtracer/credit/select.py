"""Token selection shared by every scored credit arm: per-response top-k (or bottom-k) -> weights.

Pure torch, batched, no Lightning import: the GPU benchmark box imports this file on its own.

Rules (the same for every arm, so arms differ only in their score):
  - Only response tokens are ranked; every other position gets weight 0.
  - k = round-half-up(top_frac * n) for a response of n tokens, at least 1 when n > 0, at most n.
  - Ties break by position: the earlier token ranks first (for "top" and for "bottom" alike),
    so the selection is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SELECTS = ("top", "bottom")
MAPPINGS = ("hard", "linear", "rank")


def check_options(top_frac: float, gamma: float, select: str, mapping: str) -> None:
    """Raise ValueError for an option outside its range (called by the arms' __init__)."""
    if not 0.0 <= top_frac <= 1.0:
        raise ValueError(f"top_frac = {top_frac} is outside [0, 1]; set it to the share of each response's "
                         "tokens that get gamma (default 0.4)")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma = {gamma} must be a finite number >= 0; set it to the weight of the selected "
                         "tokens (default 1.5; 1 = uniform credit)")
    check_choice("select", select, SELECTS)
    check_choice("mapping", mapping, MAPPINGS)


def check_choice(name: str, value, choices: tuple) -> None:
    """Raise ValueError naming the option, its value and the valid ones (the first is the default)."""
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not an option; use one of {', '.join(map(repr, choices))} "
                         f"(default {choices[0]!r})")


def num_selected(n: Tensor, top_frac: float) -> Tensor:
    """k per response: round-half-up(top_frac * n), >= 1 when n > 0, <= n. `n` is an int tensor."""
    k = torch.floor(n.to(torch.float64) * top_frac + 0.5).long()
    return torch.minimum(k.clamp(min=1), n.long())


def rank_in_response(scores: Tensor, response_mask: Tensor, select: str = "top") -> Tensor:
    """(B, T) long: 0 = best response token of its row (by `select`), ties by position.

    Non-response positions rank after every response token. Two stable sorts, not a -inf fill,
    so a response token scored -inf still ranks before padding.
    """
    order = torch.sort(scores, dim=-1, descending=select == "top", stable=True).indices
    off = (~response_mask).gather(-1, order)
    order = order.gather(-1, torch.sort(off.to(torch.uint8), dim=-1, stable=True).indices)
    ar = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def select_mask(scores: Tensor, response_mask: Tensor, *, top_frac: float, select: str = "top") -> Tensor:
    """(B, T) bool: the k best response tokens of each row (see the module docstring for k and ties)."""
    resp = response_mask.bool()
    k = num_selected(resp.sum(-1), top_frac)
    return (rank_in_response(scores, resp, select) < k.unsqueeze(-1)) & resp


def select_weights(scores: Tensor, response_mask: Tensor, *, top_frac: float = 0.4, gamma: float = 1.5,
                   select: str = "top", mapping: str = "hard", normalize: bool = False) -> Tensor:
    """Per-token weights (B, T) float32 from scores (B, T): gamma on favoured tokens, 1 on the rest.

    Args:
        scores: (B, T) float, higher = more important (for select="top"). Values off the response
            are ignored.
        response_mask: (B, T) bool, the tokens to weight; weight 0 elsewhere.
        top_frac: share of each response's tokens that get gamma (mapping "hard" only).
        gamma: weight of the selected tokens (hard) or of the best token (continuous maps).
        select: "top" favours high scores, "bottom" low scores (the paper's bottom-k ablation).
        mapping:
            "hard": k selected tokens get gamma, the others 1 (the method).
            "linear": 1 + (gamma - 1) * s / max s over the response, with s = max(score, 0)
                ("bottom": 1 + (gamma - 1) * (1 - s / max s)); a response whose max is 0 gets ones.
                Assumes non-negative scores (throughput, entropy, attention are).
            "rank": 1 + (gamma - 1) * p with p the rank percentile in the response: 1 for the best
                token, 0 for the worst (ties by position; a one-token response gets gamma).
            Continuous maps ignore top_frac.
        normalize: rescale each response's weights to mean 1 over its tokens (the paper does not
            say whether the weights are mean-preserving, so the default leaves them as they are).

    Returns:
        (B, T) float32 weights, exactly 0 off the response.
    """
    check_options(top_frac, gamma, select, mapping)
    resp = response_mask.bool()
    if mapping == "hard":
        sel = select_mask(scores, resp, top_frac=top_frac, select=select)
        return weights_from_mask(sel, resp, gamma=gamma, normalize=normalize)
    if mapping == "linear":
        s = scores.to(torch.float64).clamp(min=0).masked_fill(~resp, 0.0)
        top = s.amax(-1, keepdim=True)
        frac = torch.where(top > 0, s / torch.where(top > 0, top, 1.0), 0.0 if select == "top" else 1.0)
        frac = frac if select == "top" else 1.0 - frac
        w = 1.0 + (gamma - 1.0) * frac
    else:
        n = resp.sum(-1, keepdim=True)
        rank = rank_in_response(scores, resp, select)
        p = torch.where(n > 1, (n - 1 - rank).to(torch.float64) / (n - 1).clamp(min=1), 1.0)
        w = 1.0 + (gamma - 1.0) * p
    return _finish(w, resp, normalize)


def weights_from_mask(selected: Tensor, response_mask: Tensor, *, gamma: float = 1.5,
                      normalize: bool = False) -> Tensor:
    """(B, T) float32: gamma on `selected` response tokens, 1 on the other response tokens, 0 off
    the response; with `normalize`, rescaled to mean 1 over each response."""
    resp = response_mask.bool()
    w = torch.where(selected.bool(), float(gamma), 1.0).to(torch.float64)
    return _finish(w, resp, normalize)


def _finish(w: Tensor, resp: Tensor, normalize: bool) -> Tensor:
    w = w.masked_fill(~resp, 0.0)
    if normalize:
        total = w.sum(-1, keepdim=True)
        ok = total > 0
        w = torch.where(ok, w * resp.sum(-1, keepdim=True) / torch.where(ok, total, 1.0), w)
    return w.to(torch.float32)


def batch_top_mask(scores: Tensor, response_mask: Tensor, frac: float) -> Tensor:
    """(B, T) bool: the round-half-up(frac * N) highest-scored response tokens of the WHOLE batch
    (N = all response tokens, at least 1 kept when N > 0). Ties break by row-major position."""
    resp = response_mask.bool()
    flat = select_mask(scores.reshape(1, -1), resp.reshape(1, -1), top_frac=frac, select="top")
    return flat.view_as(resp)
