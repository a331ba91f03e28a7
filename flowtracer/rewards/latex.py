"""Answer-string normalisation for the math verifier: the markup graders agree carries no meaning.

Reference answers are written as the benchmark gives them (MATH: ``\\$32,\\!348``, ``90^\\circ``,
``\\text{(C)}``, ``\\frac{270}7\\text{ degrees}``) and models write the same value in many ways
(``32348``, ``90``, ``C``, ``\\frac{270}{7}``). What is stripped or rewritten here follows the
field's graders (the MATH ``is_equiv`` normaliser, lighteval and math-verify's own LaTeX
normalisation): currency signs, thin spaces, ``\\left``/``\\right``, degree signs, ``\\dfrac``/``\\tfrac``,
and trailing unit words after a number. Two kinds of answer are not mathematics and are compared
apart: multiple-choice letters (``(B)``, ``B``, ``\\text{(B)}``, ``\\textbf{(B)}~12``) and word answers
(``\\text{Evelyn}``, ``east``). Pure Python; see flowtracer.rewards.math_verifier for the comparison.
"""

from __future__ import annotations

import re
from fractions import Fraction

# (?<!\\): after a backslash these are a LaTeX line break (two backslashes: matrix rows), not a command
_CURRENCY = re.compile(r"(?<!\\)\\\$|\\textdollar\b|(?<!\\)\$")  # currency and inline-math delimiters alike
_NEG_SPACE = re.compile(r"(?<!\\)\\!\s*")  # "10,\\!080": a negative thin space joins what it separates
_SPACING = re.compile(r"(?<!\\)\\[,;:> ]|\\(?:q?quad|thinspace|medspace|thickspace)\b|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)\b\s*")
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\^\s*\{?\s*\\text\{\s*o\s*\}\s*\}?)")
_FRAC = re.compile(r"\\[dt]frac\b")
_WRAPPER = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{"
# A unit after a number or a closing brace: "5.4 \text{ cents}", "864 \mbox{ inches}^2", "36 dollars".
_UNIT_TEXT = re.compile(r"(?<=[\d}.])\s*" + _WRAPPER + r"\s*[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*\{?\d\}?)?\s*$")
_UNIT_WORD = re.compile(r"(?<=\d)\s+(?:dollars?|cents?|degrees?|units?|square\s+units|percent)\.?\s*$",
                        re.IGNORECASE)
_CHOICE = re.compile(r"^\(?([A-E])\)?$")
# A model's choice: the letter first, optionally in parentheses or a text wrapper, then anything (its value).
_CHOICE_LEAD = re.compile(r"^(?:" + _WRAPPER + r")?\s*\(([A-E])\)|^(?:" + _WRAPPER + r")?\s*([A-E])(?:\)|\s*\}|$)")
_WORDS = re.compile(r"^[A-Za-z]+(?:[ '][A-Za-z]+)*$")
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")


def _unwrap(s: str) -> str:
    """``\\text{...}`` (and friends) around the whole string removed, repeatedly."""
    while True:
        m = re.match(_WRAPPER, s)
        if not m or not s.endswith("}") or _balanced_end(s, m.end()) != len(s) - 1:
            return s
        s = s[m.end():-1].strip()


def _balanced_end(s: str, start: int) -> int:
    """Index of the brace closing the group that opened just before `start` (-1 when unclosed)."""
    depth = 1
    for i in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return i
    return -1


def canonical(s: str) -> str:
    """`s` without the markup that carries no value: currency, spacing, sizing, degrees, units.

    ``\\$32,\\!348`` -> ``32,348``; ``90^\\circ`` -> ``90``; ``\\dfrac{17}{50}`` -> ``\\frac{17}{50}``;
    ``5.4 \\text{ cents}`` -> ``5.4``. Thousands separators and ``x =`` are left to the comparison.
    """
    s = str(s).strip()
    s = _CURRENCY.sub("", s)
    s = _SPACING.sub(" ", _NEG_SPACE.sub("", s))
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = _FRAC.sub(r"\\frac", s)
    for pattern in (_UNIT_TEXT, _UNIT_WORD):
        stripped = pattern.sub("", s).strip()
        s = stripped or s
    return re.sub(r"\s+", " ", s).strip().rstrip(".").strip()


def plain_number(s: str) -> Fraction | None:
    """The exact value of a plain decimal number (``1,000``, ``-2.5``, ``.35``), else None."""
    t = s.replace(" ", "")
    if not t or not _NUMBER.match(t) or not any(c.isdigit() for c in t):
        return None
    return Fraction(t.replace(",", ""))


def choice_letter(gold: str) -> str | None:
    """The option letter when the reference is a multiple-choice answer (``(B)``, ``B``, ``\\text{(B)}``)."""
    m = _CHOICE.match(_unwrap(canonical(gold)).replace(" ", ""))
    return m.group(1) if m else None


def chosen_letter(pred: str) -> str | None:
    """The option letter a response names first (``B``, ``(B)``, ``\\textbf{(B)}~12``, ``B) 12``), else None."""
    m = _CHOICE_LEAD.match(canonical(pred))
    return (m.group(1) or m.group(2)) if m else None


def word_answer(s: str, *, bare_min: int = 3) -> str | None:
    """A word answer in lower case (``\\text{Evelyn}`` -> ``evelyn``), else None.

    Bare letters count only from `bare_min` letters on (``ab`` is a product of variables).
    """
    c = canonical(s)
    inner = _unwrap(c)
    if not _WORDS.match(inner) or (inner == c and len(inner) < bare_min):
        return None
    return " ".join(inner.lower().split())


def plain(s: str) -> str:
    """The string-equality form: canonical, text wrappers and spaces removed, lower case."""
    s = re.sub(_WRAPPER + r"([^{}]*)\}", r"\1", canonical(s))
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    return re.sub(r"\s+", "", s).rstrip(".").lower()
