"""The token-weighted PPO-clip policy loss of GRPO (docs/method.md step 5), with optional k3 KL,
truncated importance sampling (TIS) for rollouts sampled at another precision than the learner's,
sequence-level ratios (GSPO, GSPO-token) and an entropy bonus."""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
IS_LEVELS = ("token", "sequence", "sequence_token")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    token_weights: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    max_len: int | None = None,
    sampler_logprobs: Tensor | None = None,
    tis_cap: float = 0.0,
    importance_sampling_level: str = "token",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss with per-token credit weights.

    Per response token t of response i, with ``rho_t = exp(logprobs - old_logprobs)`` and the
    weighted advantage ``A_t = gamma_t * A_i`` (``gamma_t`` = `token_weights`, detached)::

        loss_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t) + beta * kl_t

    where ``kl_t = exp(ref - logp) - (ref - logp) - 1`` (the k3 estimator, as TRL) is added only
    when ``beta > 0``; then `ref_logprobs` is required. Gradients flow only through `logprobs`.

    Rollouts sampled by another numerical policy than the learner's (bf16 generation, float32 or
    autocast training) come with `sampler_logprobs`, the sampler's own log-prob of each token. With
    ``tis_cap > 0`` the policy term of every token is multiplied by the detached truncated
    importance weight ``min(pi_old / pi_sampler, tis_cap)`` (`truncated_is`), which turns the
    expectation over the sampler's tokens back into one over the learner's old policy; 0 = off
    (the mismatch is still logged). The KL term is not reweighted (as in verl).

    Shapes: `logprobs`, `old_logprobs`, `response_mask`, `token_weights`, `ref_logprobs` are (B, T);
    `advantages` is (B,) (broadcast over tokens) or (B, T). Positions outside `response_mask` are
    ignored, whatever they hold. `token_weights=None` gives exactly the plain GRPO loss, and so do
    all-ones weights (multiplying by 1.0 is exact in floating point).

    `aggregation`:
    - ``"seq-mean-token-mean"`` (default, the paper): mean over each response's tokens, then mean
      over the B responses.
    - ``"token-mean"`` (DAPO): sum over all response tokens of the batch / their count.
    - ``"seq-mean-token-sum-norm"`` (Dr. GRPO): each response's token sum divided by the constant
      `max_len`, then mean over responses. Pass the generation budget (``max_new_tokens``) as
      `max_len`; None uses T, which over (B, T) prompt+response tensors includes the prompt width.

    `importance_sampling_level` (what ``rho`` is; docs/rl-step.md):
    - ``"token"`` (default, PPO/GRPO): ``rho_t = pi(y_t) / pi_old(y_t)`` per token.
    - ``"sequence"`` (GSPO, Zheng et al. 2025): one ratio per response,
      ``s_i = exp(mean_t log(pi(y_t) / pi_old(y_t)))`` (the length-normalised sequence ratio), clipped
      as a whole and given to every token of the response. The per-token weights cannot change
      anything the ratio or the advantage sees, so non-uniform `token_weights` are refused
      (ValueError); `advantages` must be (B,).
    - ``"sequence_token"`` (GSPO-token): ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, whose value is
      ``s_i`` and whose gradient is ``s_i * grad log pi(y_t)``: the sequence's ratio and clip with
      per-token advantages, so the credit weights apply as under ``"token"``.

    `entropy` (B, T) with `entropy_coef` > 0: the bonus ``- entropy_coef * H_t`` is added to every
    response token's loss and aggregated with it (verl's ``entropy_coeff``); `entropy` must carry
    its graph (flowtracer.model.forward with ``entropy_grad=True``), or the bonus is a constant.

    A response with no tokens contributes 0 (denominators are clamped to >= 1), never NaN.

    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors: ``clip_frac`` (response tokens
    where the clipped branch is active = no gradient), ``clip_frac_low``, ``clip_frac_high``,
    ``ratio_mean``, ``policy_kl`` (mean of old - new log-prob, the k1 estimate of KL(old || new)),
    ``ref_kl`` (mean k3 KL to the reference; 0 when no `ref_logprobs`), and with an entropy bonus
    ``entropy`` (the token mean of `entropy`).
    """
    _check_options(aggregation, importance_sampling_level, entropy_coef, entropy, beta, ref_logprobs)
    mask = response_mask.bool()
    maskf = mask.to(logprobs.dtype)
    adv = _token_advantages(advantages, token_weights, mask, importance_sampling_level).to(logprobs.dtype)
    adv = adv.expand_as(logprobs)

    # Zero the log-ratio off the response so garbage there (-inf, large values) cannot overflow
    # exp() and turn into NaN through 0 * inf.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    n_tokens = maskf.sum(-1)
    ratio = torch.exp(_level_log_ratio(log_ratio, logprobs, maskf, n_tokens, importance_sampling_level))
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    tis_metrics: dict[str, Tensor] = {}
    if sampler_logprobs is not None:
        is_weights, tis_metrics = truncated_is(old_logprobs, sampler_logprobs, mask, tis_cap)
        if tis_cap > 0:
            per_token = per_token * is_weights.to(per_token.dtype)

    ref_kl = None
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
        ref_kl = torch.exp(d) - d - 1.0
        if beta > 0:
            per_token = per_token + beta * ref_kl

    if entropy_coef != 0:
        per_token = per_token - entropy_coef * torch.where(mask, entropy, torch.zeros_like(entropy)).to(per_token.dtype)

    per_token = per_token * maskf
    loss = _aggregate(per_token, n_tokens, aggregation, max_len)
    with torch.no_grad():
        metrics = _diagnostics(ratio, log_ratio, adv, maskf, n_tokens, eps_low, eps_high, ref_kl)
        if entropy is not None:
            metrics["entropy"] = (entropy.detach() * maskf).sum() / n_tokens.sum().clamp(min=1.0)
    return loss, {k: v.detach() for k, v in {**metrics, **tis_metrics}.items()}


def _check_options(aggregation, level, entropy_coef, entropy, beta, ref_logprobs) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {', '.join(IS_LEVELS)}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs `entropy` (the token entropies of this forward, with their graph)")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's log-probs); set beta: 0.0 to disable KL")


def _token_advantages(advantages: Tensor, token_weights: Tensor | None, mask: Tensor, level: str) -> Tensor:
    """The detached advantage of each token, (B, 1) or (B, T): A_i (or A_i,t) times its weight."""
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    elif level == "sequence":
        raise ValueError("importance_sampling_level='sequence' takes one advantage per response: pass (B,)")
    if token_weights is None:
        return adv
    if level == "sequence" and bool(((token_weights != 1) & mask).any()):
        raise ValueError("importance_sampling_level='sequence' (GSPO) applies one ratio and one advantage per "
                         "response, so per-token weights cannot act; use 'sequence_token' (GSPO-token)")
    return adv * token_weights.detach().to(adv.dtype)


def _level_log_ratio(log_ratio: Tensor, logprobs: Tensor, maskf: Tensor, n_tokens: Tensor, level: str) -> Tensor:
    """log rho per token for each importance-sampling level (see `policy_loss`)."""
    if level == "token":
        return log_ratio
    seq = ((log_ratio * maskf).sum(-1) / n_tokens.clamp(min=1.0)).unsqueeze(-1)  # log s_i, with its graph
    if level == "sequence":
        return seq.expand_as(log_ratio)
    # GSPO-token: value log s_i, gradient d log pi(y_t) for each token t (0 off the response)
    lp = torch.where(maskf.bool(), logprobs, torch.zeros_like(logprobs))
    return seq.detach() + lp - lp.detach()


def truncated_is(old_logprobs: Tensor, sampler_logprobs: Tensor, response_mask: Tensor,
                 cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token truncated importance weights of the learner's old policy over the sampler's.

    ``w_t = min(exp(old_t - sampler_t), cap)`` on response tokens (1 elsewhere), detached: the
    correction TRL (``vllm_importance_sampling_correction``) and verl (rollout correction, token
    level, truncate mode) apply when vLLM samples in bf16 and the trainer computes in float32.
    ``cap <= 0`` gives weights of 1 (only the statistics). Identity when the two agree.

    Returns (weights (B, T) float32, metrics), metrics as token means over the response:
    ``mismatch/abs_log_ratio`` (mean |old - sampler|), ``mismatch/kl`` (k3 estimate of
    KL(sampler || old) from the sampler's own tokens: r - 1 - log r with r = pi_old / pi_sampler),
    ``mismatch/tis_clipped_frac`` (tokens whose ratio exceeded the cap), ``mismatch/tis_weight_mean``.
    """
    mask = response_mask.bool()
    log_r = torch.where(mask, old_logprobs.detach().float() - sampler_logprobs.detach().float(),
                        torch.zeros((), device=mask.device))
    ratio = torch.exp(log_r)
    clipped = mask & (ratio > cap) if cap > 0 else torch.zeros_like(mask)
    weights = torch.where(mask, ratio.clamp(max=cap), torch.ones_like(ratio)) if cap > 0 else torch.ones_like(ratio)
    total = mask.sum().clamp(min=1).float()
    k3 = torch.expm1(log_r.clamp(max=30.0)) - log_r  # r - 1 - log r; exact near r = 1, no overflow
    metrics = {
        "mismatch/abs_log_ratio": (log_r.abs() * mask).sum() / total,
        "mismatch/kl": (k3 * mask).sum() / total,
        "mismatch/tis_clipped_frac": clipped.sum() / total,
        "mismatch/tis_weight_mean": (weights * mask).sum() / total,
    }
    return weights, metrics


