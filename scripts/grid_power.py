"""Seeds for the pre-registered chains grid (results/grid_chains_v2/PLAN.md), from the old grid.

    python scripts/grid_power.py > results/grid_chains_v2/power.md

Reads the final validation pass@1 of every cell in results/grid_chains/ (50 problems x 4 samples),
estimates the sd over seeds of the paired arm differences (each pair alone, and pooled from the
arm x seed residuals), scales it to the new validation size under stated assumptions about how
much of it is validation sampling noise, and prints the 95% t-interval half-width for each seed
count. Pure arithmetic on committed files: no model, no fit.
"""

from __future__ import annotations

import csv
import itertools
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowtracer.tools.report import read_metrics  # noqa: E402

OLD = ROOT / "results" / "grid_chains"
ARMS = ("uniform", "random", "entropy", "attention", "flow")
SEEDS = (0, 1, 2)
OLD_PROBLEMS, NEW_PROBLEMS, K = 50, 200, 4
TARGET = 0.01  # 95% half-width of each primary paired difference, in pass@1
# share of the measured paired variance that is validation sampling noise (shrinks 50 -> 200
# problems as 1/n at fixed k); the rest is training-trajectory noise (does not shrink)
VAL_SHARES = (0.0, 0.5, 1.0)


def t_two_sided(p: float, df: int) -> float:
    """t with P(|T| < t) = p for integer df (Abramowitz & Stegun 26.7.3-4, then bisection)."""

    def inside(t: float) -> float:
        th = math.atan(t / math.sqrt(df))
        c2, s = math.cos(th) ** 2, math.sin(th)
        if df % 2:
            term, acc = math.cos(th), 0.0
            for j in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...
                acc += term
                term *= c2 * (2 * j) / (2 * j + 1)
            return 2 / math.pi * (th + s * acc) if df > 1 else 2 * th / math.pi
        term, acc = 1.0, 0.0
        for j in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...
            acc += term
            term *= c2 * (2 * j - 1) / (2 * j)
        return s * acc

    return _invert(inside, p, 1e3)


def _invert(increasing, p: float, hi: float) -> float:
    """x in [0, hi] with increasing(x) = p, by bisection."""
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if increasing(mid) < p else (lo, mid)
    return (lo + hi) / 2


def chi2_quantile(p: float, df: int) -> float:
    """x with P(chi2_df <= x) = p (series of the regularized lower incomplete gamma, bisection)."""

    def cdf(x: float) -> float:
        a, y = df / 2, x / 2
        if y <= 0:
            return 0.0
        term = acc = 1.0 / a
        n = 0
        while term > 1e-16 * acc:
            n += 1
            term *= y / (a + n)
            acc += term
        return math.exp(a * math.log(y) - y - math.lgamma(a)) * acc

    return _invert(cdf, p, 200.0)


def half_width(sd: float, n: int) -> float:
    return t_two_sided(0.95, n - 1) * sd / math.sqrt(n)


def seeds_needed(sd: float, cap: int = 1000) -> int:
    return next((n for n in range(2, cap) if half_width(sd, n) <= TARGET), cap)


def final_vals() -> dict[str, list[float]]:
    out = {}
    for arm in ARMS:
        out[arm] = []
        for seed in SEEDS:
            _, val = read_metrics(OLD / f"arm={arm},seed={seed}.csv")
            out[arm].append(val[-1][1])
    return out


def within_problem_variance() -> float:
    """Mean over cells of E_i[p_i (1 - p_i)] at the final validation: pass@2 (unbiased from k=4)
    estimates E[1 - (1 - p)^2], so E[p^2] = 2 pass@1 - pass@2."""
    vals = []
    for arm, seed in itertools.product(ARMS, SEEDS):
        rows = [r for r in csv.DictReader(open(OLD / f"arm={arm},seed={seed}.csv")) if r.get("val/pass@1")]
        p1, p2 = float(rows[-1]["val/pass@1"]), float(rows[-1]["val/default/pass@2"])
        vals.append(p1 - (2 * p1 - p2))  # E[p] - E[p^2]
    return statistics.fmean(vals)


def pooled_paired_sd(y: dict[str, list[float]], arms) -> tuple[float, int]:
    """sqrt(2) x the residual sd of the additive arm + seed model: the sd of a paired difference
    when every arm is equally noisy, with (arms-1)(seeds-1) degrees of freedom."""
    a, s = len(arms), len(SEEDS)
    grand = statistics.fmean(v for arm in arms for v in y[arm])
    arm_m = {arm: statistics.fmean(y[arm]) for arm in arms}
    seed_m = [statistics.fmean(y[arm][j] for arm in arms) for j in range(s)]
    ss = sum((y[arm][j] - arm_m[arm] - seed_m[j] + grand) ** 2 for arm in arms for j in range(s))
    df = (a - 1) * (s - 1)
    return math.sqrt(2 * ss / df), df


