"""Micro-batches of a step: views that own their outputs, the no-grad pre-pass, and reassembly.

A `MicroBatch` is rows `idx` of the step's RolloutBatch restricted to the columns some row uses.
Its view copies only the inputs (tokens, masks, rewards, advantages, texts); every output field
(old log-probs, entropies, attention map, token weights) starts empty and is filled from that
micro-batch's own forward. Nothing written for one micro-batch can reach another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowtracer.batch import RolloutBatch, active_columns, split_rows
from flowtracer.credit.weights import merge_metrics
from flowtracer.model.forward import TeacherForcedOutput, teacher_forced_pass
from flowtracer.model.policy import reference_mode


@dataclass
class MicroBatch:
    idx: Tensor  # (b,) row indices into the step's batch
    cols: slice  # the columns any of these rows uses
    view: RolloutBatch  # inputs of rows idx / columns cols; outputs empty

    @classmethod
    def of(cls, rollouts: RolloutBatch, idx: Tensor) -> MicroBatch:
        cols = active_columns(rollouts.attention_mask[idx])
        return cls(idx, cols, rollouts.inputs_of(idx, cols))

    def take(self, full: Tensor | None) -> Tensor | None:
        """This micro-batch's block of a step-level (B, T) tensor."""
        return None if full is None else full[self.idx][:, self.cols]


def forward(policy, mb: MicroBatch, *, temperature: float, capture_layers=None, with_grad: bool = False,
            logits_bytes: int | None = None, capture_heads: str = "mean",
            entropy_grad: bool = False, share_prefix: bool = True) -> TeacherForcedOutput:
    """The teacher-forced forward of one micro-batch, stats on its response tokens only
    (`entropy_grad`: the entropies keep their graph, for an entropy bonus; `share_prefix`: a prompt's
    rows run it once, flowtracer.model.prefix)."""
    v = mb.view
    return teacher_forced_pass(policy, v.input_ids, v.attention_mask, capture_layers=capture_layers,
                               capture_heads=capture_heads,
                               with_grad=with_grad, stats_mask=v.response_mask, temperature=temperature,
                               logits_chunk_bytes=logits_bytes, entropy_grad=entropy_grad, share_prefix=share_prefix)


@torch.no_grad()
def reference_logprobs(policy, mb: MicroBatch, *, temperature: float, logits_bytes: int | None,
                       share_prefix: bool = True) -> Tensor:
    """Log-probs of the reference policy (adapters off) for the KL term."""
    with reference_mode(policy):
        return forward(policy, mb, temperature=temperature, logits_bytes=logits_bytes,
                       share_prefix=share_prefix).logprobs


@dataclass
class Assembled:
    """(B, T) step-level tensors assembled from disjoint micro-batch blocks (zeros elsewhere)."""

    shape: tuple[int, int]
    parts: dict[str, list[tuple[Tensor, slice, Tensor]]] = field(default_factory=dict)

    def add(self, name: str, mb: MicroBatch, value: Tensor | None) -> None:
        if value is not None:
            self.parts.setdefault(name, []).append((mb.idx, mb.cols, value.detach().float()))

    def get(self, name: str, default: Tensor | None = None) -> Tensor | None:
        """The assembled tensor; rows no micro-batch gave a value hold `default` (zeros if None)."""
        parts = self.parts.get(name)
        if not parts:
            return None
        dev = parts[0][2].device
        out = torch.zeros(self.shape, device=dev) if default is None else default.to(dev, torch.float32).clone()
        for idx, cols, value in parts:
            out[idx.to(out.device)[:, None], torch.arange(self.shape[1], device=out.device)[cols]] = value
        return out


@dataclass
class PrePassResult:
    old_logprobs: Tensor
    entropies: Tensor
    ref_logprobs: Tensor | None
    token_weights: Tensor | None  # set by per-row callbacks that ran on its micro-batches
    token_scores: Tensor | None  # the scored arm's per-token scores, from the same callbacks
    metrics: dict[str, float]
    nonfinite_attention: int  # micro-batches whose map held NaN/inf (their callbacks did not run)
    credit_seconds: float  # of the pass's time: the map's recompute and the callbacks


@torch.no_grad()
def pre_pass(policy, rollouts: RolloutBatch, *, micro_batch_size: int, temperature: float, capture_layers,
             run_callbacks: Callable[[RolloutBatch], None] | None, with_reference: bool,
             logits_bytes: int | None, capture_heads: str = "mean", share_prefix: bool = True) -> PrePassResult:
    """No-grad teacher-forced pass, one micro-batch at a time, before the update.

    Each micro-batch: old log-probs and entropies (at `temperature`), the map if `capture_layers`,
    then `run_callbacks(view)` (the per-row credit arms) while its map is alive; reference
    log-probs when `with_reference`. The map is dropped before the next micro-batch.
    """
    was_training = policy.training
    policy.eval()
    acc = Assembled(tuple(rollouts.input_ids.shape))
    metrics: dict[str, float] = {}
    bad_maps, credit_seconds = 0, 0.0
    try:
        for idx in split_rows(torch.arange(rollouts.batch_size), micro_batch_size):
            mb = MicroBatch.of(rollouts, idx)
            out = forward(policy, mb, temperature=temperature, capture_layers=capture_layers, logits_bytes=logits_bytes,
                          capture_heads=capture_heads, share_prefix=share_prefix)
            acc.add("old", mb, out.logprobs)
            acc.add("entropy", mb, out.entropy)
            credit_seconds += out.attn_seconds
            if with_reference:
                acc.add("ref", mb, reference_logprobs(policy, mb, temperature=temperature, logits_bytes=logits_bytes,
                                                      share_prefix=share_prefix))
            if run_callbacks is None:
                continue
            mb.view.old_logprobs, mb.view.entropies, mb.view.attn = out.logprobs, out.entropy, out.attn
            if out.attn is not None and not bool(torch.isfinite(out.attn).all()):
                bad_maps += 1
                continue
            t0 = time.perf_counter()
            run_callbacks(mb.view)
            credit_seconds += time.perf_counter() - t0
            acc.add("weights", mb, mb.view.token_weights)
            acc.add("scores", mb, mb.view.token_scores)
            merge_metrics(metrics, mb.view.metrics, len(idx) / rollouts.batch_size)
    finally:
        policy.train(was_training)
    weights = acc.get("weights", default=rollouts.response_mask)  # rows no callback weighted: ones
    return PrePassResult(acc.get("old"), acc.get("entropy"), acc.get("ref"), weights, acc.get("scores"), metrics,
                         bad_maps, credit_seconds)

