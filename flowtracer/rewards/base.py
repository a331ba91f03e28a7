"""The Score result type, the verifier protocol and `safe_score`, the crash-proof way to call one."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

from flowtracer.rewards.extract import FALLBACK_EXTRACTORS, extract_answer


@dataclass(frozen=True)
class Score:
    """A verifier's verdict on one response.

    reward: the scalar reward (1.0/0.0 for exact verifiers, partial credit where a task gives it).
    answer_span: [start, end) character offsets into the response of the parsed final answer (the
        flow sink), or None when no answer was found (truncated or unparsable response).
    parsed: the answer text that was checked; ``response[start:end] == parsed`` whenever both are set.
    fallback: the answer was found by a fallback extractor (``last_number``, ``last_line``), not by
        an explicit answer marker; fit, validation and eval do not accept such an answer from a
        truncated response (`graded`).
    located: the span was located by extractors for a reward function that returned a bare number
        (`safe_score`), not named by the verifier; the reward is the function's own either way.
    """

    reward: float
    answer_span: tuple[int, int] | None = None
    parsed: str | None = None
    fallback: bool = False
    located: bool = False


class Verifier(Protocol):
    """Anything called as ``verifier(response, reference) -> Score``."""

    def __call__(self, response: str, reference: Any) -> Score: ...


def safe_score(verifier: Any, response: str, reference: Any,
               locate: tuple[str, ...] | None = None) -> tuple[Score, str | None]:
    """Call `verifier` and never raise: returns ``(score, error)``.

    A raised exception, a non-number reward or a NaN/inf reward becomes ``Score(0.0, None, None)``
    and an error string (the trainer counts these). A plain number returned by a user reward function
    is accepted as the reward; its answer span is then located in the response by the extractors
    `locate` (flowtracer.rewards.extract, first match wins), independently of the reward, so credit
    arms still find the answer tokens; with `locate` None the span stays None.
    """
    try:
        out = verifier(response, reference)
    except Exception as exc:  # a verifier bug must cost one reward, not the run
        return Score(0.0), f"{type(exc).__name__}: {exc}"
    return as_score(out, response, locate)


def as_score(out: Any, response: str, locate: tuple[str, ...] | None = None) -> tuple[Score, str | None]:
    """A reward function's value for `response` (a Score, a number, a 0-dim tensor) as a Score, with the
    span located by the extractors `locate` when it is a bare number; ``(Score(0.0), error)`` when
    it is not a finite number (`safe_score` above)."""
    reward = out.reward if isinstance(out, Score) else out
    if hasattr(reward, "item") and getattr(reward, "ndim", 1) == 0:
        reward = reward.item()  # 0-dim tensor / numpy scalar
    if not isinstance(reward, numbers.Real):  # bool counts (True -> 1.0)
        return Score(0.0), f"reward is not a number: {reward!r} ({type(reward).__name__})"
    if not math.isfinite(float(reward)):
        return Score(0.0), f"reward is not finite: {reward!r}"
    if isinstance(out, Score):
        return Score(float(reward), out.answer_span, out.parsed, out.fallback), None
    name, found = extract_answer(response, locate) if locate else ("", None)
    if found is None:
        return Score(float(reward)), None
    return Score(float(reward), found[1], found[0], fallback=name in FALLBACK_EXTRACTORS, located=True), None


def gradable(score: Score, truncated: bool) -> bool:
    """Whether `score`'s answer may be graded: THE rule of fit, validation and eval.

    Not gradable: an answer found only by a fallback extractor (last number, last line: no answer
    marker) in a TRUNCATED response (cut off at max_new_tokens): the model never finished its
    answer, and the last number of a cut-off derivation is an arbitrary intermediate value, right
    only by coincidence. A closed ``\\boxed{}``, ``<answer>`` or ``####`` answer still counts, cut
    off or not: the answer was written. A response with no answer has nothing to refuse.
    """
    return not (score.answer_span is not None and score.fallback and truncated)


def graded(score: Score, truncated: bool) -> tuple[Score, bool]:
    """`score` as fit, validation and eval use it, and whether its answer was refused (`gradable`).

    A refused answer loses its span and parsed text (no flow sink, no vote in maj@k) and its
    reward becomes 0, except where the span was only located for a reward function that returned
    a bare number (`located`): that reward is the function's own decision and stays.
    Callers count the refusals (``answer/truncated_fallback``, eval's ``truncated_fallback``).
    """
    if gradable(score, truncated):
        return score, False
    return Score(score.reward if score.located else 0.0), True
