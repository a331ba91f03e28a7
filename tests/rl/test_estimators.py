"""The advantage estimators (RLOO, REINFORCE++-baseline), the sequence-level ratios (GSPO,
GSPO-token) and the entropy bonus, each against a loop reference written from its paper."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from flowtracer.rl import group_advantages, policy_loss

REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2, 0.7]
GROUPS = [5, 7, 5, 7, 5, 2, 7, 3, 2]  # non-contiguous, unequal sizes; group 3 is a singleton


def _members(i: int) -> list[float]:
    return [r for r, g in zip(REWARDS, GROUPS) if g == GROUPS[i]]


def test_rloo_is_the_reward_minus_the_mean_of_the_others():
    """Ahmadian et al. 2024: A_i = r_i - 1/(n-1) sum_{j != i} r_j (a singleton gets 0)."""
    adv, _ = group_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), mode="rloo")
    expected = []
    for i, r in enumerate(REWARDS):
        others = [x for j, (x, g) in enumerate(zip(REWARDS, GROUPS)) if g == GROUPS[i] and j != i]
        expected.append(r - sum(others) / len(others) if others else 0.0)
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_reinforce_pp_is_the_group_centred_reward_normalised_over_the_batch():
    """Hu 2025 (REINFORCE++-baseline): c_i = r_i - mean_group, then (c - mean_B c) / std_B c."""
    adv, _ = group_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), mode="reinforce_pp", eps=0.0)
    centred = [r - statistics.mean(_members(i)) for i, r in enumerate(REWARDS)]
    mu, sd = statistics.mean(centred), statistics.stdev(centred)
    assert adv.tolist() == pytest.approx([(c - mu) / sd for c in centred], abs=1e-5)


def test_reinforce_pp_normalises_over_every_process():
    """Two 'processes' holding halves of the batch, with reduce_sum adding the other's statistics,
    get the advantages of the whole batch (what DDP does through the trainer's all-reduce)."""
    r = torch.tensor(REWARDS[:8])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    full, _ = group_advantages(r, g, mode="reinforce_pp")
    halves = [(r[:4], g[:4]), (r[4:], g[4:])]

    def stats(x):  # the statistics group_advantages reduces: sum, sum of squares, count
        c = x - x.view(-1, 2).mean(1).repeat_interleave(2)
        return torch.stack([c.sum(), (c * c).sum(), torch.tensor(float(c.numel()))])

    parts = []
    for k, (rk, gk) in enumerate(halves):
        other = stats(halves[1 - k][0])
        adv, _ = group_advantages(rk, gk, mode="reinforce_pp", reduce_sum=lambda t, o=other: t + o)
        parts.append(adv)
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-6, rtol=1e-5)
    local, _ = group_advantages(r[:4], g[:4], mode="reinforce_pp")
    assert not torch.allclose(local, full[:4])  # the reduction matters


# ----------------------------------------------------------------------------- GSPO
def _batch():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 6
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    shift = torch.tensor([0.3, 0.3, -0.05, 0.1], dtype=torch.float64)[:, None]  # response 0 clips, the others not
    logprobs = old + shift + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.1
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]],
                        dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 0.8, -2.0], dtype=torch.float64)
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, -1e4))  # garbage off the response
    return logprobs, old, mask, adv


def _gspo_reference(logprobs, old, mask, adv, weights=None, eps=0.2):
    """Zheng et al. 2025, eq. 5-7: s_i = exp(1/|y_i| sum_t log pi/pi_old); the loss of response i is
    -min(s_i A, clip(s_i) A), per token t with A = A_i * w_t (GSPO-token's value), mean over its
    tokens, then over responses. Also returns which responses are clipped (no gradient)."""
    losses, clipped = [], []
    for b in range(len(adv)):
        toks = [t for t in range(mask.shape[1]) if mask[b, t]]
        s = math.exp(sum(float(logprobs[b, t] - old[b, t]) for t in toks) / len(toks))
        per = []
        for t in toks:
            a = float(adv[b]) * (float(weights[b, t]) if weights is not None else 1.0)
            per.append(-min(s * a, min(max(s, 1 - eps), 1 + eps) * a))
        clipped.append((s > 1 + eps and adv[b] > 0) or (s < 1 - eps and adv[b] < 0))
        losses.append(sum(per) / len(per))
    return sum(losses) / len(losses), clipped


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_loss_matches_the_paper(level):
    logprobs, old, mask, adv = _batch()
    loss, m = policy_loss(logprobs, old, adv, mask, importance_sampling_level=level)
    expected, clipped = _gspo_reference(logprobs, old, mask, adv)
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    assert any(clipped) and not all(clipped)  # the batch exercises both branches
    assert 0 < float(m["clip_frac"]) < 1


