"""`trainer.precision: bf16-mixed` on CPU (autocast bf16 is real there) and bf16 rollouts.

Every fit runs on `toy_rewards:digits` (groups with reward variance), so advantages, gradients
and weight updates are real; each test asserts the weights moved.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import ROOT, read_metrics, write_config
from lightning.pytorch import Callback, Trainer

import flowtracer.generation.precision as gen_precision
import flowtracer.train.module as module_mod
from flowtracer.cli import main
from flowtracer.config import LoraSpec, LossConfig, OptimConfig, SamplingConfig
from flowtracer.credit import AttentionCredit, EntropyCredit, FlowCredit, RandomCredit, UniformCredit
from flowtracer.data import PromptDataModule
from flowtracer.generation.precision import native_bf16
from flowtracer.train.module import GRPOModule

REAL_LOSS = module_mod.policy_loss


class Moves(Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        self.end = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def fit(model_dir, tmp_path, monkeypatch, *, arm, precision="bf16-mixed", steps=2, sampling_dtype="auto",
        tis_cap=2.0, **optim):
    """`steps` RL steps; returns (module, the loss calls' inputs and outputs, weights before/after)."""
    calls = []

    def spy(logp, old, adv, resp, **kw):
        loss, m = REAL_LOSS(logp, old, adv, resp, **kw)
        calls.append({"logp": logp.detach(), "old": old.detach(), "adv": adv.detach().clone(), "loss": loss.detach(),
                      "sampler": kw.get("sampler_logprobs"), "metrics": m, "resp": resp})
        return loss, m

    monkeypatch.setattr(module_mod, "policy_loss", spy)
    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_source=None, val_size=4,
                          prompts_per_step=2, cache_dir=str(tmp_path / "cache"), verifier="toy_rewards:digits")
    module = GRPOModule(
        model=model_dir, lora=LoraSpec(r=4, alpha=8),
        sampling=SamplingConfig(num_generations=4, max_new_tokens=12, dtype=sampling_dtype),
        loss=LossConfig(tis_cap=tis_cap), optim=OptimConfig(lr=1e-2, **optim), val_before_training=False,
        log_rollouts=False)
    moves = Moves()
    trainer = Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[arm, moves], default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    return module, calls, moves


def assert_real_finite_update(calls, moves):
    assert calls and any(bool((c["adv"] != 0).any()) for c in calls), "no non-zero advantage"
    assert all(bool(torch.isfinite(c["loss"])) for c in calls)
    assert any(not torch.equal(moves.start[k], moves.end[k]) for k in moves.start), "no trainable weight changed"
    assert all(bool(torch.isfinite(v).all()) for v in moves.end.values())


ARMS = {"uniform": UniformCredit, "random": RandomCredit, "entropy": EntropyCredit,
        "attention": AttentionCredit, "flow": FlowCredit}


@pytest.mark.parametrize("arm", list(ARMS))
def test_bf16_mixed_fit_with_every_credit_arm(tmp_path, tiny_model_dir, monkeypatch, arm):
    """Two steps under CPU autocast bf16: finite losses, moved weights, float32 log-probs in the loss."""
    module, calls, moves = fit(tiny_model_dir, tmp_path, monkeypatch, arm=ARMS[arm]())
    assert_real_finite_update(calls, moves)
    for c in calls:  # the ratio and the credit arms see float32 numbers, not bf16 noise
        assert c["logp"].dtype == torch.float32 and c["old"].dtype == torch.float32
    assert module.run_precision.learner.startswith("bf16-mixed")


def test_bf16_mixed_with_a_pre_pass_and_micro_batches(tmp_path, tiny_model_dir, monkeypatch):
    """Two PPO epochs: old log-probs from the no-grad pre-pass (also under autocast), micro-batched."""
    _, calls, moves = fit(tiny_model_dir, tmp_path, monkeypatch, arm=FlowCredit(), ppo_epochs=2, micro_batch_size=3)
    assert_real_finite_update(calls, moves)
    assert all(c["old"].dtype == torch.float32 for c in calls)


