"""MKL-packed decoding (flowtracer.generation.cpu_linear): same products as F.linear, used only where it applies."""

from __future__ import annotations

import dataclasses

import torch
from tiny import tiny_model, tiny_tokenizer

from flowtracer.config import SamplingConfig
from flowtracer.generation import cpu_linear, generate
from flowtracer.generation.cpu_linear import packed_linears


def test_the_pinned_torch_build_has_packed_sgemm():
    # The project pins the x86 CPU wheel of torch, which ships MKL; every test below relies on it.
    assert cpu_linear.available()


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_decode_rows_use_packed_weights_and_match_plain_linear():
    model = tiny_model("llama").eval()
    ids = torch.randint(3, 60, (5, 1))  # a decode step: 5 rows x 1 token
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_linears(model, rows=5) as n:
            packed = model(input_ids=ids).logits
    assert n == len(_linears(model)) > 0
    assert all(cpu_linear._CACHE in m.__dict__ for m in _linears(model))  # the packed path ran everywhere
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    assert all("forward" not in m.__dict__ for m in _linears(model))  # the class forward is back


def test_other_row_counts_and_autograd_take_the_plain_path():
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(3, 16)
    with packed_linears(layer, rows=5):
        with torch.no_grad():
            other = layer(x)  # 3 rows, not 5
        assert cpu_linear._CACHE not in layer.__dict__
        x5 = torch.randn(5, 16)
        y = layer(x5)  # 5 rows, but under autograd with a trainable weight
        assert cpu_linear._CACHE not in layer.__dict__
    y.sum().backward()
    # d(sum y)/dW = 1^T x: every output row's gradient is the column sum of the input
    torch.testing.assert_close(layer.weight.grad, x5.sum(0).expand(24, 16))
    assert layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(other, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_a_changed_weight_is_repacked():
    layer = torch.nn.Linear(16, 24).requires_grad_(False)
    x = torch.randn(4, 2, 16)  # 8 rows over two leading dims
    with torch.no_grad(), packed_linears(layer, rows=8):
        first = layer(x)
        packed_before = layer.__dict__[cpu_linear._CACHE][3]
        layer.weight.mul_(2.0)  # an in-place optimizer-style update bumps the version counter
        second = layer(x)
        assert layer.__dict__[cpu_linear._CACHE][3] is not packed_before
        layer.weight = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)  # a replaced weight (merged LoRA)
        third = layer(x)
    for out in (first, second, third):
        assert out.shape == (4, 2, 24)
    torch.testing.assert_close(second - layer.bias, 2 * (first - layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_disabled_or_not_float32_is_a_no_op():
    model = tiny_model("llama")
    with packed_linears(model, rows=4, enabled=False) as n:
        assert n == 0
    with packed_linears(model.to(torch.bfloat16), rows=4) as n:
        assert n == 0


def test_greedy_generation_matches_with_and_without_packing():
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    prompts = ["What is 2 + 3?", "1+1", "Add 17 and 5."]
    on = SamplingConfig(num_generations=2, max_new_tokens=8, temperature=0.0, engine="hf")  # packing is hf's
    off = dataclasses.replace(on, cpu_packed_linear=False)
    a = generate(model, tok, prompts, [None] * 3, on)
    assert all(cpu_linear._CACHE in m.__dict__ for m in _linears(model))  # 6 decode rows went through packing
    b = generate(model, tok, prompts, [None] * 3, off)
    assert torch.equal(a.input_ids, b.input_ids)
