"""Verifiers by name, for configs: ``get_verifier("math", extraction=["boxed"])``."""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any

from flowtracer.errors import InputError
from flowtracer.rewards.countdown import CountdownVerifier
from flowtracer.rewards.math_verifier import MathVerifier
from flowtracer.rewards.rgym import ReasoningGymVerifier

VERIFIERS: dict[str, type] = {
    "math": MathVerifier,
    "countdown": CountdownVerifier,
    "reasoning_gym": ReasoningGymVerifier,
}


def get_verifier(name: str, **kwargs: Any):
    """Build the verifier registered under `name` with `kwargs`; ValueError lists valid names.

    ``"package.module:attr"`` names a user reward instead: a class is instantiated with `kwargs`;
    a function ``f(response, reference) -> float | Score`` is used as is (kwargs bound).
    """
    if ":" in name:
        return import_reward(name, kwargs)
    if name not in VERIFIERS:
        raise InputError(f"unknown verifier {name!r}; valid names: {', '.join(VERIFIERS)} "
                         "or 'package.module:function'")
    return VERIFIERS[name](**kwargs)


def import_reward(name: str, kwargs: dict, label: str = "reward"):
    """`package.module:function` (or a class, instantiated with `kwargs`) as a callable;
    `label` names the setting in the one-line error (e.g. "data.rewards[1].fn")."""
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{label} {name!r} could not be imported ({exc}); check the module is on "
                         "PYTHONPATH and the name after ':' exists") from exc
    if isinstance(obj, type):
        return obj(**kwargs)
    if not callable(obj):
        raise InputError(f"{label} {name!r} is a {type(obj).__name__}, not a function or class")
    return functools.partial(obj, **kwargs) if kwargs else obj


class VerifierCache:
    """A row's verifier (its `verifier` name and `verifier_kwargs`, default math), built once per kind."""

    def __init__(self):
        self._cache: dict = {}

    def __call__(self, row: dict):
        kwargs = row.get("verifier_kwargs", {})
        key = (row.get("verifier", "math"), json.dumps(kwargs, sort_keys=True))
        if key not in self._cache:
            self._cache[key] = get_verifier(key[0], **kwargs)
        return self._cache[key]
