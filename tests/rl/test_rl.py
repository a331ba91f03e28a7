"""flowtracer.rl: the policy loss against an explicit loop reference, and group advantages."""

from __future__ import annotations

import math

import pytest
import torch

from flowtracer.rl import AGGREGATIONS, check_finite, group_advantages, policy_loss

B, T = 4, 6


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logprobs + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8  # some ratios clip
    ref = logprobs + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.4
    mask = torch.tensor(
        [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )  # row 3 has no response tokens
    adv = torch.tensor([1.0, -0.5, 0.8, 2.0], dtype=torch.float64)
    weights = 1.0 + 0.5 * (torch.rand(B, T, generator=g) > 0.5).to(torch.float64)
    # Garbage off the response must be ignored.
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, -1e4))
    return logprobs, old, ref, mask, adv, weights


def _reference_loss(
    logprobs, old, ref, mask, adv, weights, aggregation, beta, eps_low=0.2, eps_high=0.2, max_len=None
):
    """The loss written out token by token, straight from the formula in docs/method.md."""
    seq_terms, all_tokens = [], []
    for b in range(B):
        tok_losses = []
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            a = float(adv[b]) * (float(weights[b, t]) if weights is not None else 1.0)
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            loss_t = -min(rho * a, clipped * a)
            if beta > 0:
                d = float(ref[b, t]) - float(logprobs[b, t])
                loss_t += beta * (math.exp(d) - d - 1)
            tok_losses.append(loss_t)
        all_tokens += tok_losses
        n = len(tok_losses)
        if aggregation == "seq-mean-token-mean":
            seq_terms.append(sum(tok_losses) / n if n else 0.0)
        elif aggregation == "seq-mean-token-sum-norm":
            seq_terms.append(sum(tok_losses) / (max_len or T))
    if aggregation == "token-mean":
        return sum(all_tokens) / len(all_tokens)
    return sum(seq_terms) / B


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_matches_loop_reference(aggregation, use_weights, beta):
    logprobs, old, ref, mask, adv, weights = _batch()
    w = weights if use_weights else None
    loss, metrics = policy_loss(
        logprobs, old, adv, mask, token_weights=w, aggregation=aggregation,
        ref_logprobs=ref if beta > 0 else None, beta=beta,
    )
    expected = _reference_loss(logprobs, old, ref, mask, adv, w, aggregation, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert torch.isfinite(loss)


def test_max_len_and_asymmetric_clip():
    logprobs, old, ref, mask, adv, weights = _batch(1)
    loss, _ = policy_loss(
        logprobs, old, adv, mask, token_weights=weights, aggregation="seq-mean-token-sum-norm",
        eps_low=0.1, eps_high=0.28, max_len=16,
    )
    expected = _reference_loss(
        logprobs, old, ref, mask, adv, weights, "seq-mean-token-sum-norm", 0.0, 0.1, 0.28, max_len=16
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_all_ones_weights_is_exactly_plain_grpo():
    logprobs, old, _, mask, adv, _ = _batch()
    lp32, old32, adv32 = logprobs.float(), old.float(), adv.float()
    for aggregation in AGGREGATIONS:
        plain, m1 = policy_loss(lp32, old32, adv32, mask, aggregation=aggregation)
        ones, m2 = policy_loss(
            lp32, old32, adv32, mask, token_weights=torch.ones(B, T), aggregation=aggregation
        )
        assert torch.equal(plain, ones)
        assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_gradient_flows_only_through_logprobs():
    logprobs, old, ref, mask, adv, weights = _batch()
    leaves = [x.clone().requires_grad_(True) for x in (logprobs, old, ref, adv, weights)]
    lp, o, r, a, w = leaves
    loss, metrics = policy_loss(lp, o, a, mask, token_weights=w, ref_logprobs=r, beta=0.1)
    loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum() > 0
    assert torch.all(lp.grad[~mask] == 0)  # off-response garbage gets no gradient
    assert torch.isfinite(lp.grad).all()
    assert all(x.grad is None for x in (o, r, a, w))
    assert all(not v.requires_grad for v in metrics.values())


def test_advantages_vector_and_broadcast_agree():
    logprobs, old, _, mask, adv, weights = _batch()
    for aggregation in AGGREGATIONS:
        a, _ = policy_loss(logprobs, old, adv, mask, token_weights=weights, aggregation=aggregation)
        wide = adv[:, None].expand(B, T)
        b, _ = policy_loss(logprobs, old, wide, mask, token_weights=weights, aggregation=aggregation)
        assert torch.equal(a, b)


def test_metrics_clip_fractions_and_kl():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4)
    # ratios: 0.5 (low), 1.0, 1.5 (high), 1.5 with A<0 (not clipped: the unclipped branch is lower)
    logprobs = torch.log(torch.tensor([[0.5, 1.0, 1.5, 1.5]]))
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0]])
    _, m = policy_loss(logprobs, old, adv, mask, ref_logprobs=old, beta=0.0)
    assert m["clip_frac_low"].item() == pytest.approx(0.25)
    assert m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx(1.125)
    assert m["policy_kl"].item() == pytest.approx(-logprobs.mean().item())
    d = -logprobs
    assert m["ref_kl"].item() == pytest.approx((torch.exp(d) - d - 1).mean().item(), rel=1e-6)


def test_empty_batch_no_nan_and_errors():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for aggregation in AGGREGATIONS:
        zeros = torch.zeros(2, 3)
        loss, m = policy_loss(zeros, zeros, torch.ones(2), mask, aggregation=aggregation)
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
    with pytest.raises(ValueError, match="valid"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), aggregation="mean")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), beta=0.1)


def _loop_advantages(rewards, groups, mode, eps=1e-6):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        if mode == "dr_grpo":
            out.append(r - mean)
            continue
        n = len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1)) if n > 1 else 0.0
        out.append((r - mean) / (std + eps))
    return out


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
def test_group_advantages_match_loop(mode):
    # Non-contiguous, unequal groups: 7 has zero variance, 3 is a singleton (also zero variance).
    rewards = [1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.2, 1.0]
    groups = [5, 7, 5, 7, 5, 2, 7, 3, 2]
    adv, stats = group_advantages(torch.tensor(rewards), torch.tensor(groups), mode=mode)
    expected = _loop_advantages(rewards, groups, mode)
    assert adv.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert stats == {"num_groups": 4.0, "zero_variance_groups": 2.0, "zero_variance_frac": 0.5}


def test_group_advantages_match_torch_std_and_contiguous_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv, stats = group_advantages(rewards.flatten(), torch.arange(3).repeat_interleave(4))
    # TRL: (r - mean) / (torch.std(r) + eps) per group
    trl = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    assert torch.allclose(adv, trl.flatten(), atol=1e-6)
    assert stats["zero_variance_groups"] == 1.0
    assert torch.all(adv[8:] == 0)
    int_adv, _ = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert int_adv.dtype == torch.float32
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(rewards.flatten(), torch.zeros(12), mode="ppo")


def test_check_finite():
    check_finite("rewards", torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"rewards has 1 non-finite value\(s\), first at index \(2,\)"):
        check_finite("rewards", torch.tensor([0.0, 1.0, float("nan")]))
