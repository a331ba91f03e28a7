"""Accuracy of a (warm-started) model on held-out variable chains: greedy and sampled.

    nice -n 5 python scripts/eval_sft.py --model lightning_logs/sft_chains/merged \
        --n 200 --temperatures 0.7 1.0 --samples 2 --out results/sft_chains

For each decoding (greedy, then each temperature with --samples responses per problem) it reports
accuracy (verifier "math", <answer> tags) with a 95% bootstrap interval over problems, and
"steps written": the share of responses that write every step of the reference solution as
``<lhs> = <expression> = <number>`` lines (flowtracer.data.chains.parse_steps finds at least
`depth` steps and every intermediate step is read by a later one). Writes <out>.csv and <out>.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowtracer.config import SamplingConfig  # noqa: E402
from flowtracer.data.chains import INSTRUCTION, parse_steps  # noqa: E402
from flowtracer.data.sources import load_rows  # noqa: E402
from flowtracer.evaluation.stats import bootstrap_mean_ci, fmt_ci  # noqa: E402
from flowtracer.generation import generate  # noqa: E402
from flowtracer.model.policy import load_policy  # noqa: E402
from flowtracer.tools.analysis import Verifiers, format_prompts, judge  # noqa: E402


def wrote_steps(text: str, row: dict) -> bool:
    steps = parse_steps(text, row["question"])
    depth = int(row["meta"]["depth"])
    return len(steps) >= depth and all(s["used"] for s in steps[: depth - 1])


def evaluate(model, tok, rows, temperature: float, samples: int, max_new: int, batch: int, seed: int):
    """(per-problem accuracy (n,), per-problem steps-written share (n,), example responses)."""
    cfg = SamplingConfig(num_generations=samples, max_new_tokens=max_new, temperature=temperature)
    acc, steps, examples = [], [], []
    verifiers = Verifiers()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        torch.manual_seed(seed + start)
        prompts, spans = format_prompts(tok, [r["question"] for r in chunk], instruction=INSTRUCTION)
        gen = generate(model, tok, prompts, spans, cfg)
        rep = [r for r in chunk for _ in range(samples)]
        scores = judge(verifiers, rep, gen.responses)
        ok = torch.tensor([s.reward for s in scores]).view(len(chunk), samples)
        st = torch.tensor([wrote_steps(t, r) for t, r in zip(gen.responses, rep)], dtype=torch.float)
        st = st.view(len(chunk), samples)
        acc.append(ok.mean(1))
        steps.append(st.mean(1))
        examples += gen.responses[:1]
        print(f"[eval] T={temperature} {start + len(chunk)}/{len(rows)}", file=sys.stderr, flush=True)
    return torch.cat(acc), torch.cat(steps), examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lightning_logs/sft_chains/merged")
    p.add_argument("--label", default=None, help="model name in the table (default: the folder name)")
    p.add_argument("--data", default="data/chains_test.jsonl")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--temperatures", type=float, nargs="*", default=[0.7, 1.0])
    p.add_argument("--samples", type=int, default=2, help="sampled responses per problem and temperature")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-greedy", action="store_true", help="only the sampled decodings (e.g. to add a temperature)")
    p.add_argument("--out", default="results/sft_chains", help="writes <out>.csv and <out>.md (appends rows)")
    args = p.parse_args()
    model, tok = load_policy(args.model, lora=None)
    model.eval()
    rows = load_rows(args.data)[: args.n]
    label = args.label or Path(args.model).name
    out = []
    greedy = [] if args.skip_greedy else [(0.0, 1)]
    for temp, k in greedy + [(t, args.samples) for t in args.temperatures]:
        t0 = time.time()
        acc, steps, ex = evaluate(model, tok, rows, temp, k, args.max_new_tokens, args.batch_size, args.seed)
        depth = torch.tensor([int(r["meta"]["depth"]) for r in rows])
        rec = {"model": label, "decoding": "greedy" if temp == 0 else f"sampled T={temp}", "temperature": temp,
               "problems": len(rows), "samples_per_problem": k}
        for name, v in (("accuracy", acc), ("acc_depth2", acc[depth == 2]), ("acc_depth3", acc[depth == 3]),
                        ("steps_written", steps)):
            m, lo, hi = bootstrap_mean_ci(v, seed=args.seed)
            rec.update({name: round(m, 4), f"{name}_lo": round(lo, 4), f"{name}_hi": round(hi, 4)})
        rec["seconds"] = round(time.time() - t0, 1)
        out.append(rec)
        print(f"{rec['decoding']}: accuracy {fmt_ci(rec['accuracy'], rec['accuracy_lo'], rec['accuracy_hi'])}, "
              f"steps written {rec['steps_written']:.1%}; example:\n{ex[0]}", flush=True)
    write(out, args.out)


def write(recs: list[dict], out: str) -> None:
    path = Path(out + ".csv")
    old = list(csv.DictReader(open(path))) if path.exists() else []
    new = {(x["model"], x["decoding"]) for x in recs}
    keep = [r for r in old if (r["model"], r["decoding"]) not in new]  # a rerun replaces its own rows
    rows = keep + [{k: str(v) for k, v in r.items()} for r in recs]
    rows.sort(key=lambda r: (r["model"], float(r["temperature"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| model | decoding | problems x samples | accuracy [95% CI] | depth 2 | depth 3 | steps written |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = {k: float(v) for k, v in r.items() if k not in ("model", "decoding")}
        lines.append(f"| {r['model']} | {r['decoding']} | {int(f['problems'])} x {int(f['samples_per_problem'])} | "
                     f"{fmt_ci(f['accuracy'], f['accuracy_lo'], f['accuracy_hi'])} | {f['acc_depth2']:.1%} | "
                     f"{f['acc_depth3']:.1%} | {f['steps_written']:.1%} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
