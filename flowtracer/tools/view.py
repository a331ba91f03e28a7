"""`flowtracer view`: one offline HTML page of a run's rollouts and curves.

    flowtracer view lightning_logs/quickstart/version_0             # writes .../version_0/view.html
    flowtracer view runs/flow/version_0 runs/uniform/version_0      # two runs, one response under the other
    flowtracer view lightning_logs/grid_quickstart                  # a grid folder: every cell, pick two
    flowtracer view RUN --out page.html --screenshot page.png       # (the screenshot needs chromium)

The page is one self-contained file (no server, no network): the rollouts of rollouts.jsonl by step,
prompt and response, each response token shaded by its weight (or by the arm's score, e.g. flow
throughput, or its entropy, where the run logged them: `model.log_token_scores: true`), the
question and the answer span marked; reward, advantage and truncation; filters by step, reward,
group and truncation, 20 rollouts a page. A second run (or a second cell of a grid) shows, under
each response, its response to the same prompt at the same step (same seed, same prompts). Curves
from metrics.csv: reward, validation pass@1, credit/fallback_frac, seconds per step, as inline SVG.

Rollout data sits in JSON blocks, one per run and step, read only when that step is shown; past
`--max-rollouts` per run, evenly spaced steps are kept and the page says which were left out.
Every text is escaped (shown as text, never run).
"""

from __future__ import annotations

import argparse
import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowtracer.errors import InputError
from flowtracer.tools.browser import load
from flowtracer.tools.report import read_metrics
from flowtracer.tools.view_page import render_page

DEFAULT_MAX_ROLLOUTS = 20_000


@dataclass
class Run:
    label: str
    path: Path
    arm: str | None = None  # the credit arm's class name
    rows: list[dict] = field(default_factory=list)  # records of rollouts.jsonl (kept steps), + group and k
    total: int = 0  # rollouts in rollouts.jsonl
    left_out: str = ""  # what the cap left out, in words
    train: list[dict] = field(default_factory=list)  # metrics.csv training rows
    val: list[tuple[int, float]] = field(default_factory=list)  # (rl_step, val/pass@1)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ finding runs
