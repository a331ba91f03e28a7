"""Verifiers by name, for configs: ``get_verifier("math", extraction=["boxed"])``."""

from __future__ import annotations

from typing import Any

from flowtracer.rewards.countdown import CountdownVerifier
from flowtracer.rewards.math_verifier import MathVerifier
from flowtracer.rewards.rgym import ReasoningGymVerifier

VERIFIERS: dict[str, type] = {
    "math": MathVerifier,
    "countdown": CountdownVerifier,
    "reasoning_gym": ReasoningGymVerifier,
}


def get_verifier(name: str, **kwargs: Any):
    """Build the verifier registered under `name` with `kwargs`; ValueError lists valid names."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; valid names: {', '.join(VERIFIERS)}")
    return VERIFIERS[name](**kwargs)
