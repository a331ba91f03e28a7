"""dominant_paths and backbone_edges: a hand-built graph and a node-by-node reference."""

from __future__ import annotations

import pytest
import torch

from flowtracer.flow import backbone_edges, dominant_paths, edge_flow, trace_flow


def hand_graph():
    """Source 0, answer 4. Out-weights already sum to 1 and every token reaches 4, so h = 1, W' = W.

    phi: 0->1 .6, 0->2 .4, 1->3 .3, 1->4 .3, 2->3 .4, 3->4 .7. Widest path 0-2-3-4 (0.4); then
    0-1-4 and 0-1-3-4 with 0.3 each (tie broken towards the lower predecessor, 1).
    """
    T = 5
    attn = torch.zeros(T, T, dtype=torch.float64)
    for i, k, w in [(0, 1, 0.6), (0, 2, 0.4), (1, 3, 0.5), (1, 4, 0.5), (2, 3, 1.0), (3, 4, 1.0)]:
        attn[k, i] = w  # attn[query = later token, key = earlier token]
    src = torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool)
    ans = torch.tensor([0, 0, 0, 0, 1], dtype=torch.bool)
    return trace_flow(attn, src, ans)


def test_hand_built_widest_paths():
    res = hand_graph()
    torch.testing.assert_close(res.reach, torch.ones(5, dtype=torch.float64))
    paths = dominant_paths(res, 0, 10)
    assert [p for p, _ in paths] == [[0, 2, 3, 4], [0, 1, 4], [0, 1, 3, 4]]
    flows = [w for _, w in paths]
    assert flows == pytest.approx([0.4, 0.3, 0.3], abs=1e-12)
    assert sum(flows) == pytest.approx(1.0, abs=1e-12)  # a conserved flow decomposes completely
    assert dominant_paths(res, 0, 2) == paths[:2]
    assert len(dominant_paths(res, 0, 10, min_cover=0.4)) == 1
    assert len(dominant_paths(res, 0, 10, min_cover=0.5)) == 2
    assert dominant_paths(res, 0, 1) == paths[:1]


def test_hand_built_backbone_edges():
    res = hand_graph()
    got = backbone_edges(res, 0, 0.5)  # threshold 0.5 * 0.7 = 0.35
    assert [(i, k) for i, k, _ in got] == [(3, 4), (0, 1), (0, 2), (2, 3)]
    assert [v for *_, v in got] == pytest.approx([0.7, 0.6, 0.4, 0.4])
    with_sink = backbone_edges(res, 0, 0.5, include_sink=True)  # threshold 0.5 * 1.0 (sink edge of 4)
    assert [(i, k) for i, k, _ in with_sink] == [(4, -1), (3, 4), (0, 1)]
    assert len(backbone_edges(res, 0, 0.0)) == 6  # every edge with positive flow
    assert backbone_edges(res, 0, 1.0) == [got[0]]


def naive_paths(res, b, k, min_cover=None):
    """The same greedy decomposition with a plain per-node DP (same tie-breaking)."""
    phi = edge_flow(res)[b].clone()
    inj = res.inject[b].clone()
    sink = res.sink_flow[b].clone()
    T = inj.shape[0]
    total, covered, out = float(sink.sum()), 0.0, []
    while len(out) < k and (min_cover is None or covered < min_cover * total):
        best = inj.clone()
        for j in range(1, T):
            best[j] = max(best[j], torch.minimum(best[:j], phi[:j, j]).max())
        end = torch.minimum(best, sink)
        a = int(end.argmax())
        w = end[a]
        if not w > 0:
            break
        path, j = [a], a
        while not inj[j] >= w:
            j = int(torch.minimum(best[:j], phi[:j, j]).argmax())
            path.append(j)
        path.reverse()
        sink[a] -= w
        inj[path[0]] -= w
        for i, j in zip(path, path[1:]):
            phi[i, j] -= w
        out.append((path, float(w)))
        covered += float(w)
    return out


@pytest.mark.parametrize("T,seed", [(7, 0), (33, 1), (100, 2), (150, 3)])
def test_blocked_dp_matches_naive(T, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, T, T, generator=g) * 2.5
    attn = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    src = torch.zeros(2, T, dtype=torch.bool)
    ans = torch.zeros(2, T, dtype=torch.bool)
    src[:, : max(1, T // 6)] = True
    ans[:, T - max(2, T // 10): T - 1] = True
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, : T // 7] = False
    res = trace_flow(attn, src, ans, valid_mask=valid)
    phi = edge_flow(res)
    for b in range(2):
        got = dominant_paths(res, b, 12)
        assert got == naive_paths(res, b, 12)
        assert [w for _, w in got] == sorted((w for _, w in got), reverse=True)
        for path, w in got:
            assert res.source_mask[b, path[0]] and res.answer_mask[b, path[-1]]
            assert all(i < j for i, j in zip(path, path[1:]))
            assert all(phi[b, i, j] >= w for i, j in zip(path, path[1:]))
    covered = dominant_paths(res, 0, 10_000, min_cover=0.6)
    assert sum(w for _, w in covered) >= 0.6 - 1e-12
    assert covered == naive_paths(res, 0, 10_000, min_cover=0.6)


def test_paths_edge_cases():
    res = hand_graph()
    with pytest.raises(ValueError, match="b must be 0"):
        dominant_paths(res, 1, 3)
    with pytest.raises(ValueError, match="k must be"):
        dominant_paths(res, 0, 0)
    with pytest.raises(ValueError, match="min_cover"):
        dominant_paths(res, 0, 3, min_cover=1.5)
    with pytest.raises(ValueError, match="min_frac"):
        backbone_edges(res, 0, -0.1)
    # Unreached sequence: nothing to decompose.
    attn = torch.rand(6, 6).tril()
    un = trace_flow(attn[None], torch.tensor([[0, 0, 0, 0, 0, 1]]).bool(), torch.tensor([[0, 1, 0, 0, 0, 0]]).bool())
    assert dominant_paths(un, 0, 3) == [] and backbone_edges(un, 0, 0.1) == []
    with pytest.raises(ValueError, match="out of range"):
        dominant_paths(un, 1, 3)
    # A source that is also an answer token is a one-token path.
    attn = torch.zeros(3, 3)
    attn[2, 0] = 1.0
    res = trace_flow(attn, torch.tensor([True, True, False]), torch.tensor([False, True, True]))
    assert dominant_paths(res, 0, 5) == [([1], 0.5), ([0, 2], 0.5)]  # tie: lower answer index first
