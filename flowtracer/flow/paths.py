"""Backbone of a traced flow: greedy widest-path decomposition and heavy edges.

The widest-path DP  best[k] = max(inj[k], max_{i<k} min(best[i], phi[i->k]))  is sequential in k.
To avoid a Python step per token it runs over blocks of S tokens: the contribution of all earlier
blocks is one vectorised min/max, and paths inside a block come from the block's max-min closure
(log2 S squarings, batched over all blocks). Only min/max are used, so every `best` value is an
exact copy of some edge flow and the backtracking comparisons below are exact.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from .trace import FlowResult

BLOCK = 32


def _seq(res: FlowResult, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(G' row = receiver (T, T), f, inject, answer) of sequence b."""
    try:
        b = operator.index(b)
    except TypeError:
        raise ValueError(f"batch index b must be an int, got {b!r}") from None
    if res.batched:
        n = res.reached.shape[0]
        if not -n <= b < n:
            raise ValueError(f"batch index b={b!r} out of range for a batch of {n} sequences")
        return res.capacity[b].mT, res.inflow[b], res.inject[b], res.answer_mask[b]
    if b not in (0, -1):
        raise ValueError(f"unbatched FlowResult: b must be 0, got {b!r}")
    return res.capacity.mT, res.inflow, res.inject, res.answer_mask


def _closure(D: Tensor) -> Tensor:
    """Max-min closure of blocks D (n, S, S), D[y, x] = width of edge x -> y (x < y).

    Returns C with C[y, x] = widest path x -> y inside the block and C[x, x] = inf.
    """
    S = D.shape[-1]
    C = D.clone()
    C.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
    for _ in range(max(1, math.ceil(math.log2(S)))):
        # C2[y, x] = max_z min(C[y, z], C[z, x])
        C = torch.minimum(C.unsqueeze(-1), C.unsqueeze(-3)).amax(dim=-2)
    return C


def _widest(R: Tensor, inj: Tensor, C: Tensor, S: int) -> Tensor:
    """best[k] over the padded graph R (Tp, Tp) (row = receiver) with block closures C."""
    best = torch.zeros_like(inj)
    for c in range(C.shape[0]):
        s, e = c * S, (c + 1) * S
        entry = inj[s:e]
        if s:
            entry = torch.maximum(entry, torch.minimum(R[s:e, :s], best[:s]).amax(dim=-1))
        best[s:e] = torch.minimum(C[c], entry).amax(dim=-1)
    return best


def dominant_paths(
    res: FlowResult, b: int, k: int, *, min_cover: float | None = None
) -> list[tuple[list[int], float]]:
    """Greedy flow decomposition of sequence `b` into up to `k` widest source-to-sink paths.

    Each round takes the super-source -> source -> ... -> answer -> super-sink path whose bottleneck
    (smallest residual flow among the injection, the token edges phi and the sink edge) is largest,
    records it, subtracts the bottleneck from all its edges, and repeats until `k` paths, until the
    recorded flow covers `min_cover` of the flow into the sink (1 in the Doob setting), or until no
    path with positive flow is left.

    Returns a list of (token indices from a source to an answer token, flow carried) pairs, widest
    first. A source that is itself an answer token yields a one-token path. Empty if not reached.
    Ties are broken towards the lowest token index (argmax), so the result is deterministic.
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    if min_cover is not None and not (0 < min_cover <= 1):
        raise ValueError(f"min_cover must be in (0, 1], got {min_cover!r}")
    Gt, f, inj0, ans = _seq(res, b)
    T = f.shape[0]
    sink = (f * ans).clone()
    total = float(sink.sum())
    if T == 0 or total <= 0:
        return []

    # Residual flows, padded to whole blocks with isolated zero tokens.
    S = min(BLOCK, 1 << max(0, (T - 1).bit_length()))
    n = -(-T // S)
    Tp = n * S
    R = torch.zeros(Tp, Tp, dtype=torch.float64, device=f.device)
    torch.mul(Gt, f.unsqueeze(0), out=R[:T, :T])  # R[k, i] = phi(i -> k)
    inj = torch.zeros(Tp, dtype=torch.float64, device=f.device)
    inj[:T] = inj0
    sink = torch.nn.functional.pad(sink, (0, Tp - T))

    blocks = R.view(n, S, n, S).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, S, S) views
    C = _closure(blocks)
    paths: list[tuple[list[int], float]] = []
    covered = 0.0
    while len(paths) < k and (min_cover is None or covered < min_cover * total):
        best = _widest(R, inj, C, S)
        end_width = torch.minimum(best, sink)
        a = int(end_width.argmax())
        width = end_width[a]
        if not width > 0:
            break
        # Backtrack: from node j step to a predecessor whose path still has width >= `width`.
        path, j = [a], a
        while not inj[j] >= width:
            i = int(torch.minimum(best[:j], R[j, :j]).argmax())
            path.append(i)
            j = i
        path.reverse()
        # Subtract; x - w >= 0 exactly whenever x >= w, so residuals never go negative.
        sink[a] -= width
        inj[path[0]] -= width
        idx = torch.tensor(path, device=f.device)
        R[idx[1:], idx[:-1]] -= width
        touched = torch.unique((idx[1:] // S)[(idx[1:] // S) == (idx[:-1] // S)])
        if touched.numel():
            C[touched] = _closure(blocks[touched])
        w = float(width)
        paths.append((path, w))
        covered += w
    return paths


def backbone_edges(
    res: FlowResult, b: int, min_frac: float, *, include_sink: bool = False
) -> list[tuple[int, int, float]]:
    """Edges of sequence `b` whose flow phi >= `min_frac` * (largest edge flow), heaviest first.

    Returns (i, k, phi) triples with i < k token indices. With `include_sink=True` the sink edges
    a -> s (flow f(a)) take part too, both in the maximum and in the output, with k = -1.
    Zero-flow edges are never returned; an unreached sequence gives [].
    """
    if not (0 <= min_frac <= 1):
        raise ValueError(f"min_frac must be in [0, 1], got {min_frac!r}")
    Gt, f, _, ans = _seq(res, b)
    phi = Gt.mT * f.unsqueeze(-1)  # phi[i, k]
    sink = f * ans
    top = float(phi.max()) if phi.numel() else 0.0
    if include_sink and sink.numel():
        top = max(top, float(sink.max()))
    if top <= 0:
        return []
    thr = min_frac * top
    keep = (phi >= thr) & (phi > 0)
    ii, kk = keep.nonzero(as_tuple=True)
    edges = list(zip(ii.tolist(), kk.tolist(), phi[ii, kk].tolist()))
    if include_sink:
        (aa,) = ((sink >= thr) & (sink > 0)).nonzero(as_tuple=True)
        edges += [(a, -1, v) for a, v in zip(aa.tolist(), sink[aa].tolist())]
    edges.sort(key=lambda e: -e[2])
    return edges
