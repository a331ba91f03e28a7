"""flowtracer.flow.trace_flow against a path-enumerating reference, plus properties and errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from flowtracer.flow import FlowResult, edge_flow, trace_flow

MODES = [(True, True), (True, False), (False, True), (False, False)]  # (condition_on_answer, conserve)


# ----------------------------------------------------------------------------- brute-force reference
def _paths(i: int, j: int):
    """Every increasing token path i -> ... -> j (i < j), as a list of nodes."""
    inner = range(i + 1, j)
    for r in range(len(inner) + 1):
        for mid in itertools.combinations(inner, r):
            yield [i, *mid, j]


def _prod(W, path) -> float:
    return math.prod(W[a][b] for a, b in zip(path, path[1:]))


def reference(attn, src, ans, valid, eps, cond, cons, inject_mode="uniform"):
    """Literal docs/method.md definitions on plain Python floats, summing over all enumerated paths."""
    T = len(attn)
    A = [bool(ans[t] and valid[t]) for t in range(T)]
    Q = [bool(src[t] and valid[t]) for t in range(T)]
    W = [[0.0] * T for _ in range(T)]
    for i in range(T):
        for k in range(i + 1, T):
            w = float(attn[k][i]) if valid[i] and valid[k] else 0.0
            W[i][k] = 0.0 if (w < eps or A[i]) else w  # answer tokens are absorbing
    # h(i) = [i in A] + sum over all paths i -> a in A of the product of capacities.
    h = [float(A[i]) + sum(_prod(W, p) for a in range(i + 1, T) if A[a] for p in _paths(i, a))
         for i in range(T)]
    Wp = [[0.0] * T for _ in range(T)]
    for i in range(T):
        out = sum(W[i])
        for k in range(i + 1, T):
            if cond and cons:
                Wp[i][k] = W[i][k] * h[k] / h[i] if h[i] > 0 else 0.0
            elif cond:
                Wp[i][k] = W[i][k] if h[k] > 0 else 0.0
            elif cons:
                Wp[i][k] = W[i][k] / out if out > 0 else 0.0
            else:
                Wp[i][k] = W[i][k]
    reached = any(Q[q] and h[q] > 0 for q in range(T))
    inj_set = [Q[q] and (h[q] > 0 or not cond) for q in range(T)]
    n = sum(inj_set)
    inject = [(1.0 / n if (inj_set[q] and reached) else 0.0) for q in range(T)]
    if inject_mode == "reachability":  # h(q) / sum of h over the alive sources
        z = sum(h[q] for q in range(T) if Q[q])
        inject = [h[q] / z if (Q[q] and reached) else 0.0 for q in range(T)]
    f = [inject[k] + sum(inject[q] * _prod(Wp, p) for q in range(k) for p in _paths(q, k)) for k in range(T)]
    tau = [f[k] + sum(f[k] * Wp[k][j] for j in range(T)) + (f[k] if A[k] else 0.0) for k in range(T)]
    return dict(reach=h, capacity=Wp, inflow=f, throughput=tau, reached=reached, inject=inject)


def random_case(rng: random.Random, T: int):
    """A random sparse-ish DAG in attention layout, with garbage where nothing may be read."""
    attn = [[0.0] * T for _ in range(T)]
    for q in range(T):
        for k in range(T):
            if k < q:
                attn[q][k] = rng.uniform(0.05, 1.5) if rng.random() < 0.55 else 0.0
            else:  # diagonal and upper triangle are never read
                attn[q][k] = rng.choice([float("nan"), 7.0, -3.0])
    valid = [rng.random() < 0.85 for _ in range(T)]
    ans = [rng.random() < 0.3 for _ in range(T)]
    a = rng.randrange(T)
    valid[a], ans[a] = True, True  # at least one valid answer token
    src = [rng.random() < 0.35 for _ in range(T)]
    for t in range(T):
        if not valid[t]:  # padding rows/columns may hold anything (not negative-checked either)
            for u in range(T):
                attn[t][u] = rng.choice([float("nan"), 5.0, -1.0])
                attn[u][t] = rng.choice([float("inf"), 2.0, -4.0])
    return attn, src, ans, valid


def _check_against(res: FlowResult, ref: dict, T: int):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    for name in ("reach", "inflow", "throughput", "inject"):
        torch.testing.assert_close(getattr(res, name), t(ref[name]), rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(res.capacity * upper, t(ref["capacity"]), rtol=0, atol=1e-10)
    assert bool(res.reached) == ref["reached"]


@pytest.mark.parametrize("cond,cons", MODES)
def test_matches_path_enumeration(cond, cons):
    rng = random.Random(1234 + 10 * cond + cons)
    n_unreached = 0
    for _ in range(40):
        T = rng.randint(1, 8)
        B = 3
        eps = rng.choice([0.0, 0.0, 0.3])
        cases = [random_case(rng, T) for _ in range(B)]
        refs = [reference(*c, eps, cond, cons) for c in cases]
        n_unreached += sum(not r["reached"] for r in refs)
        attn = torch.tensor([c[0] for c in cases], dtype=torch.float64)
        src, ans, val = (torch.tensor([c[j] for c in cases]) for j in (1, 2, 3))
        kw = dict(edge_eps=eps, condition_on_answer=cond, conserve=cons)
        batched = trace_flow(attn, src, ans, valid_mask=val, **kw)
        for b in range(B):
            single = trace_flow(attn[b], src[b], ans[b], valid_mask=val[b], **kw)
            assert single.reach.shape == (T,) and single.reached.dim() == 0
            _check_against(single, refs[b], T)
            one = FlowResult(**{k: v[b] if isinstance(v, torch.Tensor) else v for k, v in vars(batched).items()})
            _check_against(one, refs[b], T)
    assert n_unreached > 0  # the random cases do cover unreached sequences


@pytest.mark.parametrize("cond,cons", MODES)
def test_reachability_injection_matches_path_enumeration(cond, cons):
    rng = random.Random(99 + 10 * cond + cons)
    for _ in range(30):
        T = rng.randint(1, 8)
        attn, src, ans, val = random_case(rng, T)
        ref = reference(attn, src, ans, val, 0.0, cond, cons, inject_mode="reachability")
        res = trace_flow(torch.tensor(attn, dtype=torch.float64), torch.tensor(src), torch.tensor(ans),
                         valid_mask=torch.tensor(val), condition_on_answer=cond, conserve=cons,
                         inject="reachability")
        assert res.inject_mode == "reachability"
        _check_against(res, ref, T)


def test_reachability_injection_is_the_conditioned_walk():
    """inject="reachability" (Doob setting): f(k) = P(a walk passes k), for the walk that starts
    uniformly on the question and is conditioned to reach the answer. Brute force: enumerate every
    walk q -> ... -> a (q a source, a the first answer token it meets), weight = product of its
    capacities (uniform start: the 1/|Q| cancels in the conditioning); f(k) = weight of the walks
    through k / weight of all walks. The uniform injection is not this walk: it differs."""
    rng = random.Random(5)
    differs = 0
    for _ in range(30):
        T = rng.randint(3, 8)
        attn, src, ans, val = random_case(rng, T)
        A = [bool(ans[t] and val[t]) for t in range(T)]
        Q = [bool(src[t] and val[t]) for t in range(T)]
        W = [[float(attn[k][i]) if (val[i] and val[k] and not A[i] and k > i) else 0.0 for k in range(T)]
             for i in range(T)]
        walks = [[q] for q in range(T) if Q[q] and A[q]]  # a source on the answer: a one-token walk
        walks += [p for q in range(T) if Q[q] and not A[q] for a in range(q + 1, T) if A[a] for p in _paths(q, a)
                  if not any(A[m] for m in p[1:-1])]
        weight = [_prod(W, p) for p in walks]
        z = sum(weight)
        kw = dict(valid_mask=torch.tensor(val), inject="reachability")
        res = trace_flow(torch.tensor(attn, dtype=torch.float64), torch.tensor(src), torch.tensor(ans), **kw)
        if z == 0:
            assert not bool(res.reached) and float(res.inflow.abs().sum()) == 0.0
            continue
        want = torch.tensor([sum(w for p, w in zip(walks, weight) if k in p) / z for k in range(T)],
                            dtype=torch.float64)
        torch.testing.assert_close(res.inflow, want, rtol=0, atol=1e-10)
        uniform = trace_flow(torch.tensor(attn, dtype=torch.float64), torch.tensor(src), torch.tensor(ans),
                             valid_mask=torch.tensor(val))
        differs += not torch.allclose(uniform.inflow, want, atol=1e-6)
    assert differs > 0


def test_bad_inject_raises():
    with pytest.raises(ValueError, match="reachability"):
        trace_flow(torch.zeros(3, 3), torch.tensor([1, 0, 0]), torch.tensor([0, 0, 1]), inject="h")


def test_float32_input_matches_reference():
    rng = random.Random(7)
    attn, src, ans, valid = random_case(rng, 8)
    a32 = torch.tensor(attn, dtype=torch.float32)
    ref = reference(a32.double().tolist(), src, ans, valid, 0.0, True, True)
    _check_against(trace_flow(a32, torch.tensor(src), torch.tensor(ans), valid_mask=torch.tensor(valid)), ref, 8)


# ----------------------------------------------------------------------------- attention-like maps
def softmax_attn(B: int, T: int, seed: int, temp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, T, generator=g) * temp
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def spans(B: int, T: int, q: tuple[int, int], a: tuple[int, int]):
    src = torch.zeros(B, T, dtype=torch.bool)
    ans = torch.zeros(B, T, dtype=torch.bool)
    src[:, q[0]:q[1]] = True
    ans[:, a[0]:a[1]] = True
    return src, ans


@pytest.mark.parametrize("T", [16, 128, 512])
def test_conservation_and_unit_flow(T):
    B = 2
    attn = softmax_attn(B, T, seed=T)
    src, ans = spans(B, T, (0, T // 5), (T - T // 8, T - T // 16))
    res = trace_flow(attn, src, ans)
    assert res.reached.all()
    out = res.capacity.sum(-1)
    live_inner = (res.reach > 0) & ~res.answer_mask
    torch.testing.assert_close(out[live_inner], torch.ones_like(out[live_inner]), rtol=0, atol=1e-12)
    assert (out[res.answer_mask] == 0).all()  # answers are absorbing
    torch.testing.assert_close(res.sink_flow.sum(-1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.inject.sum(-1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (res.inflow >= 0).all() and (res.inflow <= 1 + 1e-12).all()
    # Tokens after the last answer token can reach no answer: nothing at all.
    last = T - T // 16
    for x in (res.reach, res.inflow, res.throughput):
        assert (x[:, last:] == 0).all()
    # Throughput is 2 f on reachable tokens, and the edge flows are consistent with f.
    torch.testing.assert_close(res.throughput, 2 * res.inflow, rtol=0, atol=1e-12)
    phi = edge_flow(res)
    torch.testing.assert_close(phi, res.edge_flow())
    torch.testing.assert_close(res.inject + phi.sum(-2), res.inflow, rtol=0, atol=1e-12)
    assert res.capacity.dtype == res.inflow.dtype == torch.float64


def test_dead_end_gets_nothing():
    T, d = 64, 20
    attn = softmax_attn(1, T, seed=3)[0]
    attn[:, d] = 0.0  # nobody after d attends to it: d has no out-edges, a dead end
    attn = attn / attn.sum(-1, keepdim=True)
    src, ans = spans(1, T, (0, 8), (50, 55))
    res = trace_flow(attn, src[0], ans[0])
    assert res.reach[d] == 0 and res.inflow[d] == 0 and res.throughput[d] == 0
    assert (res.capacity[:, d] == 0).all()  # edges into the dead end carry nothing
    torch.testing.assert_close(res.sink_flow.sum(), torch.tensor(1.0, dtype=torch.float64))
    # Without conditioning the dead end does get flow (the switch matters).
    raw = trace_flow(attn, src[0], ans[0], condition_on_answer=False)
    assert raw.inflow[d] > 0


@pytest.mark.parametrize("left,right", [(5, 0), (0, 7), (3, 4)])
def test_padding_changes_nothing(left, right):
    T = 96
    attn = softmax_attn(1, T, seed=11)[0]
    src, ans = spans(1, T, (0, 20), (80, 86))
    P = left + T + right
    big = torch.full((P, P), float("nan"))  # padding may hold garbage
    big[left:left + T, left:left + T] = attn
    def pad(m):
        return torch.cat([torch.ones(left, dtype=torch.bool), m, torch.zeros(right, dtype=torch.bool)])

    valid = torch.zeros(P, dtype=torch.bool)
    valid[left:left + T] = True
    for cond, cons in MODES:
        ref = trace_flow(attn, src[0], ans[0], condition_on_answer=cond, conserve=cons)
        got = trace_flow(big, pad(src[0]), pad(ans[0]), valid_mask=valid, condition_on_answer=cond, conserve=cons)
        sl = slice(left, left + T)
        for name in ("reach", "inflow", "throughput", "inject"):
            x = getattr(got, name)
            torch.testing.assert_close(x[sl], getattr(ref, name), rtol=1e-12, atol=1e-14)
            assert (x[~valid] == 0).all()
        torch.testing.assert_close(got.capacity[sl, sl], ref.capacity, rtol=1e-12, atol=1e-14)
        assert (got.capacity[~valid].abs().sum() == 0) and (got.capacity[:, ~valid].abs().sum() == 0)
        assert not got.source_mask[~valid].any() and not got.answer_mask[~valid].any()


def test_batch_equals_one_at_a_time():
    B, T = 4, 200
    attn = softmax_attn(B, T, seed=5)
    src, ans = spans(B, T, (0, 30), (150, 160))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :13] = False  # left padded
    valid[2, 170:] = False  # right padded
    src[3], ans[3] = False, False
    src[3, 190:], ans[3, 100:105] = True, True  # source after the answer: not reached
    res = trace_flow(attn, src, ans, valid_mask=valid)
    assert res.reached.tolist() == [True, True, True, False]
    for b in range(B):
        one = trace_flow(attn[b], src[b], ans[b], valid_mask=valid[b])
        for name in ("reach", "inflow", "throughput", "inject", "capacity"):
            torch.testing.assert_close(getattr(res, name)[b], getattr(one, name), rtol=1e-12, atol=1e-14)


def test_edge_eps_pruning():
    T, eps = 80, 0.02
    attn = softmax_attn(1, T, seed=9, temp=3.0)[0]
    src, ans = spans(1, T, (0, 10), (60, 64))
    pruned = attn.masked_fill(attn < eps, 0.0)
    a = trace_flow(attn, src[0], ans[0], edge_eps=eps)
    b = trace_flow(pruned, src[0], ans[0])
    for name in ("reach", "inflow", "throughput", "capacity"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    small = (attn.T < eps).triu(1)
    assert small.any() and (a.capacity[small] == 0).all()
    assert (edge_flow(a)[small] == 0).all()
    full = trace_flow(attn, src[0], ans[0])
    assert not torch.equal(full.inflow, a.inflow)


def test_unreached_gives_zeros():
    T = 40
    attn = softmax_attn(2, T, seed=2)
    src, ans = spans(2, T, (30, 35), (10, 12))  # the question comes after the answer
    for cond, cons in MODES:
        res = trace_flow(attn, src, ans, condition_on_answer=cond, conserve=cons)
        assert not res.reached.any()
        for x in (res.inflow, res.throughput, res.inject):
            assert (x == 0).all() and not torch.isnan(x).any()
        assert torch.isfinite(res.reach).all() and torch.isfinite(res.capacity).all()
    # No source tokens at all is the same case.
    res = trace_flow(attn[0], torch.zeros(T, dtype=torch.bool), ans[0])
    assert not res.reached and (res.throughput == 0).all()


def test_source_that_is_an_answer_token():
    T = 30
    attn = softmax_attn(1, T, seed=4)[0]
    src = torch.zeros(T, dtype=torch.bool)
    ans = torch.zeros(T, dtype=torch.bool)
    src[[2, 20]] = True
    ans[20:23] = True
    res = trace_flow(attn, src, ans)
    assert res.inject[20] == 0.5 and res.inject[2] == 0.5
    torch.testing.assert_close(res.sink_flow.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (res.capacity[20] == 0).all()  # still absorbing: its injection goes straight to the sink


def test_int_masks_accepted():
    attn = softmax_attn(1, 20, seed=1)[0]
    src, ans = spans(1, 20, (0, 5), (15, 17))
    a = trace_flow(attn, src[0].long(), ans[0].int(), valid_mask=torch.ones(20, dtype=torch.long))
    b = trace_flow(attn, src[0], ans[0])
    torch.testing.assert_close(a.throughput, b.throughput, rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors
def _ok(B=2, T=10):
    attn = softmax_attn(B, T, seed=0)
    src, ans = spans(B, T, (0, 3), (7, 9))
    return attn, src, ans


def _set(a, idx, value):
    a = a.clone()
    a[idx] = value
    return a


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, s, q: (_set(a, (1, 5, 2), float("nan")), s, q), "NaN in sequence 1"),
        (lambda a, s, q: (_set(a, (0, 5, 2), float("inf")), s, q), "inf in sequence 0"),
        (lambda a, s, q: (_set(a, (1, 6, 0), -0.1), s, q), "negative weights in sequence 1"),
        (lambda a, s, q: (a[0, 0], s, q), "shape \\(T, T\\) or \\(B, T, T\\)"),
        (lambda a, s, q: (a[None], s, q), "shape \\(T, T\\) or \\(B, T, T\\)"),
        (lambda a, s, q: (a[:, :, :-1], s, q), "square"),
        (lambda a, s, q: (a.long(), s, q), "floating-point"),
        (lambda a, s, q: (a, s[0], q), "source_mask has shape"),
        (lambda a, s, q: (a, s, q[:, :-1]), "answer_mask has shape"),
        (lambda a, s, q: (a, s.float(), q), "bool"),
        (lambda a, s, q: (a, s, torch.cat([q[:1], torch.zeros_like(q[1:])])), "empty answer set: sequence 1"),
        (lambda a, s, q: ([[0.0]], s, q), "torch.Tensor"),
    ],
)
def test_bad_input_raises(mutate, match):
    attn, src, ans = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        trace_flow(attn, src, ans)


def test_bad_valid_mask_and_eps_and_unbatched_messages():
    attn, src, ans = _ok()
    with pytest.raises(ValueError, match="valid_mask has shape"):
        trace_flow(attn, src, ans, valid_mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="edge_eps"):
        trace_flow(attn, src, ans, edge_eps=-1.0)
    with pytest.raises(ValueError, match="edge_eps"):
        trace_flow(attn, src, ans, edge_eps=float("nan"))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 7:] = False  # the whole answer span is padding
    with pytest.raises(ValueError, match="empty answer set: sequence 0"):
        trace_flow(attn, src, ans, valid_mask=valid)
    with pytest.raises(ValueError, match="empty answer set: the sequence"):
        trace_flow(attn[0], src[0], torch.zeros(10, dtype=torch.bool))
    bad = attn[0].clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="contains NaN \\(strict"):
        trace_flow(bad, src[0], ans[0])


def test_overflowing_reachability_raises():
    T = 400
    attn = torch.full((T, T), 1e300, dtype=torch.float64).tril(-1)  # finite, but h blows past 1e308
    src = torch.zeros(T, dtype=torch.bool)
    ans = torch.zeros(T, dtype=torch.bool)
    src[0], ans[-1] = True, True
    with pytest.raises(ValueError, match="overflows float64"):
        trace_flow(attn, src, ans)
