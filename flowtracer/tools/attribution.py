"""`flowtracer attribution`: do the scorers find the tokens the answer depends on? (ground truth)

    flowtracer attribution --config experiments/tools/attribution_chains.yaml
    flowtracer attribution --config experiments/tools/attribution_chains.yaml --n 20 --out /tmp/attr
    flowtracer attribution --config experiments/tools/attribution_chains.yaml --sweep    # + layers x heads x inject

Writes <out>.csv, <out>_classes.csv and <out>.md (and <out>_sweep.*), by default under the working
folder's lightning_logs/attribution/; the committed tables are made with --out results/attribution_chains.

On variable chains (flowtracer.data.chains) the dependencies are known by construction. For each
problem the model writes its own greedy response; one teacher-forced pass then scores every token
with each scorer, exactly as the credit arms do (flowtracer.tools.analysis.arm_scores):
flow_top (throughput tau), flow_bottom (-tau), attention_mean / attention_max (attention received
from later response tokens), entropy (of the distribution predicting the token), random.

Ground truth, per problem (flowtracer.tools.truth):
  question   dependency statements ("a = 7", "c = a + 3") vs distractor statements ("Let " and "."
             excluded, shared word for word). Token level: their tokens. Statement level: each
             statement scored by the sum and by the max of its tokens' scores.
  response   read from the model's own response by flowtracer.data.chains.parse_steps: a step's
             result is *used* when a later step reads its variable. Write sites = where a used
             result is written ("10" of "c = 7 + 3 = 10"), read sites = where a later step reads it
             ("10" of "c + d = 10 + 3 = 13"). Line level: every step line (its tokens and the
             newline that ends it), used lines vs lines no later step reads.
  negatives  of the response: every other response token except the answer's opening scaffold
             (flowtracer.tools.analysis.protected_mask), the answer, `</answer>` and eos (everything
             from the answer on): the flow sink and the format, high or low by construction.
Metrics (per problem, then the mean over problems with a 95% percentile bootstrap interval):
  AUROC (Mann-Whitney, ties 1/2) for every level above; "used vs other digits" = write + read sites
  against the other digit tokens of the response only (the class-matched comparison); "write
  (old negatives)" = write sites against every non-answer token (the first version of this table,
  kept for comparison); precision@k of the write sites with k = their number (ties at the k-th
  score split in expectation); cover@40: the scorer's top 40% of response tokens (the credit
  selection, flowtracer.credit.select.select_mask) contains every write site. Problems whose flow does
  not reach an answer are left out for every scorer (counted); a metric is undefined (left out) where
  a problem has no positives or no negatives.
By class: each scorer's mean score per token class of the response (FINE_CLASSES, the protected
scaffold as "scaffold", the answer and what follows as "answer+"), the score taken as its percentile
within the response (1 = the token the scorer ranks first, 0 = last), so scorers compare.
With --sweep the same responses are also scored from each layer preset and single layer, heads
mean or max, flow injection uniform or reachability (flowtracer.tools.sweep). Rows without chain
ground truth (e.g. the quickstart) get the by-class table only.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
from pathlib import Path

import torch
import yaml
from torch import Tensor

from flowtracer.config import SamplingConfig
from flowtracer.credit.attention import received_attention
from flowtracer.credit.select import rank_in_response, select_mask
from flowtracer.credit.stats import FINE_CLASSES, fine_class_ids
from flowtracer.data.chains import INSTRUCTION
from flowtracer.errors import InputError
from flowtracer.evaluation.ranking import auroc, covers_all, group_scores, precision_at_k
from flowtracer.evaluation.stats import bootstrap_mean_ci, fmt_ci
from flowtracer.generation import generate
from flowtracer.model.policy import load_policy
from flowtracer.tools import sweep
from flowtracer.tools.analysis import (
    Verifiers,
    arm_scores,
    format_prompts,
    given_responses,
    load_problems,
    protected_mask,
    require_positive,
    rollout_batch,
    teacher_force,
)
from flowtracer.tools.truth import excluded_mask, ground_truth, has_truth, spans_mask

__all__ = ["ground_truth", "spans_mask", "scorer_scores", "batch_metrics", "run", "main"]

SCORERS = ("flow_top", "flow_bottom", "attention_mean", "attention_max", "entropy", "random")
METRICS = {
    "q_auroc": "question AUROC (tokens)", "q_prec": "question P@k (tokens)",
    "q_stmt_sum": "question AUROC (statements, sum)", "q_stmt_max": "question AUROC (statements, max)",
    "w_auroc_old": "write AUROC (old negatives)", "w_auroc": "write AUROC", "r_auroc": "read AUROC",
    "wr_auroc": "write + read AUROC", "cls_auroc": "used vs other digits AUROC",
    "line_sum": "line AUROC (sum)", "line_max": "line AUROC (max)",
    "w_prec": "write P@k", "w_cover40": "top-40% covers all writes",
}
TABLES = {"Question side": ("q_auroc", "q_prec", "q_stmt_sum", "q_stmt_max"),
          "Response side, tokens": ("w_auroc_old", "w_auroc", "r_auroc", "wr_auroc", "cls_auroc"),
          "Response side, lines and selection": ("line_sum", "line_max", "w_prec", "w_cover40")}
CLASS_COLUMNS = (*FINE_CLASSES, "answer+")  # "answer+": the answer, `</answer>` and eos


def scorer_scores(rb, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """{scorer: (B, T) score, higher = more credit} and `reached` (B,) (the arms' own scores)."""
    arms, reached = arm_scores(rb, seed=seed)
    resp = rb.response_mask.bool()
    return {"flow_top": arms["flow_top"], "flow_bottom": -arms["flow_bottom"],
            "attention_mean": arms["attention"], "attention_max": received_attention(rb.attn, resp, "max"),
            "entropy": arms["entropy"], "random": arms["random"]}, reached


def _group_auroc(s: Tensor, groups: Tensor, label: Tensor, reduce: str) -> Tensor:
    """AUROC of groups labelled 1 over groups labelled 0 (label (B, G): 1, 0 or -1 = no group)."""
    g, present = group_scores(s, groups, label.shape[-1], reduce)
    return auroc(g, present & (label == 1), present & (label == 0))


def batch_metrics(scores: dict[str, Tensor], gt: dict[str, Tensor], rb, top_frac: float = 0.4) -> dict:
    """{scorer: {metric: (B,) float64}} for one batch (METRICS; gt from flowtracer.tools.truth)."""
    resp = rb.response_mask.bool()
    excl = gt.get("excluded", rb.answer_mask.bool())
    write, read = gt["r_used"], gt["r_read"]
    both = write | read
    neg = {"w": resp & ~write & ~excl, "r": resp & ~read & ~excl, "wr": resp & ~both & ~excl}
    old_neg = resp & ~write & ~rb.answer_mask.bool()
    digits = gt["digit"] & resp & ~excl
    out = {}
    for name, s in scores.items():
        s = s.double()
        top = select_mask(s, resp, top_frac=top_frac)
        out[name] = {
            "q_auroc": auroc(s, gt["q_dep"], gt["q_dis"]), "q_prec": precision_at_k(s, gt["q_dep"], gt["q_dis"]),
            "q_stmt_sum": _group_auroc(s, gt["q_stmt"], gt["q_stmt_label"], "sum"),
            "q_stmt_max": _group_auroc(s, gt["q_stmt"], gt["q_stmt_label"], "max"),
            "w_auroc_old": auroc(s, write, old_neg), "w_auroc": auroc(s, write, neg["w"]),
            "r_auroc": auroc(s, read, neg["r"]), "wr_auroc": auroc(s, both, neg["wr"]),
            "cls_auroc": auroc(s, both & digits, digits & ~both),
            "line_sum": _group_auroc(s, gt["r_line"], gt["r_line_label"], "sum"),
            "line_max": _group_auroc(s, gt["r_line"], gt["r_line_label"], "max"),
            "w_prec": precision_at_k(s, write, neg["w"]), "w_cover40": covers_all(top, write)}
    return out


def class_sums(scores: dict[str, Tensor], classes: Tensor, resp: Tensor, keep: Tensor) -> dict[str, Tensor]:
    """{scorer: (2, C) float64}: per class of CLASS_COLUMNS, the sum of the tokens' within-response
    score percentiles (1 = ranked first) and their count, over the rows in `keep` (B,) bool."""
    n = resp.sum(-1, keepdim=True)
    rows = resp & keep.unsqueeze(-1)
    out = {}
    for name, s in scores.items():
        rank = rank_in_response(s.double(), resp, "top")
        pct = torch.where(n > 1, 1 - rank.double() / (n - 1).clamp(min=1), 1.0)
        sums = torch.zeros(len(CLASS_COLUMNS), dtype=torch.float64).index_add_(0, classes[rows].cpu(),
                                                                              pct[rows].cpu())
        counts = torch.bincount(classes[rows].cpu(), minlength=len(CLASS_COLUMNS)).double()
        out[name] = torch.stack([sums, counts])
    return out


@torch.no_grad()
def attribution_batch(model, tokenizer, rows, *, max_new_tokens: int, layers, seed: int, instruction: str,
                      reference: bool = False, with_sweep: bool = False):
    """Greedy responses (or, with `reference`, the rows' reference solutions) of one batch, scored:
    (metrics or None without ground truth, class sums, reached, correct, sweep metrics or None)."""
    prompts, spans = format_prompts(tokenizer, [r["question"] for r in rows], instruction=instruction)
    if reference:
        gen = given_responses(tokenizer, prompts, spans, [r["meta"]["solution"] for r in rows])
    else:
        gen = generate(model, tokenizer, prompts, spans,
                       SamplingConfig(num_generations=1, max_new_tokens=max_new_tokens, temperature=0.0))
    rb, verdicts = rollout_batch(tokenizer, Verifiers(), rows, gen, prompts)
    teacher_force(model, rb, layers)
    scores, reached = scorer_scores(rb, seed)
    protected = protected_mask(tokenizer, rb, verdicts)
    excl = excluded_mask(rb, protected)
    classes = fine_class_ids(tokenizer, rb.input_ids, protected)
    classes = torch.where(excl & ~protected, len(FINE_CLASSES), classes)  # the answer and what follows
    sums = class_sums(scores, classes, rb.response_mask.bool(), reached)
    metrics = swept = None
    if has_truth(rows):
        gt = {**ground_truth(tokenizer, rb, rows, spans), "excluded": excl,
              "digit": classes == FINE_CLASSES.index("digit")}
        metrics = batch_metrics(scores, gt, rb)
        if with_sweep:
            swept = sweep.sweep_batch(model, rb, gt, lambda s: batch_metrics(s, gt, rb))
    return metrics, sums, reached.cpu(), rb.rewards > 0.5, swept


def run(model, tokenizer, rows, *, max_new_tokens=64, batch_size=25, layers="middle", seed=0,
        instruction=INSTRUCTION, reference: bool = False, with_sweep: bool = False) -> tuple[dict, dict]:
    """({scorer: {metric: (n,) per-problem values, NaN = left out}} ({} without ground truth), counts
    with "classes" ({scorer: (2, C)} percentile sums and counts) and "sweep" ({variant: {metric: (n,)}}))."""
    model.eval()
    truth = has_truth(rows, strict=True)
    per = {s: {m: [] for m in METRICS} for s in SCORERS} if truth else {}
    swept: dict = {}
    counts = {"problems": len(rows), "reached": 0, "correct": 0, "classes": {}}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        metrics, sums, reached, correct, sw = attribution_batch(
            model, tokenizer, chunk, max_new_tokens=max_new_tokens, layers=layers, seed=seed + start,
            instruction=instruction, reference=reference, with_sweep=with_sweep)
        counts["reached"] += int(reached.sum())
        counts["correct"] += int(correct.sum())
        for s, v in sums.items():
            counts["classes"][s] = counts["classes"].get(s, 0) + v
        for s in per:
            for m in METRICS:
                per[s][m].append(torch.where(reached, metrics[s][m].cpu(), torch.nan))
        for key, d in (sw or {}).items():
            for m, v in d.items():
                swept.setdefault(key, {}).setdefault(m, []).append(torch.where(reached, v.cpu(), torch.nan))
        print(f"[attribution] {start + len(chunk)}/{len(rows)} problems", file=sys.stderr, flush=True)
    per = {s: {m: torch.cat(v) for m, v in d.items()} for s, d in per.items()}
    counts["sweep"] = {k: {m: torch.cat(v) for m, v in d.items()} for k, d in swept.items()}
    return per, counts


def summarise(per: dict, seed: int = 0) -> list[dict]:
    return [{"scorer": s, "metric": m, "n": int(torch.isfinite(v).sum()),
             **dict(zip(("mean", "lo", "hi"), bootstrap_mean_ci(v, seed=seed)))}
            for s, d in per.items() for m, v in d.items()]


def class_table(sums: dict[str, Tensor]) -> list[dict]:
    """One row per scorer: its mean percentile per class; and a row of token counts."""
    rows = [{"scorer": s, **{c: round(float(v[0, j] / v[1, j]), 4) if v[1, j] > 0 else "" for j, c in
                             enumerate(CLASS_COLUMNS)}} for s, v in sums.items()]
    if sums:
        n = next(iter(sums.values()))[1]
        rows.append({"scorer": "tokens", **{c: int(n[j]) for j, c in enumerate(CLASS_COLUMNS)}})
    return rows


def markdown(table: list[dict], counts: dict, command: str) -> str:
    lines = [f"`{command}`", "", f"{counts['problems']} problems, {counts['reached']} with flow reaching the answer "
             f"(scored), {counts['correct']} answered correctly (greedy). Mean [95% bootstrap CI] over problems.", ""]
    cell = {(r["scorer"], r["metric"]): r for r in table}
    for title, keys in TABLES.items() if table else ():
        lines += [f"**{title}**", "", "| scorer | " + " | ".join(METRICS[m] for m in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for s in SCORERS:
            vals = [fmt_ci(cell[s, m]["mean"], cell[s, m]["lo"], cell[s, m]["hi"],
                           pct=m.endswith(("prec", "cover40"))) for m in keys]
            lines.append(f"| {s} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["**Mean score by token class** (the score as a percentile within its response: 1 = ranked first, "
              "0 = last; 0.5 = no preference)", "",
              "| scorer | " + " | ".join(f"`{c}`" if c == "=" else c for c in CLASS_COLUMNS) + " |",
              "|---" * (len(CLASS_COLUMNS) + 1) + "|"]
    for r in class_table(counts["classes"]):
        lines.append(f"| {r['scorer']} | " + " | ".join(str(r[c]) for c in CLASS_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write(table: list[dict], counts: dict, out: str, command: str) -> None:
    """<out>.csv (metrics), <out>_classes.csv (by class), <out>.md (the command and every table)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if table:
        with open(out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["scorer", "metric", "n", "mean", "lo", "hi"])
            w.writeheader()
            w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in table)
    with open(out + "_classes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scorer", *CLASS_COLUMNS])
        w.writeheader()
        w.writerows(class_table(counts["classes"]))
    Path(out + ".md").write_text(markdown(table, counts, command))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowtracer attribution", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="bundled name, HF folder, .gguf or hub id")
    p.add_argument("--data", nargs="+", default=["data/chains_test.jsonl"], help="chain problems")
    p.add_argument("--n", type=int, default=200, help="problems (the first n of --data)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--layers", default="middle", help="attention layers of the map")
    p.add_argument("--seed", type=int, default=0, help="seed of the random scorer and the bootstrap")
    p.add_argument("--instruction", default=INSTRUCTION, help="instruction appended to each question")
    p.add_argument("--reference", action="store_true",
                   help="score the reference solutions instead of the model's greedy responses")
    p.add_argument("--sweep", action="store_true",
                   help="also score every layer preset and single layer x heads mean|max x flow injection "
                        "uniform|reachability; writes <out>_sweep.csv and <out>_sweep.md")
    p.add_argument("--out", default="lightning_logs/attribution/attribution_chains",
                   help="writes <out>.csv, <out>_classes.csv, <out>.md (default under lightning_logs/attribution/)")
    args = p.parse_args(argv)
    if args.config:

        cfg = yaml.safe_load(open(args.config)) or {}
        unknown = set(cfg) - set(vars(args))
        if unknown:
            known = sorted(set(vars(args)) - {"config"})
            raise InputError(f"{args.config}: unknown keys {sorted(unknown)}; known: {known}")
        p.set_defaults(**cfg)
        args = p.parse_args(argv)  # flags given on the command line still win
    require_positive(args, "n", "batch-size", "max-new-tokens")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(os.path.expanduser(args.model), lora=None)
    rows = load_problems(args.data, args.n)
    per, counts = run(model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      layers=args.layers, seed=args.seed, instruction=args.instruction, reference=args.reference,
                      with_sweep=args.sweep)
    command = shlex.join(["flowtracer", "attribution", *argv])  # quoted: the line runs as written
    write(summarise(per, args.seed), counts, args.out, command)
    print(Path(args.out + ".md").read_text())
    wrote = [args.out + s for s in (".csv", "_classes.csv", ".md")]
    if args.sweep:
        sweep.write(counts["sweep"], args.out + "_sweep", command, seed=args.seed)
        print(Path(args.out + "_sweep.md").read_text())
        wrote += [args.out + "_sweep.csv", args.out + "_sweep.md"]
    print(f"flowtracer attribution: wrote {', '.join(w for w in wrote if Path(w).exists())}")
    return 0
