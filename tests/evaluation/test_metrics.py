"""avg@k, unbiased pass@k (against brute-force subset enumeration), maj@k, macro average: the
torchmetrics BenchmarkAccuracy and its pieces."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import brute_pass_at_k

from flowtracer.evaluation.metrics import (
    BenchmarkAccuracy,
    answer_key,
    default_pass_ks,
    macro_average,
    majority_correct,
    pass_at_k,
)


def records(name: str, correct, keys=None) -> list[dict]:
    """Engine-style records of one set: problem i has samples correct[i] (and answer keys)."""
    keys = keys or [[None] * len(c) for c in correct]
    return [{"set": name, "index": i, "correct": [bool(x) for x in c], "keys": list(k)}
            for i, (c, k) in enumerate(zip(correct, keys))]


def set_metrics(correct, keys, pass_ks=None) -> dict:
    metric = BenchmarkAccuracy({"s": (pass_ks, True)}, sync_on_compute=False)
    metric.update(records("s", np.asarray(correct).tolist(), keys))
    out = metric.compute()["sets"]["s"]
    return {k: v for k, v in out.items() if "@" in k}


def test_pass_at_k_equals_subset_enumeration():
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for k in range(1, n + 1):
            rows = [rng.permutation([True] * c + [False] * (n - c)).tolist() for c in range(n + 1)]
            got = pass_at_k([n] * len(rows), [sum(r) for r in rows], k)  # vectorised over problems
            want = [brute_pass_at_k(r, k) for r in rows]
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_pass_at_k_stable_for_large_n():
    n, c, k = 400, 3, 200  # C(400, 200) overflows float64; the product form does not
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k([n], [c], k)[0] == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k([4], [1], 5)


def test_majority_vote_ties_go_to_the_first_answer():
    keys = [["1", "2", "2", "1"],   # tie 2-2: "1" came first -> sample 0 decides
            ["3", None, "4", "4"],  # "4" wins 2-1
            [None, None, None, None]]  # nothing extracted: unsolved
    correct = np.array([[False, True, True, False], [True, False, False, False], [False] * 4])
    assert majority_correct(keys, correct) == [False, False, False]
    correct[0, 0] = True
    correct[1, 2] = True
    assert majority_correct(keys, correct) == [True, True, False]


def test_answer_key_normalises_what_the_verifier_would_accept():
    assert answer_key("1,000") == answer_key("1000") == answer_key(" 1000. ")
    assert answer_key("2.0") == answer_key("2") and answer_key("$5$") == answer_key("\\text{5}")
    assert answer_key("\\frac{1}{2}") != answer_key("2") and answer_key(None) is None


def test_set_metrics_and_macro_average():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    keys = [["5", "6", "7", "5"], ["1", "1", "2", "2"], ["9"] * 4]
    m = set_metrics(correct, keys)
    assert default_pass_ks(4) == [1, 2, 4]
    assert m["avg@4"] == pytest.approx(6 / 12)
    assert m["pass@1"] == pytest.approx(m["avg@4"])  # pass@1 is the mean accuracy
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx((brute_pass_at_k([1, 0, 0, 1], 2) + 0 + 1) / 3)
    assert m["maj@4"] == pytest.approx(2 / 3)
    per_set = {"a": m, "b": {"avg@16": 0.1}, "c": {"avg@1": 0.3}}
    assert macro_average(per_set, ["a", "b"]) == pytest.approx((0.5 + 0.1) / 2)  # each set counts once
    assert macro_average(per_set, []) is None
    with pytest.raises(ValueError, match="raise k"):
        set_metrics(correct, keys, pass_ks=[8])


def test_pass_at_k_mean_is_numpys_to_the_last_bit():
    """The correct counts of the quickstart checkpoint's 20 validation problems (k=4): the mean
    over problems is numpy's float64 mean, so eval.json keeps the value committed before the
    metrics moved to torch (torch's own mean gives 0.6749999999999998 here)."""
    c = [2, 2, 3, 1, 2, 4, 2, 0, 2, 0, 2, 1, 0, 2, 2, 3, 1, 3, 1, 2]
    per_problem = [brute_pass_at_k([True] * x + [False] * (4 - x), 2) for x in c]
    m = set_metrics([[True] * x + [False] * (4 - x) for x in c], None)
    assert m["pass@2"] == float(np.mean(per_problem))
    assert m["avg@4"] == float(np.mean(np.array(c) / 4)) and m["pass@4"] == float(np.mean([x > 0 for x in c]))


def test_benchmark_metric_counts_a_repeated_problem_once_and_keeps_set_order():
    """DDP pads its last validation batches with repeats: a problem seen twice counts once."""
    metric = BenchmarkAccuracy({"b": ([1, 2], False), "a": (None, True), "empty": (None, True)},
                               sync_on_compute=False)
    a = records("a", [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], [["5", "6", "7", "5"], ["1"] * 4, ["9"] * 4])
    a[1]["refused"] = [True, False, True, False]  # two truncated fallback answers, counted once
    b = records("b", [[1, 1], [0, 1]])
    metric.update(a[:2] + b)
    metric.update(a[1:])  # a[1] again
    out = metric.compute()
    assert list(out["sets"]) == ["b", "a"] and out["math_sets"] == ["a"]  # "empty" saw no problem
    assert out["sets"]["a"] == {"n": 3, "k": 4, **set_metrics([r["correct"] for r in a], [r["keys"] for r in a]),
                                "truncated_fallback": 2}
    assert out["sets"]["b"]["truncated_fallback"] == 0  # records without "refused" (old callers) refuse nothing
    assert out["sets"]["b"]["pass@2"] == 1.0 and out["sets"]["b"]["avg@2"] == 0.75 and "pass@1" in out["sets"]["b"]
    assert out["math_avg"] == out["sets"]["a"]["avg@4"]
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics says so; nothing is counted
        assert metric.compute()["sets"] == {}
