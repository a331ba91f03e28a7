"""Median step-time split of a run, from its metrics.csv (time/* columns), and its validation curve.

    python scripts/step_split.py lightning_logs/quickstart/version_0 [more run folders]
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

PHASES = ("generate", "score", "old_pass", "forward", "credit", "backward", "update", "step")


def summary(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steps = [r for r in rows if r.get("rl_step")]
    out = {p: statistics.median(float(r[f"time/{p}"]) for r in steps if r.get(f"time/{p}")) for p in PHASES
           if any(r.get(f"time/{p}") for r in steps)}
    out["credit_share"] = statistics.median(float(r["time/credit_share"]) for r in steps)
    out["tok_per_s"] = statistics.median(float(r["throughput/gen_tokens_per_s"]) for r in steps)
    val = [(int(float(r["step"])), float(r["val/pass@1"])) for r in rows if r.get("val/pass@1")]
    out["val_first"], out["val_last"] = val[0][1], val[-1][1]
    return out


def main(argv: list[str]) -> None:
    cols = [*PHASES, "credit_share", "tok_per_s", "val_first", "val_last"]
    print("| run | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for arg in argv:
        s = summary(Path(arg))
        print(f"| {arg} | " + " | ".join(f"{s[c]:.3f}" if c in s else "" for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
