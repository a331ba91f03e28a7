"""Cached 16-bit copies of frozen weights, for bf16 rollouts and for linear layers under autocast.

`cast(p, dtype)`: `p` in `dtype`. A frozen parameter's copy is made once and kept as long as the
parameter lives and is unchanged (its version counter), so a LoRA base is cast once per run; a
trainable parameter is cast on every call. flowtracer.generation.precision swaps these copies in
for a rollout.

`autocast_linears(model)`: inside this block, under an active CPU autocast, every frozen
`nn.Linear` multiplies with the cached copy of its weight in the autocast dtype. Autocast would
otherwise cast the same float32 weight again on every call (Lightning's autocast keeps no cast
cache, and autocast never caches frozen weights): on a CPU, memory traffic of the order of the
bf16 matmuls themselves. The numbers are identical: autocast rounds the same weight to the same
dtype. Trainable layers (LoRA adapters, full fine-tuning) are left to autocast, and so is
everything on a GPU (casts are cheap there, and sharded weights (FSDP) must not be cached).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# id(frozen parameter) -> (version, copy); the entry goes when the parameter is collected. (Not a
# WeakKeyDictionary: its key comparison would call Tensor.__eq__.)
_CACHE: dict[int, tuple[int, Tensor]] = {}


def cast(p: Tensor, dtype: torch.dtype) -> Tensor:
    """`p` (detached) in `dtype`, from the cache when `p` is frozen and unchanged."""
    if p.requires_grad or p.is_inference():  # trainable (changes every step), or made for one call: not kept
        return p.detach().to(dtype)
    hit = _CACHE.get(id(p))
    if hit is not None and hit[0] == p._version and hit[1].dtype == dtype:
        return hit[1]
    with torch.no_grad():
        low = p.detach().to(dtype)
    if id(p) not in _CACHE:
        weakref.finalize(p, _CACHE.pop, id(p), None)
    _CACHE[id(p)] = (p._version, low)
    return low


def _linear(layer: torch.nn.Linear, dtype: torch.dtype):
    def forward(x: Tensor) -> Tensor:
        return F.linear(x, cast(layer.weight, dtype), layer.bias)

    return forward


@contextlib.contextmanager
def autocast_linears(model: torch.nn.Module) -> Iterator[int]:
    """Inside this block frozen float32 `nn.Linear` layers use cached weight copies in the active
    CPU autocast dtype (see the module docstring); yields how many layers (0 without it)."""
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    on = device == "cpu" and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if on else None
    layers = [m for m in model.modules() if on and type(m) is torch.nn.Linear and not m.weight.requires_grad
              and m.weight.dtype == torch.float32]
    with patched_forwards(layers, lambda layer: _linear(layer, dtype)):
        yield len(layers)


@contextlib.contextmanager
def patched_forwards(layers: list[torch.nn.Module], make_forward) -> Iterator[None]:
    """Give each layer the instance forward `make_forward(layer)` inside the block; the class's own
    forward is back afterwards, even on an exception (shared by the CPU linear fast paths)."""
    for layer in layers:
        layer.forward = make_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
