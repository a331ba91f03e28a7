"""Math answers checked by value: normalised markup, choice letters, words, math-verify (symbolic equivalence)."""

from __future__ import annotations

import threading
from typing import Any

from flowtracer.rewards.base import Score
from flowtracer.rewards.extract import DEFAULT_EXTRACTION, FALLBACK_EXTRACTORS, check_extraction, final_answer
from flowtracer.rewards.latex import canonical, choice_letter, chosen_letter, plain, plain_number, word_answer

# How `match` decided; every way but "string" (a literal copy of the reference) proves the reference checkable.
CHECKABLE = ("number", "choice", "words", "math-verify")
# A fraction with a known value, for the dependency check: math-verify must parse and equate both sides.
_PROBE = ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}")
INSTALL = "pip install 'math-verify[antlr4_13_2]'"


class MathVerifier:
    """Reward 1.0 when the response's final answer equals the reference answer, else 0.0.

    The final answer is found by the first extractor in `extraction` that matches, in the given
    order (``answer_tag``, ``boxed``, ``hash``, ``last_number``, ``last_line``; see
    flowtracer.rewards.extract). A ``\\boxed{}`` inside the chosen ``<answer>``/``####`` text
    narrows the answer to the box content. Both sides are normalised first
    (flowtracer.rewards.latex: currency, thin spaces, degrees, units, ``\\dfrac``), then compared
    by the first rule that applies (`match`): plain numbers by value (``32,348`` = ``32348``);
    a multiple-choice reference (``\\text{(C)}``) by the letter the answer names first; a word
    reference (``\\text{Evelyn}``) by its words, case-insensitively; anything else by math-verify
    (``verify(gold, pred)`` on both parsed as the content of a ``\\boxed{}``: ``x = 5`` = ``5``,
    ``\\frac12`` = ``0.5``, intervals, matrices, sets), and, where math-verify parses nothing or
    raises, normalised string equality. `reference` is the answer string (or a dict with an
    ``"answer"`` key).

    Threads: math-verify enforces `timeout_seconds` with ``signal.alarm``, which only works in the
    main thread. Called from another thread (a dataloader or reward worker) the timeout is switched
    off for that call instead of failing; guard against runaway sympy yourself there.
    """

    def __init__(
        self,
        extraction: tuple[str, ...] | list[str] = DEFAULT_EXTRACTION,
        timeout_seconds: int | None = 5,
    ):
        self.extraction = check_extraction(extraction)
        self.timeout_seconds = timeout_seconds

    def _timeout(self) -> int | None:
        main = threading.current_thread() is threading.main_thread()
        return self.timeout_seconds if main else None

    def _parse(self, text: str, timeout: int | None) -> list:
        from math_verify import parse  # heavy (sympy): imported on first use

        return parse("\\boxed{" + text + "}", parsing_timeout=timeout)

    def match(self, gold: str, pred: str) -> str | None:
        """How `pred` was found equal to `gold` (one of CHECKABLE, or "string"), or None."""
        g, p = canonical(gold), canonical(pred)
        a, b = plain_number(g), plain_number(p)
        if a is not None and b is not None:
            return "number" if a == b else None  # exact: 11111111100 != 11111111101
        letter = choice_letter(g)
        if letter is not None:
            return "choice" if chosen_letter(p) == letter else None
        words = word_answer(g)
        if words is not None:
            return "words" if word_answer(p, bare_min=1) == words else None
        if self._math_verify(g, p):
            return "math-verify"
        return "string" if plain(g) == plain(p) else None

    def _math_verify(self, gold: str, pred: str) -> bool:
        from math_verify import verify  # heavy (sympy): imported on first use

        timeout = self._timeout()
        try:
            g, p = self._parse(gold, timeout), self._parse(pred, timeout)
            # [expression, text], or only [text] when nothing parsed; verify would then compare strings
            return len(g) >= 2 and len(p) >= 2 and bool(verify(g, p, timeout_seconds=timeout))
        except Exception:  # math-verify errors (timeouts, sympy failures): the string rule decides
            return False

    def equal(self, gold: str, pred: str) -> bool:
        """True when `pred` is mathematically equivalent to `gold`."""
        return self.match(gold, pred) is not None

    def __call__(self, response: str, reference: Any) -> Score:
        name, found = final_answer(response, self.extraction)
        if found is None:
            return Score(0.0, None, None)
        parsed, (start, end) = found
        if isinstance(reference, dict):  # a dataset row: {"answer": ..., ...}
            reference = reference["answer"]
        reward = 1.0 if self.equal(str(reference), parsed) else 0.0
        return Score(reward, (start, end), parsed, fallback=name in FALLBACK_EXTRACTORS)

    def check_reference(self, reference: Any) -> str | None:
        """Why `reference` cannot be checked, else None.

        A reference is checkable when the verifier matches it against itself by a rule that knows
        its value (a number, a choice letter, words, or a math-verify expression); one that only a
        literal copy would match (math-verify parses nothing from it) is refused.
        """
        if isinstance(reference, dict):
            reference = reference.get("answer")
        if reference is None or not str(reference).strip():
            return "empty answer"
        if self.match(str(reference), str(reference)) in CHECKABLE:
            return None
        return "math-verify parses no expression from it"

    def check_ready(self) -> str | None:
        """Why this verifier cannot grade here (math-verify missing or broken), else None."""
        try:
            from math_verify import parse, verify  # heavy (sympy): imported on first use

            # generous time limits: on a loaded machine the first parse (sympy, antlr warming up)
            # can pass math-verify's default 5 s, which is slowness, not a broken install
            ok = verify(parse(_PROBE[0], parsing_timeout=60), parse(_PROBE[1], parsing_timeout=60), timeout_seconds=60)
        except Exception as exc:  # ImportError, or a broken install (antlr runtime mismatch, ...)
            return f"math-verify is missing or broken ({type(exc).__name__}: {exc}); install it with `{INSTALL}`"
        if not ok:
            return f"math-verify is installed but judges 1/2 != 0.5 (a broken install); reinstall it with `{INSTALL}`"
        return None
