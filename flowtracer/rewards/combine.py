"""Several weighted reward functions (`data.rewards`): the total reward, each function's rewards
(logged as ``reward/<name>``) and the one function whose answer span is FlowTracer's sink.

    data:
      rewards:
        - {fn: math, weight: 1.0}                       # a built-in verifier: (response, row answer)
        - {fn: my_rewards:format_ok, weight: 0.5}       # package.module:function, TRL's convention

An entry is ``{fn, weight (default 1), name, answer, kwargs}``:
- ``fn``: a built-in verifier name (flowtracer.rewards.VERIFIERS), called per response against the
  row's answer and built with `kwargs`; or ``package.module:function`` (a class is instantiated with
  `kwargs`, a function gets them bound), called once per step with keyword arguments: the responses
  as ``completions``, the formatted prompts as ``prompts``, and every row field (``question``,
  ``answer``, ``meta``, ``index``, ...) as a list with one entry per response. It returns one value
  per response: a number or a Score. It sees only the arguments its signature names, unless it
  takes ``**kwargs`` (so TRL reward functions over plain-text completions work unchanged).
- ``weight``: the total is ``sum_k weight_k * r_k``.
- ``name``: the log name (default: the verifier name or the function's name); must be unique.
- ``answer``: true marks the function whose answer span is the flow sink. Unmarked, it is inferred:
  the only entry, else the only built-in verifier; anything else is ambiguous and refused. A
  function returning bare numbers gets its span from the row's extractors (data.answer_extraction).

A function that raises, returns a non-number, NaN/inf or the wrong count stops the step with one
line naming the function and the row (`RewardError`): nothing is trained on a half-scored batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flowtracer.errors import InputError
from flowtracer.rewards.base import Score, as_score
from flowtracer.rewards.registry import VERIFIERS, import_reward

ENTRY_KEYS = ("fn", "weight", "name", "answer", "kwargs")
RESERVED = ("mean", "std", "errors")  # reward/mean, reward/std, reward/errors are logged already
GRADING_FIELDS = ("verifier", "verifier_kwargs", "answer_extraction")  # settings, not row data
BASE_ARGS = ("completions", "prompts", "question", "answer", "meta", "index")


class RewardError(InputError):
    """A reward function failed on a row; the message names the function and the row."""


@dataclass
class RewardFn:
    """One entry of data.rewards, built."""

    name: str
    spec: str
    weight: float
    builtin: bool
    call: Callable
    kwargs: dict
    label: str  # "data.rewards[i] (name)", for messages

    def values(self, completions: list[str], prompts: list[str], rows: list[dict]) -> list[Any]:
        """This function's raw outputs, one per response (RewardError on a bad count or a raise)."""
        if self.builtin:
            out = []
            for i, (text, row) in enumerate(zip(completions, rows)):
                try:
                    out.append(self.call(text, row.get("answer")))
                except Exception as exc:  # noqa: BLE001 - a user-facing line, naming the row
                    raise RewardError(f"{self.label} raised {type(exc).__name__}: {exc} on response {i} "
                                      f"of {_row(row)}") from exc
            return out
        try:
            out = self.call(**self._arguments(completions, prompts, rows))
        except Exception as exc:  # noqa: BLE001
            raise RewardError(f"{self.label} raised {type(exc).__name__}: {exc} on "
                              f"{self._culprit(completions, prompts, rows)}; fix the function") from exc
        try:
            out = list(out)
        except TypeError as exc:
            raise RewardError(f"{self.label} returned {type(out).__name__}, not one value per completion, "
                              f"on {_rows(rows)}") from exc
        if len(out) != len(completions):
            raise RewardError(f"{self.label} returned {len(out)} rewards for the {len(completions)} responses of "
                              f"{_rows(rows)}; return one value per completion")
        return out

    def _arguments(self, completions, prompts, rows) -> dict[str, list]:
        fields = {k: [row.get(k) for row in rows] for k in (rows[0] if rows else {}) if k not in GRADING_FIELDS}
        args = {**fields, "completions": list(completions), "prompts": list(prompts)}
        accepted = _accepted(self.call)
        return args if accepted is None else {k: v for k, v in args.items() if k in accepted}

    def _culprit(self, completions, prompts, rows) -> str:
        """The first row the function raises on alone (called row by row: the batch call failed)."""
        for i in range(len(completions)):
            try:
                self.call(**self._arguments(completions[i:i + 1], prompts[i:i + 1], rows[i:i + 1]))
            except Exception:  # noqa: BLE001
                return f"response {i} of {_row(rows[i])}"
        return f"the batch of {_rows(rows)} (no single row raises alone)"


