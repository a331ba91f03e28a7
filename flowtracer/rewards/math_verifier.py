"""Math answers checked with math-verify (symbolic equivalence), with a plain-string fallback."""

from __future__ import annotations

import re
import threading
from typing import Any

from flowtracer.rewards.base import Score
from flowtracer.rewards.extract import FALLBACK_EXTRACTORS, boxed, check_extraction, extract_answer

_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
_NUMBER = re.compile(r"^\s*[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?\s*$", re.IGNORECASE)


def _normalise(s: str) -> str:
    s = _TEXT.sub(r"\1", s)
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _fallback_equal(gold: str, pred: str) -> bool:
    """Normalised string equality, or numeric equality when both sides are plain numbers."""
    g, p = _normalise(gold), _normalise(pred)
    if g == p:
        return True
    try:
        a, b = float(g), float(p)
    except ValueError:
        return False
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))


class MathVerifier:
    """Reward 1.0 when the response's final answer equals the reference answer, else 0.0.

    The final answer is found by the first extractor in `extraction` that matches, in the given
    order (``answer_tag``, ``boxed``, ``hash``, ``last_number``, ``last_line``; see
    flowtracer.rewards.extract). A ``\\boxed{}`` inside the chosen ``<answer>``/``####`` text
    narrows the answer to the box content. The answer and the reference are both parsed as the
    content of a ``\\boxed{}`` by math-verify (so bare LaTeX such as ``\\frac12`` or ``2\\sqrt{2}``
    parses), and compared with ``verify(gold, pred)``. If math-verify raises or parses nothing on
    either side, normalised string / numeric equality decides. `reference` is the answer string
    (or a dict with an ``"answer"`` key).

    Threads: math-verify enforces `timeout_seconds` with ``signal.alarm``, which only works in the
    main thread. Called from another thread (a dataloader or reward worker) the timeout is switched
    off for that call instead of failing; guard against runaway sympy yourself there.
    """

    def __init__(
        self,
        extraction: tuple[str, ...] | list[str] = ("answer_tag", "boxed", "hash", "last_number"),
        timeout_seconds: int | None = 5,
    ):
        self.extraction = check_extraction(extraction)
        self.timeout_seconds = timeout_seconds

    def _timeout(self) -> int | None:
        main = threading.current_thread() is threading.main_thread()
        return self.timeout_seconds if main else None

    def _parse(self, text: str, timeout: int | None) -> list:
        from math_verify import parse  # heavy (sympy): imported on first use

        if "\\boxed" not in text and "$" not in text:
            text = "\\boxed{" + text + "}"
        return parse(text, parsing_timeout=timeout)

    def equal(self, gold: str, pred: str) -> bool:
        """True when `pred` is mathematically equivalent to `gold`."""
        from math_verify import verify  # heavy (sympy): imported on first use

        timeout = self._timeout()
        try:
            g, p = self._parse(gold, timeout), self._parse(pred, timeout)
            if g and p:
                return bool(verify(g, p, timeout_seconds=timeout))
        except Exception:  # math-verify errors (timeouts, sympy failures) fall back to strings
            pass
        return _fallback_equal(gold, pred)

    def __call__(self, response: str, reference: Any) -> Score:
        name, found = extract_answer(response, self.extraction)
        if found is None:
            return Score(0.0, None, None)
        parsed, (start, end) = found
        if name in ("answer_tag", "hash"):
            inner = boxed(parsed)
            if inner is not None:
                parsed, (a, b) = inner[0], (start + inner[1][0], start + inner[1][1])
                start, end = a, b
        if isinstance(reference, dict):  # a dataset row: {"answer": ..., ...}
            reference = reference["answer"]
        reward = 1.0 if self.equal(str(reference), parsed) else 0.0
        return Score(reward, (start, end), parsed, fallback=name in FALLBACK_EXTRACTORS)

    def check_reference(self, reference: Any) -> str | None:
        """Why `reference` cannot be checked (empty, or math-verify parses no expression), else None."""
        if isinstance(reference, dict):
            reference = reference.get("answer")
        if reference is None or not str(reference).strip():
            return "empty answer"
        if _NUMBER.match(str(reference)):
            return None  # the common case, no sympy needed
        try:
            parsed = self._parse(str(reference), self._timeout())
        except Exception as exc:  # math-verify raises many types on malformed LaTeX
            return f"math-verify failed: {type(exc).__name__}"
        return None if len(parsed) >= 2 else "math-verify parses no expression from it"
