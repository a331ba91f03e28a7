"""`flowtracer fit --config` end to end on a tiny random model: outputs, resume, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch  # noqa: F401  (at collection: its log handler binds the session's stderr, not one test's capsys)
import pytest
import torch
import yaml
from conftest import ROOT, read_metrics, write_config

from flowtracer.cli import main


def test_fit_two_steps_writes_run_folder(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir)
    main(["fit", "--config", str(cfg)])
    run = tmp_path / "logs" / "tiny" / "version_0"
    assert (run / "config.yaml").exists()
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2]
    for key in ("reward/mean", "accuracy", "train/loss", "train/clip_frac", "entropy", "response/length",
                "adv/zero_variance_groups"):
        assert key in metrics[1]
    header = open(run / "metrics.csv").readline()
    for key in ("time/generate", "time/score", "time/credit", "time/update", "throughput/gen_tokens_per_s",
                "val/pass@1", "val/pass@2"):
        assert key in header
    records = [json.loads(line) for line in open(run / "rollouts.jsonl")]
    assert len(records) == 2 * 2 * 4  # steps x prompts x G
    assert {"prompt", "response", "reward", "advantage", "weights", "tokens"} <= set(records[0])
    assert len(records[0]["weights"]) == len(records[0]["tokens"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # adapter-only
    assert ckpt["flowtracer"]["rl_step"] == 2


def trainable_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, weights_only=True)["state_dict"]


def assert_weights_moved(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert any(not torch.equal(a[k], b[k]) for k in a), "no trainable weight changed"


def test_resume_logs_the_same_metrics_as_uninterrupted(tmp_path, tiny_model_dir):
    """Rewards with group variance (toy_rewards:digits), so every step really updates the adapters."""
    full = tmp_path / "full"
    main(["fit", "--config", str(write_config(full, tiny_model_dir, steps=3, verifier="toy_rewards:digits"))])
    part = tmp_path / "part"
    cfg = write_config(part, tiny_model_dir, steps=2, verifier="toy_rewards:digits")
    main(["fit", "--config", str(cfg)])
    ckpt = part / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    at_step_2 = trainable_state(ckpt)
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)])
    uninterrupted = read_metrics(full / "logs" / "tiny" / "version_0")
    assert all(uninterrupted[s]["adv/zero_variance_groups"] < 2 for s in (1, 2, 3))  # 2 prompts: one group varies
    # the resumed run continues the checkpoint's run folder: one metrics.csv with every step
    assert not (part / "logs" / "tiny" / "version_1").exists()
    resumed = read_metrics(part / "logs" / "tiny" / "version_0")
    assert sorted(resumed) == [1, 2, 3]
    for step in (1, 2, 3):
        for key, value in uninterrupted[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    final = trainable_state(ckpt)
    assert_weights_moved(final, at_step_2)  # step 3 after the resume changed the adapters
    expected = trainable_state(full / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)


def fit_fails(capsys, *args) -> str:
    """`flowtracer fit ...` in this process (a subprocess would add ~10 s of imports for nothing): it must
    exit non-zero with its error on stderr and no traceback; returns stderr."""
    with pytest.raises(SystemExit) as done:
        main(["fit", *args])
    assert done.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_config_key_is_one_clear_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    err = fit_fails(capsys, "--config", str(cfg), "--model.sampling.temprature", "0.5")
    assert "temprature" in err


def test_missing_data_field_names_file_and_row(tmp_path, tiny_model_dir, capsys, monkeypatch):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    cfg = write_config(tmp_path, tiny_model_dir, train_source=str(data), val_size=0)
    monkeypatch.chdir(tmp_path)
    err = fit_fails(capsys, "--config", str(cfg)).strip().splitlines()[-1]
    assert "bad.jsonl" in err and "answer" in err and "2" in err


def test_missing_model_is_one_clear_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path, str(tmp_path / "no_such_model"))
    monkeypatch.chdir(tmp_path)
    err = fit_fails(capsys, "--config", str(cfg))
    assert "no_such_model" in err
    assert not (tmp_path / "logs" / "tiny" / "version_0" / "checkpoints").exists()


def test_switching_the_credit_arm_is_a_yaml_change(tmp_path, tiny_model_dir):
    arm = [{"class_path": "flowtracer.credit.FlowCredit", "init_args": {"top_frac": 0.4, "gamma": 1.5}}]
    cfg = write_config(tmp_path, tiny_model_dir, steps=1, callbacks=arm)
    # The tiny model never writes an answer: trace to the last token so the flow arm really runs.
    main(["fit", "--config", str(cfg), "--trainer.callbacks.init_args.fallback", "last_token",
          "--model.val_before_training", "false"])
    run = tmp_path / "logs" / "tiny" / "version_0"
    header = open(run / "metrics.csv").readline()
    for key in ("credit/fallback_frac", "credit/answer_mass", "credit/class/digit", "time/credit_share"):
        assert key in header
    records = [json.loads(line) for line in open(run / "rollouts.jsonl")]
    for rec in records:
        n = len(rec["weights"])
        assert rec["weights"].count(1.5) == max(1, int(0.4 * n + 0.5))


EXPERIMENTS = ROOT / "experiments"
RUN_CONFIGS = ("quickstart.yaml", "rl", "paper", "lora")  # full run configs
OVERLAYS = ("ablations", "eval", "scale_out")  # overlays on a run config
# grids/: tests/tools/test_grid.py; sft/: test_sft_configs_parse; tools/: tests/tools/test_attribution.py


def test_every_experiment_lives_in_a_known_folder():
    known = set(RUN_CONFIGS + OVERLAYS + ("grids", "sft", "tools"))
    for path in EXPERIMENTS.rglob("*.yaml"):
        assert path.relative_to(EXPERIMENTS).parts[0] in known, path


@pytest.mark.parametrize("config", sorted(str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.yaml")
                                           if p.relative_to(EXPERIMENTS).parts[0] in RUN_CONFIGS + OVERLAYS))
def test_every_experiment_config_parses(config, capsys):
    """Every shipped config resolves through the CLI (ablation arms on top of the quickstart)."""
    args = ["fit", "--config", str(EXPERIMENTS / config), "--print_config"]
    if config.split("/")[0] in OVERLAYS:
        args[1:1] = ["--config", str(EXPERIMENTS / "quickstart.yaml")]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    arm = printed["trainer"]["callbacks"][0]["class_path"]
    assert arm.startswith("flowtracer.credit.")


@pytest.mark.parametrize("command,built", [("fit", "fit"), ("validate", "validate"), ("sft", "fit")])
def test_only_the_named_subcommands_parser_is_built(command, built, monkeypatch, capsys):
    """Building Lightning's other subcommand parser cost every start 0.05-0.1 s; the usage still names ours."""
    from lightning.pytorch.cli import LightningCLI

    made = []
    prepare = LightningCLI._prepare_subcommand_parser
    monkeypatch.setattr(LightningCLI, "_prepare_subcommand_parser",
                        lambda self, klass, sub, **kw: made.append(sub) or prepare(self, klass, sub, **kw))
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code in (0, None) and made == [built]
    assert capsys.readouterr().out.startswith(f"usage: flowtracer {command} ")


