"""Small statistics for the research tools: bootstrap means and binomial intervals (vectorised)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bootstrap_mean_ci(values: Tensor, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      chunk: int = 500) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite entries of `values` (one per problem) and the
    percentile bootstrap interval of it (problems resampled with replacement). NaN entries (a
    problem where the statistic is undefined) are dropped first; no entries -> (nan, nan, nan)."""
    v = values.detach().double().flatten()
    v = v[torch.isfinite(v)]
    n = v.numel()
    if n == 0:
        return math.nan, math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, n_boot, chunk):  # chunks bound the (chunk, n) index matrix
        idx = torch.randint(n, (min(chunk, n_boot - start), n), generator=gen)
        means.append(v[idx].mean(1))
    means = torch.cat(means)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=means.dtype)).tolist()
    return float(v.mean()), lo, hi


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(rate, low, high): a binomial rate and its Wilson score interval."""
    if n == 0:
        return math.nan, math.nan, math.nan
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(level) or _z(level)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


def _z(level: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))


def fmt_ci(mean: float, lo: float, hi: float, pct: bool = True) -> str:
    """'45.9% [40.1, 51.2]' (pct) or '0.712 [0.690, 0.733]'."""
    if math.isnan(mean):
        return "n/a"
    if pct:
        return f"{mean:.1%} [{lo * 100:.1f}, {hi * 100:.1f}]"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
