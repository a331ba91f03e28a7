"""Float32 vs bf16 runs of the same seeds: validation pass@1, the paired difference with its 95%
t-interval, wall time, the step split, and the sampler/learner mismatch of the bf16 runs.

    python scripts/precision_compare.py OUT      # OUT/qs_f32_s<S>/version_0 and OUT/qs_bf16_s<S>/version_0,
                                                 # OUT/wall.txt lines "<f32|bf16> <seed> <seconds>"
Made for scripts/quickstart_precision.sh; prints markdown.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_split import summary  # noqa: E402

from flowtracer.tools.report import ci95_halfwidth  # noqa: E402

ARMS = ("f32", "bf16")
MISMATCH = ("mismatch/abs_log_ratio", "mismatch/kl", "mismatch/tis_clipped_frac", "mismatch/tis_weight_mean")


def _mean_ci(values: list[float]) -> str:
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:+.3f}"
    h = ci95_halfwidth(statistics.stdev(values), len(values))
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]"


def _mismatch(run: Path) -> dict[str, float]:
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("rl_step")]
    return {k: statistics.median(float(r[f"train/{k}"]) for r in rows if r.get(f"train/{k}")) for k in MISMATCH
            if any(r.get(f"train/{k}") for r in rows)}


def main(out: Path) -> None:
    walls = {}
    if (out / "wall.txt").exists():
        for line in open(out / "wall.txt"):
            arm, seed, secs = line.split()
            walls[(arm, int(seed))] = float(secs)
    seeds = sorted({int(p.name.rsplit("_s", 1)[1]) for p in out.glob("qs_f32_s*") if p.is_dir()})
    runs = {(a, s): out / f"qs_{a}_s{s}" / "version_0" for a in ARMS for s in seeds}
    sums = {k: summary(v) for k, v in runs.items() if (v / "metrics.csv").exists()}
    print("| seed | precision | val pass@1 before | after | wall s | median step s | generate | forward | "
          "credit | backward | gen tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (a, s), m in sorted(sums.items(), key=lambda kv: (kv[0][1], ARMS.index(kv[0][0]))):
        wall = walls.get((a, s))
        print(f"| {s} | {a} | {m['val_first']:.3f} | {m['val_last']:.3f} | {wall:.0f} | {m['step']:.2f} | "
              f"{m.get('generate', 0):.2f} | {m.get('forward', 0):.2f} | {m.get('credit', 0):.3f} | "
              f"{m.get('backward', 0):.2f} | {m['tok_per_s']:.0f} |" if wall is not None else
              f"| {s} | {a} | {m['val_first']:.3f} | {m['val_last']:.3f} | - | {m['step']:.2f} | "
              f"{m.get('generate', 0):.2f} | {m.get('forward', 0):.2f} | {m.get('credit', 0):.3f} | "
              f"{m.get('backward', 0):.2f} | {m['tok_per_s']:.0f} |")
    paired = [s for s in seeds if ("f32", s) in sums and ("bf16", s) in sums]
    if not paired:
        return
    after = [sums[("bf16", s)]["val_last"] - sums[("f32", s)]["val_last"] for s in paired]
    gain = [(sums[("bf16", s)]["val_last"] - sums[("bf16", s)]["val_first"])
            - (sums[("f32", s)]["val_last"] - sums[("f32", s)]["val_first"]) for s in paired]
    ratio = [sums[("bf16", s)]["step"] / sums[("f32", s)]["step"] for s in paired]
    print(f"\nbf16 - float32, paired over seeds {paired} (mean [95% t-interval]):")
    print(f"- validation pass@1 after training: {_mean_ci(after)}")
    print(f"- gain in validation pass@1 (after - before): {_mean_ci(gain)}")
    print(f"- median step time ratio bf16 / float32: {statistics.mean(ratio):.3f} (per seed: "
          f"{', '.join(f'{r:.3f}' for r in ratio)})")
    if all(("f32", s) in walls and ("bf16", s) in walls for s in paired):
        w = [walls[("bf16", s)] / walls[("f32", s)] for s in paired]
        print(f"- wall time ratio bf16 / float32: {statistics.mean(w):.3f}")
    mm = {s: _mismatch(runs[("bf16", s)]) for s in paired}
    for k in MISMATCH:
        vals = [mm[s][k] for s in paired if k in mm[s]]
        if vals:
            print(f"- bf16 runs, median over steps of train/{k}: " + ", ".join(f"{v:.4f}" for v in vals))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
