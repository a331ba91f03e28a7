"""Evaluation metrics over k sampled answers per problem, as a torchmetrics `Metric`.

* avg@k: mean accuracy over the k samples of each problem, averaged over problems (the paper's
  "avg@16" for AIME; an unbiased estimate of pass@1).
* pass@k': the unbiased estimator of Chen et al. 2021 (Codex paper), for every k' asked (<= n),
  from n samples of which c are correct: ``1 - C(n-c, k') / C(n, k')``, computed in the
  numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k'/i)`` (no huge binomials).
* maj@k: majority vote over the k extracted final answers, compared by their normalised form
  (`answer_key`); the problem counts as solved when the winning answer is correct.
  Tie-breaking: among answers with the same vote count, the one that appears first in sample order
  wins (deterministic, and with the per-row seeds of the engine the same on every run). Samples
  with no extracted answer do not vote; a problem where none has an answer counts as unsolved.
* macro average: the unweighted mean of one metric over sets (each benchmark counts once, whatever
  its size), as the paper's "math average".

`BenchmarkAccuracy` keeps, per problem, (set, index, n samples, c correct, majority correct):
its states are lists of tensors that torchmetrics itself gathers across processes when it
computes, so a DDP validation reports the numbers of one process. Problems seen twice (DDP pads
its last batches with repeats) count once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from flowtracer.rewards.latex import plain


def pass_at_k(n: Tensor | Sequence[int], c: Tensor | Sequence[int], k: int) -> Tensor:
    """Per-problem unbiased pass@k (float64) from n samples with c correct (same length).

    Vectorised over problems; exact 1.0 where fewer than k samples are wrong (every k-subset then
    holds a correct one). Raises ValueError when k > n for some problem (the estimator needs n >= k).
    """
    n, c = torch.as_tensor(n, dtype=torch.int64).flatten(), torch.as_tensor(c, dtype=torch.int64).flatten()
    if k < 1 or bool((n < k).any()):
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem (n = {int(n.min()) if n.numel() else 0})")
    if bool(((c < 0) | (c > n)).any()):
        raise ValueError("correct counts must lie in [0, n]")
    # product over i in (n-c, n] of (1 - k/i), as a masked (P, max n) product
    top = int(n.max()) if n.numel() else 1
    i = torch.arange(1, top + 1, dtype=torch.float64, device=n.device)[None, :]
    inside = (i > (n - c)[:, None]) & (i <= n[:, None])
    factors = torch.where(inside, 1.0 - k / i, torch.ones((), dtype=torch.float64, device=n.device))
    out = 1.0 - factors.prod(dim=1)
    return torch.where(n - c < k, torch.ones_like(out), out)


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
    return repr(value) if value == value and abs(value) != float("inf") else s


def majority_correct(keys: Sequence[Sequence[str | None]], correct) -> list[bool]:
    """Per problem: is the majority answer correct (ties: first in sample order)."""
    out = []
    for row, ok in zip(keys, correct):  # per problem, not per token: k is small
        counts: dict[str, int] = {}
        first: dict[str, int] = {}
        for j, key in enumerate(row):
            if key is None:
                continue
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, j)
        winner = min(counts, key=lambda a: (-counts[a], first[a])) if counts else None
        out.append(bool(ok[first[winner]]) if winner is not None else False)
    return out


def default_pass_ks(k: int) -> list[int]:
    """The k' reported when a set names none: powers of two below k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i < k} | {k})


def macro_average(per_set: dict[str, dict[str, float]], names: Sequence[str]) -> float | None:
    """Unweighted mean over `names` of each set's avg@k (None when `names` is empty)."""
    values = [next(v for m, v in per_set[n].items() if m.startswith("avg@")) for n in names]
    return sum(values) / len(values) if values else None


