"""Prefill of the fast engine, whole batch at once vs a block of prompts at a time. Prints a table.

    python benchmarks/prefill.py --threads 2 --out results/prefill_$(python -c \
        "from flowtracer.generation.precision import cpu_kind; print(cpu_kind())").md

Bundled SmolLM2-135M-Instruct, float32. One call = `fast.decode` of left-padded prompts (widths
spread over [width/2, width], as a real eval batch) for one greedy token, so nearly all of it is the
prefill. Each setting of `fast.PREFILL_TOKENS` (the block size in tokens; "whole" = one block)
runs in turn within every rep, so load drift hits all alike; the median of `--reps` is reported,
with the minor page faults per call (getrusage) that the block size is meant to cut. The greedy
tokens of every setting must agree (rows are independent; only float rounding could differ).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x400,25x120,4x100", help="rows x width of the prompt batches")
    ap.add_argument("--blocks", default="whole,4096,1024,256", help="PREFILL_TOKENS settings")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flowtracer.config import SamplingConfig
    from flowtracer.generation import fast
    from flowtracer.generation.precision import describe_cpu
    from flowtracer.model.policy import load_policy
    from flowtracer.runs.csvlog import print_and_write

    model, tok = load_policy("smollm2-135m-instruct", lora=None)[:2]
    model.eval()
    text = "The lighthouse keeper counted the ships that passed the rocks every night, and wrote each one down. "
    pool = tok(text * 200, add_special_tokens=False)["input_ids"]
    blocks = {b: (10 ** 9 if b == "whole" else int(b)) for b in args.blocks.split(",")}
    base = next(iter(blocks))  # the setting the others are compared with
    greedy = SamplingConfig(num_generations=1, max_new_tokens=1, temperature=0.0)
    results: dict[tuple[str, str], tuple[float, float]] = {}
    default = fast.PREFILL_TOKENS
    for shape in args.shapes.split(","):
        rows, width = (int(x) for x in shape.split("x"))
        lengths = torch.linspace(width // 2, width, rows).long()
        ids = torch.full((rows, width), tok.pad_token_id)
        attn = torch.zeros(rows, width, dtype=torch.long)
        for r, n in enumerate(lengths.tolist()):
            ids[r, width - n:] = torch.tensor(pool[r: r + n])
            attn[r, width - n:] = 1

        def call(block, ids=ids, attn=attn):
            fast.PREFILL_TOKENS = blocks[block]
            return fast.decode(model, ids, attn, 1, greedy, [tok.eos_token_id], tok.pad_token_id)[0]

        first = {b: call(b) for b in blocks}  # warm-up, and the tokens to compare
        agree = all(torch.equal(first[b], first[base]) for b in blocks)
        times = {b: [] for b in blocks}
        faults = {b: [] for b in blocks}
        with torch.inference_mode():
            for _ in range(args.reps):
                for b in blocks:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    call(b)
                    times[b].append(time.perf_counter() - start)
                    faults[b].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        for b in blocks:
            results[shape, b] = (statistics.median(times[b]), statistics.median(faults[b]))
        print(f"{shape}: " + ", ".join(f"{b} {results[shape, b][0] * 1e3:.0f} ms" for b in blocks)
              + f"; same tokens: {agree}", flush=True)
        if not agree:
            sys.exit(f"{shape}: the block sizes drew different greedy tokens")
    fast.PREFILL_TOKENS = default

    lines = [f"# Fast-engine prefill, whole batch vs blocks of prompts: {describe_cpu()}", "",
             f"torch {torch.__version__}, {args.threads} threads, float32; SmolLM2-135M-Instruct.",
             f"Command: `python benchmarks/prefill.py {' '.join(sys.argv[1:])}`", "",
             "| rows x width | PREFILL_TOKENS | ms per call | minor page faults per call | time vs " + base + " |",
             "| --- | --- | --- | --- | --- |"]
    for shape in args.shapes.split(","):
        for b in blocks:
            t, f = results[shape, b]
            lines.append(f"| {shape} | {b} | {t * 1e3:.0f} | {f:,.0f} | {t / results[shape, base][0]:.2f} |")
    print_and_write(lines, args.out)


if __name__ == "__main__":
    main()