class RewardSet:
    """The built `data.rewards` list: `score(completions, prompts, rows, locate)`."""

    def __init__(self, entries: Sequence[dict]):
        if not isinstance(entries, (list, tuple)) or not entries:
            raise InputError("data.rewards must be a non-empty list of {fn, weight}, e.g. "
                             "[{fn: math, weight: 1.0}, {fn: my_rewards:format_ok, weight: 0.5}]")
        self.fns = [_build(i, e) for i, e in enumerate(entries)]
        names = [f.name for f in self.fns]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"data.rewards: two functions are named {dup[0]!r} (logged as reward/{dup[0]}); "
                             "give one a `name`")
        self.answer = self.fns[_answer_index(entries, self.fns)]

    def score(self, completions: list[str], prompts: list[str], rows: list[dict],
              locate: Callable[[dict], tuple[str, ...]]) -> tuple[list[Score], dict[str, list[float]]]:
        """(the answer function's Score per response, with its span; each function's rewards by name).

        `locate(row)` names the extractors that find the span of a bare-number answer reward."""
        values: dict[str, list[float]] = {}
        answer_scores: list[Score] = []
        for fn in self.fns:
            outs = fn.values(completions, prompts, rows)
            vals = []
            for i, (out, text, row) in enumerate(zip(outs, completions, rows)):
                score, error = as_score(out, text, locate(row) if fn is self.answer else None)
                if error is not None:
                    raise RewardError(f"{fn.label} {error} for response {i} of {_row(row)}; return a finite number")
                vals.append(score.reward)
                if fn is self.answer:
                    answer_scores.append(score)
            values[fn.name] = vals
        return answer_scores, values

    def total(self, values: dict[str, list[float]]) -> list[float]:
        """sum_k weight_k * r_k per response."""
        n = len(next(iter(values.values()))) if values else 0
        return [math.fsum(f.weight * values[f.name][i] for f in self.fns) for i in range(n)]

    def describe(self) -> str:
        parts = [f"{f.weight:g} x {f.name}" + (" (answer span)" if f is self.answer else "") for f in self.fns]
        return "[flowtracer] rewards: " + " + ".join(parts)


def _build(i: int, entry: Any) -> RewardFn:
    if not isinstance(entry, dict) or "fn" not in entry:
        raise InputError(f"data.rewards[{i}] must be a mapping with `fn` (a verifier name or "
                         f"package.module:function), got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise InputError(f"data.rewards[{i}]: unknown key(s) {unknown}; valid: {', '.join(ENTRY_KEYS)}")
    spec, kwargs = str(entry["fn"]), dict(entry.get("kwargs") or {})
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise InputError(f"data.rewards[{i}].weight = {weight!r}: must be a finite number")
    builtin = ":" not in spec
    if builtin:
        if spec not in VERIFIERS:
            raise InputError(f"data.rewards[{i}].fn = {spec!r}: not a verifier ({', '.join(VERIFIERS)}) nor "
                             "package.module:function")
        call, default = VERIFIERS[spec](**kwargs), spec
    else:
        call = import_reward(spec, kwargs, label=f"data.rewards[{i}].fn =")
        default = (getattr(call, "__name__", None) or getattr(getattr(call, "func", None), "__name__", None)
                   or type(call).__name__)  # a function, a partial of one, or an instance of a class
    name = str(entry.get("name") or default)
    if name in RESERVED:
        raise InputError(f"data.rewards[{i}]: the name {name!r} clashes with reward/{name}; give it another `name`")
    fn = RewardFn(name, spec, float(weight), builtin, call, kwargs, f"data.rewards[{i}] ({name}, {spec})")
    if not builtin:
        _check_signature(fn)
    return fn


def _accepted(call: Callable) -> set[str] | None:
    """The keyword names `call` takes; None when it takes **kwargs (or has no signature)."""
    try:
        params = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_signature(fn: RewardFn) -> None:
    """Every argument the function requires is one a step passes (or one its kwargs bind)."""
    try:
        params = inspect.signature(fn.call).parameters.values()
    except (TypeError, ValueError):
        return
    missing = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in BASE_ARGS]
    if missing:
        raise InputError(f"{fn.label} requires {missing}, which a step does not pass; it gets "
                         f"{', '.join(BASE_ARGS)} (and the row's other fields) as keyword lists")


def _answer_index(entries: Sequence[dict], fns: list[RewardFn]) -> int:
    """Which function supplies the answer span: marked `answer: true`, else the only entry, else the
    only built-in verifier among those not marked `answer: false`; otherwise refused."""
    marked = [i for i, e in enumerate(entries) if e.get("answer") is True]
    if len(marked) > 1:
        raise InputError(f"data.rewards: {len(marked)} functions are marked `answer: true` "
                         f"({', '.join(fns[i].name for i in marked)}); exactly one supplies the answer span")
    if marked:
        return marked[0]
    candidates = [i for i, e in enumerate(entries) if e.get("answer") is not False]
    if len(candidates) == 1:
        return candidates[0]
    builtin = [i for i in candidates if fns[i].builtin]
    if len(builtin) == 1:
        return builtin[0]
    names = ", ".join(fns[i].name for i in (builtin or candidates)) or "none"
    raise InputError(f"data.rewards: cannot tell which function supplies the answer span (FlowTracer's sink) among "
                     f"{names}; mark exactly one with `answer: true`")


def _row(row: dict) -> str:
    where = f"training row {row['index']}" if "index" in row else "a row"
    return f"{where} (question {str(row.get('question', ''))[:50]!r})"


def _rows(rows: list[dict]) -> str:
    idx = list(dict.fromkeys(r["index"] for r in rows if "index" in r))
    return f"training rows {idx}" if idx else f"{len(rows)} rows"
