"""The estimator knobs and data.rewards in a real RL step (tiny random Llama + LoRA): the weights
move under rloo, reinforce_pp, GSPO-token and an entropy bonus; a bad reward stops the step before
any update; plain GSPO refuses a non-uniform credit arm at config time."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from lightning.pytorch import Callback, Trainer

from flowtracer.config import LoraSpec, LossConfig, OptimConfig, SamplingConfig
from flowtracer.credit import FlowCredit, UniformCredit
from flowtracer.data import PromptDataModule
from flowtracer.rewards.combine import RewardError
from flowtracer.train.module import GRPOModule
from flowtracer.train.preflight import ConfigError


class Moves(Callback):
    """The trainable weights at the start and the end, the gradients and the logged metrics."""

    def __init__(self):
        self.start, self.end, self.grads, self.metrics = {}, {}, [], {}

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(sum(float(p.grad.abs().sum()) for p in pl_module.parameters() if p.grad is not None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_train_end(self, trainer, pl_module):
        self.end = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def moved(self) -> bool:
        return bool(self.start) and any(not torch.equal(self.start[k], self.end[k]) for k in self.start)


def fit(model_dir, tmp_path, *, loss: LossConfig, arms=(), rewards=None, verifier="toy_rewards:digits", rec=None):
    rec = rec or Moves()
    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_source=None, val_size=4,
                          prompts_per_step=2, cache_dir=str(tmp_path / "cache"),
                          verifier=None if rewards else verifier, rewards=rewards)
    module = GRPOModule(model=model_dir, lora=LoraSpec(r=4, alpha=8),
                        sampling=SamplingConfig(num_generations=4, max_new_tokens=12, temperature=1.0),
                        loss=loss, optim=OptimConfig(lr=1e-2), val_before_training=False, log_rollouts=False)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[*arms, rec], default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        rec.end = rec.end or {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return rec


@pytest.mark.parametrize("loss", [
    LossConfig(advantage="rloo"),
    LossConfig(advantage="reinforce_pp"),
    LossConfig(importance_sampling_level="sequence_token"),
    LossConfig(advantage="rloo", importance_sampling_level="sequence"),
    LossConfig(entropy_coef=0.05),
], ids=["rloo", "reinforce_pp", "gspo_token", "gspo", "entropy_bonus"])
def test_each_estimator_moves_the_weights(tiny_model_dir, tmp_path, loss):
    arms = [FlowCredit()] if loss.importance_sampling_level == "sequence_token" else [UniformCredit()]
    rec = fit(tiny_model_dir, tmp_path, loss=loss, arms=arms)
    assert rec.metrics["reward/std"] > 0  # the group rewards differ: a real signal
    assert rec.grads and rec.grads[0] > 0 and rec.moved()
    if loss.entropy_coef:
        assert rec.metrics["train/entropy"] > 0  # the bonus's entropy (of the training forward) is logged


def test_the_entropy_bonus_alone_has_a_gradient(tiny_model_dir, tmp_path):
    """With every advantage zero (a constant reward) only the bonus can move the weights."""
    rec = fit(tiny_model_dir, tmp_path, loss=LossConfig(entropy_coef=0.1), arms=[UniformCredit()],
              rewards=[{"fn": "multi_rewards:Scaled", "kwargs": {"scale": 0.0}}])
    assert rec.metrics["reward/std"] == 0 and rec.grads[0] > 0 and rec.moved()


def test_several_rewards_train_and_are_logged(tiny_model_dir, tmp_path):
    rewards = [{"fn": "multi_rewards:last_char", "weight": 1.0, "answer": True},
               {"fn": "multi_rewards:digit_count", "weight": 0.5}]
    rec = fit(tiny_model_dir, tmp_path, loss=LossConfig(advantage="rloo"), arms=[FlowCredit()], rewards=rewards)
    m = rec.metrics
    assert {"reward/last_char", "reward/digit_count"} <= m.keys()
    assert m["reward/mean"] == pytest.approx(m["reward/last_char"] + 0.5 * m["reward/digit_count"], abs=1e-5)
    assert m["answer/no_span_frac"] < 1 and rec.moved()  # last_char's spans reached the flow arm


def test_a_failing_reward_stops_the_step_before_any_update(tiny_model_dir, tmp_path):
    rewards = [{"fn": "multi_rewards:last_char"}, {"fn": "multi_rewards:one_short", "weight": 0.5, "answer": False}]
    rec = Moves()
    with pytest.raises(RewardError, match=r"data.rewards\[1\] \(one_short, multi_rewards:one_short\) returned 7"):
        fit(tiny_model_dir, tmp_path, loss=LossConfig(), arms=[UniformCredit()], rewards=rewards, rec=rec)
    assert rec.start and not rec.grads and not rec.moved()


def test_plain_gspo_refuses_a_non_uniform_arm_at_config_time(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="importance_sampling_level = sequence .* FlowCredit .* sequence_token") as e:
        fit(tiny_model_dir, tmp_path, loss=LossConfig(importance_sampling_level="sequence"), arms=[FlowCredit()])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("loss, match", [
    (LossConfig(advantage="ppo"), "rloo, reinforce_pp"),
    (LossConfig(importance_sampling_level="seq"), "token, sequence, sequence_token"),
    (LossConfig(entropy_coef=-0.1), "entropy_coef = -0.1"),
])
def test_bad_loss_knobs_are_refused_in_one_line(tiny_model_dir, tmp_path, loss, match):
    with pytest.raises(ConfigError, match=match):
        fit(tiny_model_dir, tmp_path, loss=loss, arms=[UniformCredit()])
