"""Where does the dependency signal live? The attribution metrics for every attention-map variant.

Per batch (the responses and ground truth of flowtracer.tools.attribution), two extra forwards
capture every layer's own map, once with the heads averaged and once with their maximum
(flowtracer.model.capture, per_layer; one layer's per-head scores exist only a chunk at a time).
A variant's map is the mean of its layers' maps: each preset (early, middle, late, all) and each
single layer, x heads mean | max. Scored from it: flow throughput (FlowCredit, inject uniform and
reachability) and received attention (mean and max over the later response tokens).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from flowtracer.credit import FlowCredit
from flowtracer.credit.attention import received_attention
from flowtracer.evaluation.stats import bootstrap_mean_ci, fmt_ci
from flowtracer.model.capture import capture_attention
from flowtracer.model.layers import HEADS, LAYER_PRESETS, resolve_layers

SCORERS = ("flow", "flow_reach", "attention_mean", "attention_max")
SHOWN = ("q_stmt_sum", "q_stmt_max", "q_auroc", "wr_auroc", "cls_auroc", "line_max")
DEFAULT = ("flow", "middle", "mean")  # FlowTracer as the paper runs it


@torch.no_grad()
def layer_maps(model, rb, heads: str) -> dict[int, Tensor]:
    """{layer: (B, T, T)} every layer's own map (heads aggregated by `heads`), from one forward."""
    mask = rb.attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with capture_attention(model, "all", attention_mask=mask, heads=heads, per_layer=True) as cap:
        model(input_ids=rb.input_ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
    return cap.layer_attn


def variants(num_layers: int) -> list[tuple[str, list[int]]]:
    """(name, layers): every preset, then every single layer ("L<i>")."""
    return ([(p, resolve_layers(p, num_layers)) for p in LAYER_PRESETS]
            + [(f"L{i}", [i]) for i in range(num_layers)])


def variant_scores(rb, attn: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({scorer: (B, T)}, {scorer: (B,) bool scored}) of one map: flow throughput (two injections;
    scored where the flow reaches the answer) and received attention (always scored)."""
    resp = rb.response_mask.bool()
    saved = rb.attn
    rb.attn = attn
    try:
        flows = {name: FlowCredit(inject=inj).scores(rb, None)
                 for name, inj in (("flow", "uniform"), ("flow_reach", "reachability"))}
    finally:
        rb.attn = saved
    scores = {name: tau for name, (tau, _) in flows.items()}
    scored = {name: ~unreached for name, (_, unreached) in flows.items()}
    for variant in ("mean", "max"):
        scores[f"attention_{variant}"] = received_attention(attn, resp, variant)
        scored[f"attention_{variant}"] = torch.ones_like(resp[:, 0])
    return scores, scored


def sweep_batch(model, rb, gt, metrics: Callable[[dict[str, Tensor]], dict]) -> dict[tuple, dict[str, Tensor]]:
    """{(scorer, layers, heads): {metric: (B,), NaN where the variant's flow misses the answer}}."""
    out = {}
    for heads in HEADS:
        maps = layer_maps(model, rb, heads)
        for name, layers in variants(len(maps)):
            attn = torch.stack([maps[i] for i in layers]).mean(0) if len(layers) > 1 else maps[layers[0]]
            scores, scored = variant_scores(rb, attn)
            for scorer, m in metrics(scores).items():
                out[scorer, name, heads] = {k: torch.where(scored[scorer], v, torch.nan) for k, v in m.items()}
        del maps
    return out


def summarise(per: dict[tuple, dict[str, Tensor]], seed: int = 0) -> list[dict]:
    """One row per (scorer, layers, heads, metric): mean [95% bootstrap CI] over problems."""
    return [{"scorer": s, "layers": lay, "heads": h, "metric": m, "n": int(torch.isfinite(v).sum()),
             **dict(zip(("mean", "lo", "hi"), bootstrap_mean_ci(v, seed=seed)))}
            for (s, lay, h), d in per.items() for m, v in d.items()]


def best(table: list[dict], metric: str, scorers=("flow", "flow_reach")) -> dict | None:
    """The row with the highest mean of `metric` among `scorers` (None when no problem was scored)."""
    rows = [r for r in table if r["metric"] == metric and r["scorer"] in scorers and not math.isnan(r["mean"])]
    return max(rows, key=lambda r: r["mean"]) if rows else None


def versus_default(per: dict, table: list[dict], metric: str, seed: int = 0) -> str:
    """One line: the best flow variant on `metric` against the default, with the paired difference."""
    top = best(table, metric)
    ref = next((r for r in table if (r["scorer"], r["layers"], r["heads"]) == DEFAULT and r["metric"] == metric),
               None)
    if top is None or ref is None or math.isnan(ref["mean"]):
        return f"- {metric}: n/a (no problem has this metric defined)"
    key = (top["scorer"], top["layers"], top["heads"])
    diff = bootstrap_mean_ci(per[key][metric] - per[DEFAULT][metric], seed=seed)
    disjoint = top["lo"] > ref["hi"]
    return (f"- {metric}: best flow variant {key} {fmt_ci(top['mean'], top['lo'], top['hi'], pct=False)} vs "
            f"default {DEFAULT} {fmt_ci(ref['mean'], ref['lo'], ref['hi'], pct=False)}; paired difference "
            f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]; intervals {'disjoint' if disjoint else 'overlap'}")


def write(per: dict, out: str, command: str, seed: int = 0) -> list[dict]:
    """<out>.csv (every variant, scorer and metric) and <out>.md (presets, single layers, best vs default)."""
    table = summarise(per, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scorer", "layers", "heads", "metric", "n", "mean", "lo", "hi"])
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in table)
    cell = {(r["scorer"], r["layers"], r["heads"], r["metric"]): r for r in table}
    lines = [f"`{command}`", "", "Mean [95% bootstrap CI] over problems. flow = throughput, inject uniform "
             "(the paper's); flow_reach = inject reachability.", "", "**Best flow variant vs FlowTracer's default "
             "(middle layers, heads mean, inject uniform)** (the best of many variants: its interval is optimistic)",
             ""]
    lines += [versus_default(per, table, m, seed) for m in ("q_stmt_sum", "q_stmt_max", "q_auroc")]
    lines += ["", "**Layer presets**", "", "| scorer | layers | heads | " + " | ".join(SHOWN) + " |",
              "|---" * (len(SHOWN) + 3) + "|"]
    for s in SCORERS:
        for p in LAYER_PRESETS:
            for h in HEADS:
                vals = [fmt_ci(cell[s, p, h, m]["mean"], cell[s, p, h, m]["lo"], cell[s, p, h, m]["hi"], pct=False)
                        for m in SHOWN]
                lines.append(f"| {s} | {p} | {h} | " + " | ".join(vals) + " |")
    singles = sorted({r["layers"] for r in table if r["layers"].startswith("L")}, key=lambda x: int(x[1:]))
    for metric in ("q_stmt_sum", "q_stmt_max", "wr_auroc"):
        cols = [(s, h) for s in SCORERS for h in HEADS]
        lines += ["", f"**Single layers, {metric}** (mean over problems)", "",
                  "| layer | " + " | ".join(f"{s} {h}" for s, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {lay} | " + " | ".join(f"{cell[s, lay, h, metric]['mean']:.3f}" for s, h in cols) + " |"
                  for lay in singles]
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    return table
