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
  2. runs the arm's no-grad capture pass on the policy, adapters on, at the sampling temperature,
     and the arm (flowtracer.credit.weights.compute_credit);
  3. hands TRL `advantages[:, None] * weights` over the completion tokens, (B, C) instead of (B,):
     TRL's `_compute_loss` takes per-token advantages from subclasses, for every loss type.
The credit stats (credit/fallback_frac, credit/reached_frac, credit/selected_frac, credit/seconds,
...) go into TRL's own metrics, logged with `reward`, `kl` and the rest. Evaluation batches keep
TRL's plain advantages (the eval loss is plain GRPO's).

Tested with trl 1.16 only (TESTED_TRL); another version is refused on import, in one line.
"""

from __future__ import annotations

import time
import warnings

import torch
from packaging.version import Version

from flowtracer.credit.masks import DEFAULT_EXTRACTION, answer_finder, answer_mask, question_mask
from flowtracer.credit.weights import compute_credit

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
        micro_batch_size (default: per_device_train_batch_size): rows per capture forward.
    """

    def __init__(self, *args, credit, extraction=DEFAULT_EXTRACTION, question_column: str | None = "question",
                 micro_batch_size: int | None = None, **kwargs):
        if not callable(getattr(credit, "apply", None)) or not hasattr(credit, "needs_attention"):
            raise TypeError(f"credit={credit!r} is not a credit arm: pass e.g. flowtracer.credit.FlowCredit()")
        answer_finder(extraction)  # a bad extractor name fails here, not after the first generation
        super().__init__(*args, **kwargs)
        self.credit, self.extraction, self.question_column = credit, extraction, question_column
        self.credit_micro_batch_size = micro_batch_size or self.args.per_device_train_batch_size
        self._credit_warned = False

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        if "pixel_values" in out:
            raise ValueError("flowtracer.integrations.trl supports text-only models (the capture pass has no images)")
        weights, metrics = self._credit_weights(inputs, out)
        out["advantages"] = out["advantages"][:, None] * weights
        self._log_credit(metrics)
        return out

    def _credit_weights(self, inputs, out) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, C) weights over the completion tokens of TRL's batch, and the credit stats."""
        t0 = time.perf_counter()
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        p_ids, p_mask = out["prompt_ids"], out["prompt_mask"]
        c_ids, c_mask = out["completion_ids"], out["completion_mask"]
        response = c_mask.bool() if "tool_mask" not in out else c_mask.bool() & out["tool_mask"].bool()
        eos = getattr(self, "eos_token_ids", None) or [tok.eos_token_id]
        questions = [question_of(row, self.question_column) for row in inputs]
        P, none_p, none_c = p_ids.shape[1], torch.zeros_like(p_mask, dtype=torch.bool), torch.zeros_like(response)
        with self.accelerator.autocast():
            credit = compute_credit(
                self.credit, self.model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1),
                prompt_mask=torch.cat([p_mask.bool(), none_c], 1), response_mask=torch.cat([none_p, response], 1),
                question_mask=torch.cat([question_mask(tok, p_ids, p_mask, questions), none_c], 1),
                answer_mask=torch.cat([none_p, answer_mask(tok, c_ids, c_mask, eos, extraction=self.extraction)], 1),
                temperature=self.args.temperature, micro_batch_size=self.credit_micro_batch_size, tokenizer=tok,
                step=self.state.global_step, stop_early=not (self.is_deepspeed_enabled or self.is_fsdp_enabled))
        metrics = {**credit.metrics, "credit/seconds": time.perf_counter() - t0}
        return credit.weights[:, P:].to(out["advantages"].dtype), metrics

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
        raise TypeError(f"{trainer_cls!r} is not a subclass of trl.GRPOTrainer")
    return type(f"FlowTracer{trainer_cls.__name__}", (FlowTracerMixin, trainer_cls),
                {"__module__": trainer_cls.__module__, "__doc__": FlowTracerMixin.__doc__})


class FlowGRPOTrainer(FlowTracerMixin, GRPOTrainer):
    """trl.GRPOTrainer with FlowTracer token credit (see FlowTracerMixin for `credit=` and the options)."""
