"""flowtracer.model.casts and flowtracer.model.cpu_attention: faster bf16 on a CPU, the same numbers."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from flowtracer.model import cpu_attention
from flowtracer.model.casts import autocast_linears


def _lora_model():
    model = get_peft_model(tiny_model("llama", seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # non-zero B, so the adapters change the output and get gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_autocast_linears_change_nothing_but_the_casts():
    """Under autocast, frozen linears using cached bf16 weights give the same outputs and the same
    adapter gradients as autocast casting them itself; without autocast the block does nothing."""
    model = _lora_model()
    ids = torch.randint(3, 90, (2, 16))
    results = []
    for cached in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            if cached:
                with autocast_linears(model) as n:
                    out = model(input_ids=ids).logits
                assert n == sum(1 for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad)
            else:
                out = model(input_ids=ids).logits
        out.float().square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for k in results[0][1]:
        assert torch.equal(results[0][1][k], results[1][1][k]), k
    with autocast_linears(model) as n:
        assert n == 0


def test_cpu_attention_runs_half_precision_in_float32_and_passes_float32_through():
    model = tiny_model("qwen3", seed=4)
    ids = torch.randint(3, 90, (2, 18))
    ref = model(input_ids=ids).logits
    model.set_attn_implementation(cpu_attention.NAME)
    assert torch.equal(model(input_ids=ids).logits, ref)  # float32: transformers' sdpa itself
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 8, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    out, _ = cpu_attention.sdpa_forward(module, q, k, v, None, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                            enable_gqa=True).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), atol=0, rtol=0)
