"""Every settings dataclass in one place: what a YAML config (or `--print_config`) can set.

YAML keys: `model.sampling` / `model.val_sampling` (SamplingConfig), `model.loss` (LossConfig),
`model.optim` (OptimConfig), `model.dapo` (DapoConfig), `model.lora` (LoraSpec),
`data.eval_sets.<name>` (EvalSet), `data.task_kwargs` of the `chains` source (ChainSpec).
Pure Python (+ torch for the optimizer it builds); every other package imports from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from flowtracer.errors import InputError

LEGACY_SET = "default"  # the one eval set of a config without data.eval_sets (data.val_source / val_size)
CHAIN_OPS = ("+", "-", "*")  # operators the chains generator knows


@dataclass
class SamplingConfig:
    """How responses are sampled (see flowtracer.generation: chunks, engines).

    Args:
        num_generations: responses per prompt (G, the GRPO group size; >= 2).
        max_new_tokens: cap on response length in tokens.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass (1.0 = off).
        top_k: sample among the k most likely tokens (0 = off).
        seed_per_prompt: draw every response from its own seed (run seed, step, prompt position,
            sample index) instead of one RNG stream for the batch, so rollouts do not depend on
            how prompts are batched or split over processes: a DDP run then equals a 1-process
            run (see flowtracer.generation.sampler). Off by default (HF's sampler, the original runs).
        cache_implementation: HF generate's KV cache for engine "hf": None = dynamic (grows per
            token), "static" (preallocated; on CUDA transformers then compiles the decoding step
            once, which pays off on long runs of same-shaped batches; on CPU it stays eager and is
            no faster, see benchmarks/generate_bench.py).
        share_prompt_prefill: run each prompt's prefill once and copy its KV cache to its G rows,
            instead of prefilling the same prompt G times. Same cache up to float rounding; dynamic
            cache only.
        generation_batch_size: rows (responses) per generate call, in whole prompt groups:
            0 = all rows of the step in one call (default), N > 0 = at most N rows (at least one
            prompt's G rows), "auto" = the largest count whose KV cache fits the memory the
            planner leaves free (flowtracer.memory.planner). Prompts are sorted by length first;
            results come back in the original order, identical for greedy and seed_per_prompt sampling.
        generation_token_budget: also cap rows x (prompt + max_new_tokens) tokens per call
            (0 = off); bounds the KV cache when prompt lengths vary.
        cpu_packed_linear: engine "hf" on CPU in float32: decode with MKL-packed weights
            (flowtracer.generation.cpu_linear): the same linear layers through a faster GEMM for the
            decode batch's row count, equal up to float rounding; the packed copies take about twice
            the linear weights' memory. No effect on GPU or without MKL.
        engine: the generation engine (flowtracer.generation.ENGINES): "auto" (default: "fast" on
            a CPU for the models it supports, else "hf"; the start-up line names the pick), "fast"
            (our own decode loop over a static KV cache, Llama / Mistral / Qwen2 / Qwen3; the same
            samples as "hf" up to float rounding, results/decode_*.md), "hf" (model.generate),
            "hf_static" (static cache + compiled decoding, CUDA), "hf_paged" (continuous batching
            with paged attention, CUDA; no seed_per_prompt).
        dtype: precision of the rollouts (flowtracer.generation.precision): "auto" (default),
            "float32" or "bfloat16". The weights are cast to it for the generate call (frozen ones
            once per run) and autocast is off there, so this alone decides the sampler's numerics.
            "auto" = bfloat16 when training computes in bf16 (trainer.precision bf16-mixed or
            16-mixed, or model_dtype bfloat16) and the hardware multiplies bf16 natively (CUDA, or
            a CPU with AVX512-BF16 or AMX); otherwise the weights' own dtype. Where the sampler's
            numerics differ from the learner's, `fit` records the sampler's log-probs and corrects
            with `loss.tis_cap` (docs/rl-step.md).
        draw: how a sampled token is drawn without row seeds (flowtracer.generation.sampler):
            "auto" (default: "inverse_cdf" on the fast engine, "multinomial" on the hf engines),
            "multinomial" (torch.multinomial, HF's own draw: the fast engine then reproduces
            `generate`'s samples), "inverse_cdf" (fast engine only: one uniform per row against the
            cumulative softmax, the same distribution from another RNG stream, 6-57 ms cheaper per
            step at 8-64 rows on a CPU). Runs made before it existed drew "multinomial".
    """

    num_generations: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed_per_prompt: bool = False
    cache_implementation: str | None = None
    share_prompt_prefill: bool = True
    generation_batch_size: int | str = 0
    generation_token_budget: int = 0
    cpu_packed_linear: bool = True
    engine: str = "auto"
    dtype: str = "auto"
    draw: str = "auto"


@dataclass
class LossConfig:
    """The GRPO objective.

    Args:
        advantage: "grpo" (group z-score), "dr_grpo" (group mean only), "rloo" (leave-one-out mean)
            or "reinforce_pp" (REINFORCE++: group mean, then normalised over the batch); formulas in
            docs/rl-step.md.
        eps_low: PPO clip below, ratio >= 1 - eps_low.
        eps_high: PPO clip above, ratio <= 1 + eps_high (DAPO's clip-higher uses 0.28).
        aggregation: "seq-mean-token-mean" (paper), "token-mean" (DAPO), "seq-mean-token-sum-norm" (Dr. GRPO).
        beta: KL (k3) coefficient against the reference (adapters off); 0 = no KL, as in the paper.
        correct_threshold: a reward at or above this counts as a correct answer for accuracy.
        tis_cap: truncated importance sampling for rollouts sampled at another precision than the
            learner's (`sampling.dtype`): each token's policy term is weighted by
            min(pi_old / pi_sampler, tis_cap), as TRL and verl do for vLLM rollouts; 0 = off (the
            mismatch is still logged as mismatch/*). Must be 0 or >= 1. No effect when sampler and
            learner agree (no sampler log-probs are recorded then).
        importance_sampling_level: what the PPO ratio is: "token" (per token, PPO/GRPO; default),
            "sequence" (GSPO: one length-normalised ratio per response, clipped as a whole; only
            with uniform credit, since per-token weights cannot act on it) or "sequence_token"
            (GSPO-token: the sequence's ratio with per-token advantages; every credit arm applies).
            GSPO's paper clips far tighter (eps_low 3e-4, eps_high 4e-4): set eps_* with it.
        entropy_coef: entropy bonus, subtracted as entropy_coef * (the aggregated token entropy of
            the training forward, with its gradient) from the loss (verl's entropy_coeff); 0 = off.
    """

    advantage: str = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "seq-mean-token-mean"
    beta: float = 0.0
    correct_threshold: float = 1.0
    tis_cap: float = 2.0
    importance_sampling_level: str = "token"
    entropy_coef: float = 0.0


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

    def build(self, params) -> dict:
        """AdamW and its linear warm-up, in the form LightningModule.configure_optimizers returns."""
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm = max(self.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def describe(self, prompts: int, g: int, callbacks) -> str:
        """One line saying what a step does with these settings (logged when training starts)."""
        rollouts = prompts * g
        micro = self.micro_batch_size or rollouts // self.mini_batches
        arms = ", ".join(type(c).__name__ for c in callbacks) or "uniform (none set)"
        return (f"[flowtracer] each step: {prompts} prompts x {g} responses = {rollouts} rollouts; "
                f"{self.ppo_epochs} PPO epoch(s) x {self.mini_batches} mini-batch(es) of "
                f"{rollouts // self.mini_batches} rollouts, accumulated in micro-batches of {micro}; credit: {arms}")


@dataclass
class DapoConfig:
    """DAPO knobs (all off by default).

    Args:
        dynamic_sampling: drop zero-reward-variance groups and refill the batch from more prompts.
        max_extra_rounds: cap on extra generation rounds per step for the refill.
        overlong: "off", "mask" (truncated responses give no gradient) or "penalty" (soft
            overlong punishment on the reward).
        overlong_buffer: tokens before max_new_tokens where the penalty ramps from 0 to -factor
            (DAPO: 4096 of 20480); 0 = a penalty of -factor only at max_new_tokens.
        overlong_penalty: the penalty at max_new_tokens (DAPO: 1.0).
        spread_eps: a group counts as zero-variance when max - min of its rewards is <= this.
    """

    dynamic_sampling: bool = False
    max_extra_rounds: int = 2
    overlong: str = "off"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    spread_eps: float = 0.0


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft) on the attention projections.

    Args:
        r (int, default 16): adapter rank.
        alpha (int, default 32): LoRA scaling numerator (the update is scaled by alpha / r).
        dropout (float, default 0.0): dropout on the adapter input; 0 keeps rollouts and the
            update on the same function (the PPO ratio is exactly 1 on the first iteration).
        target_modules (tuple[str, ...], default q_proj, k_proj, v_proj, o_proj): names of the
            linear layers that get adapters (Llama/Qwen/Mistral naming).
        enabled (bool, default True): False = full fine-tuning (same as passing lora=None).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    enabled: bool = True

    def __post_init__(self):
        # YAML gives a list; keep the frozen dataclass hashable
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass
class EvalSet:
    """One named evaluation set (``data.eval_sets.<name>``); None = inherit.

    Args:
        source (str): ``hf:<id>[:<config>][@<split>]``, ``reasoning_gym:<task>``, ``chains`` or a
            local .jsonl/.json/.parquet/.csv file (grammar of flowtracer.data.sources).
        k (int | None, default None): samples per problem (avg@k, maj@k); None = model.val_sampling.num_generations.
        pass_ks (list[int] | None, default None): the k' <= k of pass@k'; None = 1, 2, 4, ... and k.
        temperature (float | None, default None): 0 = greedy; None = model.val_sampling.temperature.
        top_p (float | None, default None): nucleus mass; None = model.val_sampling.top_p.
        max_new_tokens (int | None, default None): response cap; None = model.val_sampling.max_new_tokens.
        size (int | None, default None): rows to read (cap) or to generate (reasoning_gym, default 64).
        question_field / answer_field (str, default question / answer): the row fields.
        verifier (str | None, default None): verifier name; None = per row (default "math").
        verifier_kwargs (dict | None, default None): its init args.
        extraction (list[str] | None, default None): answer extractors in order (shortcut for
            ``verifier_kwargs.extraction`` of the math verifier), e.g. [boxed, answer_tag].
        instruction (str | None, default None): text appended to each question; None = data.instruction,
            "" = none.
        task_kwargs (dict | None, default None): reasoning-gym task config.
        math (bool, default True): counts in the macro average (``math_avg``).
        filter (dict | str | None, default None): keep the source's rows it holds for, e.g.
            ``{tag: aime2024}`` or ``'tag == "aime2024"'`` (flowtracer.data.rows.RowFilter): one
            file can hold several benchmarks.
        map (str | None, default None): ``package.module:function`` run on each record with
            ``Dataset.map`` before the field mapping (returns the fields to add or replace).
        messages_field (str | None, default None): a chat field (a list of {role, content}, or its
            JSON text) whose system turn becomes the system prompt of the row (the file's own prompt,
            rendered with the chat template); None = data.system_prompt.
    """

    source: str
    k: int | None = None
    pass_ks: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    size: int | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    verifier: str | None = None
    verifier_kwargs: dict[str, Any] | None = None
    extraction: list[str] | None = None
    instruction: str | None = None
    task_kwargs: dict[str, Any] | None = None
    math: bool = True
    filter: dict[str, Any] | str | None = None
    map: str | None = None
    messages_field: str | None = None

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> "EvalSet":
        if not isinstance(cfg, dict) or "source" not in cfg:
            raise InputError(f"data.eval_sets.{name} needs a `source` (e.g. hf:HuggingFaceH4/MATH-500@test)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise InputError(f"data.eval_sets.{name}: unknown key(s) {unknown}; valid: {sorted(known)}")
        spec = cls(**cfg)
        if spec.k is not None and spec.k < 1:
            raise InputError(f"data.eval_sets.{name}.k must be >= 1, got {spec.k}")
        return spec

    def row_verifier_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.verifier_kwargs or {})
        if self.extraction:
            kwargs["extraction"] = list(self.extraction)
        return kwargs

    def sampling(self, base):
        """The SamplingConfig of this set: `base` (model.val_sampling) with this set's overrides."""
        k = self.k or base.num_generations
        if self.pass_ks and (max(self.pass_ks) > k or min(self.pass_ks) < 1):
            raise InputError(f"eval set {self.source}: pass_ks {self.pass_ks} must lie in 1..k = {k}; "
                             "raise k or drop the larger k'")
        over = {"num_generations": self.k, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}
        return dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})


@dataclass(frozen=True)
class ChainSpec:
    """Knobs of the generator.

    Args:
        depth (int | list[int], default [2, 3]): solution steps (k - 1 intermediate + the final);
            a list = drawn uniformly per problem.
        distractors (int | list[int], default [1, 2]): unused base variables.
        distractor_steps (int, default 0): unused derived variables (built on distractors).
        low / high (int, default 1 / 9): range of base values and constants (inclusive).
        ops (tuple[str, ...], default ("+", "-")): operators, among "+", "-", "*".
        allow_negative (bool, default False): let "-" produce negative results.
    """

    depth: int | tuple[int, ...] = (2, 3)
    distractors: int | tuple[int, ...] = (1, 2)
    distractor_steps: int = 0
    low: int = 1
    high: int = 9
    ops: tuple[str, ...] = ("+", "-")
    allow_negative: bool = False

    def __post_init__(self):
        for name in ("depth", "distractors", "ops"):
            v = getattr(self, name)
            object.__setattr__(self, name, tuple(v) if isinstance(v, (list, tuple)) else v)
        depths = self.depth if isinstance(self.depth, tuple) else (self.depth,)
        dis = self.distractors if isinstance(self.distractors, tuple) else (self.distractors,)
        if not depths or min(depths) < 1:
            raise InputError(f"chains: depth must be >= 1, got {self.depth}")
        if not dis or min(dis) < 0 or self.distractor_steps < 0:
            raise InputError("chains: distractors and distractor_steps must be >= 0")
        if self.distractor_steps and max(dis) == 0:
            raise InputError("chains: distractor_steps need distractors >= 1 to build on")
        if not self.ops or set(self.ops) - set(CHAIN_OPS):
            raise InputError(f"chains: ops must be a non-empty subset of {sorted(CHAIN_OPS)}, got {self.ops}")
        if not 0 <= self.low <= self.high:
            raise InputError(f"chains: need 0 <= low <= high, got {self.low}, {self.high}")
        if max(depths) + 1 + max(dis) + self.distractor_steps > 26:
            raise InputError("chains: more than 26 variables; lower depth or distractors")
