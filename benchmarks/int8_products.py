"""Issue 31's candidate lever "weight-only int8 rollouts": one decode step's weight products of
SmolLM2-135M at the rows a decode step batches, float32 against int8 weights. Prints a table.

    python benchmarks/int8_products.py --threads 2 [--out results/int8_products_<cpu kind>.md]

Layouts (x (rows, in) times W^T, W (out, in)), each timed over a whole step's products with every
layer's own weights (read from memory, as a decode step reads them), in interleaved rounds (load
drift hits all alike), median of the rounds' medians:
  float32 F.linear          what `generate` runs
  float32 MKL packed        the fast engine's default layout (flowtracer.generation.fast)
  int8, float32 x           PyTorch's weight-only int8 kernel (`aten._weight_int8pack_mm`, per-output
                            channel scales; gpt-fast's CPU path) fed float32 activations
  int8, bf16 x              the same kernel fed bf16 activations (its fast path)
  bf16 F.linear             bf16 weights and activations (`sampling.dtype: bfloat16`)
The step is 30 layers x (qkv, o, gate_up, down) and the vocabulary head once; the head alone is a
second row. The int8 error is against the float32 product (random weights). int8 pays only if it
beats the float32 packed layout (the fast engine's default): its weights are a quarter of the bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M: hidden 576, 9 query / 3 kv heads of 64, MLP 1536, vocabulary 49152, 30 layers
PRODUCTS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
PER_STEP = {"qkv": 30, "o": 30, "gate_up": 30, "down": 30, "head": 1}


def layouts(w: torch.Tensor, rows: int) -> dict:
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    scale = w.abs().amax(1) / 127
    wq = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    wb, sb = w.bfloat16(), scale.bfloat16()
    return {
        "float32 F.linear": lambda x: F.linear(x, w),
        "float32 MKL packed": lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, rows),
        "int8, float32 x": lambda x: torch.ops.aten._weight_int8pack_mm(x, wq, scale),
        "int8, bf16 x": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), wq, sb).float(),
        "bf16 F.linear": lambda x: F.linear(x.bfloat16(), wb).float(),
    }


def timed(step_fns: dict, rounds: int, reps: int) -> dict[str, float]:
    per: dict[str, list[float]] = {name: [] for name in step_fns}
    for fn in step_fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in step_fns.items():
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            per[name].append(statistics.median(times))
    return {name: statistics.median(t) * 1e3 for name, t in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flowtracer.generation.precision import describe_cpu
    from flowtracer.runs.csvlog import print_and_write

    gen = torch.Generator().manual_seed(0)
    # every layer its own weights, as in the model: a step reads them all from memory (cold), not one hot copy
    weights = {p: [torch.randn(shape, generator=gen) * 0.05 for _ in range(PER_STEP[p])]
               for p, shape in PRODUCTS.items()}
    xs = {p: torch.randn(args.rows, shape[1], generator=gen) for p, shape in PRODUCTS.items()}
    fns = {p: [layouts(w, args.rows) for w in ws] for p, ws in weights.items()}
    names = list(fns["head"][0])
    errors = {p: float((fns[p][0]["int8, bf16 x"](xs[p]) - F.linear(xs[p], weights[p][0])).abs().max())
              for p in PRODUCTS}

    def step(name):
        def run():
            for i in range(30):
                for p in ("qkv", "o", "gate_up", "down"):
                    fns[p][i][name](xs[p])
            fns["head"][0][name](xs["head"])
        return run

    def head(name):
        return lambda: fns["head"][0][name](xs["head"])

    table = {"**step**: 30 layers x (qkv, o, gate_up, down) + head, each its own weights": timed(
        {n: step(n) for n in names}, args.rounds, args.reps),
        "vocabulary head 49152x576 alone": timed({n: head(n) for n in names}, args.rounds, args.reps)}
    lines = [f"# Weight-only int8 vs float32 products, one decode step: {describe_cpu()}", "",
             f"torch {torch.__version__}, {args.threads} threads, {args.rows} rows; ms, median of {args.rounds} "
             f"interleaved rounds of {args.reps}.", f"Command: `python benchmarks/int8_products.py "
             f"{' '.join(sys.argv[1:])}`", "",
             "| ms | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for row, t in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{t[k]:.1f}" for k in names) + " |")
    lines += ["", "max |int8 (bf16 x) - float32| per product (weights ~N(0, 0.05^2), x ~N(0, 1)): " + "; ".join(
        f"{p} {errors[p]:.3f}" for p in PRODUCTS)]
    print_and_write(lines, args.out)


if __name__ == "__main__":
    main()
