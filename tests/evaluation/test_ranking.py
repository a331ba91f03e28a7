"""Batched ranking metrics against brute-force pair counts and enumeration."""

from __future__ import annotations

import itertools
import math

import torch

from flowtracer.evaluation.ranking import auroc, covers_all, group_scores, precision_at_k


def brute_auroc(s, pos, neg):
    P = [float(s[i]) for i in range(len(s)) if pos[i]]
    N = [float(s[i]) for i in range(len(s)) if neg[i]]
    if not P or not N:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in P for n in N)
    return wins / (len(P) * len(N))


def brute_precision(s, pos, neg, k):
    """Expected precision over every order of tied tokens: enumerate the tie permutations."""
    idx = [i for i in range(len(s)) if pos[i] or neg[i]]
    vals = sorted({float(s[i]) for i in idx}, reverse=True)
    groups = [[i for i in idx if float(s[i]) == v] for v in vals]
    total, count = 0.0, 0
    for perm in itertools.product(*[list(itertools.permutations(g)) for g in groups]):
        order = [i for g in perm for i in g]
        total += sum(bool(pos[i]) for i in order[:k]) / k
        count += 1
    return total / count


def random_case(gen, B=6, T=9, levels=4):
    s = torch.randint(levels, (B, T), generator=gen).double()  # few levels: many ties
    lab = torch.randint(3, (B, T), generator=gen)  # 0 ignored, 1 positive, 2 negative
    return s, lab == 1, lab == 2


def test_auroc_matches_pair_count_with_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        s, pos, neg = random_case(gen)
        got = auroc(s, pos, neg)
        for b in range(s.shape[0]):
            want = brute_auroc(s[b], pos[b], neg[b])
            assert (math.isnan(want) and math.isnan(got[b])) or abs(float(got[b]) - want) < 1e-12


def test_auroc_extremes_and_undefined():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    pos, neg = torch.tensor([[True, True, False, False]]), torch.tensor([[False, False, True, True]])
    assert float(auroc(s, pos, neg)) == 1.0 and float(auroc(-s, pos, neg)) == 0.0
    assert float(auroc(torch.zeros(1, 4), pos, neg)) == 0.5
    assert math.isnan(float(auroc(s, pos & False, neg)))


def test_precision_at_k_matches_enumeration():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        s, pos, neg = random_case(gen, B=4, T=7, levels=3)
        got = precision_at_k(s, pos, neg)
        for b in range(4):
            k = int(pos[b].sum())
            if k == 0 or not neg[b].any():
                assert math.isnan(got[b])
                continue
            assert abs(float(got[b]) - brute_precision(s[b], pos[b], neg[b], k)) < 1e-9


def test_covers_all():
    sel = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    pos = torch.tensor([[True, True, False], [True, True, False], [False, False, False]])
    out = covers_all(sel, pos)
    assert out[:2].tolist() == [1.0, 0.0] and math.isnan(out[2])


def test_bootstrap_and_wilson_intervals():
    from flowtracer.evaluation.stats import bootstrap_mean_ci, wilson_ci

    v = torch.tensor([0.0, 1.0] * 50 + [math.nan])  # NaN = undefined for that problem: dropped
    m, lo, hi = bootstrap_mean_ci(v, n_boot=4000)
    assert m == 0.5 and 0.39 < lo < 0.45 and 0.55 < hi < 0.61  # normal approx: 0.5 -+ 0.098
    assert bootstrap_mean_ci(v, seed=3) == bootstrap_mean_ci(v, seed=3)
    assert all(math.isnan(x) for x in bootstrap_mean_ci(torch.tensor([math.nan])))
    p, lo, hi = wilson_ci(459, 1000)
    assert p == 0.459 and abs(lo - 0.4282) < 1e-3 and abs(hi - 0.4901) < 1e-3


def test_group_auroc_matches_brute_force_on_a_hand_made_example():
    """Statements/lines scored by the sum and by the max of their tokens, then AUROC over groups."""
    # 10 tokens, 4 groups: g0 = tokens 0-2 (positive), g1 = 3-4 (negative), g2 = 6-8 (positive),
    # g3 = 9 (negative); token 5 is in no group. Row 1 has no token of g3 (absent: left out).
    s = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 5.0, 0.3, 0.3, 0.1, 0.6],
                      [1.0, 0.0, 0.0, 0.2, 0.2, 9.0, 0.1, 0.1, 0.1, 9.0]])
    groups = torch.tensor([[0, 0, 0, 1, 1, -1, 2, 2, 2, 3], [0, 0, 0, 1, 1, -1, 2, 2, 2, -1]])
    label = torch.tensor([1, 0, 1, 0])  # per group: 1 positive, 0 negative
    for reduce, fn in (("sum", sum), ("max", max)):
        g, present = group_scores(s, groups, 4, reduce)
        for b in range(2):
            members = [[float(s[b, t]) for t in range(10) if int(groups[b, t]) == j] for j in range(4)]
            want_scores = [fn(m) if m else 0.0 for m in members]
            assert present[b].tolist() == [bool(m) for m in members]
            assert torch.allclose(g[b], torch.tensor(want_scores, dtype=torch.float64))
            pos = [bool(m) and int(label[j]) == 1 for j, m in enumerate(members)]
            neg = [bool(m) and int(label[j]) == 0 for j, m in enumerate(members)]
            got = auroc(g[b:b + 1], torch.tensor([pos]), torch.tensor([neg]))
            assert abs(float(got) - brute_auroc(want_scores, pos, neg)) < 1e-12
    # by hand, row 0: sums g0 0.8, g1 0.9, g2 0.7, g3 0.6 -> pairs (g0>g1 no, g0>g3 yes, g2>g1 no,
    # g2>g3 yes) = 2/4; maxes g0 0.5, g1 0.9, g2 0.3, g3 0.6 -> 0/4
    g, present = group_scores(s, groups, 4, "sum")
    assert float(auroc(g[:1], (label == 1)[None] & present[:1], (label == 0)[None] & present[:1])) == 0.5
    g, present = group_scores(s, groups, 4, "max")
    assert float(auroc(g[:1], (label == 1)[None] & present[:1], (label == 0)[None] & present[:1])) == 0.0
