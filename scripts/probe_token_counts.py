"""Which tokens each probe arm masked most often, from `flowtracer probe --out probe.json` records.

    python scripts/probe_token_counts.py probe.json --top 8 --csv results/probe_chains_masked_tokens.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe_json")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--csv", help="write arm,token,count rows here")
    args = p.parse_args()
    records = json.load(open(args.probe_json))["records"]
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in records):
        counts = Counter(t for r in records if r["arm"] == arm for t in r["masked"])
        rows += [{"arm": arm, "token": json.dumps(t), "count": c} for t, c in counts.most_common(args.top)]
        print(arm, ", ".join(f"{json.dumps(t)} {c}" for t, c in counts.most_common(args.top)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["arm", "token", "count"])
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