def _aggregate(per_token: Tensor, n_tokens: Tensor, aggregation: str, max_len: int | None) -> Tensor:
    """The scalar loss from masked per-token losses (see `policy_loss` for the three rules)."""
    if aggregation == "seq-mean-token-mean":
        return (per_token.sum(-1) / n_tokens.clamp(min=1.0)).mean()
    if aggregation == "token-mean":
        return per_token.sum() / n_tokens.sum().clamp(min=1.0)
    denom = float(max_len if max_len is not None else per_token.shape[-1])
    return (per_token.sum(-1) / max(denom, 1.0)).mean()


def _diagnostics(ratio, log_ratio, adv, maskf, n_tokens, eps_low, eps_high, ref_kl) -> dict[str, Tensor]:
    """Token means over the response of the clip fractions, the ratio and the KL estimates."""
    total = n_tokens.sum().clamp(min=1.0)

    def masked_mean(x: Tensor) -> Tensor:
        return (x * maskf).sum() / total

    low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(maskf.dtype)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(maskf.dtype)
    return {
        "clip_frac_low": masked_mean(low),
        "clip_frac_high": masked_mean(high),
        "clip_frac": masked_mean(low + high),
        "ratio_mean": masked_mean(ratio),
        "policy_kl": masked_mean(-log_ratio),
        "ref_kl": masked_mean(ref_kl) if ref_kl is not None else ratio.new_zeros(()),
    }
