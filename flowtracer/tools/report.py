"""The grid report: summary.csv, report.md, report.html and curve PNGs from the cells' metrics.csv.

Per group (every axis but `seed`, so usually the credit arm): final and best validation pass@1
and its area under the curve (AUC: the trapezoid mean of val pass@1 over the RL steps, so on the
pass@1 scale), each as mean ± std over seeds and a 95% t-interval of the mean; mean training
reward, median step time and the credit overhead. Curves show the mean over seeds with a 95%
t-interval band. The
overhead counts what the arm adds to a step: its callback time (time/credit) plus the extra time
its attention capture adds to the old-policy pass, measured against the uniform arm's old pass when
the grid has one (the uniform arm captures nothing).
"""

from __future__ import annotations

import base64
import csv
import html
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np


def _float(v: str | None) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def read_metrics(path: Path) -> tuple[list[dict], list[tuple[int, float]]]:
    """(training rows sorted by rl_step, [(rl_step, val/pass@1)]) of one run's metrics.csv.

    A validation row is placed at the last RL step logged before it (0 before training)."""
    train, val, last_step = [], [], 0
    for row in csv.DictReader(open(path)):
        if _float(row.get("rl_step")) is not None:
            rec = {k: f for k, v in row.items() if (f := _float(v)) is not None}
            last_step = int(rec["rl_step"])
            train.append(rec)
        elif _float(row.get("val/pass@1")) is not None:
            val.append((last_step, float(row["val/pass@1"])))
    return sorted(train, key=lambda r: r["rl_step"]), val


def _auc(val: list[tuple[int, float]]) -> float:
    """Trapezoid mean of val pass@1 over the steps it was measured at (one point: that value)."""
    if not val:
        return math.nan
    if len(val) == 1 or val[-1][0] == val[0][0]:
        return val[-1][1]
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(val, val[1:]))
    return area / (val[-1][0] - val[0][0])


# two-sided 95% Student t quantiles by degrees of freedom (1..10); the normal 1.96 beyond
# Student t 0.975 quantiles for 1..30 degrees of freedom; above 30 the Cornish-Fisher expansion
# (within 1e-3 of the exact value there), not the normal 1.96 (which is 3% too narrow at df 30)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95_halfwidth(std: float, n: int) -> float:
    """Half-width of the 95% t-interval of a mean of n values with sample std `std`."""
    if n < 2 or math.isnan(std):
        return math.nan
    return t95(n - 1) * std / math.sqrt(n)


def _median(rows, key) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else math.nan


def cell_summary(cell) -> dict:
    # "finished" (this invocation) and "done" (an earlier one) differ only in the live table
    state = "done" if cell.state == "finished" else cell.state
    out = {"cell": cell.name, **cell.axes, "state": state, "seconds": round(cell.seconds, 1)}
    metrics = cell.metrics_path if hasattr(cell, "metrics_path") else cell.run_dir / "metrics.csv"
    if not metrics.exists():
        return out
    if cell.state == "pending":  # metrics but no done.json: running now, or crashed/killed earlier
        out["state"] = "incomplete"
    train, val = read_metrics(metrics)
    after = [v for s, v in val if s > 0] or [v for _, v in val]
    out.update({
        "steps": int(train[-1]["rl_step"]) if train else 0,
        "auc_val": _auc(val),
        "init_val": val[0][1] if val and val[0][0] == 0 else math.nan,
        "final_val": val[-1][1] if val else math.nan,
        "best_val": max(after) if after else math.nan,
        "mean_reward": statistics.fmean(r["reward/mean"] for r in train) if train else math.nan,
        "step_s": _median(train, "time/step"),
        "credit_s": _median(train, "time/credit"),
        "old_pass_s": _median(train, "time/old_pass"),
    })
    out["_train"], out["_val"] = train, val
    return out


def _group_key(cell) -> str:
    return ",".join(f"{a}={v}" for a, v in cell.axes.items() if a != "seed") or "all"


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(grid) -> tuple[list[dict], list[dict]]:
    cells = [cell_summary(c) for c in grid.cells]
    groups: dict[str, list[dict]] = defaultdict(list)
    for cell, summary in zip(grid.cells, cells):
        if "final_val" in summary and cell.state in ("done", "finished"):  # no partial runs in the means
            groups[_group_key(cell)].append(summary)
    base_pass = None
    for key, rows in groups.items():
        if key == "arm=uniform":
            base_pass = statistics.fmean(r["old_pass_s"] for r in rows)
    table = []
    for key, rows in groups.items():
        step = statistics.fmean(r["step_s"] for r in rows)
        credit = statistics.fmean(r["credit_s"] for r in rows)
        capture = max(statistics.fmean(r["old_pass_s"] for r in rows) - base_pass, 0.0) if base_pass else 0.0
        table.append({
            "group": key, "seeds": len(rows),
            "final_val": _mean_std([r["final_val"] for r in rows]),
            "best_val": _mean_std([r["best_val"] for r in rows]),
            "auc_val": _mean_std([r["auc_val"] for r in rows]),
            "mean_reward": _mean_std([r["mean_reward"] for r in rows]),
            "step_s": step, "credit_s": credit, "capture_s": capture,
            "overhead": (credit + capture) / step if step else math.nan,
            "_rows": rows,
        })
    return cells, table


def paired_vs(table: list[dict], base: str = "arm=uniform") -> list[dict]:
    """Each group minus `base` on the seeds both finished (same seed = same prompts and first
    samples, so the pairing removes the seed's share of the noise): mean ± std [95% t-interval]."""
    ref = {r.get("seed"): r for t in table if t["group"] == base for r in t["_rows"]}
    out = []
    for t in (t for t in table if t["group"] != base):
        pairs = [(r, ref[r.get("seed")]) for r in t["_rows"] if r.get("seed") in ref]
        if pairs:
            out.append({"group": t["group"], "seeds": len(pairs),
                        "final_val": _mean_std([a["final_val"] - b["final_val"] for a, b in pairs]),
                        "auc_val": _mean_std([a["auc_val"] - b["auc_val"] for a, b in pairs])})
    return out


