"""Rebuild a run's policy from its checkpoint and config (shared by `flowtracer eval` and `export`).

A checkpoint holds only the trainable tensors (LoRA adapters, or every weight under full
fine-tuning) plus optimizer state; the base model and the LoRA settings come from the run's
resolved config.yaml, which `fit` writes into the run folder beside checkpoints/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from flowtracer.data import PromptDataModule
from flowtracer.errors import InputError
from flowtracer.runs.checkpoints import UnsafeCheckpointError, load_checkpoint_file
from flowtracer.train.module import GRPOModule


def run_dir_of(ckpt_path: str | os.PathLike) -> Path:
    """<run> for <run>/checkpoints/<name>.ckpt (the checkpoint's own folder otherwise)."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {path} does not exist; pass --config with the run's config.yaml")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise InputError(f"config {path} is not a mapping of keys (trainer, model, data)")
    return cfg


def merged_configs(paths: list[str]) -> dict[str, Any]:
    """Several configs read in order, later keys overriding earlier ones (dicts merged deeply),
    as `flowtracer fit --config a.yaml --config b.yaml` does."""
    out: dict[str, Any] = {}
    for path in paths:
        _merge(out, read_config(path))
    return out


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def run_config(ckpt_path: str | os.PathLike, given: str | None = None) -> dict[str, Any]:
    """The config a checkpoint was trained with: `given`, else <run>/config.yaml."""
    path = Path(given) if given else run_dir_of(ckpt_path) / "config.yaml"
    if not given and not path.is_file():
        raise InputError(f"{path} is missing (the run folder of {ckpt_path} has no config.yaml); "
                         "pass --config with the config the run was trained with")
    return read_config(path)


def instantiate(cfg: dict[str, Any]):
    """(GRPOModule, PromptDataModule) from the `model` and `data` sections of a fit config.

    Parsed by jsonargparse exactly as `flowtracer fit` does (defaults, dataclasses, types); the
    model weights are not loaded yet (`module.configure_model()` does).
    """


    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GRPOModule, "model")
    parser.add_class_arguments(PromptDataModule, "data")
    try:
        parsed = parser.parse_object({"model": cfg.get("model") or {}, "data": cfg.get("data") or {}})
    except ArgumentError as exc:
        raise InputError(f"config: {' '.join(str(exc).split())} (`flowtracer fit --print_config` lists every "
                         "key and its type)") from exc
    init = parser.instantiate_classes(parsed)
    return init.model, init.data


def load_checkpoint_into(module, ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """Load the checkpoint's trainable tensors into `module.policy`; returns the checkpoint's
    flowtracer state (rl_step, ...). Every trainable tensor must be in the checkpoint."""

    path = Path(ckpt_path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; pass <run>/checkpoints/last.ckpt")
    try:
        ckpt = load_checkpoint_file(path)  # weights and settings only: a crafted pickle is refused unrun
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a text file, a truncated zip: not a torch file at all
        raise InputError(f"{path} is not a checkpoint (torch.load: {type(exc).__name__}); "
                         "pass <run>/checkpoints/last.ckpt") from exc
    if not isinstance(ckpt, dict):
        raise InputError(f"{path} is a torch file but not a checkpoint (no state_dict); "
                         "pass <run>/checkpoints/last.ckpt")
    state = ckpt.get("state_dict") or {}
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    result = module.load_state_dict(state, strict=False)
    missing = sorted(trainable - set(state))
    if result.unexpected_keys or missing:
        raise InputError(
            f"{path} does not fit the model of its config ({len(result.unexpected_keys)} unexpected, "
            f"{len(missing)} missing tensors, e.g. {(result.unexpected_keys or missing)[0]}); pass --config "
            "with the config the run was trained with (same model and lora settings)")
    return dict(ckpt.get("flowtracer") or {})
