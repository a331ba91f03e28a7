"""Credit inside the training forward (one PPO epoch): same weights and gradients as the separate pass.

One RL step of a tiny random Llama (LoRA) run twice with the same seed: once with the separate
no-grad pass before the update (`fuse_credit=False`), once with the map, entropies and old
log-probs taken from the training forward itself; and once more with gradient checkpointing on.
The token weights, the attention map the arm saw, and the LoRA gradients of the first (only)
optimizer step must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

import flowtracer.module as module_mod
from flowtracer.credit import EntropyCredit, FlowCredit, UniformCredit
from flowtracer.data import PromptDataModule
from flowtracer.module import GRPOModule, OptimConfig
from flowtracer.policy import LoraSpec
from flowtracer.rollout import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
REAL_PASS = module_mod.teacher_forced_pass


class RecordingFlow(FlowCredit):
    """FlowCredit that keeps what it saw and what it set."""

    def __init__(self):
        super().__init__()
        self.seen: list[dict] = []

    def on_rollout_batch(self, trainer, pl_module, rollouts):
        super().on_rollout_batch(trainer, pl_module, rollouts)
        self.seen.append({"attn": rollouts.attn.clone(), "weights": rollouts.token_weights.clone(),
                          "old": rollouts.old_logprobs.clone(), "entropy": rollouts.entropies.clone()})


class GradRecorder(Callback):
    """The trainable gradients right before each optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.requires_grad and p.grad is not None})


def run_step(model_dir, tmp_path, *, arm, fuse=True, checkpointing=False, micro=0, monkeypatch=None):
    """One RL step; returns (grads of the step, number of teacher-forced passes)."""
    calls = []
    if monkeypatch is not None:
        def counting(*args, **kwargs):
            calls.append(kwargs.get("with_grad", False))
            return REAL_PASS(*args, **kwargs)

        monkeypatch.setattr(module_mod, "teacher_forced_pass", counting)
    dm = PromptDataModule(train_source=str(ROOT / "data/arith_train.jsonl"), val_source=None, val_size=4,
                          prompts_per_step=2, cache_dir=str(tmp_path / "cache"))
    module = GRPOModule(
        model=model_dir, lora=LoraSpec(r=4, alpha=8), gradient_checkpointing=checkpointing,
        sampling=SamplingConfig(num_generations=4, max_new_tokens=12), optim=OptimConfig(lr=1e-3, micro_batch_size=micro),
        val_before_training=False, log_rollouts=False, fuse_credit=fuse)
    grads = GradRecorder()
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[arm, grads], default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    assert len(grads.grads) == 1
    return grads.grads[0], calls


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_capture_in_training_forward_matches_separate_pass(tmp_path, tiny_model_dir, monkeypatch):
    sep_arm, fused_arm = RecordingFlow(), RecordingFlow()
    g_sep, calls_sep = run_step(tiny_model_dir, tmp_path / "a", arm=sep_arm, fuse=False, monkeypatch=monkeypatch)
    g_fused, calls_fused = run_step(tiny_model_dir, tmp_path / "b", arm=fused_arm, monkeypatch=monkeypatch)
    assert calls_sep == [False, True]  # the no-grad pass, then the training forward
    assert calls_fused == [True]  # zero extra passes: only the training forward
    (sep,), (fused,) = sep_arm.seen, fused_arm.seen
    assert fused["weights"].shape == sep["weights"].shape  # one micro-batch = the whole batch
    torch.testing.assert_close(fused["attn"], sep["attn"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused["old"], sep["old"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused["entropy"], sep["entropy"], atol=1e-5, rtol=1e-5)
    assert torch.equal(fused["weights"], sep["weights"])
    assert (fused["weights"] == 1.5).any()  # the arm really selected tokens
    assert_same(g_fused, g_sep)


def test_gradient_checkpointing_leaves_weights_and_gradients_unchanged(tmp_path, tiny_model_dir, monkeypatch):
    plain_arm, ckpt_arm = RecordingFlow(), RecordingFlow()
    g_plain, _ = run_step(tiny_model_dir, tmp_path / "a", arm=plain_arm)
    observed = []
    real_observe = module_mod.teacher_forced_pass.__globals__["AttentionCapture"].observe

    def observe(self, module, *args):
        observed.append(module.layer_idx)
        return real_observe(self, module, *args)

    monkeypatch.setattr(module_mod.teacher_forced_pass.__globals__["AttentionCapture"], "observe", observe)
    g_ckpt, _ = run_step(tiny_model_dir, tmp_path / "b", arm=ckpt_arm, checkpointing=True)
    # The tiny model has 6 layers, "middle" = layers 2 and 3; the backward's recompute runs after
    # the capture context closed, so each selected layer is seen exactly once.
    assert sorted(i for i in observed if i in (2, 3)) == [2, 3]
    (plain,), (ckpt,) = plain_arm.seen, ckpt_arm.seen
    torch.testing.assert_close(ckpt["attn"], plain["attn"], atol=1e-6, rtol=1e-5)
    assert torch.equal(ckpt["weights"], plain["weights"])
    assert_same(g_ckpt, g_plain)


@pytest.mark.parametrize("micro", [3])
def test_micro_batches_in_forward_and_batch_global_fallback(tmp_path, tiny_model_dir, monkeypatch, micro):
    """Per-micro-batch credit gives the whole-batch gradients; a batch-global arm keeps the pre-pass."""
    g_fused, calls = run_step(tiny_model_dir, tmp_path / "a", arm=RecordingFlow(), micro=micro, monkeypatch=monkeypatch)
    assert calls == [True, True, True]  # 8 rollouts in micro-batches of 3, no separate pass
    g_sep, _ = run_step(tiny_model_dir, tmp_path / "b", arm=RecordingFlow(), fuse=False, micro=micro)
    assert_same(g_fused, g_sep)
    _, calls = run_step(tiny_model_dir, tmp_path / "c", arm=EntropyCredit(variant="80/20"), micro=micro,
                        monkeypatch=monkeypatch)
    assert calls == [False, True, True, True]  # batch-wide top 20%: the whole-batch pass first
    _, calls = run_step(tiny_model_dir, tmp_path / "d", arm=UniformCredit(), micro=micro, monkeypatch=monkeypatch)
    assert calls == [True, True, True]  # nothing to capture: weights set before the update
