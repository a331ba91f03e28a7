"""Per-step cost of picking the next token, apart from the model: the two samplers the decode engines
use, at a vocabulary of SmolLM2's 49152 and the rows a decode step batches. Prints a table.

    python benchmarks/sampler_cost.py --threads 2 [--out results/sampler_cost_<cpu kind>.md]

The rows call the fast engine's own sampler (`flowtracer.generation.fast.Sampler`, temperature 1):
`inverse CDF` is the unseeded default (`sampling.draw: auto`: one uniform per row against the float64
cumulative softmax); `multinomial` the unseeded `sampling.draw: multinomial` (`torch.multinomial` of
the softmax, as HF's sampler draws);
`row-seeded` is `sampling.seed_per_prompt: true` (flowtracer.generation.sampler: a counter-based hash
per (row, step, token), then Gumbel-max in float64), also split into its two parts.
Compare with `benchmarks/decode.py`'s ms per step at the same rows to see the sampler's share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32,64")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flowtracer.config import SamplingConfig
    from flowtracer.generation.fast import Sampler
    from flowtracer.generation.precision import describe_cpu
    from flowtracer.generation.sampler import gumbel_perturbed, hashed_uniform
    from flowtracer.runs.csvlog import print_and_write

    rows_list = [int(r) for r in args.rows.split(",")]
    sampling = SamplingConfig(temperature=1.0)
    hf_stream = SamplingConfig(temperature=1.0, draw="multinomial")
    cases = {
        "inverse CDF (unseeded, default)": lambda lg, s, u: Sampler(sampling, None)(lg, 5),
        "multinomial (unseeded)": lambda lg, s, u: Sampler(hf_stream, None)(lg, 5),
        "row-seeded: hash": lambda lg, s, u: hashed_uniform(s, 5, lg.shape[-1]),
        "row-seeded: Gumbel-max": lambda lg, s, u: gumbel_perturbed(lg, u).argmax(-1),
        "row-seeded: total": lambda lg, s, u: Sampler(sampling, s)(lg, 5),
    }
    table = {}
    for rows in rows_list:
        logits, seeds = torch.randn(rows, args.vocab), torch.arange(rows)
        u = hashed_uniform(seeds, 5, args.vocab)
        for name, fn in cases.items():
            table[name, rows] = median_ms(lambda fn=fn, lg=logits, s=seeds, u=u: fn(lg, s, u), args.reps)
    lines = [f"# Sampler cost per decode step: {describe_cpu()}", "",
             f"torch {torch.__version__}, {args.threads} threads, vocabulary {args.vocab}, median of {args.reps}.",
             f"Command: `python benchmarks/sampler_cost.py {' '.join(sys.argv[1:])}`", "",
             "| ms per step | " + " | ".join(f"{r} rows" for r in rows_list) + " |",
             "| --- |" + " --- |" * len(rows_list)]
    lines += [f"| {name} | " + " | ".join(f"{table[name, r]:.2f}" for r in rows_list) + " |" for name in cases]
    print_and_write(lines, args.out)


if __name__ == "__main__":
    main()