def main() -> None:
    y = final_vals()
    print("# Seeds for the chains grid v2: power arithmetic\n")
    print("`python scripts/grid_power.py > results/grid_chains_v2/power.md` (pure arithmetic on "
          "results/grid_chains/*.csv; no model). Written on Intel(R) Xeon(R) Processor (2 cores; AVX512 "
          "F/BW/VL/VNNI, no AVX512-BF16, no AMX); the CPU does not enter the numbers.\n")
    print(f"Old grid: final validation pass@1, {OLD_PROBLEMS} problems x {K} samples, seeds {SEEDS}.\n")
    print("| arm | " + " | ".join(f"seed {s}" for s in SEEDS) + " |\n|---|" + "---|" * len(SEEDS))
    for arm in ARMS:
        print(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in y[arm]) + " |")

    sds = []
    for a, b in (("flow", "uniform"), ("flow", "random")):
        d = [x - z for x, z in zip(y[a], y[b])]
        sds.append((f"{a} - {b} (this pair)", statistics.stdev(d), len(d) - 1, statistics.fmean(d)))
    for arms in (("uniform", "random", "flow"), ARMS):
        sd, df = pooled_paired_sd(y, arms)
        sds.append((f"pooled, arms {'/'.join(arms)}", sd, df, math.nan))

    w = within_problem_variance()
    indep50 = math.sqrt(2 * w / (OLD_PROBLEMS * K))
    print(f"\nWithin-problem variance E[p(1-p)] at the final validation (from pass@1 and pass@2, mean of the "
          f"15 cells): {w:.3f}. Were the two arms' validation samples independent, validation noise alone "
          f"would give a paired sd of sqrt(2 x {w:.3f} / {OLD_PROBLEMS * K}) = {indep50:.3f} at "
          f"{OLD_PROBLEMS}x{K} ({indep50 / 2:.3f} at {NEW_PROBLEMS}x{K}). The measured paired sds below are "
          "smaller: the arms of a seed validate with the same sampling seeds (common random numbers), so "
          "their samples differ only where the policies do, and how much of the measured sd is validation "
          "noise cannot be told from the committed summaries (no per-sample records). Hence the shares below.\n")

    print("## Paired sd at 50x4 and its upper confidence bounds\n")
    print("One-sided upper confidence bounds of an sd with df degrees of freedom: sd x sqrt(df / chi2_{alpha, df}), "
          "alpha = 0.20 (80%) and 0.05 (95%); with 2 df the sd of 3 seeds is barely known.\n")
    print("| estimate | df | mean diff | sd | 80% upper | 95% upper |\n|---|---|---|---|---|---|")
    rows = []
    for name, sd, df, mean in sds:
        up80, up95 = (sd * math.sqrt(df / chi2_quantile(a, df)) for a in (0.20, 0.05))
        rows.append((name, sd, up80, up95))
        m = "" if math.isnan(mean) else f"{mean:+.4f}"
        print(f"| {name} | {df} | {m} | {sd:.4f} | {up80:.4f} | {up95:.4f} |")

    print(f"\n## Seeds needed for a 95% half-width <= {TARGET} at {NEW_PROBLEMS}x{K}\n")
    print(f"sd at {NEW_PROBLEMS}x{K} = sd at {OLD_PROBLEMS}x{K} x sqrt(1 - v + v x {OLD_PROBLEMS}/{NEW_PROBLEMS}), "
          "v = share of the paired variance that is validation noise (k stays 4, so that share scales "
          "as 1/problems whatever the within-problem correlation). n = smallest with "
          "t_{0.975, n-1} x sd / sqrt(n) <= 0.01.\n")
    head = " | ".join(f"v={v:g}: point / 80% / 95%" for v in VAL_SHARES)
    print(f"| estimate | {head} |\n|---|" + "---|" * len(VAL_SHARES))
    for name, sd, up80, up95 in rows:
        cells = []
        for v in VAL_SHARES:
            f = math.sqrt(1 - v + v * OLD_PROBLEMS / NEW_PROBLEMS)
            cells.append(" / ".join(str(seeds_needed(x * f)) for x in (sd, up80, up95)))
        print(f"| {name} | " + " | ".join(cells) + " |")

    ns = range(3, 17)
    print(f"\n## Half-width (pass@1 points) by seed count at {NEW_PROBLEMS}x{K}, v = 0 (nothing shrinks)\n")
    print("| estimate (sd) | " + " | ".join(f"n={n}" for n in ns) + " |\n|---|" + "---|" * len(ns))
    for name, sd, up80, _ in rows:
        for label, x in ((name, sd), (f"{name}, 80% upper", up80)):
            print(f"| {label} ({x:.4f}) | " + " | ".join(f"{100 * half_width(x, n):.2f}" for n in ns) + " |")
    print("\nt_{0.975, n-1}: " + ", ".join(f"n={n}: {t_two_sided(0.95, n - 1):.3f}" for n in ns))


if __name__ == "__main__":
    main()
