"""Truncated importance sampling (flowtracer.rl.loss.truncated_is) and its place in the policy loss."""

from __future__ import annotations

import math

import pytest
import torch

from flowtracer.rl import policy_loss, truncated_is

# Two responses of 3 and 2 tokens (the last column of row 1 is padding).
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -3.4, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


def test_truncated_is_equals_the_hand_computation():
    w, m = truncated_is(OLD, SAMPLER, MASK, cap=1.2)
    # ratios pi_old / pi_sampler = exp(old - sampler) on the 5 response tokens
    r = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(-0.1), math.exp(0.4)]
    want_w = [[min(r[0], 1.2), r[1], r[2]], [r[3], min(r[4], 1.2), 1.0]]  # padding: 1
    torch.testing.assert_close(w, torch.tensor(want_w))
    logs = [0.5, -1.0, 0.0, -0.1, 0.4]
    assert float(m["mismatch/abs_log_ratio"]) == pytest.approx(sum(abs(x) for x in logs) / 5)
    assert float(m["mismatch/kl"]) == pytest.approx(sum(math.exp(x) - 1 - x for x in logs) / 5, rel=1e-6)
    assert float(m["mismatch/tis_clipped_frac"]) == pytest.approx(2 / 5)  # exp(0.5) and exp(0.4) > 1.2
    assert float(m["mismatch/tis_weight_mean"]) == pytest.approx((1.2 + r[1] + 1 + r[3] + 1.2) / 5, rel=1e-6)


def test_truncated_is_is_the_identity_when_sampler_and_learner_agree():
    w, m = truncated_is(OLD, OLD.clone(), MASK, cap=2.0)
    assert torch.equal(w, torch.ones_like(w))
    assert float(m["mismatch/abs_log_ratio"]) == 0 and float(m["mismatch/kl"]) == 0
    assert float(m["mismatch/tis_clipped_frac"]) == 0


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (OLD + 0.1 * torch.randn(OLD.shape, generator=g)).requires_grad_(True)
    adv = torch.tensor([1.0, -0.5])
    weights = torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.5, 1.0]])
    return logp, adv, weights


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_policy_loss_with_tis_weights_each_tokens_policy_term(aggregation):
    """The loss with TIS = the loss whose per-token terms are multiplied by the hand weights; the
    gradient too. With sampler = old it equals the loss without TIS exactly."""
    logp, adv, weights = _loss_inputs()
    kw = dict(token_weights=weights, aggregation=aggregation)
    loss, m = policy_loss(logp, OLD, adv, MASK, sampler_logprobs=SAMPLER, tis_cap=1.2, **kw)
    w, _ = truncated_is(OLD, SAMPLER, MASK, cap=1.2)
    ratio = torch.exp(logp - OLD)
    a = adv[:, None] * weights
    per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * w * MASK
    want = (per_token.sum() / MASK.sum() if aggregation == "token-mean"
            else (per_token.sum(-1) / MASK.sum(-1)).mean())
    torch.testing.assert_close(loss, want)
    g_loss, = torch.autograd.grad(loss, logp)
    g_want, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g_loss, g_want)
    assert float(m["mismatch/tis_clipped_frac"]) == pytest.approx(0.4)

    plain, _ = policy_loss(logp, OLD, adv, MASK, **kw)
    same, m_same = policy_loss(logp, OLD, adv, MASK, sampler_logprobs=OLD.clone(), tis_cap=1.2, **kw)
    assert torch.equal(same, plain) and float(m_same["mismatch/kl"]) == 0
    off, m_off = policy_loss(logp, OLD, adv, MASK, sampler_logprobs=SAMPLER, tis_cap=0.0, **kw)
    assert torch.equal(off, plain)  # cap 0: no correction ...
    assert float(m_off["mismatch/abs_log_ratio"]) > 0  # ... but the mismatch is still measured
