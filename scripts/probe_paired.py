"""Paired differences between probe arms on the same problems, from `flowtracer probe --out probe.json`.

    python scripts/probe_paired.py probe_chains.json --md results/probe_chains_paired.md

Every arm of the probe masks the same problems' responses, so two arms compare problem by problem:
the difference of their "answer changed" rates with a 95% interval for a paired mean (normal
approximation, t ~ 1.96 at n >= 60), and the discordant counts (A changed the answer and B did not,
and the reverse; McNemar's test looks only at these).
"""

from __future__ import annotations

import argparse
import json
import math

PAIRS = (("flow_top", "class_random"), ("flow_top", "random"), ("flow_top", "attention"),
         ("attention", "class_random"), ("class_random", "random"), ("random", "flow_bottom"))


def paired(changed: dict[str, dict[str, bool]], a: str, b: str) -> dict:
    diffs = [int(v[a]) - int(v[b]) for v in changed.values() if a in v and b in v]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"a": a, "b": b, "n": n, "diff": mean, "lo": mean - half, "hi": mean + half,
            "a_only": sum(d == 1 for d in diffs), "b_only": sum(d == -1 for d in diffs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe_json")
    p.add_argument("--md", help="write the table (and the command) here")
    args = p.parse_args()
    changed: dict[str, dict[str, bool]] = {}
    for r in json.load(open(args.probe_json))["records"]:
        changed.setdefault(r["question"], {})[r["arm"]] = bool(r["changed"])
    lines = ["| arm A | arm B | problems | changed(A) - changed(B) [95% CI] | A only | B only |",
             "|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        r = paired(changed, a, b)
        lines.append(f"| {a} | {b} | {r['n']} | {100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] "
                     f"points | {r['a_only']} | {r['b_only']} |")
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"`python scripts/probe_paired.py {args.probe_json} --md {args.md}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