def test_gspo_token_has_the_value_of_gspo_and_a_per_token_gradient():
    """GSPO-token: s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)]. With uniform weights its gradient equals
    GSPO's: d/d log pi(y_t) = -s_i A_i / (|y_i| B) on unclipped responses, 0 on clipped ones."""
    logprobs, old, mask, adv = _batch()
    grads = {}
    for level in ("sequence", "sequence_token"):
        lp = logprobs.clone().requires_grad_(True)
        policy_loss(lp, old, adv, mask, importance_sampling_level=level)[0].backward()
        grads[level] = lp.grad
    _, clipped = _gspo_reference(logprobs, old, mask, adv)
    expected = torch.zeros_like(logprobs)
    for b in range(len(adv)):
        n = int(mask[b].sum())
        s = math.exp(float(((logprobs[b] - old[b]) * mask[b]).sum()) / n)
        if not clipped[b]:
            expected[b, mask[b]] = -s * float(adv[b]) / (n * len(adv))
    torch.testing.assert_close(grads["sequence_token"], expected)
    torch.testing.assert_close(grads["sequence"], expected)


def test_gspo_token_applies_per_token_weights():
    logprobs, old, mask, adv = _batch()
    weights = torch.ones_like(logprobs)
    weights[:, 2] = 1.5
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, token_weights=weights, importance_sampling_level="sequence_token")
    expected, clipped = _gspo_reference(logprobs, old, mask, adv, weights)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    loss.backward()
    b = next(i for i in range(len(adv)) if not clipped[i] and mask[i, 2] and mask[i, 3])
    assert float(lp.grad[b, 2]) == pytest.approx(1.5 * float(lp.grad[b, 3]))  # the weight reaches the gradient


def test_plain_gspo_refuses_per_token_weights_and_token_advantages():
    logprobs, old, mask, adv = _batch()
    weights = torch.ones_like(logprobs)
    policy_loss(logprobs, old, adv, mask, token_weights=weights, importance_sampling_level="sequence")  # ones: fine
    weights[0, 2] = 1.5
    with pytest.raises(ValueError, match="sequence_token"):
        policy_loss(logprobs, old, adv, mask, token_weights=weights, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        policy_loss(logprobs, old, adv[:, None].expand_as(logprobs), mask, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logprobs, old, adv, mask, importance_sampling_level="seq")


# ----------------------------------------------------------------------------- entropy bonus
@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_entropy_bonus_is_subtracted_with_the_loss_aggregation_and_has_a_gradient(aggregation):
    logprobs, old, mask, adv = _batch()
    logits = torch.randn(*logprobs.shape, 5, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    base, _ = policy_loss(logprobs, old, adv, mask, aggregation=aggregation)
    loss, m = policy_loss(logprobs, old, adv, mask, aggregation=aggregation, entropy=entropy, entropy_coef=0.1)
    if aggregation == "token-mean":
        h = float(entropy[mask].mean())
    else:
        h = sum(float(entropy[b][mask[b]].mean()) for b in range(len(adv))) / len(adv)
    assert float(loss.detach()) == pytest.approx(float(base) - 0.1 * h, rel=1e-9)
    assert float(m["entropy"]) == pytest.approx(float(entropy[mask].mean()))
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0  # the bonus trains the logits
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logprobs, old, adv, mask, entropy_coef=0.1)
