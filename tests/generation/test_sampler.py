"""The per-row seeded sampler's noise (flowtracer.generation.sampler) against a pure-Python splitmix64:
the engines compare with each other, so this pins the values both draw."""

from __future__ import annotations

import math

import torch

from flowtracer.generation.sampler import gumbel_perturbed, hashed_uniform

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
