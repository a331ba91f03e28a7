"""Final-answer extractors: each returns ``(parsed_text, (start, end))`` or None.

The span indexes the response string, so ``response[start:end] == parsed_text`` always holds;
that span is what becomes the flow sink (the answer tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from flowtracer.errors import InputError

Extracted = tuple[str, tuple[int, int]]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH = re.compile(r"####([^\n]*)")
# Integers, thousands separators, decimals and simple fractions ("1/2"); a leading minus sign.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _trimmed(text: str, start: int, end: int, trailing: str = "") -> Extracted | None:
    """Shrink [start, end) past surrounding whitespace (and `trailing` chars at the end)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] in trailing):
        end -= 1
    return (text[start:end], (start, end)) if end > start else None


def _last_group(pattern: re.Pattern, text: str) -> Extracted | None:
    """Group 1 of the last match of `pattern`, trimmed (a trailing period dropped)."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    return _trimmed(text, matches[-1].start(1), matches[-1].end(1), trailing=".")


def answer_tag(text: str) -> Extracted | None:
    """Content of the last complete ``<answer>...</answer>`` (an unclosed tag does not count)."""
    return _last_group(_ANSWER_TAG, text)


def boxed(text: str) -> Extracted | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}``, nested braces matched.

    An unbalanced last box (a truncated response) gives None rather than an earlier box: the
    final answer was never finished.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return _trimmed(text, start, i)
    return None


def hash_answer(text: str) -> Extracted | None:
    """The rest of the line after the last ``####`` (GSM8K style), trailing period dropped."""
    return _last_group(_HASH, text)


def last_number(text: str) -> Extracted | None:
    """The last number in the text (e.g. ``-3``, ``1,000``, ``2.5``, ``1/2``)."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return m.group(0), (m.start(), m.end())


def last_line(text: str) -> Extracted | None:
    """The last non-empty line, stripped."""
    end = len(text)
    while end > 0:
        start = text.rfind("\n", 0, end) + 1
        found = _trimmed(text, start, end)
        if found is not None:
            return found
        end = start - 1
    return None


EXTRACTORS: dict[str, Callable[[str], Extracted | None]] = {
    "answer_tag": answer_tag,
    "boxed": boxed,
    "hash": hash_answer,
    "last_number": last_number,
    "last_line": last_line,
}


# The math verifier's order, and where a reward function that returns a bare number gets its answer span.
DEFAULT_EXTRACTION = ("answer_tag", "boxed", "hash", "last_number")

# Extractors that find an answer without an explicit answer marker: in a truncated response they
# would name an arbitrary intermediate value as the answer.
FALLBACK_EXTRACTORS = frozenset({"last_number", "last_line"})


def row_extraction(row: dict) -> tuple[str, ...]:
    """The extractors that locate the answer span of a reward that returns a bare number: the row's
    ``answer_extraction`` (data.answer_extraction), else DEFAULT_EXTRACTION."""
    return tuple(row.get("answer_extraction") or DEFAULT_EXTRACTION)


def check_extraction(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate extractor names early (config errors should fail at construction, not mid-run)."""
    names = tuple(names)
    unknown = [n for n in names if n not in EXTRACTORS]
    if unknown or not names:
        raise InputError(f"unknown extractor(s) {unknown or names}; valid: {', '.join(EXTRACTORS)}")
    return names


def extract_answer(text: str, names: tuple[str, ...]) -> tuple[str, Extracted | None]:
    """Run the extractors in order; the first that matches wins. Returns (name, result)."""
    for name in names:
        found = EXTRACTORS[name](text)
        if found is not None:
            return name, found
    return "", None


def final_answer(text: str, names: tuple[str, ...]) -> tuple[str, Extracted | None]:
    """`extract_answer`, then a ``\\boxed{}`` inside the chosen ``<answer>`` / ``####`` text narrows
    the answer to the box content (the span still indexes `text`). Returns (extractor name, result)."""
    name, found = extract_answer(text, names)
    if found is not None and name in ("answer_tag", "hash"):
        start = found[1][0]
        inner = boxed(found[0])
        if inner is not None:
            found = (inner[0], (start + inner[1][0], start + inner[1][1]))
    return name, found


# The opening scaffold each marker extractor needs right before its answer ("<answer>", "\\boxed{",
# "####"), and the phrase a fallback answer is often announced with ("The answer is").
_SCAFFOLDS = (
    ("answer_tag", re.compile(r"<answer>\s*$")),
    ("boxed", re.compile(r"\\(?:boxed|fbox)\s*\{\s*$")),
    ("hash", re.compile(r"####\s*$")),
)
_ANSWER_IS = re.compile(r"(?:\b(?:the|my)\s+)?(?:\bfinal\s+)?\banswer\s+is\s*:?\s*\$?\s*$", re.IGNORECASE)


def scaffold_span(text: str, answer_span: tuple[int, int]) -> tuple[int, int] | None:
    """[start, end) of the answer's opening scaffold in `text`, or None.

    The scaffold is the marker of the extractor that produced `answer_span` (the one whose span it
    is): "<answer>" (answer_tag), "\\boxed{" / "\\fbox{" (boxed), "####" (hash), with the
    whitespace up to the answer; an answer no marker extractor produced (last_number, last_line)
    has the scaffold "The answer is" (also "Answer is", "The final answer is:") when the text
    before it ends with that phrase.
    """
    start = answer_span[0]
    head = text[:start]
    for name, pattern in _SCAFFOLDS:
        found = EXTRACTORS[name](text)
        if found is not None and tuple(found[1]) == tuple(answer_span):
            m = pattern.search(head)
            return (m.start(), m.end()) if m else None
    tail = max(0, start - 64)  # the phrase is short: search only the tail
    m = _ANSWER_IS.search(head, tail)
    return (m.start(), m.end()) if m else None