def test_bf16_rollouts_record_sampler_logprobs_and_apply_tis(tmp_path, tiny_model_dir, monkeypatch):
    """auto on a bf16-capable CPU under bf16-mixed: bf16 rollouts, the sampler's log-probs reach the
    loss, the mismatch is small but real, and the TIS weights are those of the hand formula."""
    # report AVX512-BF16 on any CPU: auto then picks bf16 rollouts (emulated bf16 gives the same numbers)
    monkeypatch.setattr(gen_precision, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    module, calls, moves = fit(tiny_model_dir, tmp_path, monkeypatch, arm=UniformCredit())
    assert_real_finite_update(calls, moves)
    assert module.sampling.dtype == "bfloat16" and module.run_precision.record
    for c in calls:
        resp = c["resp"].bool()
        assert c["sampler"] is not None and c["sampler"].dtype == torch.float32
        diff = (c["old"] - c["sampler"])[resp]
        assert 0 < float(diff.abs().mean()) < 0.5  # bf16 sampler vs autocast learner: close, not equal
        assert float(c["metrics"]["mismatch/abs_log_ratio"]) == pytest.approx(float(diff.abs().mean()), rel=1e-4)
        want = diff.exp().clamp(max=2.0).mean()
        assert float(c["metrics"]["mismatch/tis_weight_mean"]) == pytest.approx(float(want), rel=1e-4)


def test_float32_run_keeps_float32_rollouts_and_records_nothing(tmp_path, tiny_model_dir, monkeypatch):
    module, calls, moves = fit(tiny_model_dir, tmp_path, monkeypatch, arm=UniformCredit(), precision="32-true",
                               steps=1)
    assert_real_finite_update(calls, moves)
    assert module.sampling.dtype == "float32" and not module.run_precision.record
    assert all(c["sampler"] is None and "mismatch/kl" not in c["metrics"] for c in calls)


def test_explicit_float32_rollouts_under_bf16_mixed_are_corrected_too(tmp_path, tiny_model_dir, monkeypatch):
    """A float32 sampler with an autocast learner still differs from it: recorded, corrected."""
    module, calls, moves = fit(tiny_model_dir, tmp_path, monkeypatch, arm=UniformCredit(), sampling_dtype="float32",
                               steps=1)
    assert_real_finite_update(calls, moves)
    assert module.sampling.dtype == "float32" and module.run_precision.record
    assert all(c["sampler"] is not None for c in calls)


def fit16(model_dir, tmp_path, init_scale: float, steps: int = 2):
    """16-mixed (fp16 autocast + GradScaler) on CPU through Lightning's MixedPrecision plugin: the
    CUDA code path of `trainer.precision: 16-mixed`, which Lightning's flag refuses on CPU."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_source=None, val_size=4,
                          prompts_per_step=2, cache_dir=str(tmp_path / "cache"), verifier="toy_rewards:digits")
    module = GRPOModule(model=model_dir, lora=LoraSpec(r=4, alpha=8), sampling=SamplingConfig(num_generations=4,
                        max_new_tokens=12), optim=OptimConfig(lr=1e-2), val_before_training=False, log_rollouts=False)
    moves = Moves()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    trainer = Trainer(max_steps=steps, accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[FlowCredit(), moves], default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    return module, moves, plugin.scaler


def test_16_mixed_unscales_before_clipping_and_leaves_overflows_to_the_scaler(tmp_path, tiny_model_dir):
    module, moves, scaler = fit16(tiny_model_dir, tmp_path / "ok", init_scale=2.0**8)
    assert module.guard.skips.total == 0 and module.amp_overflows == 0
    assert any(not torch.equal(moves.start[k], moves.end[k]) for k in moves.start)
    # a loss scale that overflows fp16 in the backward: GradScaler skips the step and halves the
    # scale; the guard does not count it (it would otherwise stop the run after max_consecutive_skips)
    module, moves, scaler = fit16(tiny_model_dir, tmp_path / "overflow", init_scale=2.0**100, steps=3)
    assert module.amp_overflows == 3 and module.guard.skips.total == 0
    assert scaler.get_scale() == 2.0**97
    assert all(torch.equal(moves.start[k], moves.end[k]) for k in moves.start)


@pytest.mark.parametrize("arm", [None, "flowtracer.credit.FlowCredit"])
def test_cli_fit_in_bf16_mixed_validates_checkpoints_and_logs_the_mismatch(tmp_path, tiny_model_dir, arm):
    """`flowtracer fit ... --trainer.precision bf16-mixed` (the issue's reproduction, on a tiny
    model): validation before and after, finite moved adapters in the checkpoint, mismatch logged."""
    callbacks = [{"class_path": arm}] if arm else None
    cfg = write_config(tmp_path, tiny_model_dir, steps=2, verifier="toy_rewards:digits", callbacks=callbacks)
    main(["fit", "--config", str(cfg), "--trainer.precision", "bf16-mixed"])
    run = tmp_path / "logs" / "tiny" / "version_0"
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2] and all(math.isfinite(m["train/loss"]) for m in metrics.values())
    header = open(run / "metrics.csv").readline()
    assert "val/pass@1" in header
    if native_bf16("cpu"):
        assert all(m["train/mismatch/abs_log_ratio"] > 0 for m in metrics.values())
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in state.items())  # B starts at 0: it moved


def test_cli_fit_in_bf16_true_over_bf16_weights(tmp_path, tiny_model_dir):
    """`trainer.precision: bf16-true` with `model.model_dtype: bfloat16` (the paper configs) runs as
    32-true over bf16 weights: rollouts in the weights' dtype (nothing recorded), finite moved adapters."""
    cfg = write_config(tmp_path, tiny_model_dir, steps=2, verifier="toy_rewards:digits")
    main(["fit", "--config", str(cfg), "--trainer.precision", "bf16-true", "--model.model_dtype", "bfloat16"])
    run = tmp_path / "logs" / "tiny" / "version_0"
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2] and all(math.isfinite(m["train/loss"]) for m in metrics.values())
    assert not any(k.startswith("train/mismatch/") for m in metrics.values() for k in m)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in state.items())


