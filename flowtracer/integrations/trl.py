"""FlowTracer credit inside TRL's GRPOTrainer: per-token advantages A_i * w_t from any credit arm.

    from flowtracer.credit import FlowCredit
    from flowtracer.integrations.trl import FlowGRPOTrainer

    trainer = FlowGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                              credit=FlowCredit(top_frac=0.4, gamma=1.5))

After TRL has generated and scored a batch (`_generate_and_score_completions`: TRL's `generate`, a
`rollout_func`, or vLLM in colocate or server mode alike), the adapter
  1. marks the question in each prompt (the dataset's `question_column`, else the last user message)
     and the final answer in each completion (`extraction`: extractor names or a function), on the
     token ids TRL built (flowtracer.credit.masks);
  2. gets the attention map (or entropies) the arm reads, from the policy, adapters on: either
     fused, from TRL's own loss forward of each micro-batch (no extra pass; where the arm reads only
     the map and that forward runs the policy that sampled, as in the suite's default), or from a
     separate no-grad capture pass right away (eval mode, TRL's autocast, the sampling temperature;
     flowtracer.credit.weights.compute_credit: for a map-only arm each prompt runs once for its G
     completions and the forward stops at the attention of the arm's last layer; an entropy arm
     runs every layer and the vocabulary head);
  3. runs the arm and hands TRL `advantages[:, None] * weights` over the completion tokens, (B, C)
     instead of (B,): TRL's `_compute_loss` takes per-token advantages from subclasses, for every
     loss type.
The credit stats (credit/fallback_frac, credit/reached_frac, credit/selected_frac, credit/seconds,
...) go into TRL's own metrics, one entry per generation batch, logged with `reward`, `kl` and the
rest. Evaluation batches keep TRL's plain advantages (the eval loss is plain GRPO's).

Tested with trl 1.16 only (TESTED_TRL); another version is refused on import, in one line.
"""

from __future__ import annotations

import time
import warnings

import torch
from packaging.version import Version

from flowtracer.credit.masks import DEFAULT_EXTRACTION, answer_finder, answer_mask, question_mask
from flowtracer.credit.weights import compute_credit, credit_batch, merge_metrics, weights_from_pass
from flowtracer.errors import InputError
from flowtracer.model.capture import capture_attention

try:
    import trl
except ImportError as exc:  # the adapter is an optional extra
    raise ImportError("flowtracer.integrations.trl needs TRL: pip install 'flowtracer[trl]'") from exc

TESTED_TRL = (">=1.16", "<1.17")
FALLBACK_WARN = 0.5  # warn when more than this share of a batch's responses gets uniform weights


def check_trl_version(version: str) -> None:
    """Refuse a TRL outside the tested range (the adapter relies on GRPOTrainer internals)."""
    v = Version(version)
    if not Version(TESTED_TRL[0][2:]) <= v < Version(TESTED_TRL[1][1:]):
        raise ImportError(f"flowtracer.integrations.trl is tested with trl{','.join(TESTED_TRL)}, found trl "
                          f"{version}: install the tested one with pip install 'flowtracer[trl]'")


check_trl_version(trl.__version__)
from accelerate.utils import gather_object  # noqa: E402 - TRL's own dependency, once the version is known to fit
from trl import GRPOTrainer  # noqa: E402


