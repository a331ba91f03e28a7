"""Chunked generation (flowtracer.generation): same rollouts as one call, less memory, engine seam."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from flowtracer.config import SamplingConfig
from flowtracer.generation import ENGINES, generate, register_engine
from flowtracer.generation.chunks import chunk_prompts
from flowtracer.generation.sampler import row_seeds
from flowtracer.memory.measure import measure_peak

# lengths 14, 42, 3, 25, 9: sorting reorders them, chunks have different prompt widths
PROMPTS = ["What is 2 + 3?", "Add 17 and 5, then tell me the sum please.", "1+1",
           "Compute 12 * 3 - 4 please", "9 - 4 = ?"]


def test_chunks_are_sorted_whole_groups_within_limits():
    lengths = [14, 42, 3, 25, 9]
    chunks = chunk_prompts(lengths, g=2, max_new_tokens=10, max_rows=4)
    assert chunks == [[2, 4], [0, 3], [1]]  # shortest first, 2 prompts x G=2 rows each
    by_tokens = chunk_prompts(lengths, g=2, max_new_tokens=10, token_budget=2 * 2 * (25 + 10))
    assert all(len(c) * 2 * (max(lengths[i] for i in c) + 10) <= 140 for c in by_tokens if len(c) > 1)
    assert sorted(i for c in by_tokens for i in c) == list(range(5))
    assert chunk_prompts(lengths, 2, 10, max_rows=1) == [[2], [4], [0], [3], [1]]  # one prompt at least
    assert chunk_prompts(lengths, 2, 10) == [[2, 4, 0, 3, 1]]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("sampled", [False, True])
def test_chunked_equals_one_call(arch, sampled):
    model, tok = tiny_model(arch), tiny_tokenizer()
    g = 3
    base = SamplingConfig(num_generations=g, max_new_tokens=10, temperature=1.0 if sampled else 0.0, top_k=20)
    seeds = row_seeds(0, 0, list(range(len(PROMPTS))), g) if sampled else None
    one = generate(model, tok, PROMPTS, [None] * len(PROMPTS), base, row_seeds=seeds)
    for size in (3, 7):  # one prompt per call; two prompts per call (7 rows -> 6)
        cfg = dataclasses.replace(base, generation_batch_size=size)
        got = generate(model, tok, PROMPTS, [None] * len(PROMPTS), cfg, row_seeds=seeds)
        assert got.prompt_len == one.prompt_len == max(len(p) for p in PROMPTS)
        for name in ("input_ids", "attention_mask", "prompt_mask", "response_mask", "question_mask", "truncated"):
            assert torch.equal(getattr(got, name), getattr(one, name)), name
        assert got.responses == one.responses
    assert one.response_mask.sum() > 0 and len(set(one.responses)) > 1
    # the layout: prompt i's rows hold prompt i, right-aligned at prompt_len
    row = tok.decode(one.input_ids[g][one.prompt_mask[g]])
    assert row == PROMPTS[1] and bool(one.prompt_mask[g, one.prompt_len - 1])


def test_token_budget_chunks_equal_one_call():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    base = SamplingConfig(num_generations=2, max_new_tokens=6, temperature=0.0)
    one = generate(model, tok, PROMPTS, [None] * 5, base)
    got = generate(model, tok, PROMPTS, [None] * 5, dataclasses.replace(base, generation_token_budget=100))
    assert torch.equal(got.input_ids, one.input_ids) and got.responses == one.responses


def _peak_bytes(model, tok, sampling) -> int:
    with measure_peak("cpu") as peak:  # RSS high-water mark of this process (flowtracer.memory.measure)
        generate(model, tok, PROMPTS * 6, [None] * 30, sampling)
    return peak.bytes


@pytest.mark.slow
def test_small_generation_batch_lowers_the_peak():
    # 30 prompts x 4 rows: the KV cache and logits of 120 rows dominate (measured ~145 MB vs ~17 MB)
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4)
    tok = tiny_tokenizer()
    base = SamplingConfig(num_generations=4, max_new_tokens=48, temperature=0.0, share_prompt_prefill=False)
    small = _peak_bytes(model, tok, dataclasses.replace(base, generation_batch_size=4))
    whole = _peak_bytes(model, tok, base)
    assert whole > 10 * 2**20 and small < 0.5 * whole, (small, whole)


def test_engine_seam_and_unknown_engine():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    calls = []

    @register_engine("test_constant")
    def constant(model, tokenizer, ids, g, sampling, row_seeds=None):
        calls.append(len(ids))
        new = torch.full((len(ids) * g, 3), tok.convert_tokens_to_ids("7"))
        new[:, -1] = tok.eos_token_id
        return new, torch.ones(len(ids) * g, dtype=torch.bool)

    try:
        cfg = SamplingConfig(num_generations=2, engine="test_constant", generation_batch_size=2)
        out = generate(model, tok, PROMPTS[:3], [None] * 3, cfg)
        assert calls == [1, 1, 1] and out.responses == ["77"] * 6
        assert out.response_mask.sum(1).tolist() == [3] * 6 and not out.truncated.any()
    finally:
        del ENGINES["test_constant"]
    with pytest.raises(ValueError, match="sampling.engine"):
        generate(model, tok, PROMPTS[:1], [None], SamplingConfig(num_generations=2, engine="nope"))