def run_dirs(path: str | Path) -> list[tuple[str, Path]]:
    """(label, run folder) for a run folder, a grid folder (its cells) or a folder of version_N runs."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{path}: no such folder; give a run folder (lightning_logs/<name>/version_N) or a grid "
                         "folder (the grid file's out:)")
    if _is_run(p):
        return [(f"{p.parent.name}/{p.name}" if p.name.startswith("version_") else p.name, p)]
    if (p / "cells").is_dir():  # a grid: <out>/cells/<cell>/run/version_0
        cells = [(c.name, c / "run" / "version_0") for c in sorted((p / "cells").iterdir()) if c.is_dir()]
        found = [(name, d) for name, d in cells if _is_run(d)]
    else:
        found = [(f"{p.name}/{d.name}", d) for d in sorted(p.glob("version_*"), key=_version) if _is_run(d)]
    if not found:
        raise InputError(f"{path}: no rollouts.jsonl or metrics.csv in it or in its cells/ or version_N folders; "
                         "give a run folder that `flowtracer fit` wrote (lightning_logs/<name>/version_N)")
    return found


def _is_run(p: Path) -> bool:
    return (p / "rollouts.jsonl").is_file() or (p / "metrics.csv").is_file()


def _version(p: Path) -> int:
    m = re.fullmatch(r"version_(\d+)", p.name)
    return int(m.group(1)) if m else -1


# ------------------------------------------------------------------------------ reading one run
def load_run(label: str, path: Path, max_rollouts: int = DEFAULT_MAX_ROLLOUTS) -> Run:
    run = Run(label, path, arm=_arm_of_config(path / "config.yaml"))
    file = path / "rollouts.jsonl"
    rows = []
    if file.is_file():
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{file}:{n}: not a JSON record ({err.msg}); fix or delete that line") from None
    else:
        run.notes.append("no rollouts.jsonl (model.log_rollouts was false)")
    _number_groups(rows)
    run.total = len(rows)
    run.rows, run.left_out = cap_rows(rows, max_rollouts)
    run.arm = next((r["arm"] for r in rows if r.get("arm")), run.arm)
    if rows and "scores" not in rows[0]:
        run.notes.append("no per-token scores or entropies logged (set model.log_token_scores: true)")
    if (path / "metrics.csv").is_file():
        run.train, run.val = read_metrics(path / "metrics.csv")
    else:
        run.notes.append("no metrics.csv")
    return run


def _arm_of_config(path: Path) -> str | None:
    """The credit arm's class name from the run's config.yaml (the callback that is a *Credit)."""
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None  # the page names no arm; the rollouts and curves do not depend on it
    cbs = (cfg.get("trainer") or {}).get("callbacks") or []
    names = [str(cb.get("class_path", "")).rsplit(".", 1)[-1] for cb in cbs if isinstance(cb, dict)]
    return next((n for n in names if n.endswith("Credit")), None)


def _number_groups(rows: list[dict]) -> None:
    """rows[i]["group"] (the prompt's index within its step) and ["k"] (the response's index within
    its group): the G responses to one prompt are consecutive records of a step."""
    prev = None
    for r in rows:
        key = (r.get("step"), r.get("prompt"))
        if prev is None or key[0] != prev[0]:
            group, k = 0, 0
        elif key != prev:
            group, k = group + 1, 0
        else:
            k += 1
        r["group"], r["k"], prev = group, k, key


def cap_rows(rows: list[dict], max_rollouts: int) -> tuple[list[dict], str]:
    """At most `max_rollouts` rows: whole steps, evenly spaced, the first and last kept."""
    if len(rows) <= max_rollouts:
        return rows, ""
    steps = sorted({r["step"] for r in rows})
    per_step = len(rows) / len(steps)
    n = max(1, min(len(steps), int(max_rollouts // per_step)))
    keep = {steps[round(i * (len(steps) - 1) / max(n - 1, 1))] for i in range(n)}
    kept = [r for r in rows if r["step"] in keep]
    while len(kept) > max_rollouts and len(keep) > 1:  # uneven steps: drop from the middle until it fits
        keep.discard(sorted(keep)[len(keep) // 2])
        kept = [r for r in rows if r["step"] in keep]
    kept = kept[:max_rollouts]
    note = (f"showing {len(kept)} of {len(rows)} rollouts: {len(keep)} of {len(steps)} steps "
            f"({_ranges(sorted(keep))}); the other steps are left out (--max-rollouts {max_rollouts})")
    return kept, note


def _ranges(steps: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return shown + (f", ... {steps[-1]}" if len(steps) > limit else "")


# ------------------------------------------------------------------------------ tokens as text
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet (bytes_to_unicode), as Llama 3, Qwen and SmolLM use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_texts(tokens: list[str]) -> list[str]:
    """The text each token stands for, in order, so that "".join(...) is the decoded response.

    Byte-level BPE tokens ("Ġthe", "Ċ") are mapped back to bytes and decoded as UTF-8 across token
    boundaries (a character split over tokens shows with the token that completes it);
    SentencePiece ("▁the", "<0x0A>") has its space and byte tokens decoded; any other token is its
    own text."""
    if all(ch in BYTE_DECODER for tok in tokens for ch in tok):
        data = [bytes(BYTE_DECODER[ch] for ch in tok) for tok in tokens]
    elif any("▁" in tok or _SP_BYTE.fullmatch(tok) for tok in tokens):
        data = [bytes([int(m.group(1), 16)]) if (m := _SP_BYTE.fullmatch(tok)) else tok.replace("▁", " ").encode()
                for tok in tokens]
    else:
        return list(tokens)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(b) for b in data]
    if out:
        out[-1] += dec.decode(b"", final=True)
    return out


# ------------------------------------------------------------------------------ the page
def page_data(runs: list[Run]) -> tuple[dict, dict[str, list]]:
    """(meta, blocks): meta = the runs, the prompts and one column per rollout field (what filters
    read, parsed when the page opens); blocks["d<run>_<block>"] = the tokens of one step of one run
    (texts, weights, scores, entropies, answer span), parsed when that step is shown."""
    prompts: dict[str, list] = {}  # prompt text -> [id, question, reference answer] (runs pair by the text)
    meta_runs, blocks = [], {}
    for ri, run in enumerate(runs):
        cols = {k: [] for k in ("step", "group", "k", "reward", "adv", "trunc", "pid", "n", "block", "off")}
        steps: list = []
        weights = [w for r in run.rows for w in r.get("weights", [])]
        ents = [e for r in run.rows for e in r.get("entropy") or []]
        for r in run.rows:
            if not steps or steps[-1] != r["step"]:
                steps.append(r["step"])
                blocks[f"d{ri}_{len(steps) - 1}"] = []
            block = blocks[f"d{ri}_{len(steps) - 1}"]
            entry = prompts.setdefault(r.get("prompt", ""), [len(prompts), r.get("question"), r.get("answer")])
            entry[1] = entry[1] or r.get("question")  # a run that logged no question text takes another's
            pid = entry[0]
            for name, value in (("step", r["step"]), ("group", r["group"]), ("k", r["k"]),
                                ("reward", r.get("reward")), ("adv", r.get("advantage")), ("trunc", r.get("truncated")),
                                ("pid", pid), ("n", len(r.get("tokens", []))), ("block", len(steps) - 1),
                                ("off", len(block))):
                cols[name].append(value)
            block.append([token_texts(r.get("tokens", [])), r.get("weights"), r.get("scores"), r.get("entropy"),
                          r.get("answer_span")])
        meta_runs.append({
            "label": run.label, "arm": run.arm, "total": run.total, "kept": len(run.rows), "leftOut": run.left_out,
            "notes": run.notes, "steps": steps, "rows": cols,
            "score": any(r.get("scores") is not None for r in run.rows),
            "entropy": bool(ents), "wlo": min(weights, default=1.0), "whi": max(weights, default=1.0),
            "emax": max(ents, default=0.0)})
    return {"runs": meta_runs, "prompts": [[p, q, a] for p, (_, q, a) in prompts.items()]}, blocks


def build_page(paths: list[str | Path], *, max_rollouts: int = DEFAULT_MAX_ROLLOUTS, title: str | None = None) -> str:
    """The HTML page of one or more runs (a grid folder counts as its cells), as a string."""
    if max_rollouts < 1:
        raise InputError(f"--max-rollouts {max_rollouts}: must be >= 1")
    found = [pair for p in paths for pair in run_dirs(p)]
    runs = [load_run(label, path, max_rollouts) for label, path in found]
    meta, blocks = page_data(runs)
    return render_page(title or "flowtracer view: " + ", ".join(str(p) for p in paths), runs, meta, blocks)


def write_page(paths: list[str | Path], out: str | Path | None = None, **kwargs) -> Path:
    """Write the page; default <first run folder>/view.html (a grid: <grid>/view.html)."""
    out = Path(out) if out else Path(paths[0]) / "view.html"
    text = build_page(paths, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flowtracer view", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) or grid folder(s)")
    p.add_argument("--out", help="the HTML file (default: RUN/view.html)")
    p.add_argument("--max-rollouts", type=int, default=DEFAULT_MAX_ROLLOUTS,
                   help=f"per run; beyond it evenly spaced steps are kept (default {DEFAULT_MAX_ROLLOUTS})")
    p.add_argument("--title", help="the page title (default: the run folders)")
    p.add_argument("--screenshot", metavar="PNG", help="also load the page in headless Chromium and save a "
                   "screenshot (fails on any console error)")
    args = p.parse_args(argv)
    out = write_page(args.runs, args.out, max_rollouts=args.max_rollouts, title=args.title)
    print(f"wrote {out}")
    if args.screenshot:
        result = load(out, screenshot=args.screenshot)
        result.raise_on_errors()
        print(f"wrote {args.screenshot} (page rendered in {result.render_ms:.0f} ms, no console messages)")
    return 0
