"""Re-grade a `flowtracer eval` output's saved responses under the old and the current grading rule.

    python scripts/regrade_eval.py EVAL_DIR --config CONFIG [--config OVERLAY ...]

EVAL_DIR holds eval_samples.jsonl (with its "truncated" flags); --config: the config(s) the eval ran
with (the run's config.yaml for --ckpt_path). Each response is verified again; "old" credits whatever
answer the extractors found (as eval and validation did before issue 32), "new" refuses a truncated
response's fallback answer as training does (flowtracer.rewards.graded). Prints, per set and
metric, old / new / delta (a markdown table), and checks that "new" equals the saved verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowtracer.evaluation.engine import summarize
from flowtracer.evaluation.metrics import answer_key
from flowtracer.rewards import VerifierCache, graded, safe_score
from flowtracer.rewards.extract import row_extraction
from flowtracer.tools.runs import instantiate, merged_configs


def regrade(samples: list[dict], rows: dict[str, list[dict]], threshold: float) -> tuple[list, list]:
    """(old-rule records, new-rule records) of the saved samples."""
    verifiers, old, new = VerifierCache(), [], []
    for rec in samples:
        row = rows[rec["set"]][rec["index"]]
        o, n = {**rec, "correct": [], "keys": []}, {**rec, "correct": [], "keys": [], "refused": []}
        for text, cut in zip(rec["responses"], rec["truncated"]):
            score, _ = safe_score(verifiers(row), text, row["answer"], locate=row_extraction(row))
            o["correct"].append(bool(score.reward >= threshold))
            o["keys"].append(answer_key(score.parsed))
            score, refused = graded(score, cut)
            n["correct"].append(bool(score.reward >= threshold))
            n["keys"].append(answer_key(score.parsed))
            n["refused"].append(refused)
        o.pop("refused", None)
        old.append(o)
        new.append(n)
    return old, new


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir")
    p.add_argument("--config", action="append", required=True)
    args = p.parse_args(argv)
    samples = [json.loads(line) for line in open(Path(args.eval_dir) / "eval_samples.jsonl")]
    settings, data = instantiate(merged_configs(args.config))
    data.setup_eval()
    names = list(dict.fromkeys(r["set"] for r in samples))
    specs = {n: data.eval_specs[n] for n in names}
    old, new = regrade(samples, data.eval_rows, settings.loss_cfg.correct_threshold)
    moved = sum(a["correct"] != b["correct"] for a, b in zip(new, samples))
    if moved:
        print(f"warning: {moved} problems' verdicts differ from the saved ones", file=sys.stderr)
    before, after = summarize(old, specs), summarize(new, specs)
    print("| set | metric | old rule | new rule | delta |\n|---|---|---|---|---|")
    for name in names:
        for metric, value in after["sets"][name].items():
            if "@" in metric:
                was = before["sets"][name][metric]
                print(f"| {name} | {metric} | {100 * was:.1f} | {100 * value:.1f} | {100 * (value - was):+.1f} |")
        print(f"| {name} | answers refused | | {after['sets'][name]['truncated_fallback']} | |")
    if after["math_avg"] is not None:
        print(f"| math average | avg@k | {100 * before['math_avg']:.1f} | {100 * after['math_avg']:.1f} | "
              f"{100 * (after['math_avg'] - before['math_avg']):+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
