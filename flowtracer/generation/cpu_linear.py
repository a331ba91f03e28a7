"""Decoding on CPU with MKL-packed weights: the same float32 linear layers, a faster GEMM.

Why: at decode time every linear layer multiplies a handful of rows (the batch's rows x 1 token) by
its whole weight. For such shapes MKL's plain `sgemm` takes a slow path, and the same products
with the weight packed once for that row count (`cblas_sgemm_pack`, the op PyTorch's Inductor uses
for frozen CPU linears) are several times faster per layer. Measured gains: docs/performance.md.

How: inside `packed_linears(model, rows)`, every float32 `nn.Linear` on the CPU answers inputs of
exactly `rows` rows from a weight packed for that row count; any other input (prefill, a chunk of
another size) and anything under autograd goes to the plain `F.linear`. A packed weight is cached
on its layer and rebuilt when the weight tensor is replaced (merged LoRA each step) or changed in
place (its version counter), so frozen layers are packed once per run. Cost: the packed copies
take about twice the linear weights' memory (one row count cached per layer).

The products are the same up to float rounding (about 1e-5 relative, the difference between two
GEMM kernels), so sampled tokens match plain decoding except where two tokens were within that
rounding of each other. Off: `sampling.cpu_packed_linear: false`. Without MKL (e.g. ARM builds)
this is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from flowtracer.model.casts import patched_forwards

_CACHE = "_flowtracer_packed"  # layer attribute: (weight tensor, its version, rows, packed weight)


def available() -> bool:
    """Whether this torch build has MKL's packed sgemm (x86 builds with MKL)."""
    mkl = getattr(torch.ops, "mkl", None)
    return torch.backends.mkl.is_available() and hasattr(mkl, "_mkl_linear") and hasattr(
        mkl, "_mkl_reorder_linear_weight")


def _eligible(layer: torch.nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (type(layer) is torch.nn.Linear and isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor
            and w.device.type == "cpu" and w.dtype == torch.float32
            and (layer.bias is None or layer.bias.dtype == torch.float32))


def _packed_weight(layer: torch.nn.Linear, rows: int) -> torch.Tensor:
    weight = layer.weight
    # an inference tensor (a LoRA merge under `flowtracer validate`'s inference mode) has no version
    # counter and cannot change in place
    version = -1 if weight.is_inference() else weight._version
    cached = layer.__dict__.get(_CACHE)
    if cached is not None and cached[0] is weight and cached[1] == version and cached[2] == rows:
        return cached[3]
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    layer.__dict__[_CACHE] = (weight, version, rows, packed)
    return packed


def _forward(layer: torch.nn.Linear, rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // max(1, x.shape[-1])
        if (n != rows or x.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))):
            return F.linear(x, layer.weight, layer.bias)
        out = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), _packed_weight(layer, rows),
                                        layer.weight, layer.bias, rows)
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int, enabled: bool = True) -> Iterator[int]:
    """Inside this block the model's float32 CPU linear layers answer `rows`-row inputs from packed
    weights (see the module docstring). Yields the number of layers switched (0 = nothing to do)."""
    layers = [m for m in model.modules() if _eligible(m)] if enabled and rows > 0 and available() else []
    with patched_forwards(layers, lambda layer: _forward(layer, rows)):
        yield len(layers)

