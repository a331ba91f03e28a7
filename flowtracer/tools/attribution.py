"""`flowtracer attribution`: do the scorers find the tokens the answer depends on? (ground truth)

    flowtracer attribution --config experiments/attribution_chains.yaml
    flowtracer attribution --config experiments/attribution_chains.yaml --n 20 --out /tmp/attr

On variable chains (flowtracer.data.chains) the dependencies are known by construction. For each
problem the model writes its own greedy response; one teacher-forced pass then scores every token
with each scorer, exactly as the credit arms do (flowtracer.tools.analysis.arm_scores):
flow_top (throughput tau), flow_bottom (-tau), attention_mean / attention_max (attention received
from later response tokens), entropy (of the distribution predicting the token), random.

Ground truth, per problem:
  question  positives = tokens of the statements the answer depends on ("a = 7", "c = a + 3"),
            negatives = tokens of the distractor statements (dep_spans / distractor_spans of the
            generator; "Let " and "." excluded, since both kinds share them word for word).
  response  positives = tokens of the *used intermediate results* of the model's own response:
            flowtracer.data.chains.parse_steps reads its "<lhs> = <expr> = <n>" lines; a step's
            result n is used when a later step reads its variable (a step "e = ..." reads the
            variable of e's definition in the question; the query step "c + d = ..." reads c and
            d). Negatives = every other response token except the final answer span (the flow
            sink, high by construction) - including the eos token.
Metrics (per problem, then the mean over problems with a 95% percentile bootstrap interval):
  AUROC (Mann-Whitney, ties 1/2), precision@k with k = number of positives (R-precision; ties at
  the k-th score split in expectation), and cover@40: the scorer's top 40% of response tokens
  (the credit arms' selection, flowtracer.credit.select.select_mask) contains every token of every
  used intermediate result. Problems whose flow does not reach an answer are left out for every
  scorer (counted); a metric is undefined (left out) where a problem has no positives/negatives.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch
import yaml
from torch import Tensor

from flowtracer.config import SamplingConfig
from flowtracer.credit.attention import received_attention
from flowtracer.credit.select import select_mask
from flowtracer.data.chains import INSTRUCTION, used_result_spans
from flowtracer.errors import InputError
from flowtracer.evaluation.ranking import auroc, covers_all, precision_at_k
from flowtracer.evaluation.stats import bootstrap_mean_ci, fmt_ci
from flowtracer.generation import generate, response_token_offsets
from flowtracer.model.policy import load_policy
from flowtracer.rewards.spans import char_span_to_token_mask
from flowtracer.tools.analysis import (
    Verifiers,
    arm_scores,
    format_prompts,
    given_responses,
    load_problems,
    require_positive,
    rollout_batch,
    teacher_force,
)

SCORERS = ("flow_top", "flow_bottom", "attention_mean", "attention_max", "entropy", "random")
METRICS = {"q_auroc": "question AUROC", "q_prec": "question P@k", "r_auroc": "response AUROC",
           "r_prec": "response P@k", "r_cover40": "top-40% covers all"}


def spans_mask(offsets, spans, length: int, shift: int = 0) -> Tensor:
    """(length,) bool: tokens overlapping any of the character spans (shifted by `shift`)."""
    mask = torch.zeros(length, dtype=torch.bool)
    for a, b in spans:
        mask |= char_span_to_token_mask(offsets, (a + shift, b + shift), length)
    return mask


def ground_truth(tokenizer, rb, rows: list[dict], qspans) -> dict[str, Tensor]:
    """(B, T) bool masks: q_dep, q_dis (question statements), r_used (used intermediate results)."""
    B, T = rb.input_ids.shape
    out = {k: torch.zeros(B, T, dtype=torch.bool) for k in ("q_dep", "q_dis", "r_used")}
    plen = int(rb.prompt_mask.any(0).nonzero().max()) + 1  # prompts end at this column
    for i, row in enumerate(rows):  # per problem (text offsets), never per token
        meta, span = row.get("meta") or {}, qspans[i]
        if span is None or "dep_spans" not in meta:
            raise InputError("attribution needs chain problems with ground truth (meta.dep_spans); "
                             "use data/chains_*.jsonl or the 'chains' source")
        enc = tokenizer(rb.prompts[i], add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        cols = slice(plen - n, plen)
        out["q_dep"][i, cols] = spans_mask(enc["offset_mapping"], meta["dep_spans"], n, span[0])
        out["q_dis"][i, cols] = spans_mask(enc["offset_mapping"], meta["distractor_spans"], n, span[0])
        rcols = rb.response_mask[i].nonzero().squeeze(-1)
        ids = rb.input_ids[i, rcols].tolist()
        offsets = response_token_offsets(tokenizer, ids, rb.responses[i])
        used = used_result_spans(rb.responses[i], row["question"])
        out["r_used"][i, rcols] = spans_mask(offsets, used, len(ids))
    return {k: v.to(rb.input_ids.device) for k, v in out.items()}


def scorer_scores(rb, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """{scorer: (B, T) score, higher = more credit} and `reached` (B,) (the arms' own scores)."""
    arms, reached = arm_scores(rb, seed=seed)
    resp = rb.response_mask.bool()
    return {"flow_top": arms["flow_top"], "flow_bottom": -arms["flow_bottom"],
            "attention_mean": arms["attention"], "attention_max": received_attention(rb.attn, resp, "max"),
            "entropy": arms["entropy"], "random": arms["random"]}, reached


def batch_metrics(scores: dict[str, Tensor], gt: dict[str, Tensor], rb, top_frac: float = 0.4) -> dict:
    """{scorer: {metric: (B,) float64}} for one batch."""
    resp = rb.response_mask.bool()
    r_neg = resp & ~gt["r_used"] & ~rb.answer_mask.bool()
    out = {}
    for name, s in scores.items():
        s = s.double()
        top = select_mask(s, resp, top_frac=top_frac)
        out[name] = {"q_auroc": auroc(s, gt["q_dep"], gt["q_dis"]),
                     "q_prec": precision_at_k(s, gt["q_dep"], gt["q_dis"]),
                     "r_auroc": auroc(s, gt["r_used"], r_neg), "r_prec": precision_at_k(s, gt["r_used"], r_neg),
                     "r_cover40": covers_all(top, gt["r_used"])}
    return out


@torch.no_grad()
def attribution_batch(model, tokenizer, rows, *, max_new_tokens: int, layers, seed: int, instruction: str,
                      reference: bool = False):
    """Greedy responses (or, with `reference`, the rows' reference solutions), scores and per-problem
    metrics of one batch: (metrics, reached, correct)."""
    prompts, spans = format_prompts(tokenizer, [r["question"] for r in rows], instruction=instruction)
    if reference:
        gen = given_responses(tokenizer, prompts, spans, [r["meta"]["solution"] for r in rows])
    else:
        gen = generate(model, tokenizer, prompts, spans,
                       SamplingConfig(num_generations=1, max_new_tokens=max_new_tokens, temperature=0.0))
    rb, _ = rollout_batch(tokenizer, Verifiers(), rows, gen, prompts)
    teacher_force(model, rb, layers)
    scores, reached = scorer_scores(rb, seed)
    gt = ground_truth(tokenizer, rb, rows, spans)
    return batch_metrics(scores, gt, rb), reached.cpu(), rb.rewards > 0.5


def run(model, tokenizer, rows, *, max_new_tokens=64, batch_size=25, layers="middle", seed=0,
        instruction=INSTRUCTION, reference: bool = False) -> tuple[dict, dict]:
    """{scorer: {metric: (n,) per-problem values, NaN = left out}} and counts."""
    model.eval()
    per = {s: {m: [] for m in METRICS} for s in SCORERS}
    n_reached = n_correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        metrics, reached, correct = attribution_batch(model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                                      layers=layers, seed=seed + start, instruction=instruction,
                                                      reference=reference)
        n_reached, n_correct = n_reached + int(reached.sum()), n_correct + int(correct.sum())
        for s in SCORERS:
            for m in METRICS:
                per[s][m].append(torch.where(reached, metrics[s][m].cpu(), torch.nan))
        print(f"[attribution] {start + len(chunk)}/{len(rows)} problems", file=sys.stderr, flush=True)
    per = {s: {m: torch.cat(v) for m, v in d.items()} for s, d in per.items()}
    return per, {"problems": len(rows), "reached": n_reached, "correct": n_correct}


def summarise(per: dict, seed: int = 0) -> list[dict]:
    return [{"scorer": s, "metric": m, "n": int(torch.isfinite(v).sum()),
             **dict(zip(("mean", "lo", "hi"), bootstrap_mean_ci(v, seed=seed)))}
            for s, d in per.items() for m, v in d.items()]


def write(table: list[dict], counts: dict, out: str, command: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scorer", "metric", "n", "mean", "lo", "hi"])
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in table)
    cell = {(r["scorer"], r["metric"]): r for r in table}
    lines = [f"`{command}`", "", f"{counts['problems']} problems, {counts['reached']} with flow reaching the answer "
             f"(scored), {counts['correct']} answered correctly (greedy). Mean [95% bootstrap CI] over problems.", "",
             "| scorer | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for s in SCORERS:
        vals = [fmt_ci(cell[s, m]["mean"], cell[s, m]["lo"], cell[s, m]["hi"], pct=m.endswith(("prec", "cover40")))
                for m in METRICS]
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


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
    p.add_argument("--out", default="results/attribution_chains", help="writes <out>.csv and <out>.md")
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
                      layers=args.layers, seed=args.seed, instruction=args.instruction, reference=args.reference)
    table = summarise(per, args.seed)
    write(table, counts, args.out, "flowtracer attribution " + " ".join(argv))
    print(Path(args.out + ".md").read_text())
    return 0
