"""Evaluation metrics over k sampled answers per problem (pure numpy, no Lightning, no model).

* avg@k: mean accuracy over the k samples of each problem, averaged over problems (the paper's
  "avg@16" for AIME; an unbiased estimate of pass@1).
* pass@k': the unbiased estimator of Chen et al. 2021 (Codex paper), for every k' <= n, from n
  samples of which c are correct: ``1 - C(n-c, k') / C(n, k')``, computed in the numerically stable
  product form ``1 - prod_{i=n-c+1}^{n} (1 - k'/i)`` (no huge binomials).
* maj@k: majority vote over the k extracted final answers, compared by their normalised form
  (`answer_key`); the problem counts as solved when the winning answer is correct.
  Tie-breaking: among answers with the same vote count, the one that appears first in sample order
  wins (deterministic, and with the per-row seeds of the engine the same on every run). Samples
  with no extracted answer do not vote; a problem where none has an answer counts as unsolved.
* macro average: the unweighted mean of one metric over sets (each benchmark counts once, whatever
  its size), as the paper's "math average".
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from flowtracer.rewards.latex import plain


def pass_at_k(n: Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Per-problem unbiased pass@k from n samples with c correct (arrays of the same length).

    Vectorised over problems; exact 1.0 where fewer than k samples are wrong (every k-subset then
    holds a correct one). Raises ValueError when k > n for some problem (the estimator needs n >= k).
    """
    n, c = np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64)
    if k < 1 or (n < k).any():
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem (n = {n.min() if n.size else 0})")
    if ((c < 0) | (c > n)).any():
        raise ValueError("correct counts must lie in [0, n]")
    # product over i in (n-c, n] of (1 - k/i), as a masked (P, max n) product
    i = np.arange(1, int(n.max()) + 1 if n.size else 1, dtype=np.float64)[None, :]
    inside = (i > (n - c)[:, None]) & (i <= n[:, None])
    factors = np.where(inside, 1.0 - k / i, 1.0)
    out = 1.0 - factors.prod(axis=1)
    return np.where(n - c < k, 1.0, out)


def avg_at_k(correct: np.ndarray) -> float:
    """Mean accuracy over the (P, k) boolean matrix (every problem has k samples)."""
    correct = np.asarray(correct, dtype=np.float64)
    return float(correct.mean()) if correct.size else 0.0


def answer_key(parsed: str | None) -> str | None:
    """The normalised form answers are voted by: the verifier's string form (flowtracer.rewards.latex.plain:
    currency, degrees, units, text wrappers, spaces, thousands separators and a trailing period
    dropped, lower case); plain numbers by value ("2.0" = "2")."""
    if parsed is None:
        return None
    s = plain(str(parsed))
    try:
        value = float(s)
    except ValueError:
        return s or None
    return repr(value) if np.isfinite(value) else s


def majority_correct(keys: Sequence[Sequence[str | None]], correct: np.ndarray) -> np.ndarray:
    """(P,) bool: is the majority answer of each problem correct (ties: first in sample order)."""
    correct = np.asarray(correct, dtype=bool)
    out = np.zeros(len(keys), dtype=bool)
    for p, row in enumerate(keys):  # per problem, not per token: k is small
        counts: dict[str, int] = {}
        first: dict[str, int] = {}
        for j, key in enumerate(row):
            if key is None:
                continue
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, j)
        if counts:
            winner = min(counts, key=lambda a: (-counts[a], first[a]))
            out[p] = correct[p, first[winner]]
    return out


def default_pass_ks(k: int) -> list[int]:
    """The k' reported when a set names none: powers of two below k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i < k} | {k})


def set_metrics(correct: np.ndarray, keys: Sequence[Sequence[str | None]],
                pass_ks: Iterable[int] | None = None) -> dict[str, float]:
    """avg@k, pass@k' (each k' asked, default `default_pass_ks`) and maj@k of one set.

    correct: (P, k) bool; keys: P lists of k normalised answers (None = nothing extracted).
    """
    correct = np.asarray(correct, dtype=bool)
    p, k = correct.shape
    ks = sorted(set(pass_ks)) if pass_ks else default_pass_ks(k)
    if any(kk > k for kk in ks):
        raise ValueError(f"pass@{max(ks)} asked but only k={k} samples per problem; raise k or drop it")
    out = {f"avg@{k}": avg_at_k(correct)}
    n, c = np.full(p, k), correct.sum(1)
    for kk in ks:
        out[f"pass@{kk}"] = float(pass_at_k(n, c, kk).mean()) if p else 0.0
    out[f"maj@{k}"] = float(majority_correct(keys, correct).mean()) if p else 0.0
    return out


def macro_average(per_set: dict[str, dict[str, float]], names: Iterable[str]) -> float | None:
    """Unweighted mean over `names` of each set's avg@k (None when `names` is empty)."""
    values = [next(v for m, v in per_set[n].items() if m.startswith("avg@")) for n in names]
    return float(np.mean(values)) if values else None
