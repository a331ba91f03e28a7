"""Write the bundled variable-chain splits under data/ (seeded: reruns give identical files).

    python scripts/make_chains.py     # data/chains_train.jsonl (1000), chains_val.jsonl (100),
                                      # chains_test.jsonl (300), chains_heldout.jsonl (200)

train: depth 1-3 (solution steps), val/test/heldout: depth 2-3 (the evaluated range); all with 1-2
distractor variables and one distractor derived variable, values 1..9, operators + and -.
Each split has its own seed; a val/test question that also occurs in train is dropped (and the
next seed's problem taken), so the held-out splits never repeat a training question.
heldout is the validation set of the pre-registered grid (results/grid_chains_v2/PLAN.md): no
earlier tool read it (the attribution sweep chose its variant on chains_test), and it comes last
so the other three files stay byte-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowtracer.config import ChainSpec  # noqa: E402
from flowtracer.data.chains import make_problem  # noqa: E402

SPLITS = {  # name: (size, seed, knobs)
    "train": (1000, 1, dict(depth=(1, 2, 3))),
    "val": (100, 2, dict(depth=(2, 3))),
    "test": (300, 3, dict(depth=(2, 3))),
    "heldout": (200, 4, dict(depth=(2, 3))),
}
COMMON = dict(distractors=(1, 2), distractor_steps=1, low=1, high=9, ops=("+", "-"))


def split_rows(size: int, seed: int, knobs: dict, seen: set[str]) -> list[dict]:
    spec, rows, i = ChainSpec(**COMMON, **knobs), [], 0
    while len(rows) < size:
        row = make_problem(seed * 1_000_003 + i, spec).row()
        i += 1
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


def main() -> None:
    seen: set[str] = set()
    for name, (size, seed, knobs) in SPLITS.items():
        rows = split_rows(size, seed, knobs, seen)
        path = ROOT / "data" / f"chains_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(rows)} rows")


if __name__ == "__main__":
    main()
