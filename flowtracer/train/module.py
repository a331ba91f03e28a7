"""GRPO as a LightningModule, with per-token credit set by rollout callbacks.

One training step, top to bottom (`training_step`, after cleanrl's update):
  prompts (by step number) -> generate G responses each -> score (rewards, answer spans,
  group advantages) -> place the credit callbacks (flowtracer.train.step.placement)
  -> [pre-pass, micro-batch by micro-batch, when the plan needs one]
  -> for each PPO epoch, mini-batch, micro-batch: forward (log-probs at the sampling temperature,
     the attention map when an arm reads it) -> token weights -> loss -> backward
  -> optimizer step per mini-batch -> metrics and rollouts.jsonl.
The pieces are Lightning-free (flowtracer.train.step); this module orchestrates them.

Features: LoRA or full fine-tuning; reference = adapters off (KL k3 only when beta > 0); PPO epochs,
mini-batches and micro-batches (gradient accumulation); AdamW with linear warm-up and gradient
clipping; validation on the eval sets (flowtracer.train.validation: avg@k, pass@k', maj@k per set,
math_avg, val/pass@1) before training and every `trainer.val_check_interval` steps.
Precisions: float32 (default), `trainer.precision: bf16-mixed` (CPU and GPU) or 16-mixed (CUDA),
bf16 weights (`model_dtype: bfloat16`); rollouts in `sampling.dtype`, a sampler/learner mismatch
corrected by truncated importance sampling (flowtracer.train.precision, `loss.tis_cap`).
Resume: `--ckpt_path` restores adapters (or full weights), optimizer, scheduler, step and RNG; the
prompts and samples of step s are functions of (seed, s), so a resumed run logs the metrics of an
uninterrupted one, even after a SIGKILL (flowtracer.runs.checkpoints: atomic checkpoints after the step's logs).
Guards: non-finite rewards, advantages, credit weights, attention maps, loss or gradients skip that
update (flowtracer.train.guards); `optim.max_consecutive_skips` in a row stop the run.
Scale-out: under DDP each process takes a block of the step's prompts (flowtracer.train.distributed);
with `sampling.seed_per_prompt` the metrics equal a 1-process run with the same global batch.
"""

from __future__ import annotations

import math
import os

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from flowtracer.batch import Generated, RolloutBatch
from flowtracer.config import DapoConfig, LoraSpec, LossConfig, OptimConfig, SamplingConfig
from flowtracer.credit.base import RolloutCallback
from flowtracer.generation import engine_line, sample
from flowtracer.generation.sampler import row_seeds
from flowtracer.model import prefix
from flowtracer.model.policy import load_policy
from flowtracer.rewards import VerifierCache
from flowtracer.rl import policy_loss
from flowtracer.runs.checkpoints import install_atomic_io, rewind_run_dir
from flowtracer.runs.csvlog import append_lines
from flowtracer.train import distributed as dist
from flowtracer.train import validation
from flowtracer.train.guarded import GuardedUpdates
from flowtracer.train.guards import UpdateGuard, assert_finite_state
from flowtracer.train.preflight import ConfigError, preflight
from flowtracer.train.refill import RolloutSource, sample_rollouts
from flowtracer.train.step import PhaseTimer, Placement, logprob_temperature, micro, plan_credit
from flowtracer.train.step.records import RolloutStats, rollout_records, seed_step, step_warnings
from flowtracer.train.step.score import rollout_batch, score_responses


