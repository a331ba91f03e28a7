"""`flowtracer eval` on local fixture sets, validation during fit on eval sets, `flowtracer export`
round trips (logits and eval numbers), and the TensorBoard + CSV loggers. Tiny models, no network."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, brute_pass_at_k, write_config

from flowtracer.cli import main

FIX = ROOT / "tests" / "fixtures" / "eval"
EVAL_SETS = {
    # a sampled set with a toy reward that has spread, so pass@k' is not trivially 0
    "aime": {"source": str(FIX / "aime_mini.jsonl"), "question_field": "problem", "k": 4,
             "pass_ks": [1, 2, 3, 4], "verifier": "faulty_rewards:varied"},
    "math": {"source": str(FIX / "math_mini.jsonl"), "question_field": "problem", "k": 1,
             "temperature": 0.0, "extraction": ["boxed", "last_number"]},  # greedy
    "gsm": {"source": str(FIX / "gsm_mini.jsonl"), "k": 3, "math": False},
}


def eval_config(tmp_path: Path, model_dir: str, seeded: bool = True) -> Path:
    cfg = {"model": {"model": model_dir, "val_sampling": {"num_generations": 2, "max_new_tokens": 8,
                                                          "temperature": 1.0, "seed_per_prompt": seeded}},
           # eval never reads the training data (this id would need the network)
           "data": {"train_source": "hf:not-needed/by-eval", "val_batch_size": 3, "eval_sets": EVAL_SETS}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_eval(*args: str) -> None:
    try:
        main(["eval", *args])
    except SystemExit as done:  # the tools exit only on failure
        raise AssertionError(f"flowtracer eval exited {done.code}") from done


def test_fixture_eval_three_sets(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    run_eval("--config", str(eval_config(tmp_path, tiny_model_dir)), "--model", tiny_model_dir, "--out", str(out))
    printed = capsys.readouterr().out
    for name in EVAL_SETS:
        assert f"eval: {name}" in printed
    assert "math average" in printed
    result = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    for name, spec in EVAL_SETS.items():
        recs = [s for s in samples if s["set"] == name]
        m = result["sets"][name]
        assert m["n"] == len(recs) == len((FIX / Path(spec["source"]).name).read_text().splitlines())
        assert all(len(r["responses"]) == spec["k"] for r in recs)
        for kk in spec.get("pass_ks") or [kk for kk in (1, 2, 4) if kk < spec["k"]] + [spec["k"]]:
            want = np.mean([brute_pass_at_k(r["correct"], kk) for r in recs])
            assert m[f"pass@{kk}"] == pytest.approx(want, abs=1e-12)
        assert m[f"avg@{spec['k']}"] == pytest.approx(np.mean([r["correct"] for r in recs]))
    assert 0 < result["sets"]["aime"]["pass@4"] < 1  # the toy reward has spread
    greedy = [s for s in samples if s["set"] == "math"]
    assert result["math_sets"] == ["aime", "math"]
    assert result["math_avg"] == pytest.approx((result["sets"]["aime"]["avg@4"] + result["sets"]["math"]["avg@1"]) / 2)
    assert "| math average (aime, math) |" in (out / "eval.md").read_text() and greedy
    # per-row seeds: the responses do not depend on how prompts are batched
    run_eval("--config", str(eval_config(tmp_path, tiny_model_dir)), "--model", tiny_model_dir,
             "--out", str(tmp_path / "b1"), "--batch_size", "1")
    assert (tmp_path / "b1" / "eval_samples.jsonl").read_text() == (out / "eval_samples.jsonl").read_text()


def test_validation_during_fit_logs_every_set(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=1, eval_sets=EVAL_SETS)
    main(["fit", "--config", str(cfg), "--trainer.val_check_interval", "1"])
    rows = list(csv.DictReader(open(tmp_path / "logs" / "tiny" / "version_0" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v != ""}
    for key in ("val/aime/avg@4", "val/aime/pass@3", "val/aime/maj@4", "val/math/avg@1", "val/gsm/pass@2",
                "val/math_avg", "val/pass@1"):
        assert key in logged, key
    before = next(r for r in rows if r.get("val/math_avg"))  # step 0, before training
    assert float(before["val/pass@1"]) == pytest.approx(np.mean([float(before[f"val/{n}/avg@{s['k']}"])
                                                                 for n, s in EVAL_SETS.items()]))


def _fit_tiny(tmp_path: Path, model_dir: str, lora: bool = True) -> Path:
    """One real RL step with a reward that varies within groups; returns its last.ckpt."""
    cfg = write_config(tmp_path, model_dir, steps=1, verifier="faulty_rewards:varied")
    data = yaml.safe_load(cfg.read_text())
    data["model"]["val_before_training"] = False
    data["model"]["optim"]["lr"] = 1e-2
    if not lora:
        data["model"]["lora"] = None
    cfg.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(cfg)])
    run = tmp_path / "logs" / "tiny" / "version_0"
    metrics = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("reward/std")]
    assert float(metrics[0]["reward/std"]) > 0  # non-zero reward variance: there was a gradient
    return run / "checkpoints" / "last.ckpt"


def _trained_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from flowtracer.tools.runs import instantiate, load_checkpoint_into, run_config

    module, _ = instantiate(run_config(ckpt)[0])
    load_checkpoint_into(module, ckpt)
    with torch.no_grad():
        return module.policy.eval()(input_ids=ids).logits


def test_export_lora_round_trip_and_eval_agree(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = _fit_tiny(tmp_path, tiny_model_dir)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # adapters moved from 0
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(adapter)])
    main(["export", "--ckpt_path", str(ckpt), "--out", str(merged), "--merge"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()

    ids = torch.tensor([[5, 17, 40, 23, 9, 61, 33, 2]])
    want = _trained_logits(ckpt, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(untrained, want, atol=1e-4)  # training changed the function
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft, want, rtol=1e-5, atol=1e-5)

    cfg = str(eval_config(tmp_path, tiny_model_dir, seeded=False))  # HF's sampler, seeded per batch
    run_eval("--config", cfg, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "e_ckpt"))
    run_eval("--config", cfg, "--model", str(merged), "--out", str(tmp_path / "e_merged"))
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("e_ckpt", "e_merged"))
    assert a["sets"] == b["sets"] and a["math_avg"] == b["math_avg"]
    sa, sb = ((tmp_path / d / "eval_samples.jsonl").read_text() for d in ("e_ckpt", "e_merged"))
    assert sa == sb  # the very same responses, sample for sample

    # one loader for eval and export: the run folder, or a copied last.ckpt with no config.yaml
    # beside it (its model settings come from the checkpoint itself), give the same model
    copied = tmp_path / "copied" / "last.ckpt"
    copied.parent.mkdir()
    shutil.copy(ckpt, copied)
    run_eval("--config", cfg, "--ckpt_path", str(copied), "--out", str(tmp_path / "e_copied"))
    run_eval("--config", cfg, "--ckpt_path", str(ckpt.parent.parent), "--out", str(tmp_path / "e_folder"))
    for d in ("e_copied", "e_folder"):
        assert (tmp_path / d / "eval_samples.jsonl").read_text() == sa
    main(["export", "--ckpt_path", str(copied), "--out", str(tmp_path / "merged_copied"), "--merge"])
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_copied").eval()(input_ids=ids).logits
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_export_full_finetune_and_errors(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    ckpt = _fit_tiny(tmp_path, tiny_model_dir, lora=False)
    out = tmp_path / "full"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, _trained_logits(ckpt, ids), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "flowtracer_export.json").read_text())["kind"] == "full"
    with pytest.raises(SystemExit) as done:  # an existing folder is never overwritten
        main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    assert done.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")])
    assert done.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as done:  # a folder of configs: the message lists its YAML files
        main(["eval", "--config", str(ROOT / "experiments" / "eval"), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "is a folder; pass one of its YAML files" in err and "math.yaml" in err


def test_tensorboard_logger_writes_events_and_metrics_csv(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=1)
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(tmp_path / "logs"), "name": "tb"}}]
    data["model"]["val_before_training"] = False
    cfg.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(cfg)])
    runs = list((tmp_path / "logs" / "tb").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # CSV and TensorBoard share one run folder
    assert list(runs[0].glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(runs[0] / "metrics.csv")))
    assert any(r.get("reward/mean") for r in rows)


def test_eval_math_config_sets_parse_without_network():
    from flowtracer.tools.runs import instantiate, merged_configs

    _, data = instantiate(merged_configs([str(ROOT / "experiments" / "eval/math.yaml")]))
    specs = data.eval_specs
    assert set(specs) == {"aime24", "aime25", "amc23", "math500", "olympiadbench", "gsm8k"}
    assert specs["aime24"].k == specs["aime25"].k == 16 and not specs["gsm8k"].math
    assert all(s.source.startswith("hf:") for s in specs.values())


def test_csv_logger_added_to_any_logger_config(tmp_path):
    from flowtracer.train.lightning_cli import _SAFE_CSV, _ensure_csv_logger, _share_version

    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"project": "p", "name": "myrun", "save_dir": str(tmp_path), "version": "abc123"}}
    cfg = {"trainer": {"logger": wandb}}  # a single logger, not a list
    _ensure_csv_logger(cfg)
    _share_version(cfg)
    csv_lg, kept = cfg["trainer"]["logger"]
    assert csv_lg == {"class_path": _SAFE_CSV, "init_args": {"save_dir": str(tmp_path), "name": "myrun"}}
    assert kept["init_args"]["version"] == "abc123"  # a W&B run id is never rewritten
    (tmp_path / "myrun" / "version_3").mkdir(parents=True)
    tb = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
          "init_args": {"save_dir": str(tmp_path), "name": "myrun", "version": None}}
    cfg = {"trainer": {"logger": [tb]}}
    _ensure_csv_logger(cfg)
    _share_version(cfg)
    assert [lg["init_args"]["version"] for lg in cfg["trainer"]["logger"]] == [4, 4]  # one run folder
    off = {"trainer": {"logger": False}}
    _ensure_csv_logger(off)
    assert off["trainer"]["logger"] is False


def test_eval_response_stats_counts_what_the_table_hides(tmp_path):
    """scripts/eval_response_stats.py: per set, stopped vs cut off, closed \\boxed{} (nested braces too),
    refused and correct, from eval_samples.jsonl."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_response_stats", ROOT / "scripts/eval_response_stats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    records = [
        {"set": "a", "responses": ["so \\boxed{\\frac{1}{2}}", "x = 3", "\\boxed{4"], "truncated": [False, True, True],
         "refused": [False, True, False], "correct": [True, False, False]},
        {"set": "b", "responses": ["12345"], "truncated": [False], "refused": [False], "correct": [False]},
    ]
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    a, b = mod.stats(str(path))
    assert a == {"set": "a", "responses": 3, "stopped": 1, "cut off": 2, "closed boxed": 1, "refused": 1,
                 "correct": 1, "median chars": 8}
    assert (b["responses"], b["stopped"], b["closed boxed"], b["median chars"]) == (1, 1, 0, 5)
