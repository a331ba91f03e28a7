"""GRPO as a LightningModule, with per-token credit set by rollout callbacks.

One training step, top to bottom (`training_step`):
  prompts (from the data module, by step number) -> sampled responses (G per prompt)
  -> verifier rewards and answer spans -> group advantages
  -> credit: every RolloutCallback enriches the batch (token weights, stats)
  -> PPO-clip update(s) with the weighted advantages -> metrics and rollout JSONL.

Where the credit arms get old log-probs, entropies and attention (`_credit_plan`):
  * one PPO epoch and one mini-batch (the default; `fuse_credit: true`): no extra pass. Each
    micro-batch's training forward captures the (detached) attention of the arms' layers, its own
    detached log-probs are the old ones (ratio 1), entropies come from the same logits, the arms
    set that micro-batch's token weights, then the loss and the backward run. Arms that need none
    of it (uniform, random) run once on the whole batch before the update.
  * several PPO epochs or mini-batches, `fuse_credit: false`, or a batch-global arm (entropy
    80/20, random) over several micro-batches: one no-grad teacher-forced pass before the first
    epoch serves old log-probs, entropies and attention together.
Log-probs and entropies are computed on response tokens only, in chunks of positions whose float32
logits fit `logits_budget_mb` (with grad, chunks beyond one are recomputed in the backward).

Features: LoRA or full fine-tuning; reference = adapters off (KL k3 only when beta > 0); PPO epochs,
mini-batches and micro-batches (gradient accumulation); AdamW with linear warm-up and gradient
clipping; validation pass@1 / pass@k before training and every `trainer.val_check_interval` steps.
Precisions: float32 (default, CPU) and bfloat16 (`model_dtype: bfloat16`, GPU).
Resume: `--ckpt_path` restores adapters (or full weights), optimizer, scheduler, step and RNG; the
prompts of step s and the sampling seed are functions of (seed, s), so a resumed run logs the same
metrics as an uninterrupted one. A run killed at any moment resumes the same way (flowtracer.ckpt:
atomic checkpoints saved after the step's logs; logs of redone steps rewound).
Guards: non-finite rewards, advantages, credit weights, loss or gradients skip that update
(flowtracer.guards); `optim.max_consecutive_skips` in a row stop the run.
Scale-out: under DDP each process takes a block of the step's prompts (flowtracer.distributed);
with `sampling.seed_per_prompt` the metrics equal a 1-process run with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from flowtracer import distributed as dist
from flowtracer.attention import teacher_forced_pass
from flowtracer.ckpt import install_atomic_io, rewind_run_dir
from flowtracer.csvlog import append_lines
from flowtracer.credit.base import RolloutCallback
from flowtracer.guards import SkipCounter, assert_finite_state, grads_finite, nonfinite_fields
from flowtracer.policy import LoraSpec, load_policy, merged_lora, reference_mode
from flowtracer.rewards import VerifierCache, char_span_to_token_mask, safe_score
from flowtracer.rl import group_advantages, policy_loss
from flowtracer.rl.dapo import DapoConfig  # [issue 15] DAPO knobs
from flowtracer.rollout import Generated, RolloutBatch, SamplingConfig, generate, response_token_offsets


@dataclass
class LossConfig:
    """The GRPO objective.

    Args:
        advantage: "grpo" (group z-score) or "dr_grpo" (group mean only).
        eps_low: PPO clip below, ratio >= 1 - eps_low.
        eps_high: PPO clip above, ratio <= 1 + eps_high (DAPO's clip-higher uses 0.28).
        aggregation: "seq-mean-token-mean" (paper), "token-mean" (DAPO), "seq-mean-token-sum-norm" (Dr. GRPO).
        beta: KL (k3) coefficient against the reference (adapters off); 0 = no KL, as in the paper.
        correct_threshold: a reward at or above this counts as a correct answer for accuracy.
    """

    advantage: str = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "seq-mean-token-mean"
    beta: float = 0.0
    correct_threshold: float = 1.0


@dataclass
class OptimConfig:
    """Optimisation of one RL step.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up over this many optimizer steps, then constant.
        grad_clip: max global gradient norm (0 = off).
        ppo_epochs: passes over each step's rollouts (1 = on-policy, ratio is 1 at the first pass).
        mini_batches: optimizer steps per PPO epoch (rollouts split in this many mini-batches).
        micro_batch_size: sequences per forward/backward (gradient accumulation); 0 = whole mini-batch.
        max_consecutive_skips: updates skipped in a row for non-finite values (NaN/inf rewards,
            advantages, weights, loss or gradients) before the run stops with an error.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 0
    max_consecutive_skips: int = 5


class GRPOModule(LightningModule):
    """GRPO on a Hugging Face causal LM with token weights from rollout callbacks.

    Args:
        model: bundled name ("smollm2-135m-instruct"), local HF folder, .gguf file or hub id.
        lora: LoRA adapter spec; null = full fine-tuning.
        model_dtype: "float32" or "bfloat16" weights.
        attn_implementation: attention kernel for generation and training ("sdpa", "eager", ...).
        gradient_checkpointing: trade compute for activation memory in the update.
        sampling: rollout sampling (G = sampling.num_generations responses per prompt).
        val_sampling: validation sampling; num_generations = k of pass@k.
        loss: the GRPO objective (clip, aggregation, KL).
        optim: optimizer and PPO epochs / mini-batches / micro-batches.
        seed: seeds prompt order and sampling; step s uses seed (seed, s).
        val_before_training: measure validation accuracy before the first update.
        log_rollouts: write every rollout to rollouts.jsonl in the run folder.
        fuse_credit: with one PPO epoch and one mini-batch, take attention, entropies and old
            log-probs from the training forward itself (no extra pass); false = always a separate
            no-grad pass first (same weights, one more forward).
        logits_budget_mb: MiB of float32 logits (plus log-softmax) the log-prob/entropy
            computation may hold at once; more response tokens than that are chunked.
        dapo: DAPO's dynamic sampling and overlong handling, off by default (flowtracer.rl.dapo).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lora: LoraSpec | None = LoraSpec(),
        model_dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
        val_sampling: SamplingConfig = SamplingConfig(num_generations=4, temperature=0.7),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        val_before_training: bool = True,
        log_rollouts: bool = True,
        fuse_credit: bool = True,
        logits_budget_mb: float = 512.0,
        dapo: DapoConfig = DapoConfig(),
    ):
        super().__init__()
        self.save_hyperparameters()
        if sampling.num_generations < 2:
            raise ValueError(f"sampling.num_generations must be >= 2 for group advantages, got "
                             f"{sampling.num_generations}: set model.sampling.num_generations: 8")
        self.model_name, self.lora, self.model_dtype = model, lora, model_dtype
        self.attn_implementation, self.gradient_checkpointing = attn_implementation, gradient_checkpointing
        self.sampling, self.val_sampling, self.loss_cfg, self.optim = sampling, val_sampling, loss, optim
        self.seed, self.val_before_training, self.log_rollouts = seed, val_before_training, log_rollouts
        if not logits_budget_mb > 0:
            raise ValueError(f"logits_budget_mb must be > 0, got {logits_budget_mb}: set model.logits_budget_mb: 512")
        self.fuse_credit, self.logits_budget_mb = bool(fuse_credit), float(logits_budget_mb)
        self.dapo = dapo  # [issue 15]
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only trainable weights (adapters under LoRA)
        self.policy = None
        self.tokenizer = None
        self.rl_step = 0
        self._verifier = VerifierCache()  # row -> its verifier, built once per kind
        self.val_pass1, self.val_passk = MeanMetric(), MeanMetric()
        self.val_history: list[tuple[int, float]] = []
        self._skips = SkipCounter(optim.max_consecutive_skips)
        self._step_skips = 0
        self._loss_finite = True
        self._resumed_steps: int | None = None
        self.preflight_done = False

    # ----------------------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy, self.tokenizer = load_policy(
            self.model_name, dtype=self.model_dtype, attn_implementation=self.attn_implementation,
            lora=self.lora, gradient_checkpointing=self.gradient_checkpointing)

    def setup(self, stage: str) -> None:
        install_atomic_io(self.trainer)
        if stage == "fit" and not self.preflight_done:  # the CLI runs it earlier, before any output
            from flowtracer.checks import preflight

            preflight(self, self.trainer.datamodule, self.trainer.world_size, self._rollout_callbacks())
            self.preflight_done = True

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        warm = max(self.optim.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        g, p = self.sampling.num_generations, dm.prompts_per_step
        micro = self.optim.micro_batch_size or (p * g) // self.optim.mini_batches
        rank_zero_info(
            f"[flowtracer] each step: {p} prompts x {g} responses = {p * g} rollouts; "
            f"{self.optim.ppo_epochs} PPO epoch(s) x {self.optim.mini_batches} mini-batch(es) of "
            f"{(p * g) // self.optim.mini_batches} rollouts, accumulated in micro-batches of {micro}; "
            f"credit: {', '.join(type(c).__name__ for c in self._rollout_callbacks()) or 'uniform (none set)'}")
        if self._resumed_steps is not None:
            log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank asks
            if self.trainer.global_rank == 0:
                # steps after the checkpoint may have been logged before a crash; they run again now
                rewind_run_dir(log_dir, self._resumed_steps)
        if self.val_before_training and self.rl_step == 0:
            acc = self._evaluate_split()
            if acc is not None and self.logger is not None:
                self.logger.log_metrics({"val/pass@1": acc[0], f"val/pass@{acc[2]}": acc[1]}, step=0)

    # ----------------------------------------------------------------------------- the RL step
    def training_step(self, batch, batch_idx):
        step = self.rl_step
        self._seed_everything(step)
        rank, world = dist.rank_world(self.trainer)
        rows, positions = dist.shard(self.trainer.datamodule.train_batch(step), rank, world)
        timer = _PhaseTimer()

        # [issue 15] generate + score, with DAPO dynamic sampling / overlong handling when enabled
        from flowtracer.dapo_sampling import sample_rollouts

        gen, rollouts = sample_rollouts(self, rows, positions, step, timer)
        callbacks = self._rollout_callbacks()
        plan = self._credit_plan(callbacks, rollouts.batch_size)
        with timer("old_pass"):
            if plan == "pre_pass":
                self._old_policy_pass(rollouts, callbacks)
            elif self.loss_cfg.beta > 0:
                self._reference_pass(rollouts)
        with timer("credit"):
            for cb in callbacks if plan != "in_forward" else ():
                cb.on_rollout_batch(self.trainer, self, rollouts)
        rollouts.attn = None  # the (B, T, T) map is spent once the weights exist; free it before the update
        with timer("update"):
            update_metrics = self._guarded_update(rollouts, step, callbacks if plan == "in_forward" else (), timer)

        self.rl_step += 1
        metrics = {**self._rollout_metrics(rollouts, gen), **update_metrics, **rollouts.metrics,
                   **timer.metrics(int(gen.response_mask.sum()))}
        dist.log_synced(self, metrics, rollouts.batch_size)
        self.log_dict({"reward": metrics["reward/mean"], "acc": metrics["accuracy"]}, prog_bar=True,
                      on_step=True, on_epoch=False, logger=False, batch_size=rollouts.batch_size)
        if self.log_rollouts:
            self._write_rollouts(step, rollouts)

    def _seed_everything(self, step: int) -> None:
        """Sampling and shuffles of step s depend on (seed, s) only: exact resume, no RNG drift."""
        import numpy as np

        s = (self.seed * 1_000_003 + step) % (2**31)
        random.seed(s)
        np.random.seed(s)  # no numpy draws today; seeded so a credit arm that adds some stays exact
        torch.manual_seed(s)

    def _prompts(self, rows):
        dm = self.trainer.datamodule
        formatted = [dm.format_prompt(self.tokenizer, row["question"]) for row in rows]
        return [f[0] for f in formatted], [f[1] for f in formatted]

    def _generate(self, rows, sampling: SamplingConfig, positions=None, step: int = 0) -> Generated:
        prompts, spans = self._prompts(rows)
        seeds = None
        if sampling.seed_per_prompt:
            from flowtracer.sampling import row_seeds

            seeds = row_seeds(self.seed, step, positions if positions is not None else list(range(len(rows))),
                              sampling.num_generations, device=self.device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with merged_lora(self.policy):  # one GEMM per adapted layer and token, not three
                return generate(self.policy, self.tokenizer, prompts, spans, sampling, row_seeds=seeds)
        finally:
            self.policy.train(was_training)

    def _score(self, rows, gen: Generated) -> RolloutBatch:
        """Rewards, answer-token masks and group advantages for the generated rollouts."""
        g = len(gen.responses) // len(rows)
        rewards, answer_mask = [], torch.zeros_like(gen.response_mask)
        n_errors = n_no_span = 0
        resp_start = gen.prompt_len  # responses start right after the left-padded prompts
        for i, text in enumerate(gen.responses):
            row = rows[i // g]
            score, error = safe_score(self._verifier(row), text, row["answer"])
            n_errors += error is not None
            rewards.append(score.reward)
            if score.answer_span is None:
                n_no_span += 1
                continue
            ids = gen.input_ids[i, resp_start:][gen.response_mask[i, resp_start:]].tolist()
            offsets = response_token_offsets(self.tokenizer, ids, text)
            tok_mask = char_span_to_token_mask(offsets, score.answer_span, len(ids))
            n_no_span += not bool(tok_mask.any())  # a span no token covers: credit falls back, counted
            answer_mask[i, resp_start:resp_start + len(ids)] = tok_mask.to(answer_mask.device)
        device = gen.input_ids.device
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=device)
        group_ids = torch.arange(len(rows), device=device).repeat_interleave(g)
        advantages, adv_stats = group_advantages(rewards_t, group_ids, mode=self.loss_cfg.advantage)
        batch = RolloutBatch(
            input_ids=gen.input_ids, attention_mask=gen.attention_mask, prompt_mask=gen.prompt_mask,
            response_mask=gen.response_mask, question_mask=gen.question_mask, answer_mask=answer_mask,
            rewards=rewards_t, advantages=advantages.float(), group_ids=group_ids,
            prompts=[p for p in self._prompts(rows)[0] for _ in range(g)], responses=gen.responses,
            answers=[str(r["answer"]) for r in rows for _ in range(g)])
        batch.metrics.update({f"adv/{k}": float(v) for k, v in adv_stats.items()})
        batch.metrics["reward/errors"] = float(n_errors)
        batch.metrics["answer/no_span_frac"] = n_no_span / len(gen.responses)
        batch.metrics["answer/no_span"] = float(n_no_span)
        return batch

    def _rollout_callbacks(self) -> list[RolloutCallback]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, RolloutCallback)]

    @torch.no_grad()
    def _old_policy_pass(self, rollouts: RolloutBatch, callbacks) -> None:
        """One teacher-forced pass serves every arm: old log-probs, entropies, attention if asked."""
        capture = self._capture_layers(callbacks)
        was_training = self.policy.training
        self.policy.eval()
        try:
            out = teacher_forced_pass(self.policy, rollouts.input_ids, rollouts.attention_mask,
                                      capture_layers=capture, stats_mask=rollouts.response_mask,
                                      logits_chunk_bytes=self._logits_bytes())
            rollouts.old_logprobs, rollouts.entropies, rollouts.attn = out.logprobs, out.entropy, out.attn
            if self.loss_cfg.beta > 0:
                self._reference_pass(rollouts)
        finally:
            self.policy.train(was_training)

    # ----------------------------------------------------------------------------- credit placement
    def _credit_plan(self, callbacks, batch_size: int) -> str:
        """Where credit arms get their inputs: "in_forward", "before_update" or "pre_pass".

        "in_forward" (an arm needs attention or entropies) and "before_update" (no arm does) need
        one PPO epoch and one mini-batch: the training forward is then the only pass, and the old
        policy is the current one. A batch-global arm cannot see the whole batch from inside one
        micro-batch, so with several micro-batches it gets the separate whole-batch pre-pass.
        """
        if not (self.fuse_credit and self.optim.ppo_epochs == 1 and self.optim.mini_batches == 1):
            return "pre_pass"
        if not any(cb.needs_attention or cb.needs_entropy for cb in callbacks):
            return "before_update"
        micro = self.optim.micro_batch_size or batch_size
        if micro < batch_size and any(cb.batch_global for cb in callbacks):
            return "pre_pass"
        return "in_forward"

    def _capture_layers(self, callbacks):
        """The one layer selection the attention-needing arms share (None when none needs it)."""
        layer_sets = {json.dumps(cb.capture_layers) for cb in callbacks if cb.needs_attention}
        if len(layer_sets) > 1:
            raise ValueError(f"credit callbacks ask for different attention layers {sorted(layer_sets)}; "
                             "give them the same `layers`")
        return json.loads(layer_sets.pop()) if layer_sets else None

    def _logits_bytes(self) -> int:
        return int(self.logits_budget_mb * 2**20)

    @torch.no_grad()
    def _reference_pass(self, rollouts: RolloutBatch) -> None:
        """Reference log-probs (adapters off) for the KL term; only when beta > 0."""
        with reference_mode(self.policy):
            self._ref_logprobs = teacher_forced_pass(
                self.policy, rollouts.input_ids, rollouts.attention_mask, capture_layers=None,
                stats_mask=rollouts.response_mask, logits_chunk_bytes=self._logits_bytes()).logprobs

    def _fused_forward(self, rollouts: RolloutBatch, idx, cols, callbacks, timer, metrics: dict):
        """One-epoch training forward of micro-batch `idx`: (log-probs with grad, old log-probs, weights).

        The attention of the arms' layers is captured (detached) in this very forward; old
        log-probs are its detached log-probs (ratio 1, as the old policy is the current one);
        the arms set this micro-batch's weights before the loss is formed. Old log-probs,
        entropies and weights are written back into `rollouts` for logging; the arms' metrics
        are averaged over micro-batches, weighted by rows (`*_seconds` summed).
        """
        resp = rollouts.response_mask[idx][:, cols]
        with timer("forward"):
            out = teacher_forced_pass(
                self.policy, rollouts.input_ids[idx][:, cols], rollouts.attention_mask[idx][:, cols],
                capture_layers=self._capture_layers(callbacks), with_grad=True, stats_mask=resp,
                logits_chunk_bytes=self._logits_bytes())
        timer.move("forward", "credit", out.attn_seconds)  # the map's recompute is credit cost
        old = out.logprobs.detach()
        if callbacks:
            view = rollouts.rows(idx, cols)
            view.old_logprobs, view.entropies, view.attn = old, out.entropy, out.attn
            with timer("credit"):
                for cb in callbacks:
                    cb.on_rollout_batch(self.trainer, self, view)
            w = view.weights_or_ones()
            share = len(idx) / rollouts.batch_size
            for k, v in view.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * (1.0 if k.endswith("_seconds") else share)
            _fill_rows(rollouts, "token_weights", idx, cols, w)
        else:
            w = rollouts.weights_or_ones()[idx][:, cols]
        _fill_rows(rollouts, "old_logprobs", idx, cols, old)
        _fill_rows(rollouts, "entropies", idx, cols, out.entropy)
        return out.logprobs, old, w

    def _update(self, rollouts: RolloutBatch, in_forward=(), timer=None) -> dict[str, float]:
        """PPO-clip: `ppo_epochs` passes, each split into `mini_batches` optimizer steps.

        `in_forward`: credit callbacks to run inside each micro-batch's training forward (one epoch
        only, see `_credit_plan`); then old log-probs, entropies and weights are filled as we go.
        """
        timer = timer or _PhaseTimer()
        fused_metrics: dict[str, float] = {}
        opt, sched = self.optimizers(), self.lr_schedulers()
        b = rollouts.batch_size
        mb_size = math.ceil(b / self.optim.mini_batches)
        micro = self.optim.micro_batch_size or mb_size
        weights = rollouts.weights_or_ones() if rollouts.old_logprobs is not None else None
        ref = getattr(self, "_ref_logprobs", None) if self.loss_cfg.beta > 0 else None
        sums: dict[str, float] = {}
        n_minibatches = 0
        world = dist.rank_world(self._trainer)[1]
        for epoch in range(self.optim.ppo_epochs):
            order = torch.randperm(b) if self.optim.mini_batches > 1 else torch.arange(b)
            for mb in order.split(mb_size):
                opt.zero_grad(set_to_none=True)
                # tokens of the mini-batch over all processes: DDP averages gradients, so each
                # process scales by world/total to give the global token mean (token-mean aggregation)
                mb_tokens = dist.all_sum(self, rollouts.response_mask[mb].sum()).clamp(min=1)
                for idx in mb.split(micro):
                    cols = _active_columns(rollouts.attention_mask[idx])
                    if weights is not None:  # old log-probs and weights came before the update
                        with timer("forward"):
                            logp = teacher_forced_pass(
                                self.policy, rollouts.input_ids[idx][:, cols], rollouts.attention_mask[idx][:, cols],
                                capture_layers=None, with_grad=True, stats_mask=rollouts.response_mask[idx][:, cols],
                                logits_chunk_bytes=self._logits_bytes()).logprobs
                        old, w = rollouts.old_logprobs[idx][:, cols], weights[idx][:, cols]
                    else:
                        logp, old, w = self._fused_forward(rollouts, idx, cols, in_forward, timer, fused_metrics)
                    loss, m = policy_loss(
                        logp, old, rollouts.advantages[idx],
                        rollouts.response_mask[idx][:, cols], token_weights=w,
                        eps_low=self.loss_cfg.eps_low, eps_high=self.loss_cfg.eps_high,
                        aggregation=self.loss_cfg.aggregation, beta=self.loss_cfg.beta,
                        max_len=self.sampling.max_new_tokens,
                        ref_logprobs=None if ref is None else ref[idx][:, cols])
                    # Each micro-batch's share of the mini-batch mean (tokens for token-mean, else rows).
                    tok_share = rollouts.response_mask[idx].sum().float() / mb_tokens * world
                    share = (tok_share if self.loss_cfg.aggregation == "token-mean"
                             else torch.tensor(len(idx) / len(mb)))
                    self._loss_finite &= bool(torch.isfinite(loss))
                    with timer("backward"):
                        self.manual_backward(loss * share.to(loss.device))
                    for k, v in {"loss": loss, **m}.items():  # diagnostics are token means
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) * float(share if k == "loss" else tok_share)
                with timer("backward"):  # clip and optimizer step count as backward
                    self._optimizer_step(opt, sched)  # a non-finite mini-batch is skipped, see guards
                n_minibatches += 1
        rollouts.metrics.update(fused_metrics)
        out = {f"train/{k}": v / n_minibatches for k, v in sums.items()}
        out["train/lr"] = sched.get_last_lr()[0]
        return out

    # ----------------------------------------------------------------------------- numerical guards
    def _guarded_update(self, rollouts: RolloutBatch, step: int, in_forward=(), timer=None) -> dict[str, float]:
        """`_update`, unless a reward, advantage, weight or old log-prob is NaN/inf: then skip it."""
        bad = nonfinite_fields(rollouts)
        ok = self.trainer.strategy.reduce_boolean_decision(not bad, all=True)  # every process skips together
        self._step_skips = 0
        if ok:
            out = self._update(rollouts, in_forward, timer)
        else:
            self._record_skip(f"non-finite {', '.join(bad) or 'inputs on another process'}", step)
            out = {}
        return {**out, "guard/skipped_updates": float(self._step_skips), "guard/skipped_total": float(self._skips.total)}

    def _optimizer_step(self, opt, sched) -> None:
        """Clip and step, unless the loss or a gradient is NaN/inf: then drop the gradients."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        ok = self._loss_finite and grads_finite(params)  # gradients are already averaged over processes
        ok = self.trainer.strategy.reduce_boolean_decision(ok, all=True)
        self._loss_finite = True
        if not ok:
            opt.zero_grad(set_to_none=True)
            self._record_skip("non-finite loss or gradients", self.rl_step)
            return
        self._skips.record(True)
        if self.optim.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    def _record_skip(self, what: str, step: int) -> None:
        self._step_skips += 1
        rank_zero_info(f"[flowtracer] step {step}: update skipped ({what})")
        self._skips.record(False, what, step)

    # ----------------------------------------------------------------------------- metrics and logs
    def _rollout_metrics(self, rollouts: RolloutBatch, gen: Generated) -> dict[str, float]:
        # over the rollouts of every process (identity with one), so DDP logs the 1-process values
        rewards = dist.gather_cat(self, rollouts.rewards)
        lengths = dist.gather_cat(self, rollouts.response_mask.sum(1).float())
        truncated = dist.gather_cat(self, gen.truncated.float())
        resp = rollouts.response_mask
        ent = rollouts.entropies
        ent_sum = dist.all_sum(self, (ent * resp).sum()) if ent is not None else None
        n_tok = dist.all_sum(self, resp.sum().float()).clamp(min=1)
        return {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "accuracy": (rewards >= self.loss_cfg.correct_threshold).float().mean().item(),
            "response/length": lengths.mean().item(),
            "response/truncated_frac": truncated.mean().item(),
            "entropy": (ent_sum / n_tok).item() if ent_sum is not None else 0.0,
            "rl_step": float(self.rl_step),
        }

    def _write_rollouts(self, step: int, rollouts: RolloutBatch) -> None:
        log_dir = self.trainer.log_dir  # once: under DDP every call is a broadcast all ranks must join
        if log_dir is None:
            return
        path = os.path.join(log_dir, "rollouts.jsonl")
        weights = rollouts.weights_or_ones()
        lines = []
        for i in range(rollouts.batch_size):
            m = rollouts.response_mask[i]
            lines.append(json.dumps({
                "step": step, "prompt": rollouts.prompts[i], "response": rollouts.responses[i],
                "answer": rollouts.answers[i], "reward": rollouts.rewards[i].item(),
                "advantage": rollouts.advantages[i].item(),
                "tokens": self.tokenizer.convert_ids_to_tokens(rollouts.input_ids[i][m].tolist()),
                "weights": [round(w, 4) for w in weights[i][m].tolist()]}))
        lines = [ln for part in dist.gather_objects(self, lines) for ln in part]  # rank order = prompt order
        if self.trainer.global_rank != 0:
            return
        os.makedirs(log_dir, exist_ok=True)
        # One write() of whole lines, fsynced: a crash never leaves half a record behind.
        append_lines(path, "\n".join(lines) + "\n")

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def _correctness(self, rows) -> torch.Tensor:
        """(prompts, k) bool: which of k sampled answers per prompt are correct."""
        gen = self._generate(rows, self.val_sampling)
        k = len(gen.responses) // len(rows)
        rewards = [safe_score(self._verifier(rows[i // k]), t, rows[i // k]["answer"])[0].reward
                   for i, t in enumerate(gen.responses)]
        return (torch.tensor(rewards) >= self.loss_cfg.correct_threshold).view(len(rows), k)

    def validation_step(self, rows, batch_idx):
        self._seed_everything(10**6 + batch_idx)  # validation samples do not depend on the step
        correct = self._correctness(rows).float()
        self.val_pass1.update(correct.mean(1))
        self.val_passk.update(correct.max(1).values)

    def on_validation_epoch_end(self):
        k = self.val_sampling.num_generations
        p1, pk = self.val_pass1.compute(), self.val_passk.compute()
        self.log_dict({"val/pass@1": p1, f"val/pass@{k}": pk}, prog_bar=False)
        self.log("val_acc", p1, prog_bar=True, logger=False)
        self.val_pass1.reset(), self.val_passk.reset()
        if not self.trainer.sanity_checking:
            self.val_history.append((self.rl_step, float(p1)))
            rank_zero_info(f"[flowtracer] step {self.rl_step}: validation pass@1 = {float(p1):.3f}, pass@{k} = {float(pk):.3f}")

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def _evaluate_split(self):
        """Validation outside Lightning's loop (before training): (pass@1, pass@k, k) or None."""
        loader = self.trainer.datamodule.val_dataloader()
        if loader is None:
            return None
        p1, pk = [], []
        for i, rows in enumerate(loader):
            self._seed_everything(10**6 + i)
            c = self._correctness(rows).float()
            p1.append(c.mean(1)), pk.append(c.max(1).values)
        if not p1:
            return None
        a1, ak = torch.cat(p1).mean().item(), torch.cat(pk).mean().item()
        self.val_history.append((0, a1))
        rank_zero_info(f"[flowtracer] before training: validation pass@1 = {a1:.3f}, "
                       f"pass@{self.val_sampling.num_generations} = {ak:.3f}")
        return a1, ak, self.val_sampling.num_generations

    def on_train_end(self) -> None:
        if len(self.val_history) >= 2:
            (s0, a0), (s1, a1) = self.val_history[0], self.val_history[-1]
            rank_zero_info(f"[flowtracer] validation pass@1: {a0:.3f} at step {s0} -> {a1:.3f} at step {s1}")

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        assert_finite_state(checkpoint["state_dict"])  # the guards make this unreachable; never save NaN
        checkpoint["flowtracer"] = {"rl_step": self.rl_step, "val_history": self.val_history,
                                    "skips": self._skips.state_dict()}

    def on_load_checkpoint(self, checkpoint) -> None:
        state = checkpoint.get("flowtracer", {})
        self.rl_step = state.get("rl_step", 0)
        self._resumed_steps = self.rl_step
        self._skips.load_state_dict(state.get("skips", {}))
        self.val_history = list(map(tuple, state.get("val_history", [])))


def _fill_rows(rollouts: RolloutBatch, name: str, idx, cols: slice, value: torch.Tensor) -> None:
    """rollouts.<name>[idx, cols] = value, allocating a zero (B, T) float32 tensor first if unset."""
    full = getattr(rollouts, name)
    if full is None:
        full = torch.zeros(rollouts.input_ids.shape, dtype=torch.float32, device=value.device)
        setattr(rollouts, name, full)
    full[idx, cols] = value.detach().to(full.dtype)


def _active_columns(attention_mask: torch.Tensor) -> slice:
    """The column range that holds a real token in some row (drops all-padding columns)."""
    used = attention_mask.bool().any(0).nonzero()
    return slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 0)


class _PhaseTimer:
    """Wall-clock seconds per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-attribute `seconds` already counted in phase `src` to phase `dst`."""
        self.seconds[src] = self.seconds.get(src, 0.0) - seconds
        self.seconds[dst] = self.seconds.get(dst, 0.0) + seconds

    def metrics(self, generated_tokens: int) -> dict[str, float]:
        total = time.perf_counter() - self._start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = total
        out["time/credit_share"] = self.seconds.get("credit", 0.0) / max(total, 1e-9)
        out["throughput/gen_tokens_per_s"] = generated_tokens / max(self.seconds.get("generate", 0.0), 1e-9)
        return out
