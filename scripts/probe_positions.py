"""Where in the reasoning each probe arm's picks sit, from `flowtracer probe --out probe.json`.

    python scripts/probe_positions.py probe_chains.json --csv results/probe_chains_positions.csv

Takes the greedy responses the probe recorded (one per eligible problem), redoes the probe's
selection on them (flowtracer.tools.probe.select_arms: same model, layers, frac, protection, and
the same per-batch seeds), and reports per arm the mean relative position of its picks (0 = the
first reasoning token, 1 = the last) and the share of its picks in the last fifth of the reasoning.
The control for position: class-matched random matches flow_top's token classes, not its positions,
and the final step's result (what the answer copies) lies at the end. No regeneration, so it is
cheap (one teacher-forced pass per batch). The responses are re-tokenized from text; a row whose
tokens differ from the greedy ones would differ here (the eligible count is printed to compare).
"""

from __future__ import annotations

import argparse
import csv
import json

import torch

from flowtracer.model.policy import load_policy
from flowtracer.tools.analysis import Verifiers, load_problems
from flowtracer.tools.probe import relative_positions, select_arms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe_json")
    p.add_argument("--csv", help="write arm,picks,mean_position,last_fifth_share rows here")
    args = p.parse_args()
    probe = json.load(open(args.probe_json))
    a = probe["args"]
    originals = {r["question"]: r["original"] for r in probe["records"]}
    rows = [r for r in load_problems(a["data"], a["n"]) if r["question"] in originals]
    model, tok = load_policy(a["model"], lora=None)
    model.eval()
    kw = {"instruction": a["instruction"]} if a.get("instruction") else {}
    pos: dict[str, list[torch.Tensor]] = {}
    eligible = 0
    # the probe's seed of a batch is seed + its start row: the same batches and seeds as the probe's
    # when every problem was recorded (else the random arms draw other tokens)
    for start in range(0, len(rows), a["batch_size"]):
        batch = rows[start:start + a["batch_size"]]
        sel = select_arms(model, tok, batch, verifiers=Verifiers(), protect=a["protect"], frac=a["frac"],
                          max_new_tokens=a["max_new_tokens"], layers=a["layers"], seed=a["seed"] + start,
                          responses=[originals[r["question"]] for r in batch], **kw)
        eligible += int(sel.eligible.sum())
        for arm, m in sel.masks.items():
            if arm != "none":
                pos.setdefault(arm, []).append(relative_positions(m, sel.reasoning))
    out = []
    for arm, parts in pos.items():
        rel = torch.cat(parts)
        out.append({"arm": arm, "picks": rel.numel(), "mean_position": round(float(rel.mean()), 3),
                    "last_fifth_share": round(float((rel >= 0.8).float().mean()), 3)})
    print(f"{eligible}/{len(rows)} recorded responses eligible again")
    print("| arm | picks | mean relative position | share in the last fifth |\n|---|---|---|---|")
    for r in out:
        print(f"| {r['arm']} | {r['picks']} | {r['mean_position']:.3f} | {r['last_fifth_share']:.1%} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0]))
            w.writeheader()
            w.writerows(out)


if __name__ == "__main__":
    main()
