"""Rows drawn on demand from an Arrow-backed `datasets.Dataset`, and the declarative step's parts.

A row is ``{"question": str, "answer": str | dict, "verifier": str, "meta": dict}`` (plus
``"system_prompt"`` when the source names a chat `messages` field). `Rows` is a read-only sequence
of such rows over a dataset: nothing is decoded until a row or a batch is asked for, so a large
training file stays in the memory-mapped Arrow cache, not in a Python list.

The declarative step (flowtracer.data.sources applies it): an optional row filter (`RowFilter`,
``{column: value or [values]}`` or an expression), an optional user function ``module:fn`` run with
``Dataset.map`` (`UserMap`), then the field mapping (`RowFormat`): which field is the question,
which the answer, which holds the chat messages.
"""

from __future__ import annotations

import ast
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

from flowtracer.errors import InputError


class DataError(InputError):
    """A data source could not be read as asked; the message says how to fix it."""


@dataclass(frozen=True)
class RowFormat:
    """How a dataset record becomes a row: the field mapping, applied when a row is drawn.

    question_field / answer_field: the record's fields; verifier: every row's verifier (None = the
    record's own "verifier" field, else "math"); messages_field: a chat `messages` field (a list of
    {role, content} or its JSON text) whose system turn becomes the row's "system_prompt";
    json_answer: the answer field holds JSON text (reasoning-gym entries); mixed: fields whose
    values mix types across records, read as the text the file has (`as_written`).
    """

    question_field: str = "question"
    answer_field: str = "answer"
    verifier: str | None = None
    messages_field: str | None = None
    json_answer: bool = False
    mixed: tuple[str, ...] = ()

    def columns(self, available: Sequence[str]) -> list[str]:
        """The dataset columns a row is made from (the others are never read)."""
        wanted = [self.question_field, self.answer_field, "verifier", "meta", self.messages_field]
        return [c for c in dict.fromkeys(wanted) if c and c in available]

    def decode(self, rec: dict[str, Any]) -> dict[str, Any]:
        if self.mixed:
            rec = {k: as_written(v) if k in self.mixed else v for k, v in rec.items()}
        answer = rec[self.answer_field]
        if self.json_answer and isinstance(answer, str):
            answer = json.loads(answer)
        if isinstance(answer, (list, tuple)):  # several final answers (OlympiadBench's final_answer)
            answer = ", ".join(map(str, answer))
        answer = answer if isinstance(answer, dict) else str(answer)
        meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
        if isinstance(answer, str) and "####" in answer:
            # GSM8K convention: a worked solution ending in "#### <final answer>"; keep the final part
            meta.setdefault("solution", answer)
            answer = answer.rsplit("####", 1)[1].strip()
        row = {"question": str(rec[self.question_field]), "answer": answer,
               "verifier": self.verifier or rec.get("verifier") or "math", "meta": meta}
        if self.messages_field:
            system = system_prompt_of(rec[self.messages_field])
            if system:
                row["system_prompt"] = system
        return row


def as_written(value: Any) -> Any:
    """A value of a field that mixes types, from `datasets`' JSON storage of it: text that parses
    as JSON is stored as it is and other text quoted, so a quoted string is unquoted."""
    if isinstance(value, str) and value.startswith('"'):
        try:
            text = json.loads(value)
        except json.JSONDecodeError:
            return value
        return text if isinstance(text, str) else value
    return value


def system_prompt_of(messages: Any) -> str | None:
    """The content of the first system turn of a chat (a list of {role, content} or its JSON
    text); None when there is none. ValueError says what is wrong with a malformed chat."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list of messages ({exc.msg})") from exc
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("not a list of {role, content} messages")
    system = next((m.get("content") for m in messages if m["role"] == "system"), None)
    return str(system) if system else None


class Rows(Sequence):
    """Read-only rows over a `datasets.Dataset` (Arrow-backed); decoded only when drawn.

    `take(indices)` reads one batch in one Arrow gather; `rows[i]`, `rows[a:b]` (a list) and
    iteration (in chunks) go through it. `extra` fields are added to every row, and `index_key`
    (if set) gets the row's position in this sequence.
    """

    CHUNK = 512

    def __init__(self, dataset, fmt: RowFormat, where: str = "", extra: dict[str, Any] | None = None,
                 index_key: str | None = None):
        self.dataset, self.fmt, self.where = dataset, fmt, where
        self.extra, self.index_key = dict(extra or {}), index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"Rows({self.where or 'dataset'}, {len(self)} rows)"

    def take(self, indices) -> list[dict[str, Any]]:
        idx = [int(i) for i in indices]
        if not idx:
            return []
        cols = self.dataset[idx]  # one gather from the Arrow table: a dict of columns
        out = []
        for j, i in enumerate(idx):
            row = self.fmt.decode({k: v[j] for k, v in cols.items()})
            row.update(self.extra)
            if self.index_key:
                row[self.index_key] = i
            out.append(row)
        return out

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self.take([i % n])[0]

    def __iter__(self):
        for start in range(0, len(self), self.CHUNK):
            yield from self.take(range(start, min(len(self), start + self.CHUNK)))

    def select(self, indices) -> "Rows":
        """These rows at `indices` (an index mapping over the same Arrow table, no copy)."""
        return Rows(self.dataset.select(indices), self.fmt, self.where, self.extra, self.index_key)

    def with_fields(self, index_key: str | None = None, **extra: Any) -> "Rows":
        """The same rows with `extra` fields (and their position under `index_key`) added."""
        return Rows(self.dataset, self.fmt, self.where, {**self.extra, **extra}, index_key or self.index_key)

    def questions(self):
        """Every row's question text, in order, read column-wise (no row is decoded)."""
        column = self.dataset.select_columns([self.fmt.question_field])
        for batch in column.iter(batch_size=10_000):
            yield from (str(q) for q in batch[self.fmt.question_field])