class BenchmarkAccuracy(Metric):
    """avg@k, pass@k' (each k' asked), maj@k per eval set, and the math average over sets.

    Args:
        sets: set name -> (the k' of pass@k' or None for `default_pass_ks`, counts in the math
            average). Sets are reported in this order.
        **kwargs: torchmetrics options (``sync_on_compute=False`` for a single process).

    `update(records)` takes the engine's records (``{"set", "index", "correct": [k bool],
    "keys": [k answer keys], "refused": [k bool] (optional)}``,
    flowtracer.evaluation.engine.eval_batch); `compute()` returns ``{"sets": {name: {"n", "k",
    "avg@k", "pass@k'", ..., "maj@k", "truncated_fallback"}}, "math_avg", "math_sets"}`` over every
    process's problems (sets without problems are left out); "truncated_fallback" counts the
    answers refused as a truncated response's fallback answer (flowtracer.rewards.graded).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, sets: dict[str, tuple[Sequence[int] | None, bool]], **kwargs: Any):
        super().__init__(**kwargs)
        self.names = list(sets)
        self.pass_ks = {name: (sorted(set(ks)) if ks else None) for name, (ks, _) in sets.items()}
        self.math = {name: bool(m) for name, (_, m) in sets.items()}
        for state in ("set_id", "index", "n", "correct", "majority", "refused"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, records: Sequence[dict]) -> None:
        if not records:
            return
        long = {"dtype": torch.int64, "device": self.device}
        self.set_id.append(torch.tensor([self.names.index(r["set"]) for r in records], **long))
        self.index.append(torch.tensor([int(r["index"]) for r in records], **long))
        self.n.append(torch.tensor([len(r["correct"]) for r in records], **long))
        self.correct.append(torch.tensor([sum(map(bool, r["correct"])) for r in records], **long))
        votes = majority_correct([r["keys"] for r in records], [r["correct"] for r in records])
        self.majority.append(torch.tensor(votes, **long))
        self.refused.append(torch.tensor([sum(map(bool, r.get("refused", ()))) for r in records], **long))

    def _problems(self) -> dict[int, dict[int, tuple[int, int, int, int]]]:
        """set id -> index -> (n, c, majority, refused), one entry per problem (the last one seen)."""
        states = [dim_zero_cat(s).long().tolist() if (not isinstance(s, list) or s) else []
                  for s in (self.set_id, self.index, self.n, self.correct, self.majority, self.refused)]
        out: dict[int, dict[int, tuple[int, int, int, int]]] = {}
        for sid, idx, n, c, m, r in zip(*states):
            out.setdefault(sid, {})[idx] = (n, c, m, r)
        return out

    def compute(self) -> dict[str, Any]:
        problems, sets = self._problems(), {}
        for sid, name in enumerate(self.names):
            by_index = problems.get(sid)
            if by_index:
                sets[name] = self._set_metrics(name, [by_index[i] for i in sorted(by_index)])
        math_sets = [name for name in sets if self.math[name]]
        return {"sets": sets, "math_avg": macro_average(sets, math_sets), "math_sets": math_sets}

    def _set_metrics(self, name: str, rows: list[tuple[int, int, int, int]]) -> dict[str, Any]:
        n = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        c = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        k, p = int(n.max()), len(rows)
        if bool((n != k).any()):
            raise ValueError(f"eval set {name}: problems with different sample counts ({sorted(set(n.tolist()))})")
        ks = self.pass_ks[name] or default_pass_ks(k)
        if max(ks) > k:
            raise ValueError(f"pass@{max(ks)} asked but only k={k} samples per problem; raise k or drop it")
        out: dict[str, Any] = {"n": p, "k": k, f"avg@{k}": float(c.sum()) / (p * k)}
        for kk in ks:  # numpy's pairwise mean: the same last bit as the numbers committed before torch
            out[f"pass@{kk}"] = float(pass_at_k(n, c, kk).numpy().mean())
        out[f"maj@{k}"] = sum(r[2] for r in rows) / p
        out["truncated_fallback"] = sum(r[3] for r in rows)  # answers refused (flowtracer.rewards.graded)
        return out
