"""The memory planner: shapes against real models, phase arithmetic, `flowtracer plan`, fit's refusal."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ROOT, write_config
from tiny import tiny_model

from flowtracer.cli import main
from flowtracer.memory.planner import SHAPES, RunSpec, auto_rows, plan, resident_bytes, resolve_shape, shape_from_config


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shape_counts_the_parameters_of_a_real_model(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    shape = shape_from_config(model.config)
    norms = sum(p.numel() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n)
    assert shape.params == sum(p.numel() for p in model.parameters()) - norms  # qk-norms: 2 x head_dim per layer
    targets = ["q_proj", "v_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    assert shape.lora_params(4, targets) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_named_shapes_match_the_published_sizes():
    assert SHAPES["qwen3-4b"].params == pytest.approx(4.02e9, rel=0.01)
    assert SHAPES["qwen3-1.7b"].params == pytest.approx(1.72e9, rel=0.01)
    assert SHAPES["qwen3-0.6b"].params == pytest.approx(0.596e9, rel=0.01)
    assert SHAPES["qwen3-4b"].kv_bytes_per_token(2) == 144 * 1024  # 36 layers x 8 KV heads x 128 x (K, V) x 2 B
    assert resolve_shape("Qwen/Qwen3-4B-Base") is SHAPES["qwen3-4b"]
    with pytest.raises(ValueError, match="--shape"):
        resolve_shape("no/such-model")


def test_phases_follow_the_knobs():
    shape = SHAPES["qwen3-4b"]
    run = RunSpec(rollouts=512, num_generations=8, prompt_tokens=256, max_new_tokens=1024, micro_batch_size=8)
    whole, chunked = plan(shape, run), plan(shape, dataclasses.replace(run, generation_batch_size=64))
    kv = 512 * 1280 * 144 * 1024
    assert whole.parts["kv_cache/chunk"] == kv and chunked.parts["kv_cache/chunk"] == kv / 8
    assert whole.phases["generate"] > chunked.phases["generate"]
    ckpt = plan(shape, dataclasses.replace(run, gradient_checkpointing=True)).phases["update"]
    no_ckpt = plan(shape, dataclasses.replace(run, gradient_checkpointing=False)).phases["update"]
    assert ckpt < no_ckpt
    flow = plan(shape, run).phases["flow"] - sum(resident_bytes(shape, run))
    assert flow == (4 + 8) * 8 * 1280**2  # float32 map + float64 solve of one micro-batch
    lora, full = resident_bytes(shape, run), resident_bytes(shape, dataclasses.replace(run, lora_r=None))
    assert full[1] == 3 * shape.params * 2 and lora[1] < full[1] / 100
    budget = 80 * 2**30
    rows = auto_rows(shape, run, budget, sum(lora))
    assert rows % 8 == 0 and 8 <= rows < 512
    auto = plan(shape, dataclasses.replace(run, generation_batch_size="auto"), budget)
    assert auto.generation_rows == rows and auto.phases["generate"] <= 0.9 * budget


def test_plan_tool_prints_every_phase(capsys):
    main(["plan", "--config", str(ROOT / "experiments/paper/qwen3_4b_dapo_1k.yaml"), "--memory-gb", "80"])
    out = capsys.readouterr().out
    for word in ("weights", "kv_cache/chunk", "activations(update)", "flow_solve(float64)", "generate",
                 "update", "rows per generate call", "generated tokens per step", "80.0 GiB", "fits"):
        assert word in out, word
    with pytest.raises(SystemExit) as done:
        main(["plan", "--config", str(ROOT / "experiments/quickstart.yaml"), "--shape", "gpt-17"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.startswith("flowtracer plan: error:") and "--shape" in err


def test_fit_refuses_a_config_over_the_device_memory(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("FLOWTRACER_MEMORY_GB", "0.001")  # 1 MiB: the tiny model's update does not fit
    cfg = write_config(tmp_path, tiny_model_dir, steps=1)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(cfg), "--model.sampling.max_new_tokens", "200"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowtracer: error: the planned peak memory") and "model." in err[-1], err[-1]
    assert not (tmp_path / "logs").exists()


def test_fit_resolves_auto_generation_batch_size(tiny_model_dir):
    from flowtracer.config import SamplingConfig
    from flowtracer.data import PromptDataModule
    from flowtracer.train.module import GRPOModule
    from flowtracer.train.preflight import check_memory

    module = GRPOModule(model=tiny_model_dir, sampling=SamplingConfig(num_generations=4, generation_batch_size="auto"),
                        val_sampling=SamplingConfig(num_generations=2, generation_batch_size="auto"))
    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_size=4, prompts_per_step=2)
    dm.setup("fit")
    module.configure_model()
    check_memory(module, dm, 1, (), torch.device("cpu"))
    assert module.sampling.generation_batch_size == 8  # both prompts' rows fit in one call
    assert module.val_sampling.generation_batch_size == 32 * 2  # val_batch_size (default 32) x k