class FlowTracerMixin:
    """Token credit for a GRPOTrainer (or any subclass of it): see the module docstring.

    Args (keyword-only, besides the trainer's own):
        credit: a credit arm from flowtracer.credit (FlowCredit, AttentionCredit, EntropyCredit,
            RandomCredit, UniformCredit) or any RolloutCallback that sets token weights.
        extraction (default: answer_tag, boxed, hash, last_number): where the answer is, the flow's
            sink: extractor names tried in order (flowtracer.rewards.extract), or a function
            `(completion_text, truncated) -> (start, end) or None`. No answer: all-ones weights, counted.
        question_column (default "question"): the dataset column with the bare question, the flow's
            source; rows without it use the last user message (or the prompt string), and a question
            not found in the prompt makes every prompt token a source.
        fuse (default None = where it applies): take the map from TRL's own loss forward instead of a
            separate pass. It applies to an arm that reads only the map, per row (FlowCredit,
            AttentionCredit), when the loss forward runs the policy that sampled (num_iterations 1,
            steps_per_generation dividing gradient_accumulation_steps). False = always the pass.
        micro_batch_size (default: per_device_train_batch_size): rows per separate capture forward.
    """

    def __init__(self, *args, credit, extraction=DEFAULT_EXTRACTION, question_column: str | None = "question",
                 fuse: bool | None = None, micro_batch_size: int | None = None, **kwargs):
        if not callable(getattr(credit, "apply", None)) or not hasattr(credit, "needs_attention"):
            raise InputError(f"credit={credit!r} is not a credit arm: pass e.g. flowtracer.credit.FlowCredit()")
        answer_finder(extraction)  # a bad extractor name fails here, not after the first generation
        super().__init__(*args, **kwargs)
        self.credit, self.extraction, self.question_column = credit, extraction, question_column
        self.credit_micro_batch_size = micro_batch_size or self.args.per_device_train_batch_size
        self.fuse_credit = self._fusable() if fuse is None else bool(fuse)
        if self.fuse_credit and not self._fusable():
            raise InputError("fuse=True needs an arm that reads only the attention map, per row (FlowCredit, "
                             "AttentionCredit), num_iterations=1 and gradient_accumulation_steps a multiple of "
                             "steps_per_generation; pass fuse=None to decide automatically")
        self._credit_pending = None  # the loss inputs whose forward the map is taken from (fused)
        self._credit_parts: list[tuple[dict[str, float], int]] = []  # fused: stats of this generation batch
        self._credit_warned = False

    def _fusable(self) -> bool:
        arm, args = self.credit, self.args
        return (bool(arm.needs_attention) and not arm.needs_entropy and not arm.batch_global
                and args.num_iterations == 1 and args.gradient_accumulation_steps % args.steps_per_generation == 0)

    # ------------------------------------------------------------------ after TRL generates and scores
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        if "pixel_values" in out:
            raise InputError("flowtracer.integrations.trl supports text-only models (the capture pass has no images)")
        t0 = time.perf_counter()
        masks = self._credit_masks(inputs, out)
        if self.fuse_credit:  # the weights come with the loss forward; the masks travel with the batch
            B = masks["flowtracer_response_mask"].shape[0]
            out.update(masks, flowtracer_seconds=torch.full((B,), (time.perf_counter() - t0) / B))
            return out
        weights, metrics = self._credit_pass(out, masks)
        out["advantages"] = out["advantages"][:, None] * weights
        self._log_credit({**metrics, "credit/seconds": time.perf_counter() - t0, "credit/forward_seconds": 0.0})
        return out

    def _credit_masks(self, inputs, out) -> dict[str, torch.Tensor]:
        """The question (B, P), answer (B, C) and ranked-response (B, C) masks of TRL's batch."""
        tok = self._credit_tokenizer()
        c_ids, c_mask = out["completion_ids"], out["completion_mask"]
        eos = getattr(self, "eos_token_ids", None) or [tok.eos_token_id]
        questions = [question_of(row, self.question_column) for row in inputs]
        return {"flowtracer_question_mask": question_mask(tok, out["prompt_ids"], out["prompt_mask"], questions),
                "flowtracer_answer_mask": answer_mask(tok, c_ids, c_mask, eos, extraction=self.extraction),
                "flowtracer_response_mask": c_mask.bool() & out.get("tool_mask", c_mask).bool()}

    def _credit_pass(self, out, masks) -> tuple[torch.Tensor, dict[str, float]]:
        """The separate no-grad capture pass and the arm: (B, C) weights over the completions, stats."""
        batch = _layout(out, masks)
        with self.accelerator.autocast():
            credit = compute_credit(
                self.credit, self.model, *batch, temperature=self.args.temperature,
                micro_batch_size=self.credit_micro_batch_size, tokenizer=self._credit_tokenizer(),
                step=self.state.global_step, stop_early=not (self.is_deepspeed_enabled or self.is_fsdp_enabled))
        return credit.weights[:, out["prompt_ids"].shape[1]:].to(out["advantages"].dtype), credit.metrics

    # ------------------------------------------------------------------ fused: the map of TRL's loss forward
    def _compute_loss(self, model, inputs):
        if "flowtracer_answer_mask" not in inputs:
            return super()._compute_loss(model, inputs)
        self._credit_pending = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._credit_pending = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kwargs):
        inputs, self._credit_pending = self._credit_pending, None  # the loss's own forward only
        if inputs is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)
        heads = getattr(self.credit, "capture_heads", "mean")
        with capture_attention(self.accelerator.unwrap_model(model), self.credit.capture_layers,
                               attention_mask=attention_mask, heads=heads) as captured:
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)
        t0 = time.perf_counter()
        P = inputs["prompt_ids"].shape[1]
        batch = credit_batch(*_layout(inputs, inputs))
        part = weights_from_pass(self.credit, batch, captured.attn, tokenizer=self._credit_tokenizer(),
                                 step=self.state.global_step)
        # _compute_loss reads inputs["advantages"] after this forward: the weights reach this very loss
        inputs["advantages"] = inputs["advantages"][:, None] * part.weights[:, P:].to(inputs["advantages"].dtype)
        forward_s = captured.seconds + time.perf_counter() - t0
        self._collect_fused({**part.metrics, "credit/forward_seconds": forward_s,
                             "credit/seconds": forward_s + float(inputs["flowtracer_seconds"].sum())},
                            len(input_ids))
        return result

    def _collect_fused(self, metrics: dict[str, float], rows: int) -> None:
        """One log entry per generation batch, as the separate pass gives (seconds summed, the rest row means)."""
        self._credit_parts.append((metrics, rows))
        if len(self._credit_parts) < self.args.steps_per_generation:
            return
        total, n = {}, sum(r for _, r in self._credit_parts)
        for part, r in self._credit_parts:
            merge_metrics(total, part, r / n)
        self._credit_parts = []
        self._log_credit(total)

    # ------------------------------------------------------------------ logging
    def _credit_tokenizer(self):
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    def _log_credit(self, metrics: dict[str, float]) -> None:
        """Into TRL's metrics (averaged over processes, logged at TRL's logging steps)."""
        if self.accelerator.num_processes > 1:
            parts = gather_object([metrics])
            keys = {k for p in parts for k in p}
            metrics = {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}
        for k in sorted(metrics):
            self._metrics["train"][k].append(metrics[k])
        fallback = metrics.get("credit/fallback_frac", 0.0)
        if fallback > FALLBACK_WARN and not self._credit_warned:
            self._credit_warned = True
            warnings.warn(f"FlowTracer: {fallback:.0%} of a batch's responses got uniform weights (no answer span, "
                          f"or flow that does not reach it); check that extraction={self.extraction!r} finds the "
                          "answer your prompts ask for (credit/no_answer_frac is logged)", stacklevel=2)


