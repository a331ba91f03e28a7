"""Scoring of one step's responses: verifier rewards, answer-token masks (the flow sinks) and the
RolloutBatch the credit arms and the loss read. Shared by the trainer and the analysis tools.

A reward function that returns a bare number gets its answer span from the row's extractors
(flowtracer.rewards.extract.row_extraction: data.answer_extraction, by default answer tag, box,
####, last number), found independently of the reward. A response the verifier finds no answer
in gets reward 0 and no answer span (credit falls back to uniform for it, counted in
`answer/no_span`). A TRUNCATED response whose answer was only found by a
fallback extractor (last number, last line: no explicit answer marker) is treated the same way: the
model never finished its answer, and the last number of a cut-off derivation is an arbitrary
intermediate value, not a flow sink (counted in `answer/truncated_fallback`; for a span located for a
bare-number reward only the span is dropped, the reward stays the function's). A closed
`\\boxed{}` or `<answer>` in a truncated response still counts: the answer was written. The rule is
flowtracer.rewards.graded, the one validation and `flowtracer eval` grade by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowtracer.batch import Generated, RolloutBatch
from flowtracer.generation import response_token_offsets
from flowtracer.rewards import Score, VerifierCache, char_span_to_token_mask, graded, safe_score
from flowtracer.rewards.combine import RewardSet
from flowtracer.rewards.extract import row_extraction
from flowtracer.rl import group_advantages


@dataclass
class Scored:
    """Verdicts on a batch of responses (one per row of a Generated)."""

    rewards: Tensor  # (B,) float32
    answer_mask: Tensor  # (B, T) bool: the tokens of the parsed final answer
    scores: list[Score]
    errors: int  # verifier calls that raised or returned a non-number (scored 0)
    no_span: int  # responses without an answer span (no answer, or a span no token covers)
    truncated_fallback: int  # truncated responses whose fallback-extracted answer was refused
    per_fn: dict[str, list[float]] | None = None  # data.rewards: each function's rewards (unweighted)


def score_responses(tokenizer, verifiers: VerifierCache, rows: list[dict], gen: Generated,
                    rewards: RewardSet | None = None) -> Scored:
    """Score response i against rows[i] (one row per response) and map answer spans onto tokens.

    With `rewards` (data.rewards) the reward is their weighted total and the answer span is that of
    the function that supplies it (flowtracer.rewards.combine; a failing function raises RewardError);
    otherwise each row's verifier, whose failures score 0 and are counted."""
    answer_mask = torch.zeros_like(gen.response_mask, dtype=torch.bool)
    scores, errors, no_span, refused = [], 0, 0, 0
    per_fn = None
    if rewards is not None:
        prompts = gen.prompts or [""] * len(rows)
        verdicts, per_fn = rewards.score(list(gen.responses), prompts, rows, row_extraction)
    for i, (row, text) in enumerate(zip(rows, gen.responses)):
        if rewards is None:
            score, error = safe_score(verifiers(row), text, row.get("answer"), locate=row_extraction(row))
            errors += error is not None
        else:
            score = verdicts[i]
        score, was_refused = graded(score, bool(gen.truncated[i]))  # the rule validation and eval use too
        refused += was_refused
        if was_refused and per_fn is not None:
            per_fn[rewards.answer.name][i] = score.reward
        scores.append(score)
        if score.answer_span is None:
            no_span += 1
            continue
        cols = gen.response_mask[i].nonzero().squeeze(-1)
        ids = gen.input_ids[i, cols].tolist()
        tok_mask = char_span_to_token_mask(response_token_offsets(tokenizer, ids, text), score.answer_span, len(ids))
        no_span += not bool(tok_mask.any())  # a span no token covers: credit falls back, counted
        answer_mask[i, cols] = tok_mask.to(answer_mask.device)
    totals = [s.reward for s in scores] if per_fn is None else rewards.total(per_fn)
    rewards_t = torch.tensor(totals, dtype=torch.float32, device=gen.input_ids.device)
    return Scored(rewards_t, answer_mask, scores, errors, no_span, refused, per_fn)


def rollout_batch(gen: Generated, scored: Scored, *, prompts: list[str], answers: list[str],
                  group_size: int, advantage: str | None = "grpo", reduce_sum=None) -> RolloutBatch:
    """The RolloutBatch of scored responses; rows [i*G, (i+1)*G) answer prompt i.

    advantage: a mode of flowtracer.rl.group_advantages ("grpo", "dr_grpo", "rloo", "reinforce_pp"),
    or None for zeros (analysis tools, one response per prompt). reduce_sum: sums a tensor over
    processes (the batch statistics of "reinforce_pp"); None = this process only.
    """
    device = gen.input_ids.device
    n = len(gen.responses)
    group_ids = torch.arange(n // group_size, device=device).repeat_interleave(group_size)
    stats = {}
    if advantage is None:
        advantages = torch.zeros(n, device=device)
    else:
        advantages, stats = group_advantages(scored.rewards, group_ids, mode=advantage, reduce_sum=reduce_sum)
    batch = RolloutBatch(
        input_ids=gen.input_ids, attention_mask=gen.attention_mask, prompt_mask=gen.prompt_mask,
        response_mask=gen.response_mask, question_mask=gen.question_mask, answer_mask=scored.answer_mask,
        rewards=scored.rewards, advantages=advantages.float(), group_ids=group_ids,
        prompts=list(prompts), responses=list(gen.responses), answers=list(answers),
        sampler_logprobs=gen.sampler_logprobs)
    batch.metrics.update({f"adv/{k}": float(v) for k, v in stats.items()})
    batch.metrics.update({
        "reward/errors": float(scored.errors),
        "answer/no_span": float(scored.no_span),
        "answer/no_span_frac": scored.no_span / max(n, 1),
        "answer/truncated_fallback": float(scored.truncated_fallback),
    })
    for name, values in (scored.per_fn or {}).items():  # data.rewards: each function's mean
        batch.metrics[f"reward/{name}"] = sum(values) / max(len(values), 1)
    return batch