def test_bf16_mixed_on_a_cpu_without_native_bf16_warns_and_keeps_float32_rollouts(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    monkeypatch.setattr(gen_precision, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.warns(UserWarning, match="emulated here and slower than float32"):
        module, calls, moves = fit(tiny_model_dir, tmp_path, monkeypatch, arm=UniformCredit(), steps=1)
    assert_real_finite_update(calls, moves)
    assert module.sampling.dtype == "float32" and module.run_precision.record  # autocast learner: still corrected


@pytest.mark.parametrize("precision,val_dtype", [("32-true", "auto"), ("bf16-mixed", "auto"),
                                                 ("bf16-mixed", "bfloat16")])
def test_validate(tmp_path, tiny_model_dir, precision, val_dtype):
    """`flowtracer validate` runs under Lightning's inference mode: the LoRA merge, the packed CPU
    linears and the bf16 cast of the rollout weights must work there too."""
    cfg = write_config(tmp_path, tiny_model_dir)
    main(["validate", "--config", str(cfg), "--trainer.precision", precision, "--model.val_sampling.dtype", val_dtype])
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "tiny_validate" / "version_0" / "metrics.csv"))]
    vals = [float(r["val/pass@1"]) for r in rows if r.get("val/pass@1")]
    assert vals and all(0.0 <= v <= 1.0 for v in vals)
    assert not (tmp_path / "logs" / "tiny").exists()  # no checkpoint-less version_N among the training runs


def test_resume_keeps_the_runs_precision_or_says_it_changed(tmp_path, tiny_model_dir, caplog):
    """`--ckpt_path last` with no precision flag goes on in the run's bf16-mixed (recorded in its
    config.yaml, said in one line); a different precision set on the command is said too."""
    import yaml

    cfg = write_config(tmp_path, tiny_model_dir, steps=1, verifier="toy_rewards:digits")
    quiet = ["--model.val_before_training", "false"]
    main(["fit", "--config", str(cfg), "--trainer.precision", "bf16-mixed", *quiet])
    run = tmp_path / "logs" / "tiny" / "version_0"

    def adapters():
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        return {k: v for k, v in state.items() if "lora_" in k}

    before = adapters()
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "2", *quiet])
    assert "resuming with the run's trainer.precision = bf16-mixed" in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2]
    if native_bf16("cpu"):  # bf16 rollouts against the autocast learner: the mismatch is recorded
        assert metrics[2]["train/mismatch/abs_log_ratio"] > 0
    after = adapters()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the resumed step moved the weights
    caplog.clear()
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "3",
              "--trainer.precision", "32-true", *quiet])
    assert "resuming a run trained with trainer.precision = bf16-mixed in 32-true" in caplog.text
    assert sorted(read_metrics(run)) == [1, 2, 3]
