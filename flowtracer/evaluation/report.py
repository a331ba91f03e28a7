"""Eval results as a rich table (terminal), markdown (eval.md) and JSON (eval.json)."""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console
from rich.table import Table


def _columns(result: dict[str, Any]) -> list[str]:
    """Metric columns over all sets: avg@k, pass@k' (by k'), maj@k, in that order."""
    names = {m for s in result["sets"].values() for m in s if "@" in m}

    def order(m: str):
        kind, k = m.split("@")
        return ({"avg": 0, "pass": 1, "maj": 2}.get(kind, 3), int(re.sub(r"\D", "", k) or 0))
    return sorted(names, key=order)


def rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the summary table (percent): avg@k and maj@k at each set's own k, then
    the pass@k' columns of all sets (blank where a set has no such k'); the macro average last."""
    passes = [c for c in _columns(result) if c.startswith("pass@")]
    header = ["set", "n", "k", "avg@k", "maj@k", *passes]
    body = []
    for name, m in result["sets"].items():
        k = m["k"]
        body.append([name, str(m["n"]), str(k), f"{100 * m[f'avg@{k}']:.1f}", f"{100 * m[f'maj@{k}']:.1f}",
                     *(f"{100 * m[c]:.1f}" if c in m else "" for c in passes)])
    if result.get("math_avg") is not None:
        body.append([f"math average ({', '.join(result['math_sets'])})", "", "",
                     f"{100 * result['math_avg']:.1f}", "", *("" for _ in passes)])
    return header, body


def print_table(result: dict[str, Any], title: str = "evaluation", console=None) -> None:
    """One rich table per set (its metrics) and the macro average, printed to `console`."""

    console = console or Console()
    for name, m in result["sets"].items():
        table = Table(title=f"{title}: {name} ({m['n']} problems, k={m['k']})")
        metrics = [c for c in _columns(result) if c in m]
        for c in metrics:
            table.add_column(c, justify="right")
        table.add_row(*(f"{100 * m[c]:.1f}" for c in metrics))
        console.print(table)
    if result.get("math_avg") is not None:
        console.print(f"[bold]math average[/bold] (mean avg@k over {', '.join(result['math_sets'])}): "
                      f"{100 * result['math_avg']:.1f}")
    if refused_note(result):
        console.print(refused_note(result))


def refused_note(result: dict[str, Any]) -> str:
    """One sentence on the answers graded wrong because a truncated response had no answer marker
    (flowtracer.rewards.graded), or "" when there were none."""
    counts = {name: m.get("truncated_fallback", 0) for name, m in result["sets"].items()}
    if not any(counts.values()):
        return ""
    per_set = ", ".join(f"{name} {c}" for name, c in counts.items() if c)
    return (f"Refused as in training: {sum(counts.values())} answers ({per_set}) taken from a response cut "
            "off at max_new_tokens with no answer marker (a last number), graded wrong.")


def markdown(result: dict[str, Any], title: str = "evaluation") -> str:
    header, body = rows(result)
    lines = [f"# {title}", "", "Accuracy in percent; math average = mean avg@k over the math sets.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if refused_note(result):
        lines += ["", refused_note(result)]
    return "\n".join(lines) + "\n"


def to_json(result: dict[str, Any], **meta: Any) -> str:
    return json.dumps({**meta, **result}, indent=2, sort_keys=False) + "\n"


def log_metrics(result: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """Flat metric names: <prefix>/<set>/<metric>, <prefix>/<set>/truncated_fallback (answers
    refused, flowtracer.rewards.graded) and <prefix>/math_avg."""
    out = {f"{prefix}/{name}/{m}": float(v) for name, s in result["sets"].items()
           for m, v in s.items() if "@" in m or m == "truncated_fallback"}
    if result.get("math_avg") is not None:
        out[f"{prefix}/math_avg"] = float(result["math_avg"])
    return out
