"""Token weights from plain tensors: the credit arms for any trainer, no Lightning.

    weights = token_weights(FlowCredit(), model, input_ids, attention_mask, prompt_mask, response_mask,
                            question_mask, answer_mask, temperature=1.0)          # (B, T) float32

`compute_credit` (the same, plus the arm's stats) runs the no-grad teacher-forced pass the arm needs
(flowtracer.model.forward: the attention map of the arm's layers for FlowCredit and AttentionCredit,
the forward stopped after the last of them; entropies at the sampling temperature for
EntropyCredit; nothing for UniformCredit and RandomCredit), micro-batch by micro-batch, then the
arm's own `apply` on each micro-batch (the per-row arms) or once on the whole batch (the
batch-global ones). The GRPO module's pre-pass runs the same `apply` on the same views, so both give
the same weights for the same batch (tests/credit/test_weights.py).

Masks are (B, T) bool over one layout: the prompt left-padded, the response right-padded (what
TRL and the suite both build). The question and answer masks come from flowtracer.credit.masks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch, active_columns, split_rows
from flowtracer.errors import InputError
from flowtracer.model.forward import logprob_temperature, teacher_forced_pass


@dataclass
class Credit:
    """What one call returns: the weights and the arm's stats for the batch."""

    weights: Tensor  # (B, T) float32, 0 off the response
    metrics: dict[str, float]  # the arm's credit/* stats (row-weighted means), credit/seconds, credit/nonfinite_frac


def credit_batch(input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor, response_mask: Tensor,
                 question_mask: Tensor, answer_mask: Tensor) -> RolloutBatch:
    """The RolloutBatch an arm reads, from plain tensors (rewards and advantages play no part in credit)."""
    B = input_ids.shape[0]
    masks = [m.bool() for m in (prompt_mask, response_mask, question_mask, answer_mask)]
    if any(m.shape != input_ids.shape for m in (attention_mask, *masks)):
        raise InputError(f"every mask must have the shape of input_ids {tuple(input_ids.shape)}")
    zeros = torch.zeros(B, device=input_ids.device)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, prompt_mask=masks[0],
                        response_mask=masks[1], question_mask=masks[2], answer_mask=masks[3], rewards=zeros,
                        advantages=zeros, group_ids=torch.arange(B, device=input_ids.device))


def token_weights(arm, model, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor, response_mask: Tensor,
                  question_mask: Tensor, answer_mask: Tensor, temperature: float = 1.0, **kwargs) -> Tensor:
    """(B, T) float32 weights of `arm` for this batch (keyword options: see `compute_credit`)."""
    return compute_credit(arm, model, input_ids, attention_mask, prompt_mask, response_mask, question_mask,
                          answer_mask, temperature, **kwargs).weights


def compute_credit(arm, model, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor, response_mask: Tensor,
                   question_mask: Tensor, answer_mask: Tensor, temperature: float = 1.0, *, micro_batch_size: int = 0,
                   tokenizer=None, step: int | None = None, logits_bytes: int | None = None,
                   stop_early: bool = True) -> Credit:
    """Run the pass `arm` needs on `model` (no grad, eval mode, adapters as they are) and the arm.

    Args:
        arm: a credit arm (flowtracer.credit: FlowCredit, AttentionCredit, EntropyCredit, RandomCredit,
            UniformCredit, or any RolloutCallback that sets token weights).
        model: the policy (a transformers causal LM, or a peft wrapper of one).
        temperature: the sampling temperature (entropies are those of the sampling distribution; 0 = 1).
        micro_batch_size: rows per forward (0 = all); each forward holds one (b, T, T) map at most.
        tokenizer: optional, names the token classes of the selected tokens in the stats.
        step: the RL step (RandomCredit's seed); default: the arm's own call count.
        logits_bytes: memory budget of the chunked vocabulary projection (EntropyCredit only).
        stop_early: a map-only pass stops after the arm's last layer (False: runs every layer, for
            DeepSpeed ZeRO-3 / FSDP wrappers; same weights).
    """
    if arm.batch_global and arm.needs_attention:
        raise InputError(f"{type(arm).__name__}: a batch-global arm cannot read the attention map (the map exists "
                         "one micro-batch at a time)")
    t0 = time.perf_counter()
    batch = credit_batch(input_ids, attention_mask, prompt_mask, response_mask, question_mask, answer_mask)
    metrics: dict[str, float] = {"credit/nonfinite_frac": 0.0}
    weights = None
    if arm.needs_attention or arm.needs_entropy:
        entropies, weights = _pass(arm, model, batch, metrics, temperature=temperature,
                                   micro_batch_size=micro_batch_size, tokenizer=tokenizer, step=step,
                                   logits_bytes=logits_bytes, stop_early=stop_early)
        batch.entropies = entropies
    if weights is None:  # the arm reads no map: once, on the whole batch
        arm.apply(batch, tokenizer=tokenizer, step=step)
        metrics.update(batch.metrics)
        weights = batch.weights_or_ones()
    metrics["credit/seconds"] = time.perf_counter() - t0
    return Credit(weights.float(), metrics)


