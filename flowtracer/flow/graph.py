"""Input checks and the token graph: attention map -> masked capacity matrix.

Layout used inside the engine: `G[b, k, i] = W[b, i, k] = attn[b, k, i]` for i < k, i.e. the same
row = receiving token layout as `attn`, so no transpose copy is ever made. Every flow quantity
is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

# h(i) at or below the smallest normal float64 counts as "cannot reach the answer": 1 / h then stays
# finite, so reweighting never produces inf * 0 = NaN. True reachabilities are >= products of
# attention weights along one path and are never this small in practice.
H_TINY = torch.finfo(torch.float64).tiny


def _where(b: int | None) -> str:
    return "" if b is None else f" in sequence {b} of the batch"


def check_mask(mask: Tensor | None, name: str, shape: torch.Size, device: torch.device) -> Tensor | None:
    """Validate a (T,) / (B, T) token mask and return it as bool on `device`."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but attn of shape (..., T, T) needs {tuple(shape)}"
        )
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} must be a bool (or 0/1 integer) mask, got dtype {mask.dtype}")
    return mask.to(device=device, dtype=torch.bool) if mask.dtype != torch.bool else mask.to(device)


def check_attn(attn: Tensor) -> None:
    """Shape and dtype checks on the attention map (values are checked after masking)."""
    if not isinstance(attn, Tensor):
        raise ValueError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() not in (2, 3):
        raise ValueError(f"attn must have shape (T, T) or (B, T, T), got {attn.dim()} dims {tuple(attn.shape)}")
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be square in its last two dims (query, key), got {tuple(attn.shape)}")
    if not attn.dtype.is_floating_point:
        raise ValueError(f"attn must be a floating-point tensor, got dtype {attn.dtype}")


def build_capacity(attn: Tensor, valid: Tensor, answer: Tensor, edge_eps: float, batched: bool) -> Tensor:
    """Float64 G (B, T, T), G[b, k, i] = W[b, i, k], with pruning, padding and absorbing answers.

    Only the strict lower triangle of `attn` among valid tokens is read (and checked): rows/columns of
    padding are zeroed before any value check, so garbage there is harmless. Answer tokens lose their
    out-edges to later tokens (column a of G): their only out-edge is the implicit one to the sink.
    """
    G = attn.to(torch.float64, copy=True, memory_format=torch.contiguous_format)
    G.tril_(-1)  # writes zeros, so NaN/inf above the diagonal is dropped, not propagated
    if not bool(valid.all()):
        G.masked_fill_(~valid[:, :, None], 0.0)
        G.masked_fill_(~valid[:, None, :], 0.0)
    # One fused min/max pass per sequence (NaN propagates into both) flags bad values.
    # (T >= 1 here: the caller has already rejected an empty answer set.)
    low, high = torch.aminmax(G.view(G.shape[0], -1), dim=-1)
    bad = ~torch.isfinite(low) | ~torch.isfinite(high)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        what = "NaN" if bool(torch.isnan(G[b]).any()) else "inf"
        raise ValueError(f"attn contains {what}{_where(b if batched else None)} (strict lower triangle)")
    if bool((low < 0).any()):
        b = int((low < 0).nonzero()[0])
        raise ValueError(
            f"attn has negative weights{_where(b if batched else None)} (min {float(low[b]):.3g}); "
            "edge capacities must be >= 0"
        )
    if edge_eps > 0:
        G.masked_fill_(G < edge_eps, 0.0)
    G.masked_fill_(answer[:, None, :], 0.0)
    return G


def solve_unit(G: Tensor, rhs: Tensor, transpose: bool) -> Tensor:
    """x with (I - G) x = rhs, or (I - G)^T x = rhs if `transpose`; G (B, T, T) strictly lower.

    `unitriangular=True` makes LAPACK ignore the (zero) diagonal and treat it as 1, so negating G in
    place gives I - G without allocating another T x T matrix; the second negation restores G exactly.
    """
    G.neg_()
    try:
        A = G.mT if transpose else G
        x = torch.linalg.solve_triangular(A, rhs.unsqueeze(-1), upper=transpose, unitriangular=True)
    finally:
        G.neg_()
    return x.squeeze(-1)
