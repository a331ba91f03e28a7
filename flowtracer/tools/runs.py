"""Rebuild a run's policy from its checkpoint and config: the one loader of `flowtracer eval` and `export`.

A checkpoint holds only the trainable tensors (LoRA adapters, or every weight under full
fine-tuning) plus optimizer state and the settings it was trained with. The rules, the same for
both commands:
  --ckpt_path  a checkpoint file, or a run folder (lightning_logs/<name>/version_N: its
               checkpoints/last.ckpt);
  the model    (base model, LoRA settings) comes from the run's resolved config.yaml beside
               checkpoints/, else from the settings the checkpoint itself holds (a copied
               last.ckpt), else from --config; a checkpoint that does not fit them is refused.
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


def checkpoint_file(ckpt_path: str | os.PathLike) -> Path:
    """--ckpt_path as a file: itself, or for a run folder its checkpoints/last.ckpt."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for found in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if found.is_file():
                return found
        raise InputError(f"--ckpt_path {path} is a folder without checkpoints/last.ckpt; pass a run folder "
                         "(lightning_logs/<name>/version_N) or a .ckpt file")
    if not path.is_file():
        raise InputError(f"--ckpt_path {path} does not exist; pass a run folder (lightning_logs/<name>/version_N) "
                         "or its checkpoints/last.ckpt")
    return path


def run_dir_of(ckpt_path: str | os.PathLike) -> Path:
    """<run> for <run>/checkpoints/<name>.ckpt (the checkpoint's own folder otherwise)."""
    path = Path(ckpt_path).expanduser().resolve()
    if path.is_dir():  # --ckpt_path at the run folder itself
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p) for p in path.glob("*.yaml"))
        hint = f" ({', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})" if inside else ""
        raise InputError(f"--config {path} is a folder; pass one of its YAML files{hint}")
    if not path.is_file():
        raise InputError(f"config {path} does not exist; pass --config with the run's config.yaml")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"config {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
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


def run_config(ckpt_path: str | os.PathLike, given: list[str] | str | None = None) -> tuple[dict[str, Any], str]:
    """(config, where it came from) of the model a checkpoint was trained with: <run>/config.yaml,
    else the settings the checkpoint holds, else `given` (--config)."""
    beside = run_dir_of(ckpt_path) / "config.yaml"
    if beside.is_file():
        return read_config(beside), str(beside)
    saved = _saved_settings(checkpoint_file(ckpt_path))
    if saved is not None:
        return saved, f"the settings saved in {ckpt_path}"
    given = [given] if isinstance(given, str) else list(given or [])
    if given:
        return merged_configs(given), " + ".join(given)
    raise InputError(f"{ckpt_path}: no config.yaml beside its checkpoints/ folder and no settings inside it; "
                     "pass --config with the config the run was trained with")


def _saved_settings(path: Path) -> dict[str, Any] | None:
    """The model and data settings Lightning stored in a checkpoint (save_hyperparameters), as a config."""
    try:
        ckpt = load_checkpoint_file(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:  # not a torch file: load_checkpoint_into says so
        return None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("hyper_parameters"), dict):
        return None

    def plain(section: Any) -> dict[str, Any]:
        return {k: v for k, v in dict(section or {}).items() if not k.startswith("_")}

    return {"model": plain(ckpt["hyper_parameters"]), "data": plain(ckpt.get("datamodule_hyper_parameters"))}


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

    path = checkpoint_file(ckpt_path)
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
