"""Token classes of the weighted tokens (logging only): are the hubs delimiters, numbers, words?

The paper reports flow hubs are mostly delimiters, newlines, repeated variable names and operators;
`class_shares` lets every arm log the same breakdown of the tokens it selected.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

CLASSES = ("punctuation", "newline", "digit", "operator", "word", "whitespace", "special")
OPERATORS = frozenset("+-*/=^<>()×÷−≤≥≠±")

# One {token id: class} dict per tokenizer, dropped with the tokenizer.
_CACHE: "weakref.WeakKeyDictionary[object, dict[int, str]]" = weakref.WeakKeyDictionary()


def token_class(text: str) -> str:
    """Class of one token's decoded text, one of CLASSES.

    Order of the rules: empty or ChatML-like "<|...|>" -> special; only whitespace -> newline if it
    holds a line break, else whitespace; any letter -> word (variable names, "x2"); any digit ->
    digit ("12", "3.5"); only operator characters +-*/=^<>() (and their Unicode forms) -> operator;
    anything else (.,;:!? brackets, $, \\, "\\boxed"'s braces, undecodable bytes) -> punctuation.
    """
    if not text or (text.startswith("<|") and text.endswith("|>")):
        return "special"
    body = text.strip()
    if not body:
        return "newline" if ("\n" in text or "\r" in text) else "whitespace"
    if any(c.isalpha() for c in body):
        return "word"
    if any(c.isdigit() for c in body):
        return "digit"
    if all(c in OPERATORS or c.isspace() for c in body):
        return "operator"
    return "punctuation"


def _classes_for(tokenizer) -> dict[int, str]:
    try:
        return _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache across calls
        return {}


def token_classes(tokenizer, ids: list[int]) -> list[str]:
    """Class of each token id; special tokens by id, the others by their decoded text (cached)."""
    cache = _classes_for(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for i in ids:
        if i not in cache:
            cache[i] = "special" if i in special else token_class(tokenizer.decode([i]))
        out.append(cache[i])
    return out


def class_shares(tokenizer, input_ids: Tensor, selected: Tensor, prefix: str = "credit/class/") -> dict[str, float]:
    """Share of each token class among the selected tokens, e.g. {"credit/class/word": 0.4, ...}.

    Every class key is present (0.0 when nothing is selected) so logged curves never have gaps.
    The Python loop runs over distinct selected ids only, and each id is decoded once per tokenizer.
    """
    counts = dict.fromkeys(CLASSES, 0)
    ids, n = torch.unique(input_ids[selected.bool()], return_counts=True)
    for cls, c in zip(token_classes(tokenizer, ids.tolist()), n.tolist()):
        counts[cls] += c
    total = max(sum(counts.values()), 1)
    return {f"{prefix}{k}": v / total for k, v in counts.items()}


# The finer classes of the research tools (flowtracer.tools.probe / attribution): "=" apart from the
# other operators, and "scaffold" (the answer's opening scaffold), which only the caller can mark.
FINE_CLASSES = ("digit", "operator", "=", "newline", "space", "word", "punctuation", "special", "scaffold")


def fine_class(text: str) -> str:
    """`token_class` with "=" split from the operators and whitespace named "space"."""
    cls = token_class(text)
    if cls == "operator" and text.strip() == "=":
        return "="
    return "space" if cls == "whitespace" else cls


def fine_class_ids(tokenizer, input_ids: Tensor, scaffold: Tensor | None = None) -> Tensor:
    """(B, T) long: the index in FINE_CLASSES of every token; `scaffold` (B, T) bool overrides."""
    ids, inverse = torch.unique(input_ids, return_inverse=True)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    per_id = [FINE_CLASSES.index("special" if i in special else fine_class(tokenizer.decode([i])))
              for i in ids.tolist()]
    out = torch.tensor(per_id, dtype=torch.long, device=input_ids.device)[inverse]
    if scaffold is not None:
        out = torch.where(scaffold.bool(), FINE_CLASSES.index("scaffold"), out)
    return out
