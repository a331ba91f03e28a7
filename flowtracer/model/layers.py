"""The `layers` knob of the attention map: presets, validation and resolution (the one home of both).

A selection is a preset name or a list of layer indices. `check_layers` validates the knob when an
arm is built (no model yet); `resolve_layers` turns it into indices once the depth is known.
Pure Python: no torch, transformers or Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence

LAYER_PRESETS = ("early", "middle", "late", "all")
HEADS = ("mean", "max")  # how a layer's query heads are aggregated (flowtracer.model.capture); the first is the default
_FIX = "use 'middle' (the paper's default), 'early', 'late', 'all' or a list of layer indices like [2, 3]"


def check_layers(layers: str | Sequence[int]) -> str | list[int]:
    """Validate a `layers` knob without a model: a preset name or a non-empty list of ints."""
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"layers = {layers!r} is not a preset; {_FIX}")
        return layers
    try:
        out = list(layers)
    except TypeError:
        raise ValueError(f"layers = {layers!r} is neither a preset nor a list; {_FIX}") from None
    if not out or not all(isinstance(i, int) and not isinstance(i, bool) for i in out):
        raise ValueError(f"layers = {layers!r} must be a non-empty list of ints; {_FIX}")
    return out


def resolve_layers(spec: str | Sequence[int] | range, num_layers: int) -> list[int]:
    """Turn a layer selection into a sorted list of layer indices.

    ``"middle"`` = [floor(L/3), floor(2L/3)) (the paper's default), ``"early"`` = [0, floor(L/3)),
    ``"late"`` = [floor(2L/3), L), ``"all"`` = [0, L), or an explicit list/range of indices in
    [0, L). Duplicates count once (a layer is never averaged in twice).
    """
    L = int(num_layers)
    if isinstance(spec, str):
        check_layers(spec)
        bounds = {"early": (0, L // 3), "middle": (L // 3, 2 * L // 3), "late": (2 * L // 3, L), "all": (0, L)}
        layers = list(range(*bounds[spec]))
        if not layers:
            raise ValueError(f"layers = {spec!r} selects no layer of a {L}-layer model; pass explicit indices")
        return layers
    try:
        layers = sorted({int(i) for i in spec})
    except TypeError:
        raise ValueError(f"layers = {spec!r} is neither a preset nor a list of ints; {_FIX}") from None
    if not layers:
        raise ValueError("layers is an empty list; pass None to skip the attention capture")
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has {L} layers, valid indices are 0..{L - 1}")
    return layers
