"""The planner models the chosen precision: bf16 rollouts, autocast, and `flowtracer plan` reading them."""

from __future__ import annotations

import dataclasses

import yaml
from conftest import ROOT

from flowtracer.memory.planner import SHAPES, RunSpec, forward_bytes, generation_bytes, plan, resident_bytes
from flowtracer.tools.plan import runspec_from_config

SHAPE = SHAPES["qwen3-1.7b"]
F32 = RunSpec(rollouts=64, max_new_tokens=1024, dtype="float32", micro_batch_size=8, accelerator="cuda")


def test_bf16_rollouts_halve_the_kv_cache_and_keep_a_copy_of_the_frozen_weights():
    bf16 = dataclasses.replace(F32, sampler_dtype="bfloat16")
    p32, p16 = plan(SHAPE, F32), plan(SHAPE, bf16)
    assert p16.parts["kv_cache/chunk"] == p32.parts["kv_cache/chunk"] / 2
    frozen = SHAPE.params - SHAPE.target_params(F32.lora_targets)
    assert sum(resident_bytes(SHAPE, bf16)) - sum(resident_bytes(SHAPE, F32)) == frozen * 2
    # the merged adapted layers are cast for the call as well, and the sampler's log-probs recorded
    extra = generation_bytes(SHAPE, bf16, 64) - generation_bytes(SHAPE, F32, 64)
    assert extra < 0 and p16.phases["generate"] < p32.phases["generate"]


def test_autocast_shrinks_activations_and_caches_frozen_weights():
    mixed = dataclasses.replace(F32, autocast=True, sampler_dtype="bfloat16", accelerator="cpu")
    f32 = dataclasses.replace(F32, accelerator="cpu")
    assert forward_bytes(SHAPE, mixed, True) < forward_bytes(SHAPE, f32, True)
    assert sum(resident_bytes(SHAPE, mixed)) - sum(resident_bytes(SHAPE, f32)) == SHAPE.params * 2
    full = dataclasses.replace(mixed, lora_r=None, sampler_dtype=None)  # full fine-tuning: nothing frozen to cache
    assert resident_bytes(SHAPE, full) == resident_bytes(SHAPE, dataclasses.replace(full, autocast=False))


def test_plan_tool_reads_trainer_precision_and_sampling_dtype():
    cfg = yaml.safe_load(open(ROOT / "experiments/lora/qwen3_4b_dapo_1k.yaml"))
    cfg["model"]["model_dtype"] = "float32"
    cfg["trainer"]["precision"] = "bf16-mixed"
    _, run, _ = runspec_from_config(cfg, 256)
    assert run.autocast and run.sampler == "bfloat16"  # auto on a GPU config: bf16 rollouts
    cfg["model"].setdefault("sampling", {})["dtype"] = "float32"
    assert runspec_from_config(cfg, 256)[1].sampler == "float32"
    cfg["trainer"]["precision"] = "32-true"
    cfg["model"]["sampling"]["dtype"] = "auto"
    _, run, _ = runspec_from_config(cfg, 256)
    assert not run.autocast and run.sampler == "float32" and not run.recasts
