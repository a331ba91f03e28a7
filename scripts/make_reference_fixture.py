"""Write tests/fixtures/math_references.jsonl: the reference answers of a local math benchmark file.

    python scripts/make_reference_fixture.py ../shared/benchmarks/math_benchmarks.jsonl

Only derived facts are kept (each row's `id`, `tag` and `ground_truth` string), never the problems:
tests/rewards/test_math_references.py checks that the verifier accepts every reference the way
models write it. The source file is MATH-500 + AIME 2024 + AIME 2025 (560 rows), as described in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "math_references.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("source", help="a JSONL file with id, tag and ground_truth fields")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.source) if line.strip()]
    kept = [{"id": str(r["id"]), "tag": r["tag"], "ground_truth": r["ground_truth"]} for r in rows]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"wrote {len(kept)} references to {args.out}")


if __name__ == "__main__":
    main()
