"""`flowtracer plan`: predicted peak memory of each phase of a config's RL step, without weights.

    flowtracer plan --config experiments/lora/qwen3_4b_dapo_1k.yaml --memory-gb 80
    flowtracer plan --config experiments/quickstart.yaml              # this machine's GPU (or RAM)
    flowtracer plan --config X --shape qwen3-1.7b --prompt-tokens 300  # another model / prompt length

The model's shape comes from a named shape (qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b,
smollm2-135m; Qwen3 hub ids map to them), or a local folder's config.json; nothing is downloaded
and no weights are read. The memory model is flowtracer.memory.planner (the one `fit` checks against).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import yaml

from flowtracer.errors import InputError
from flowtracer.memory.planner import (
    GIB,
    HEADROOM,
    RunSpec,
    device_memory,
    largest_micro_batch,
    memory_fix,
    plan,
    resolve_shape,
)
from flowtracer.train.precision import MIXED, resolve

_ATTENTION_ARMS = ("FlowCredit", "AttentionCredit")


def runspec_from_config(cfg: dict, prompt_tokens: int) -> tuple[str, RunSpec, int]:
    """(model name, RunSpec, world size) from a parsed `flowtracer fit` YAML."""
    model, data, trainer = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("trainer") or {}
    sampling, optim = model.get("sampling") or {}, model.get("optim") or {}
    devices = trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(trainer.get("num_nodes", 1) or 1)
    lora = model.get("lora", {}) if "lora" in model else {}
    enabled = lora is not None and lora.get("enabled", True)
    g = int(sampling.get("num_generations", 8))
    arms = [str(cb.get("class_path", "")) for cb in (trainer.get("callbacks") or []) if isinstance(cb, dict)]
    run = RunSpec(
        rollouts=int(data.get("prompts_per_step", 8)) // world * g, num_generations=g,
        prompt_tokens=prompt_tokens, max_new_tokens=int(sampling.get("max_new_tokens", 48)),
        dtype=str(model.get("model_dtype", "float32")),
        lora_r=int(lora.get("r", 16)) if enabled else None,
        lora_targets=tuple(lora.get("target_modules") or ("q_proj", "k_proj", "v_proj", "o_proj")) if enabled else (),
        gradient_checkpointing=bool(model.get("gradient_checkpointing", False)),
        micro_batch_size=int(optim.get("micro_batch_size", 0)), mini_batches=int(optim.get("mini_batches", 1)),
        logits_budget_mb=float(model.get("logits_budget_mb", 512.0)),
        needs_attention=any(a.endswith(_ATTENTION_ARMS) for a in arms),
        generation_batch_size=sampling.get("generation_batch_size", 0),
        generation_token_budget=int(sampling.get("generation_token_budget", 0)),
        accelerator="cpu" if str(trainer.get("accelerator", "cpu")) == "cpu" else "cuda",
        **_precision(trainer, model))
    return str(model.get("model", "smollm2-135m-instruct")), run, world


def _precision(trainer: dict, model: dict) -> dict:
    """RunSpec's rollout dtype and autocast from trainer.precision and model.sampling.dtype, resolved
    as `fit` resolves them (flowtracer.train.precision) for this config's accelerator."""
    weights = str(model.get("model_dtype", "float32"))
    if weights not in ("float32", "bfloat16", "float16"):
        return {}
    precision = str(trainer.get("precision", "32-true"))
    precision = {"bf16": "bf16-mixed", "16": "16-mixed"}.get(precision, precision)
    device = "cpu" if str(trainer.get("accelerator", "cpu")) == "cpu" else "cuda"
    setting = str((model.get("sampling") or {}).get("dtype", "auto"))
    run = resolve(setting, precision, getattr(torch, weights), device)
    sampler = str(run.sampler).removeprefix("torch.")
    return {"sampler_dtype": None if sampler == weights else sampler, "autocast": precision in MIXED}


