"""Decode speed of each generation engine against the memory-bandwidth floor. Prints a table.

    python benchmarks/decode.py --threads 2 --out results/decode_$(python -c \
        "from flowtracer.generation.precision import cpu_kind; print(cpu_kind())").md

Bundled SmolLM2-135M-Instruct with LoRA r=16 merged (as `sample` runs it). One step = one new token
for every row. ms per step is the difference between a call that generates `--tokens` long and one
that generates short, divided by the extra tokens, so prefill and per-call costs cancel; EOS is
disabled for the benchmark so every row runs the full length. Engines alternate within each rep
(A B A B ...), so load drift hits both alike; the median of `--reps` is reported.
Floor = one read of the model's weight bytes (the tied embedding counted once) at the read
bandwidth measured here (a sum over a 1 GiB float32 tensor, the same threads).
Sampling at T = 1: "hf" draws with torch.multinomial (transformers' sampler), "fast" with its default
inverse-CDF draw (sampling.draw auto), "fast:multinomial" with HF's (the sampler's share of the step).
The lever table times the vocabulary product (the largest one) in each GEMM layout the engines
could use, which is what decided the fast engine's layout (flowtracer.generation.fast).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(reps: int = 7) -> float:
    x = torch.ones(256 * 1024 * 1024)  # 1 GiB
    x.sum()
    return x.numel() * 4 / median_time(lambda: x.sum(), reps)


def lever_rows(weight: torch.Tensor, rows: int, reps: int) -> dict[str, float]:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    w_t = weight.t().contiguous()
    out = {"F.linear(x, W)": lambda: F.linear(x, weight), "(W @ x^T)^T": lambda: (weight @ x.t()).t(),
           "x @ W^T (contiguous copy)": lambda: torch.mm(x, w_t)}
    from flowtracer.generation.cpu_linear import available
    if available() and weight.dtype == torch.float32:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        out["MKL packed"] = lambda: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)
    for fn in out.values():
        fn()
    return {k: median_time(fn, reps) * 1e3 for k, fn in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32,64")
    ap.add_argument("--engines", default="hf,fast:multinomial,fast",
                    help="engine[:draw] list; the fast engine draws inverse_cdf by default (sampling.draw auto), "
                         "fast:multinomial draws HF's stream (the last one is compared with the first)")
    ap.add_argument("--short", type=int, default=8, help="new tokens of the short call")
    ap.add_argument("--tokens", type=int, default=40, help="new tokens of the long call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="float32, or bfloat16 (only where the CPU has it natively)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flowtracer.config import LoraSpec, SamplingConfig
    from flowtracer.generation import ENGINES
    from flowtracer.generation.precision import describe_cpu, native_bf16, rollout_dtype
    from flowtracer.model.policy import load_policy, merged_lora
    from flowtracer.runs.csvlog import print_and_write

    dtype = getattr(torch, args.dtype)
    if dtype == torch.bfloat16 and not native_bf16("cpu"):
        sys.exit("this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 would be emulated; run --dtype float32")
    model, tok = load_policy("smollm2-135m-instruct", lora=LoraSpec(r=16, alpha=32))[:2]
    model.eval()
    base = model.get_base_model()
    vocab = base.config.vocab_size
    # no EOS: every row runs the full length, so the two calls differ by exactly their token counts
    tok.eos_token = tok.convert_ids_to_tokens(vocab - 1)
    base.generation_config.eos_token_id = vocab - 1
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a long story about a lighthouse."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = [tok(prompt, add_special_tokens=False)["input_ids"]]
    seen, weight_bytes = set(), 0
    for p in base.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.numel() * dtype.itemsize
    bandwidth = read_bandwidth()
    floor_ms = weight_bytes / bandwidth * 1e3
    engines = args.engines.split(",")
    rows_list = [int(r) for r in args.rows.split(",")]

    results: dict[tuple[str, int], float] = {}
    with torch.no_grad(), merged_lora(model), rollout_dtype(model, dtype), torch.inference_mode():
        for rows in rows_list:
            def call(engine, n, rows=rows):
                name, _, draw = engine.partition(":")
                s = SamplingConfig(num_generations=rows, max_new_tokens=n, temperature=1.0, engine=name,
                                   draw=draw or "auto")
                new = ENGINES[name](model, tok, ids, rows, s)[0]
                assert new.shape == (rows, n), f"{engine} made {tuple(new.shape)}, expected {(rows, n)}"

            for engine in engines:  # warm-up (first-call allocations, cached weight layouts)
                call(engine, args.short)
            times = {(e, n): [] for e in engines for n in (args.short, args.tokens)}
            for _ in range(args.reps):
                for engine in engines:
                    for n in (args.short, args.tokens):
                        start = time.perf_counter()
                        call(engine, n)
                        times[engine, n].append(time.perf_counter() - start)
            for engine in engines:
                long_s = statistics.median(times[engine, args.tokens])
                short_s = statistics.median(times[engine, args.short])
                results[engine, rows] = (long_s - short_s) / (args.tokens - args.short) * 1e3
            print(f"rows {rows}: " + ", ".join(f"{e} {results[e, rows]:.1f} ms" for e in engines), flush=True)
        head = base.get_output_embeddings().weight.detach()
        levers = {rows: lever_rows(head, rows, max(5, args.reps * 3)) for rows in rows_list}

    def row(label, fmt):
        return f"| {label} | " + " | ".join(fmt(r) for r in rows_list) + " |"

    lines = [f"# Decode step per engine: {describe_cpu()}", "",
             f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; "
             "SmolLM2-135M-Instruct, LoRA r=16 merged.",
             f"Command: `python benchmarks/decode.py {' '.join(sys.argv[1:])}`", "",
             f"- read bandwidth: **{bandwidth / 1e9:.1f} GB/s** (sum over 1 GiB)",
             f"- weight bytes read per step: **{weight_bytes / 1e6:.0f} MB**",
             f"- floor (one read of the weights): **{floor_ms:.1f} ms** per step", "",
             "| engine | " + " | ".join(f"{r} rows" for r in rows_list) + " |",
             "| --- |" + " --- |" * len(rows_list)]
    for engine in engines:
        lines.append(row(f"{engine} ms/step", lambda r, e=engine: f"{results[e, r]:.1f}"))
        lines.append(row(f"{engine} x floor", lambda r, e=engine: f"{results[e, r] / floor_ms:.2f}"))
    if len(engines) > 1:
        a, b = engines[0], engines[-1]
        lines.append(row(f"{b} / {a}", lambda r: f"{results[b, r] / results[a, r]:.2f}"))
    lines += ["", f"Levers: the vocabulary product ({head.shape[0]} x {head.shape[1]}, {args.dtype}) "
              "per GEMM layout, ms", "",
              "| layout | " + " | ".join(f"{r} rows" for r in rows_list) + " |", "| --- |" + " --- |" * len(rows_list)]
    for name in levers[rows_list[0]]:
        lines.append(row(name, lambda r, n=name: f"{levers[r][n]:.2f}"))
    print_and_write(lines, args.out)


if __name__ == "__main__":
    main()
