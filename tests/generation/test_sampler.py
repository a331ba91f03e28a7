"""The per-row seeded sampler's noise (flowtracer.generation.sampler) against a pure-Python splitmix64:
the engines compare with each other, so this pins the values both draw."""

from __future__ import annotations

import math

import torch

from flowtracer.generation.sampler import gumbel_perturbed, hashed_uniform, inverse_cdf_draw

MASK = (1 << 64) - 1
K1, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * M1) & MASK
    z = ((z ^ (z >> 27)) * M2) & MASK
    return z ^ (z >> 31)


def _uniform(seed: int, t: int, v: int) -> float:
    base = _mix((seed * K1 + t) & MASK)
    return ((_mix((base + v * K1) & MASK) >> 11) + 0.5) / float(1 << 53)


def test_hashed_uniform_and_gumbel_max_match_a_pure_python_reference():
    seeds = [0, 1, 12345, -7, 2**62 + 3]  # negative and large int64 seeds wrap like uint64
    vocab, t = 37, 5
    u = hashed_uniform(torch.tensor(seeds), t, vocab)
    expected = [[_uniform(s & MASK, t, v) for v in range(vocab)] for s in seeds]
    assert u.dtype == torch.float64 and u.tolist() == expected
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    logits = torch.randn(len(seeds), vocab, generator=torch.Generator().manual_seed(0))
    perturbed = gumbel_perturbed(logits, u)
    reference = [[float(logits[r, v]) - math.log(-math.log(expected[r][v])) for v in range(vocab)]
                 for r in range(len(seeds))]
    assert torch.allclose(perturbed, torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-12)
    assert perturbed.argmax(-1).tolist() == [max(range(vocab), key=row.__getitem__) for row in reference]
    scores64 = logits.double()  # float64 scores need no cast: they must still not be overwritten
    gumbel_perturbed(scores64, u)
    assert torch.equal(scores64, logits.double())


def _brute_force_inverse_cdf(scores: list[float], u: float) -> int:
    """The textbook inverse CDF in exact rationals over float64 probabilities: the first index whose
    cumulative probability exceeds u."""
    top = max(scores)
    p = [0.0 if s == float("-inf") else math.exp(s - top) for s in scores]
    total, acc = math.fsum(p), 0.0
    for i, pi in enumerate(p):
        acc = math.fsum(p[:i + 1])
        if pi > 0 and acc > u * total:
            return i
    return max(i for i, pi in enumerate(p) if pi > 0)


def test_inverse_cdf_draw_picks_the_brute_force_token_for_its_uniform_and_never_a_filtered_one(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 23, generator=gen, dtype=torch.float64) * 2
    scores[:, ::4] = float("-inf")  # filtered tokens, the first and the last among them
    scores[:, -1] = float("-inf")
    picked = inverse_cdf_draw(scores, generator=torch.Generator().manual_seed(11))
    u = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(11))  # the same uniforms
    assert picked.tolist() == [_brute_force_inverse_cdf(scores[r].tolist(), float(u[r])) for r in range(64)]
    assert torch.isfinite(scores.gather(1, picked[:, None])).all()
    # u at the ends of [0, 1): the first and the last token with positive probability
    edge = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, float("-inf")]], dtype=torch.float64)
    for u_value, expected in ((0.0, 0), (1 - 2**-53, 3)):
        monkeypatch.setattr(torch, "rand", lambda *a, v=u_value, **k: torch.full((1, 1), v, dtype=torch.float64))
        assert inverse_cdf_draw(edge).tolist() == [expected]


def test_inverse_cdf_draw_samples_the_softmax_and_follows_the_global_rng():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0]])
    probs = logits.double().softmax(-1)[0]
    n = 40000
    torch.manual_seed(5)
    picks = inverse_cdf_draw(logits.expand(n, -1))
    counts = torch.bincount(picks, minlength=6).double()
    assert counts[4] == 0
    expected = probs * n
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom: P(> 20.5) < 0.0005 for an exact sampler
    torch.manual_seed(5)  # the global generator, as torch.multinomial: seeded runs and resumes repeat it
    assert torch.equal(inverse_cdf_draw(logits.expand(n, -1)), picks)
