"""Attention for bf16/fp16 tensors on a CPU: the `sdpa` kernel, run in float32.

torch's CPU flash-attention kernel is several times slower in bf16 than in float32 (decode
steps and training alike; docs/generation-and-memory.md has the measurement), while upcasting q,
k and v to float32 costs a few percent. So on a CPU, half-precision inputs are upcast, attention
runs in float32 (with autocast off) and the output goes back to the value's dtype; float32 inputs
and any CUDA tensor pass straight to transformers' sdpa. The result is sdpa's, computed more
precisely: the bf16 rounding of q, k and v stays, the softmax and both products do not round.

`load_policy` selects it (`NAME`, registered in transformers' AttentionInterface) for a model
loaded with `attn_implementation: sdpa`; the attention capture (flowtracer.model.capture) wraps
the same function.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_cpu_fp32"
_HALF = (torch.bfloat16, torch.float16)


def sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention; on a CPU, half-precision inputs computed in float32."""
    if query.device.type != "cpu" or (query.dtype not in _HALF and value.dtype not in _HALF):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out_dtype = value.dtype if value.dtype in _HALF else query.dtype
    if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(out_dtype), weights


AttentionInterface.register(NAME, sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
