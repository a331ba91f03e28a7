"""Why an eval table reads what it reads: per set, how many responses stopped on their own, how many
were cut off at max_new_tokens, how many end in a closed \\boxed{...} (the grader's own `boxed`
extractor), were refused (a fallback answer in a cut-off response) or correct; and the median
response length in characters.

    python scripts/eval_response_stats.py <eval --out folder>/eval_samples.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

from flowtracer.rewards.extract import boxed


def stats(path: str) -> list[dict]:
    sets: dict[str, dict] = defaultdict(lambda: {"responses": 0, "stopped": 0, "cut off": 0, "closed boxed": 0,
                                                 "refused": 0, "correct": 0, "_lengths": []})
    for line in open(path):
        r = json.loads(line)
        s = sets[r["set"]]
        for resp, cut, refused, ok in zip(r["responses"], r["truncated"], r["refused"], r["correct"]):
            s["responses"] += 1
            s["cut off"] += bool(cut)
            s["stopped"] += not cut
            s["closed boxed"] += boxed(resp) is not None
            s["refused"] += bool(refused)
            s["correct"] += bool(ok)
            s["_lengths"].append(len(resp))
    return [{"set": name, **{k: v for k, v in s.items() if not k.startswith("_")},
             "median chars": int(statistics.median(s["_lengths"]))} for name, s in sets.items()]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = stats(sys.argv[1])
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
