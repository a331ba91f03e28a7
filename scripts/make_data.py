"""Generate the small bundled datasets under data/ (seeded: reruns give identical files).

    python scripts/make_data.py            # writes data/arith_train.jsonl, data/arith_val.jsonl,
                                           # data/sample_math.jsonl

arith_*: one-digit additions "What is a + b?" (all 100 pairs a, b in 0..9, shuffled and split
80 / 20), verifier "math". SmolLM2-135M-Instruct gets ~78% of these right greedily but only ~40%
when sampled at T=0.8 (32 new tokens), so GRPO groups have mixed rewards from the first step (see
scripts/probe_accuracy.py). sample_math: a few GSM8K-style word problems whose "answer" field is a
worked solution ending in "#### <number>" (the GSM8K convention), for tests and examples.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (template, how to compute the number); filled with small random integers
_WORD_PROBLEMS = [
    ("{n} has {a} apples and buys {b} more. How many apples does {n} have now?",
     "{n} has {a} + {b} = {r} apples.", lambda a, b: a + b),
    ("A box holds {a} pencils. {n} takes {b} of them. How many pencils are left in the box?",
     "{a} - {b} = {r} pencils are left.", lambda a, b: a - b),
    ("{n} reads {a} pages a day for {b} days. How many pages does {n} read in total?",
     "{n} reads {a} * {b} = {r} pages.", lambda a, b: a * b),
    ("{n} shares {p} stickers equally among {b} friends. How many stickers does each friend get?",
     "Each friend gets {p} / {b} = {r} stickers.", None),
]
_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jon"]


def arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "verifier": "math"}
            for a, b in pairs]
    return rows[:80], rows[80:]


def word_problems(rng: random.Random, n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        template, solution, fn = _WORD_PROBLEMS[i % len(_WORD_PROBLEMS)]
        name, a, b = rng.choice(_NAMES), rng.randint(10, 40), rng.randint(2, 9)
        if fn is None:  # exact division: the product is the total
            p, r = a * b, a
            q, s = template.format(n=name, p=p, b=b), solution.format(p=p, b=b, r=r)
        else:
            r = fn(a, b)
            q, s = template.format(n=name, a=a, b=b), solution.format(n=name, a=a, b=b, r=r)
        rows.append({"question": q, "answer": f"{s}\n#### {r}", "verifier": "math"})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {path} ({len(rows)} rows, {path.stat().st_size} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "data"), help="output folder (default: data/)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    train, val = arithmetic(random.Random(args.seed))
    write(out / "arith_train.jsonl", train)
    write(out / "arith_val.jsonl", val)
    write(out / "sample_math.jsonl", word_problems(random.Random(args.seed + 1)))


if __name__ == "__main__":
    main()