class GRPOModule(GuardedUpdates, LightningModule):
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
        log_token_scores: rollouts.jsonl also holds each response token's score under the credit arm
            (`scores`: flow throughput, entropy, attention received, ...) and its entropy (`entropy`),
            for `flowtracer view` (a larger file; benchmarks/token_scores_cost.py measures it).
        fuse_credit: with one PPO epoch and one mini-batch, take attention, entropies and old
            log-probs from the training forward itself (no extra pass); false = always a separate
            no-grad pass first (same weights, one more forward).
        logits_budget_mb: MiB of float32 logits (plus log-softmax) the log-prob/entropy
            computation may hold at once; more response tokens than that are chunked.
        share_prefix: every teacher-forced forward runs a prompt once for its G rows, packed
            (flowtracer.model.prefix: same numbers up to rounding); false = padded (B, T) rows.
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
        log_token_scores: bool = False,
        fuse_credit: bool = True,
        logits_budget_mb: float = 512.0,
        share_prefix: bool = True,
        dapo: DapoConfig = DapoConfig(),
    ):
        super().__init__()
        self.save_hyperparameters()
        if sampling.num_generations < 2:
            raise ConfigError(f"sampling.num_generations must be >= 2 for group advantages, got "
                             f"{sampling.num_generations}: set model.sampling.num_generations: 8")
        self.model_name, self.lora, self.model_dtype = model, lora, model_dtype
        self.attn_implementation, self.gradient_checkpointing = attn_implementation, gradient_checkpointing
        self.sampling, self.val_sampling, self.loss_cfg, self.optim = sampling, val_sampling, loss, optim
        self.seed, self.val_before_training, self.log_rollouts = seed, val_before_training, log_rollouts
        self.log_token_scores = bool(log_token_scores)
        if not logits_budget_mb > 0:
            raise ConfigError(f"logits_budget_mb must be > 0, got {logits_budget_mb}: set model.logits_budget_mb: 512")
        self.fuse_credit, self.logits_budget_mb = bool(fuse_credit), float(logits_budget_mb)
        self.share_prefix, self.dapo = bool(share_prefix), dapo
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only trainable weights (adapters under LoRA)
        self.policy = None
        self.tokenizer = None
        self.rl_step = 0
        self.verifiers = VerifierCache()  # row -> its verifier, built once per kind
        self.val_history: list[tuple[int, float]] = []
        self.val_metric = None  # torchmetrics, over the eval sets (flowtracer.train.validation.metric)
        self.rollout_stats = RolloutStats(loss.correct_threshold)  # per step, reduced over processes
        self.guard = UpdateGuard(optim.max_consecutive_skips, log=rank_zero_info)
        self._resumed_steps: int | None = None
        self.preflight_done = False
        self.run_precision = None  # flowtracer.train.precision.RunPrecision, set by the pre-flight check

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
            preflight(self, self.trainer.datamodule, self.trainer.world_size, self._rollout_callbacks(),
                      device=self.trainer.strategy.root_device, precision=self.trainer.precision)
            self.preflight_done = True

    def configure_optimizers(self):
        return self.optim.build([p for p in self.policy.parameters() if p.requires_grad])

    def on_train_start(self) -> None:
        rank_zero_info(self.optim.describe(self.trainer.datamodule.prompts_per_step, self.sampling.num_generations,
                                           self._rollout_callbacks()))
        rank_zero_info(self.run_precision.describe(self.loss_cfg.tis_cap))
        rank_zero_info(engine_line(self.policy, self.sampling, self.val_sampling))
        rank_zero_info(prefix.forward_line(self.policy, self.share_prefix))
        reward_set = getattr(self.trainer.datamodule, "reward_set", None)
        if reward_set is not None:
            rank_zero_info(reward_set.describe())
        if self._resumed_steps is not None:
            log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank asks
            if self.trainer.global_rank == 0:
                # steps after the checkpoint may have been logged before a crash; they run again now
                rewind_run_dir(log_dir, self._resumed_steps)
        if self.val_before_training and self.rl_step == 0:
            metrics = validation.before_training(self)
            if metrics and self.logger is not None:
                self.logger.log_metrics(metrics, step=0)

    # ----------------------------------------------------------------------------- the RL step
    def training_step(self, batch, batch_idx):
        step = self.rl_step
        seed_step(self.seed, step)
        rank, world = dist.rank_world(self.trainer)
        rows, positions = dist.shard(self.trainer.datamodule.train_batch(step), rank, world)
        timer = PhaseTimer(self.device)
        gen, rollouts = sample_rollouts(self._rollout_source(), rows, positions, step, timer)  # (+ DAPO knobs)
        plan = plan_credit(self._rollout_callbacks(), ppo_epochs=self.optim.ppo_epochs,
                           mini_batches=self.optim.mini_batches, micro_batch_size=self.optim.micro_batch_size,
                           batch_size=rollouts.batch_size, fuse=self.fuse_credit)
        with timer("old_pass"):
            pre = self._pre_pass(rollouts, plan, timer) if plan.pre_pass else None
        with timer("credit"):  # whole-batch callbacks: those that read no forward output, then
            self._run_callbacks(plan.at(Placement.BEFORE_UPDATE), rollouts)  # the batch-global ones
            self._run_callbacks(plan.at(Placement.PRE_PASS, batch_global=True), rollouts)
        with timer("update"):
            update_metrics = self._guarded_update(rollouts, plan, pre, timer)

        self.rl_step += 1
        stats = self.rollout_stats.of_step(rollouts, gen.truncated)
        metrics = {**stats, "rl_step": float(self.rl_step), **update_metrics, **rollouts.metrics,
                   **timer.metrics(int(gen.response_mask.sum()))}
        for line in step_warnings(metrics, step + 1):  # also sets warn/* in the logged metrics
            rank_zero_info(line)
        dist.log_synced(self, metrics, rollouts.batch_size, reduced=stats)
        self.log_dict({"reward": metrics["reward/mean"], "acc": metrics["accuracy"]}, prog_bar=True,
                      on_step=True, on_epoch=False, logger=False, batch_size=rollouts.batch_size)
        if self.log_rollouts:
            self._write_rollouts(step, rollouts, gen.truncated)

    def _rollout_source(self) -> RolloutSource:
        rank, world = dist.rank_world(self.trainer)
        return RolloutSource(
            generate=self._generate, score=self._score,
            refill_rows=lambda key: dist.shard(self.trainer.datamodule.train_batch(key), rank, world),
            any_process=lambda flag: self.trainer.strategy.reduce_boolean_decision(flag, all=False),
            dapo=self.dapo, max_new_tokens=self.sampling.max_new_tokens, advantage=self.loss_cfg.advantage,
            pad_id=self.tokenizer.pad_token_id, reduce_sum=self._sum_over_processes)

    def _generate(self, rows, positions: list[int], step: int) -> Generated:
        formatted = [self.trainer.datamodule.format_prompt(self.tokenizer, row["question"]) for row in rows]
        seeds = None
        if self.sampling.seed_per_prompt:
            seeds = row_seeds(self.seed, step, positions, self.sampling.num_generations, device=self.device)
        return sample(self.policy, self.tokenizer, [f[0] for f in formatted], [f[1] for f in formatted],
                      self.sampling, row_seeds=seeds, record_logprobs=self.run_precision.record)

    def _score(self, rows, gen: Generated) -> RolloutBatch:
        g = len(gen.responses) // len(rows)
        scored = score_responses(self.tokenizer, self.verifiers, [r for r in rows for _ in range(g)], gen,
                                 rewards=getattr(self.trainer.datamodule, "reward_set", None))
        return rollout_batch(gen, scored, prompts=gen.prompts,
                             answers=[str(r["answer"]) for r in rows for _ in range(g)], group_size=g,
                             advantage=self.loss_cfg.advantage, reduce_sum=self._sum_over_processes)

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_sum(self, t)

    def _rollout_callbacks(self) -> list[RolloutCallback]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, RolloutCallback)]

    def _run_callbacks(self, callbacks, rollouts: RolloutBatch) -> None:
        with torch.autocast(self.device.type, enabled=False):  # credit math as written (flow in float64)
            for cb in callbacks:
                cb.on_rollout_batch(self.trainer, self, rollouts)

    @property
    def _temperature(self) -> float:
        """Log-probs and entropies are those of the distribution the rollouts were sampled from."""
        return logprob_temperature(self.sampling.temperature)

    def _logits_bytes(self) -> int:
        return int(self.logits_budget_mb * 2**20)

    def _pre_pass(self, rollouts: RolloutBatch, plan, timer: PhaseTimer) -> micro.PrePassResult:
        """No-grad pass, micro-batch by micro-batch: old log-probs, entropies, reference log-probs,
        and the per-row callbacks placed there (each sees its micro-batch's map only)."""
        row_cbs = plan.at(Placement.PRE_PASS, batch_global=False)
        pre = micro.pre_pass(
            self.policy, rollouts, micro_batch_size=self.optim.micro_batch_size, temperature=self._temperature,
            capture_layers=plan.pre_pass_layers, capture_heads=plan.heads, with_reference=self.loss_cfg.beta > 0,
            run_callbacks=(lambda view: self._run_callbacks(row_cbs, view)) if row_cbs else None,
            logits_bytes=self._logits_bytes(), share_prefix=self.share_prefix)
        timer.move("old_pass", "credit", pre.credit_seconds)
        rollouts.old_logprobs, rollouts.entropies = pre.old_logprobs, pre.entropies
        if pre.token_weights is not None:
            rollouts.token_weights = pre.token_weights
        if pre.token_scores is not None:
            rollouts.token_scores = pre.token_scores
        rollouts.metrics.update(pre.metrics)
        return pre

    def _update(self, rollouts: RolloutBatch, plan, pre, timer: PhaseTimer) -> dict[str, float]:
        """PPO-clip: `ppo_epochs` passes, each split into `mini_batches` optimizer steps, each
        accumulated over micro-batches that own their forward, weights and loss."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        b = rollouts.batch_size
        mb_size = math.ceil(b / self.optim.mini_batches)
        world = dist.rank_world(self.trainer)[1]
        outputs = micro.Assembled(tuple(rollouts.input_ids.shape))  # for logging only, never read back
        credit_metrics: dict[str, float] = {}
        sums: dict[str, float] = {}
        n_minibatches = 0
        for epoch in range(self.optim.ppo_epochs):
            order = torch.randperm(b) if self.optim.mini_batches > 1 else torch.arange(b)
            for rows in (r.sort().values for r in order.split(mb_size)):  # a prompt's rows together: packable
                opt.zero_grad(set_to_none=True)
                # tokens of the mini-batch over all processes: DDP averages gradients, so each
                # process scales by world/total to give the global token mean (token-mean aggregation)
                mb_tokens = dist.all_sum(self, rollouts.response_mask[rows].sum()).clamp(min=1)
                for idx in micro.split_rows(rows, self.optim.micro_batch_size):
                    mb = micro.MicroBatch.of(rollouts, idx)
                    found = self._micro_loss(rollouts, mb, plan, pre, timer, credit_metrics,
                                             outputs if epoch == 0 else None)
                    if found is None:  # non-finite attention map: this mini-batch's update is skipped
                        continue
                    loss, m = found
                    tok_share = mb.view.response_mask.sum().float() / mb_tokens * world
                    share = (tok_share if self.loss_cfg.aggregation == "token-mean"
                             else torch.tensor(len(idx) / len(rows)))
                    if not bool(torch.isfinite(loss)):
                        self.guard.flag("non-finite loss")
                    with timer("backward"):
                        self.manual_backward(loss * share.to(loss.device))
                    for k, v in {"loss": loss, **m}.items():  # diagnostics are token means
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) * float(share if k == "loss" else tok_share)
                with timer("backward"):  # clip and optimizer step count as backward
                    self._optimizer_step(opt, sched)  # a non-finite mini-batch is skipped, see guards
                n_minibatches += 1
        rollouts.metrics.update(credit_metrics)  # and for the logs, the weights and entropies the update used:
        rollouts.token_weights = outputs.get("weights", default=rollouts.response_mask)
        rollouts.entropies = outputs.get("entropy") if "entropy" in outputs.parts else rollouts.entropies
        rollouts.token_scores = outputs.get("scores") if "scores" in outputs.parts else rollouts.token_scores
        out = {f"train/{k}": v / n_minibatches for k, v in sums.items()}
        out["train/lr"] = sched.get_last_lr()[0]
        return out

    def _micro_loss(self, rollouts, mb: micro.MicroBatch, plan, pre, timer, credit_metrics, outputs):
        """Forward -> weights -> loss of one micro-batch; None when its attention map is non-finite."""
        pass_kw = dict(temperature=self._temperature, logits_bytes=self._logits_bytes(), share_prefix=self.share_prefix)
        ref = mb.take(pre.ref_logprobs) if pre is not None else None
        if ref is None and self.loss_cfg.beta > 0:
            with timer("reference"):
                ref = micro.reference_logprobs(self.policy, mb, **pass_kw)
        bonus = self.loss_cfg.entropy_coef != 0
        with timer("forward"):
            fwd = micro.forward(self.policy, mb, capture_layers=plan.forward_layers, capture_heads=plan.heads,
                                with_grad=True, entropy_grad=bonus, **pass_kw)
        timer.move("forward", "credit", fwd.attn_seconds)  # the map's recompute is credit cost
        old = mb.take(pre.old_logprobs) if pre is not None else fwd.logprobs.detach()
        entropy = mb.take(pre.entropies) if pre is not None else fwd.entropy.detach()  # arms and logs: no graph
        weights = self._micro_weights(rollouts, mb, plan, fwd, old, entropy, timer, credit_metrics)
        if weights is None:
            return None
        if outputs is not None:
            outputs.add("weights", mb, weights)
            outputs.add("entropy", mb, entropy)
            outputs.add("scores", mb, mb.view.token_scores)  # set by the arms that ran in this forward
        return policy_loss(
            fwd.logprobs, old, mb.view.advantages, mb.view.response_mask, token_weights=weights,
            eps_low=self.loss_cfg.eps_low, eps_high=self.loss_cfg.eps_high, aggregation=self.loss_cfg.aggregation,
            beta=self.loss_cfg.beta, max_len=self.sampling.max_new_tokens, ref_logprobs=ref,
            sampler_logprobs=mb.view.sampler_logprobs, tis_cap=self.loss_cfg.tis_cap,
            importance_sampling_level=self.loss_cfg.importance_sampling_level,
            entropy=fwd.entropy if bonus else None, entropy_coef=self.loss_cfg.entropy_coef)

    def _micro_weights(self, rollouts, mb, plan, fwd, old, entropy, timer, credit_metrics):
        """This micro-batch's token weights: from the arms placed in its forward, else the step's."""
        in_forward = plan.at(Placement.IN_FORWARD)
        if in_forward:
            view = mb.view
            view.old_logprobs, view.entropies, view.attn = old, entropy, fwd.attn
            if fwd.attn is not None and not bool(torch.isfinite(fwd.attn).all()):
                self.guard.flag("non-finite attention map")
                return None
            with timer("credit"):
                self._run_callbacks(in_forward, view)
            micro.merge_metrics(credit_metrics, view.metrics, len(mb.idx) / rollouts.batch_size)
            if view.token_weights is not None:
                return view.token_weights
        if rollouts.token_weights is not None:
            return mb.take(rollouts.token_weights)
        return mb.view.response_mask.float()

    # ----------------------------------------------------------------------------- metrics and logs
    def _write_rollouts(self, step: int, rollouts: RolloutBatch, truncated: torch.Tensor) -> None:
        log_dir = self.trainer.log_dir  # once: under DDP every call is a broadcast all ranks must join
        if log_dir is None:
            return
        arm = next((type(cb).__name__ for cb in self._rollout_callbacks() if cb.sets_weights), None)
        records = rollout_records(rollouts, self.tokenizer, step, truncated=truncated,
                                  token_scores=self.log_token_scores, arm=arm)
        lines = dist.gather_to_zero(self, records)  # rank order = prompt order
        if lines is not None:
            os.makedirs(log_dir, exist_ok=True)
            # One write() of whole lines, fsynced: a crash never leaves half a record behind.
            append_lines(os.path.join(log_dir, "rollouts.jsonl"), "\n".join(lines) + "\n")

    # ----------------------------------------------------------------------------- validation
    # validation runs on the evaluation engine (flowtracer.train.validation): per-set avg@k,
    # pass@k', maj@k, math_avg; val/pass@1 kept.
    def validation_step(self, rows, batch_idx):
        validation.validation_step(self, rows)

    def on_validation_epoch_end(self):
        validation.on_validation_epoch_end(self)

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
                                    "skips": self.guard.skips.state_dict()}

    def on_load_checkpoint(self, checkpoint) -> None:
        state = checkpoint.get("flowtracer", {})
        self.rl_step = state.get("rl_step", 0)
        self._resumed_steps = self.rl_step
        self.guard.skips.load_state_dict(state.get("skips", {}))
        self.val_history = list(map(tuple, state.get("val_history", [])))