def _layout(out, masks) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, prompt, response, question, answer masks) over prompt + completion columns."""
    p_ids, p_mask, c_ids, c_mask = out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]
    none_p, none_c = torch.zeros_like(p_mask, dtype=torch.bool), torch.zeros_like(c_mask, dtype=torch.bool)
    return (torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), torch.cat([p_mask.bool(), none_c], 1),
            torch.cat([none_p, masks["flowtracer_response_mask"]], 1),
            torch.cat([masks["flowtracer_question_mask"], none_c], 1),
            torch.cat([none_p, masks["flowtracer_answer_mask"]], 1))


def question_of(row: dict, column: str | None) -> str | None:
    """The question text of a dataset row: `row[column]`, else the last user message, else the prompt string."""
    if column and isinstance(row.get(column), str):
        return row[column]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


def with_flowtracer(trainer_cls: type) -> type:
    """`trainer_cls` (GRPOTrainer or a subclass of it) with FlowTracer credit: `credit=` and the options above."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, GRPOTrainer)):
        raise InputError(f"{trainer_cls!r} is not a subclass of trl.GRPOTrainer: wrap GRPOTrainer or a subclass of it")
    return type(f"FlowTracer{trainer_cls.__name__}", (FlowTracerMixin, trainer_cls),
                {"__module__": trainer_cls.__module__, "__doc__": FlowTracerMixin.__doc__})


class FlowGRPOTrainer(FlowTracerMixin, GRPOTrainer):
    """trl.GRPOTrainer with FlowTracer token credit (see FlowTracerMixin for `credit=` and the options)."""
