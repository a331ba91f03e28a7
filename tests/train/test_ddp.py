"""Scale-out: `trainer.strategy=ddp`, 2 CPU processes (gloo) equal 1 process with the same global batch:
the training steps and the validation (whose metrics torchmetrics reduces across the processes)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, read_metrics, write_config

from flowtracer.cli import main

pytestmark = pytest.mark.slow  # each test launches 3-4 Python processes

# Timings differ between runs; everything else a step logs must match.
VOLATILE = ("time/", "throughput/", "credit/flow_seconds")
FIX = ROOT / "tests" / "fixtures" / "eval"
# 4 + 3 + 2 problems in batches of 2: 5 validation batches, so DDP pads rank 1 with a repeated batch
EVAL_SETS = {
    "aime": {"source": str(FIX / "aime_mini.jsonl"), "question_field": "problem", "k": 4, "pass_ks": [1, 2, 4],
             "verifier": "faulty_rewards:varied", "max_new_tokens": 12},
    "math": {"source": str(FIX / "math_mini.jsonl"), "question_field": "problem", "k": 1, "temperature": 0.0},
    "gsm": {"source": str(FIX / "gsm_mini.jsonl"), "k": 3, "math": False, "size": 2},
}


def _validation(version_dir) -> list[dict[str, float]]:
    """The logged validation rows (before training, then each validation), val/* values only."""
    rows = list(csv.DictReader(open(version_dir / "metrics.csv")))
    return [{k: float(v) for k, v in r.items() if k.startswith("val/") and v != ""}
            for r in rows if r.get("val/math_avg")]


def _fit(cfg, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "flowtracer.cli", "fit", "--config", str(cfg), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_ddp_two_processes_equal_one_process(tmp_path, tiny_model_dir):
    runs = {}
    for name, devices in (("single", 1), ("ddp", 2)):
        cfg = write_config(tmp_path / name, tiny_model_dir, steps=2)
        data = yaml.safe_load(cfg.read_text())
        data["trainer"].update({"devices": devices, "strategy": "ddp" if devices > 1 else "auto"})
        data["model"]["sampling"]["seed_per_prompt"] = True
        data["trainer"]["val_check_interval"] = 2  # validation before training and after step 2
        data["data"].update({"eval_sets": EVAL_SETS, "val_batch_size": 2})
        data["trainer"]["callbacks"] = [{"class_path": "flowtracer.credit.UniformCredit"}]
        data["data"]["prompts_per_step"] = 4  # global batch: 4 prompts x G=4; DDP: 2 prompts per process
        data["data"]["verifier"] = "faulty_rewards:varied"  # rewards with spread: real updates in step 1
        cfg.write_text(yaml.safe_dump(data))
        if devices == 1:  # the reference in this process (one launch, ~10 s of imports, fewer)
            assert main(["fit", "--config", str(cfg)]) == 0
        else:
            _fit(cfg)
        runs[name] = tmp_path / name / "logs" / "tiny" / "version_0"
    single, ddp = read_metrics(runs["single"]), read_metrics(runs["ddp"])
    assert sorted(single) == sorted(ddp) == [1, 2]
    assert single[1]["reward/std"] > 0 and single[2]["train/loss"] != 0  # the update really ran
    diffs = []
    for step in single:
        keys = {k for k in single[step] if not k.startswith(VOLATILE)}
        assert keys == {k for k in ddp[step] if not k.startswith(VOLATILE)}
        for k in sorted(keys):
            assert ddp[step][k] == pytest.approx(single[step][k], abs=1e-5), (step, k)
            diffs.append(abs(ddp[step][k] - single[step][k]))
    print(f"\nDDP (2 processes) vs 1 process: {len(diffs)} logged values over {len(single)} steps, "
          f"max |difference| {max(diffs):.2e}")  # shown with pytest -s; quoted in the README
    # validation: the same metrics from 2 processes (DDP pads with a repeated batch, counted once) as from 1
    val_single, val_ddp = _validation(runs["single"]), _validation(runs["ddp"])
    assert len(val_single) == len(val_ddp) == 2
    for a, b in zip(val_single, val_ddp):
        assert sorted(a) == sorted(b) and a == pytest.approx(b, abs=1e-12)
    assert {"val/aime/pass@2", "val/gsm/maj@3", "val/math/avg@1", "val/math_avg", "val/pass@1"} <= set(val_single[0])
    assert 0 < val_single[0]["val/aime/pass@4"] < 1  # the toy reward has spread
    # rank 0 wrote every process's rollouts, in prompt order
    a = [json.loads(x) for x in open(runs["single"] / "rollouts.jsonl")]
    b = [json.loads(x) for x in open(runs["ddp"] / "rollouts.jsonl")]
    assert ([(r["prompt"], r["response"], r["reward"]) for r in a]
            == [(r["prompt"], r["response"], r["reward"]) for r in b])
    assert not list(runs["ddp"].parent.glob("version_1"))  # one run folder, written by rank 0
    # the adapters moved (LoRA B starts at 0) and both runs moved them the same way
    states = {n: torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for n, r in runs.items()}
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in states["single"].items())
    for k, v in states["single"].items():
        torch.testing.assert_close(states["ddp"][k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_ddp_in_bf16_mixed_updates_and_logs_the_mismatch(tmp_path, tiny_model_dir):
    """bf16-mixed under DDP (gloo, 2 CPU processes): autocast in every process, bf16 rollouts where the
    CPU multiplies bf16 natively, finite losses, the same moved adapters on both ranks (checkpoint)."""
    cfg = write_config(tmp_path, tiny_model_dir, steps=2)
    data = yaml.safe_load(cfg.read_text())
    data["trainer"].update({"devices": 2, "strategy": "ddp", "precision": "bf16-mixed", "val_check_interval": 100})
    data["model"].update({"val_before_training": False})
    data["model"]["sampling"]["seed_per_prompt"] = True
    data["trainer"]["callbacks"] = [{"class_path": "flowtracer.credit.FlowCredit"}]
    data["data"].update({"prompts_per_step": 4, "verifier": "faulty_rewards:varied"})
    cfg.write_text(yaml.safe_dump(data))
    _fit(cfg)
    run = tmp_path / "logs" / "tiny" / "version_0"
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2] and metrics[1]["reward/std"] > 0
    assert all(abs(m["train/loss"]) < float("inf") and "train/mismatch/kl" in m for m in metrics.values())
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
