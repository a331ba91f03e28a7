"""The attention capture and the token statistics under CPU autocast bf16 (trainer.precision bf16-mixed)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from flowtracer.model.forward import teacher_forced_pass

# bf16 keeps 8 bits of mantissa: scores off by ~2^-8 relative, so probabilities off by ~1e-2 at most
# (softmax and the head/layer average run in float32; the average shrinks the error further).
MAP_ATOL, MAP_MEAN = 2e-2, 2e-3


def _batch(B=3, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :9] = 0  # a left-padded prompt
    mask[1, -6:] = 0  # a right-padded response
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("chunk", [None, 4096])  # one chunk, or many small ones (the masked columns path)
def test_captured_map_under_bf16_autocast_is_the_float32_map_within_bf16_tolerance(arch, chunk):
    model = tiny_model(arch, seed=1)
    ids, mask = _batch()
    ref = teacher_forced_pass(model, ids, mask, capture_layers="all", attn_chunk_bytes=chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher_forced_pass(model, ids, mask, capture_layers="all", attn_chunk_bytes=chunk)
    assert got.attn.dtype == torch.float32 and bool(torch.isfinite(got.attn).all())
    diff = (got.attn - ref.attn).abs()
    assert float(diff.max()) < MAP_ATOL and float(diff.mean()) < MAP_MEAN
    assert float(diff.max()) > 0  # bf16 really ran (a float32 recompute would match to 1e-6)
    valid = mask.bool()
    pair = valid[:, :, None] & valid[:, None, :]
    assert bool((got.attn[~pair] == 0).all())  # padding rows and columns exactly zero
    torch.testing.assert_close(got.attn.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-3, rtol=0)


def test_logprobs_and_entropies_under_autocast_are_float32_and_close():
    model = tiny_model("qwen3", seed=2)
    ids, mask = _batch()
    ref = teacher_forced_pass(model, ids, mask, capture_layers=None, temperature=0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher_forced_pass(model, ids, mask, capture_layers=None, temperature=0.7, with_grad=True)
    assert got.logprobs.dtype == got.entropy.dtype == torch.float32
    assert got.logprobs.requires_grad and not got.entropy.requires_grad
    torch.testing.assert_close(got.logprobs.detach(), ref.logprobs, atol=0.1, rtol=0)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=0.1, rtol=0)
    got.logprobs.sum().backward()  # the graph goes back through the bf16 projection
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