def paired_markdown(table: list[dict], base: str = "arm=uniform") -> list[str]:
    rows = paired_vs(table, base)
    if not rows:
        return []
    md = ["", f"## Paired differences vs {base} (same seeds)", "",
          "| group | seeds | final val pass@1 diff | val pass@1 AUC diff |", "|---|---|---|---|"]
    return md + [f"| {r['group']} | {r['seeds']} | {_pm(r['final_val'], r['seeds'])} | "
                 f"{_pm(r['auc_val'], r['seeds'])} |" for r in rows]


def paired_sections(table: list[dict]) -> list[str]:
    """The report's paired differences: every arm vs uniform; vs random too (it reweights as many
    tokens as the scored arms, so it isolates which tokens they pick); and vs flow where the grid has
    it (a FlowTracer variant such as flow_reach against the paper's setting)."""
    return [line for base in ("arm=uniform", "arm=random", "arm=flow") for line in paired_markdown(table, base)]


def _pm(ms: tuple[float, float], n: int = 0) -> str:
    """'mean ± std', plus ' [lo, hi]' (95% t-interval of the mean) for n >= 2 seeds."""
    if math.isnan(ms[0]):
        return "n/a"
    h = ci95_halfwidth(ms[1], n)
    return f"{ms[0]:.3f} ± {ms[1]:.3f}" + ("" if math.isnan(h) else f" [{ms[0] - h:.3f}, {ms[0] + h:.3f}]")


HEADER = ["group", "seeds", "final val pass@1", "best val pass@1", "val pass@1 AUC", "mean train reward",
          "step s", "credit s", "capture s", "credit overhead"]


def _rows(table: list[dict]) -> list[list[str]]:
    return [[t["group"], str(t["seeds"]), _pm(t["final_val"], t["seeds"]), _pm(t["best_val"], t["seeds"]),
             _pm(t["auc_val"], t["seeds"]), _pm(t["mean_reward"]),
             f"{t['step_s']:.2f}", f"{t['credit_s']:.3f}", f"{t['capture_s']:.2f}", f"{t['overhead']:.1%}"]
            for t in table]


def markdown_table(table: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(table)]
    return "\n".join(lines)


def _plot(table: list[dict], out: Path, key: str, ylabel: str, val: bool = False) -> Path:
    """Mean over seeds per group (a band of the 95% t-interval of the mean), against the RL step."""
    import matplotlib  # heavy: imported for plots only, and the backend is set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: plots only

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for t in table:
        series = [dict(r["_val"]) if val else {int(x["rl_step"]): x[key] for x in r["_train"] if key in x}
                  for r in t["_rows"]]
        steps = sorted(set().union(*series)) if series else []
        if not steps:
            continue
        grid = np.array([[s.get(x, np.nan) for x in steps] for s in series], dtype=float)
        mean = np.nanmean(grid, 0)
        n = np.isfinite(grid).sum(0)
        std = np.nanstd(grid, 0, ddof=1) if grid.shape[0] > 1 else np.zeros_like(mean)
        half = np.array([ci95_halfwidth(float(sd), int(k)) for sd, k in zip(std, n)])
        ax.plot(steps, mean, marker="o" if val else None, label=t["group"])
        ax.fill_between(steps, mean - np.nan_to_num(half), mean + np.nan_to_num(half), alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{key.replace('/', '_').replace('@', '')}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(grid) -> dict[str, Path]:
    out = Path(grid.out)
    out.mkdir(parents=True, exist_ok=True)
    cells, table = summarize(grid)

    cols = list(dict.fromkeys(k for c in cells for k in c if not k.startswith("_")))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({k: v for k, v in c.items() if not k.startswith("_")} for c in cells)

    plots = []
    if table:
        plots = [_plot(table, out, "reward/mean", "train reward (mean)"),
                 _plot(table, out, "accuracy", "train accuracy"),
                 _plot(table, out, "val/pass@1", "val pass@1", val=True)]
    done = sum(c["state"] in ("done", "finished") for c in cells)
    intro = (f"{done}/{len(cells)} cells finished. Mean ± std over seeds [95% t-interval of the mean]; AUC = "
             "trapezoid mean of val pass@1 over the RL steps. Credit overhead = (credit "
             "callback + attention-capture time above the uniform arm's old pass) / step time.")
    md = ["# Grid report", "", intro, "", markdown_table(table), *paired_sections(table), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", "## Cells", "", "| cell | state | final val | best val | seconds |", "|---|---|---|---|---|"]
    md += [f"| {c['cell']} | {c['state']} | {c.get('final_val', math.nan):.3f} | "
           f"{c.get('best_val', math.nan):.3f} | {c['seconds']} |" for c in cells]
    (out / "report.md").write_text("\n".join(md) + "\n")

    def img(p: Path) -> str:  # inlined so the page is one self-contained file
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<img alt="{p.stem}" src="data:image/png;base64,{data}">'

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in _rows(table))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>flowtracer grid report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:48%}</style></head>"
        f"<body><h1>Grid report</h1><p>{html.escape(intro)}</p><table><tr>{head}</tr>{body}</table>"
        + "".join(img(p) for p in plots) + "</body></html>"
    )
    (out / "report.html").write_text(page)
    return {"md": out / "report.md", "html": out / "report.html", "csv": out / "summary.csv"}
