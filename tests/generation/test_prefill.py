"""Rollout generation: one shared prefill per prompt gives the same rollouts as G separate ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from flowtracer.config import SamplingConfig
from flowtracer.generation import generate
from flowtracer.generation.sampler import row_seeds

# different lengths, so the batch is left-padded and the shared cache must line up with the padding
PROMPTS = ["What is 2 + 3?", "Add 17 and 5, then tell me the sum please.", "1+1"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sampled", [False, True])
def test_shared_prefill_gives_the_same_rollouts(arch, sampled):
    model, tok = tiny_model(arch), tiny_tokenizer()
    model.eval()
    base = SamplingConfig(num_generations=3, max_new_tokens=8, temperature=1.0 if sampled else 0.0, engine="hf")
    seeds = row_seeds(0, 0, list(range(len(PROMPTS))), 3) if sampled else None  # same draws both ways
    out = {}
    for share in (False, True):
        sampling = dataclasses.replace(base, share_prompt_prefill=share)
        out[share] = generate(model, tok, PROMPTS, [None] * len(PROMPTS), sampling, row_seeds=seeds)
    a, b = out[False], out[True]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.responses == b.responses
    assert a.response_mask.sum() > 0


def test_shared_prefill_calls_the_model_once_per_prompt_for_the_prompt():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.eval()
    rows_seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows_seen.append(tuple(i[0].shape)))
    try:
        generate(model, tok, PROMPTS[:2], [None, None],
                 SamplingConfig(num_generations=4, max_new_tokens=2, temperature=0, engine="hf"))
    finally:
        hook.remove()
    prefill, first = rows_seen[0], rows_seen[1]
    assert prefill[0] == 2 and prefill[1] > 1  # the prompts once each, all but their last token
    assert first == (8, 1)  # then G rows decode from the last prompt token on