class RowsChain(Sequence):
    """Several `Rows` read as one sequence (the validation rows of all eval sets)."""

    def __init__(self, parts: Sequence[Sequence[dict]]):
        self.parts = [p for p in parts if len(p)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        for part in self.parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def __iter__(self):
        for part in self.parts:
            yield from part


# ----------------------------------------------------------------------------- the row filter
_FUNCS = {"len": len, "str": str, "int": int, "float": float, "abs": abs, "min": min, "max": max}
_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Compare,
          ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot, ast.Name,
          ast.Load, ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Subscript, ast.Slice, ast.BinOp, ast.Add,
          ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Call, ast.Attribute, ast.IfExp)


class RowFilter:
    """Keep the rows a condition holds for: ``{column: value}`` (a list of values = any of them;
    several columns = all must match) or a Python expression over the columns, such as
    ``tag == "aime2024"`` or ``len(problem) < 500 and level in ["Level 1", "Level 2"]`` (comparisons,
    and/or/not, arithmetic, subscripts, methods of the values, and len/str/int/float/abs/min/max).

    Called on a batch of records (a dict of columns) with their indices, as `Dataset.filter` does
    with ``batched=True, with_indices=True``; `check(columns)` says what is wrong before it runs.
    """

    def __init__(self, spec: dict[str, Any] | str, label: str = "data.filter"):
        if not isinstance(spec, (dict, str)) or not spec:
            raise DataError(f"{label} must be {{column: value}} or an expression string, got {spec!r}")
        self.spec, self.label = spec, label
        self.names = sorted(spec) if isinstance(spec, dict) else _expression_names(spec, label)

    def check(self, columns: Sequence[str], where: str) -> None:
        missing = [n for n in self.names if n not in columns]
        if missing:
            raise DataError(f"{self.label} names {', '.join(map(repr, missing))}, not a field of {where} "
                            f"(fields: {', '.join(columns)})")

    def describe(self) -> str:
        if isinstance(self.spec, str):
            return self.spec
        return " and ".join(f"{k} in {v!r}" if isinstance(v, list) else f"{k} == {v!r}" for k, v in self.spec.items())

    def __call__(self, batch: dict[str, list], indices: list[int]) -> list[bool]:
        if isinstance(self.spec, dict):
            keep = [True] * len(indices)
            for col, want in self.spec.items():
                allowed = want if isinstance(want, list) else [want]
                keep = [k and v in allowed for k, v in zip(keep, batch[col])]
            return keep
        code = compile(ast.parse(self.spec, mode="eval"), self.label, "eval")
        out = []
        for j, i in enumerate(indices):
            row = {n: batch[n][j] for n in self.names}
            try:
                out.append(bool(eval(code, {"__builtins__": {}, **_FUNCS}, row)))  # checked: _NODES only
            except Exception as exc:  # a value the expression cannot handle (None, a wrong type)
                raise RowFailure(i, exc, self.label) from exc
        return out


def _expression_names(text: str, label: str) -> list[str]:
    """The column names an expression reads; DataError for syntax or constructs outside _NODES."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise DataError(f"{label} {text!r} is not a Python expression ({exc.msg})") from exc
    for node in ast.walk(tree):
        if not isinstance(node, _NODES) or (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
            raise DataError(f"{label} {text!r}: {type(node).__name__} is not allowed; use comparisons, "
                            "and/or/not, arithmetic, subscripts and len/str/int/float")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in _FUNCS:
            raise DataError(f"{label} {text!r}: {node.func.id}() is not available; use {', '.join(_FUNCS)}")
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - called)


# ----------------------------------------------------------------------------- the user map
class RowFailure(Exception):
    """A user function (map) or filter expression failed on the row at `index` (of the dataset it ran on)."""

    def __init__(self, index: int, error: BaseException | str, label: str):
        super().__init__(f"{label} failed on index {index}: {error}")
        self.index, self.error, self.label = index, error, label


def import_function(spec: str, label: str = "data.map") -> Callable:
    """The function ``package.module:function`` names."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"{label} {spec!r} must be 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"{label} {spec!r} could not be imported ({exc}); check the module is on PYTHONPATH "
                        "and the name after ':' exists") from exc
    if not callable(fn):
        raise DataError(f"{label} {spec!r} is a {type(fn).__name__}, not a function")
    return fn


class UserMap:
    """``fn(row) -> dict`` run by `Dataset.map` (``with_indices=True``): the fields it returns are
    added to the row (or replace those of the same name); a failure names the row."""

    def __init__(self, spec: str, label: str = "data.map"):
        self.spec, self.label = spec, label
        self.fn = import_function(spec, label)

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            out = self.fn(row)
        except Exception as exc:  # the user's function: report it with the row it failed on
            raise RowFailure(index, f"{type(exc).__name__}: {exc}", f"{self.label} {self.spec}") from exc
        if not isinstance(out, dict):
            raise RowFailure(index, f"it returned a {type(out).__name__}, not a dict of fields",
                             f"{self.label} {self.spec}")
        return out