@pytest.mark.parametrize("config", sorted(p.name for p in (EXPERIMENTS / "sft").glob("*.yaml")))
def test_sft_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["sft", "--config", str(EXPERIMENTS / "sft" / config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["export_dir"] and printed["data"]["target_field"]


def test_kl_ppo_epochs_mini_and_micro_batches(tmp_path, tiny_model_dir):
    """beta > 0 (reference = adapters off), 2 PPO epochs x 2 mini-batches, micro-batches of 2."""
    cfg = write_config(tmp_path, tiny_model_dir, steps=4, verifier="toy_rewards:digits")  # real advantages
    main(["fit", "--config", str(cfg), "--model.loss.beta", "0.1", "--model.loss.aggregation", "token-mean",
          "--model.optim.ppo_epochs", "2", "--model.optim.mini_batches", "2",
          "--model.optim.micro_batch_size", "2", "--model.val_before_training", "false",
          "--trainer.val_check_interval", "4"])
    metrics = read_metrics(tmp_path / "logs" / "tiny" / "version_0")
    assert sorted(metrics) == [1]  # 4 optimizer steps = 1 RL step
    assert metrics[1]["train/ref_kl"] > 0  # the adapters moved away from the reference
    assert metrics[1]["train/ratio_mean"] != 1.0  # later mini-batches are off-policy
