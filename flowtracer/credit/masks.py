"""The flow's source and sink as token masks, for a trainer that hands over token ids and text only.

`question_mask`: the prompt tokens overlapping the question's characters (the last occurrence of the
question in the decoded prompt; all prompt tokens when it is not found), as the suite's prompt
formatting and `flowtracer.generation.question_mask` mark them. `answer_mask`: the tokens of the
final answer that the extractors (flowtracer.rewards.extract.final_answer, the math verifier's
rules) find in the decoded completion; a truncated completion (no EOS) whose answer only a fallback
extractor (last number, last line) finds has none (flowtracer.rewards.graded, as in training and eval). A response
without an answer span gets uniform weights from every arm, and is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flowtracer.generation import response_token_offsets
from flowtracer.rewards.base import Score, gradable
from flowtracer.rewards.extract import DEFAULT_EXTRACTION, FALLBACK_EXTRACTORS, check_extraction, final_answer
from flowtracer.rewards.spans import char_span_to_token_mask, locate_question_span

# answer_span(text, truncated) -> [start, end) of the answer in `text`, or None
AnswerSpan = Callable[[str, bool], "tuple[int, int] | None"]


def question_mask(tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, questions: Sequence[str | None]) -> Tensor:
    """(B, P) bool: the tokens of each row's question inside its prompt (all prompt tokens if not found).

    `prompt_ids` (B, P) are the tokens the model saw (special tokens included), `prompt_mask` marks the
    real ones; `questions[b]` is the question text (None = the whole prompt is the source).
    """
    out = torch.zeros_like(prompt_mask, dtype=torch.bool)
    memo: dict[tuple, Tensor] = {}  # the G rows of a prompt share it
    for b, question in enumerate(questions):
        cols = prompt_mask[b].bool().nonzero().squeeze(-1)
        ids = prompt_ids[b, cols].tolist()
        key = (tuple(ids), question)
        if key not in memo:
            text = tokenizer.decode(ids, skip_special_tokens=False)
            span = locate_question_span(text, question) if question else None
            mask = char_span_to_token_mask(_offsets(tokenizer, ids, text), span, len(ids))
            memo[key] = mask if bool(mask.any()) else torch.ones(len(ids), dtype=torch.bool)
        out[b, cols] = memo[key].to(out.device)
    return out


def answer_mask(tokenizer, completion_ids: Tensor, completion_mask: Tensor, eos_ids: Sequence[int], *,
                extraction: Sequence[str] | AnswerSpan = DEFAULT_EXTRACTION) -> Tensor:
    """(B, C) bool: the final-answer tokens of each completion (none where no answer is found).

    `completion_ids` (B, C) are right-padded, `completion_mask` marks the real tokens (EOS included);
    a row that does not end in one of `eos_ids` is truncated. `extraction`: extractor names tried in
    order (flowtracer.rewards.extract), or a function `(text, truncated) -> span or None`.
    """
    find = answer_finder(extraction)
    eos = set(int(i) for i in eos_ids)
    out = torch.zeros_like(completion_mask, dtype=torch.bool)
    for b in range(completion_ids.shape[0]):
        cols = completion_mask[b].bool().nonzero().squeeze(-1)
        ids = completion_ids[b, cols].tolist()
        if not ids:
            continue
        text = tokenizer.decode(ids, skip_special_tokens=True)
        span = find(text, ids[-1] not in eos)
        if span is not None:
            out[b, cols] = char_span_to_token_mask(response_token_offsets(tokenizer, ids, text), span,
                                                   len(ids)).to(out.device)
    return out


def answer_finder(extraction: Sequence[str] | AnswerSpan) -> AnswerSpan:
    """`(text, truncated) -> span or None` for extractor names (checked here: InputError) or a function."""
    if callable(extraction):
        return extraction
    names = check_extraction(extraction)

    def find(text: str, truncated: bool):
        name, found = final_answer(text, names)
        if found is None:
            return None
        # the one rule of fit, validation and eval: a cut-off derivation's last number is not its answer
        score = Score(0.0, found[1], found[0], fallback=name in FALLBACK_EXTRACTORS)
        return found[1] if gradable(score, truncated) else None

    return find


def _offsets(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """(start, end) of each token in `text` = decode(ids) with special tokens kept.

    Re-tokenising usually reproduces `ids` and gives exact offsets; otherwise growing prefixes are
    decoded (exact, slower).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] == ids:
        return [tuple(o) for o in enc["offset_mapping"]]
    ends = [len(p) for p in tokenizer.batch_decode([ids[: j + 1] for j in range(len(ids))], skip_special_tokens=False)]
    return list(zip([0] + ends[:-1], ends))
