"""Rollouts of a policy in training, and where each response token sits in its text.

`sample` is what the RL step, validation and eval call: `generate` (flowtracer.generation.chunks)
with the policy in eval mode, its LoRA adapters merged exactly for the call, and its weights in
the rollout precision `sampling.dtype` (flowtracer.generation.precision).
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from flowtracer.batch import Generated
from flowtracer.config import SamplingConfig
from flowtracer.generation.chunks import generate
from flowtracer.generation.precision import rollout_dtype
from flowtracer.model.policy import merged_lora


def response_token_offsets(tokenizer, token_ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each response token inside the decoded `text`.

    Fast path: re-tokenising the text usually reproduces the sampled ids, and then the tokenizer's
    own offsets are exact. Otherwise fall back to decoding growing prefixes (exact, slower).
    Special tokens (EOS) get the empty span (len(text), len(text)).
    """
    special = set(tokenizer.all_special_ids)
    body = [t for t in token_ids if t not in special]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] == body:
        body_offsets = [tuple(o) for o in enc["offset_mapping"]]
    else:
        prefixes = tokenizer.batch_decode([body[: j + 1] for j in range(len(body))],
                                          skip_special_tokens=True)
        ends = [len(p) for p in prefixes]
        body_offsets = list(zip([0] + ends[:-1], ends))
    it = iter(body_offsets)
    return [(len(text), len(text)) if t in special else next(it) for t in token_ids]


def sample(policy, tokenizer, prompts: list[str], question_spans: list[tuple[int, int] | None],
           sampling: SamplingConfig, *, row_seeds: Tensor | None = None, record_logprobs: bool = False) -> Generated:
    """`generate` from a policy in training: eval mode and LoRA merged exactly into the base weights
    for the call (one GEMM per adapted layer and token, not three), both restored afterwards.

    The weights are cast to `sampling.dtype` for the call ("auto" left unresolved, as outside
    `fit`, keeps them as they are) and autocast is off. Decoding runs under
    `torch.inference_mode` (no autograd bookkeeping per decode step); the returned tensors are
    cloned out of it, so the training forward can use them as ordinary tensors.
    """
    setting = getattr(sampling, "dtype", "auto")
    dtype = getattr(torch, setting) if setting != "auto" else None
    was_training = policy.training
    policy.eval()
    try:
        # the merged and cast weights are ordinary tensors even when the caller runs under inference
        # mode (`flowtracer validate`): they replace parameters, and casts of frozen ones are kept
        with torch.inference_mode(False), merged_lora(policy), rollout_dtype(policy, dtype):
            with torch.inference_mode():
                gen = generate(policy, tokenizer, prompts, question_spans, sampling, row_seeds=row_seeds,
                               record_logprobs=record_logprobs)
    finally:
        policy.train(was_training)
    for f in fields(gen):
        value = getattr(gen, f.name)
        if isinstance(value, Tensor):
            setattr(gen, f.name, value.clone())
    return gen
