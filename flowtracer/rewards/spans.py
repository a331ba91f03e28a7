"""Map character spans (question in the prompt, answer in the response) onto tokens."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def char_span_to_token_mask(
    offsets: Sequence[tuple[int, int]] | Tensor, span: tuple[int, int] | None, length: int
) -> Tensor:
    """Bool mask (length,) of the tokens whose character range overlaps ``span = [start, end)``.

    `offsets` are per-token ``(start, end)`` character offsets into the same text the span indexes
    (a fast tokenizer's ``return_offsets_mapping`` on the response text). Zero-width tokens
    (``(0, 0)`` specials, end <= start) are never marked. Tokens past `length` are dropped and
    missing ones are False, so `length` can be the padded response width. ``span=None`` or an empty
    span gives all False.
    """
    mask = torch.zeros(length, dtype=torch.bool)
    if span is None or span[1] <= span[0] or len(offsets) == 0:
        return mask
    off = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)[:length]
    start, end = off[:, 0], off[:, 1]
    hit = (end > start) & (start < span[1]) & (end > span[0])
    mask[: hit.shape[0]] = hit
    return mask


def locate_question_span(prompt_text: str, question: str) -> tuple[int, int] | None:
    """[start, end) of the last occurrence of `question` in the formatted prompt, or None.

    The last occurrence, because a chat template or few-shot preamble may quote earlier text; the
    user's question comes last. Surrounding whitespace of `question` is ignored (templates often
    strip it). None (not found, empty question) means: use all prompt tokens as the flow source.
    """
    q = question.strip()
    if not q:
        return None
    start = prompt_text.rfind(q)
    return (start, start + len(q)) if start >= 0 else None