@torch.no_grad()
def _pass(arm, model, batch: RolloutBatch, metrics: dict, *, temperature, micro_batch_size, tokenizer, step,
          logits_bytes, stop_early) -> tuple[Tensor | None, Tensor | None]:
    """The forward, micro-batch by micro-batch: (entropies or None, weights or None if the arm is batch-global)."""
    layers = arm.capture_layers if arm.needs_attention else None
    per_row = not arm.batch_global
    B, T = batch.input_ids.shape
    entropies = torch.zeros(B, T, device=batch.input_ids.device) if arm.needs_entropy else None
    weights = batch.response_mask.float() if per_row else None
    was_training = model.training
    model.eval()
    try:
        for idx in split_rows(torch.arange(B, device=batch.input_ids.device), micro_batch_size):
            cols = active_columns(batch.attention_mask[idx])
            view = batch.inputs_of(idx, cols)
            out = teacher_forced_pass(model, view.input_ids, view.attention_mask, capture_layers=layers,
                                      capture_heads=getattr(arm, "capture_heads", "mean"),
                                      temperature=logprob_temperature(temperature), stats_mask=view.response_mask,
                                      token_stats=arm.needs_entropy, logits_chunk_bytes=logits_bytes,
                                      stop_early=stop_early)
            pos = torch.arange(T, device=idx.device)[cols]
            if entropies is not None:
                entropies[idx[:, None], pos] = out.entropy
            if per_row:
                part = weights_from_pass(arm, view, out.attn, out.entropy, tokenizer=tokenizer, step=step)
                weights[idx[:, None], pos] = part.weights
                merge_metrics(metrics, part.metrics, len(idx) / B)
    finally:
        model.train(was_training)
    return entropies, weights


def weights_from_pass(arm, batch: RolloutBatch, attn: Tensor | None, entropies: Tensor | None = None, *,
                      tokenizer=None, step: int | None = None) -> Credit:
    """The arm on a batch whose forward outputs are known (the map of its layers, entropies): its
    weights and stats. A non-finite map ranks nothing: all-ones weights, counted in credit/nonfinite_frac."""
    if attn is not None and not bool(torch.isfinite(attn).all()):
        return Credit(batch.response_mask.float(), {"credit/nonfinite_frac": 1.0})
    batch.attn, batch.entropies = attn, entropies
    arm.apply(batch, tokenizer=tokenizer, step=step)
    return Credit(batch.weights_or_ones().float(), {**batch.metrics, "credit/nonfinite_frac": 0.0})


def merge_metrics(total: dict[str, float], part: dict[str, float], share: float) -> None:
    """Add one micro-batch's credit metrics: means weighted by its share of rows, `*seconds` summed."""
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v) * (1.0 if k.endswith("seconds") else share)