def report(name: str, run: RunSpec, world: int, budget: float | None, shape, where: str = "") -> list[str]:
    """The lines `flowtracer plan` prints; `where` says whose memory `budget` is."""
    p = plan(shape, run, budget)

    def gib(b):
        return f"{b / GIB:8.2f} GiB"

    lines = [f"model {name}: {shape.params / 1e9:.2f} B parameters, {shape.layers} layers, "
             f"KV cache {shape.kv_bytes_per_token(2 if run.dtype != 'float32' else 4) / 1024:.0f} KiB/token",
             f"per process ({world} process(es)): {run.rollouts} rollouts of <= {run.prompt_tokens} + "
             f"{run.max_new_tokens} tokens, micro-batch {run.micro}, {run.dtype} weights"
             f"{' under autocast' if run.autocast else ''}, rollouts in {run.sampler}, "
             f"{'LoRA r=' + str(run.lora_r) if run.lora_r else 'full fine-tuning'}, gradient checkpointing "
             f"{'on' if run.gradient_checkpointing else 'off'}, "
             f"attention capture {'on' if run.needs_attention else 'off'}",
             "", "component                        bytes"]
    lines += [f"  {k:<28}{gib(v)}" for k, v in p.parts.items()]
    lines += ["", "phase peak (resident + transient)"]
    lines += [f"  {k:<28}{gib(v)}" + ("   <- peak" if k == p.peak_phase else "") for k, v in p.phases.items()]
    lines += ["", f"generation: {p.generation_rows} rows per generate call "
                  f"({'auto' if isinstance(run.generation_batch_size, str) else 'as set'}), "
                  f"{-(-run.rollouts // p.generation_rows)} call(s) per step; "
                  f"<= {p.tokens_per_step:,} generated tokens per step per process"]
    if budget:
        fits = p.peak <= budget
        lines.append(f"device memory {budget / GIB:.1f} GiB ({where or 'given'}): peak {p.peak / GIB:.2f} GiB "
                     f"{'fits' if fits else 'DOES NOT FIT'} ({100 * p.peak / budget:.0f}%); largest micro_batch_size "
                     f"that fits: {largest_micro_batch(shape, run, budget)} (at {int(HEADROOM * 100)}% of the device)")
        if not fits:
            lines.append(f"does not fit: phase {p.peak_phase!r} needs {p.peak / GIB:.2f} GiB; "
                         f"{memory_fix(shape, run, p, budget)}")
    return lines


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="flowtracer plan", allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a `flowtracer fit` YAML")
    ap.add_argument("--shape", help="model shape or folder with config.json (default: the config's model)")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="longest prompt in tokens (default 256)")
    ap.add_argument("--memory-gb", type=float, help="device memory to check against (default: this "
                    "machine's GPU for gpu configs, its RAM for cpu configs or where it has no GPU)")
    args = ap.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    cfg = yaml.safe_load(path.read_text()) or {}
    name, run, world = runspec_from_config(cfg, args.prompt_tokens)
    shape = resolve_shape(args.shape or name)
    budget, where = _budget(args.memory_gb, run.accelerator)
    print("\n".join(report(args.shape or name, run, world, budget, shape, where)))
    return 0


def _budget(memory_gb: float | None, accelerator: str) -> tuple[float, str]:
    """(bytes, whose memory that is): --memory-gb, FLOWTRACER_MEMORY_GB, this machine's GPU, else its RAM."""
    if memory_gb is not None:
        if not memory_gb > 0:
            raise InputError(f"--memory-gb {memory_gb}: give the device memory in GB (> 0)")
        return memory_gb * GIB, "--memory-gb"
    if os.environ.get("FLOWTRACER_MEMORY_GB"):
        return device_memory(), "FLOWTRACER_MEMORY_GB"
    if accelerator == "cuda" and torch.cuda.is_available():
        return device_memory("cuda"), f"this machine's GPU 0, {torch.cuda.get_device_name(0)}"
    if accelerator == "cuda":
        return device_memory("cpu"), ("this machine's RAM: the config is for a GPU and there is none here; "
                                      "pass --memory-gb with the target GPU's memory")
    return device_memory("cpu"), "this machine's RAM"
