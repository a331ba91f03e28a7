"""When running a prompt once per group pays (`model.share_prefix`, flowtracer.model.prefix): the loss
forward and backward of one GRPO micro-batch, packed against padded, over prompt and completion lengths.
Prints a table.

    python benchmarks/shared_prompt.py --threads 2 [--out results/shared_prompt_<cpu kind>.md]

Per shape: G rows sharing one prompt of P tokens, completions of lengths spread evenly over
[C/4, C] (rows that stop early, as sampled ones do), right-padded; the bundled SmolLM2-135M with
LoRA r=8 on q/k/v/o, float32, random token ids (timing only). One side = teacher_forced_pass with
a graph and its backward through the log-probs of the completion tokens, with share_prefix on and
off, interleaved, median of the reps. "tokens" = what each side's decoder runs: G x (P + C) padded,
P + the completions' own tokens packed (or "padded" where packing saves under a quarter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def batch(prompt: int, completion: int, g: int, vocab: int, gen: torch.Generator):
    lengths = [round(completion / 4 + k * (completion - completion / 4) / max(1, g - 1)) for k in range(g)]
    ids = torch.randint(10, vocab, (g, prompt + completion), generator=gen)
    ids[:, :prompt] = ids[0, :prompt]
    mask = torch.zeros(g, prompt + completion, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :prompt + n] = 1
    response = torch.zeros_like(mask)
    response[:, prompt:] = 1
    return ids.masked_fill(mask == 0, 0), mask, response, prompt + sum(lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="50x48,200x48,500x48,50x256,200x256,500x256,200x1024",
                    help="prompt x completion tokens")
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flowtracer.config import LoraSpec
    from flowtracer.generation.precision import describe_cpu
    from flowtracer.model import prefix
    from flowtracer.model.forward import teacher_forced_pass
    from flowtracer.model.policy import load_policy
    from flowtracer.runs.csvlog import print_and_write

    policy, _ = load_policy("smollm2-135m-instruct",
                            lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    vocab = policy.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)

    def step(ids, mask, response, share):
        policy.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = teacher_forced_pass(policy, ids, mask, capture_layers=None, with_grad=True, stats_mask=response,
                                  share_prefix=share)
        out.logprobs.sum().backward()
        return time.perf_counter() - start

    rows = []
    for shape in args.shapes.split(","):
        p, c = (int(v) for v in shape.split("x"))
        ids, mask, response, packed_tokens = batch(p, c, args.g, vocab, gen)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        packs = prefix.plan_packs(ids, mask, pos)
        times: dict[bool, list[float]] = {False: [], True: []}
        step(ids, mask, response, True)  # warm-up
        for _ in range(args.reps):
            for share in (False, True):
                times[share].append(step(ids, mask, response, share))
        padded, packed = (statistics.median(times[s]) for s in (False, True))
        rows.append((shape, args.g * (p + c), packed_tokens if packs else "padded", padded, packed))
        print(f"{shape}: padded {padded:.2f} s, packed {packed:.2f} s", flush=True)
    lines = [f"# Loss forward + backward, a prompt once per group vs padded rows: {describe_cpu()}", "",
             f"torch {torch.__version__}, {args.threads} threads, float32, SmolLM2-135M + LoRA r=8, G = {args.g}, "
             f"median of {args.reps}.", f"Command: `python benchmarks/shared_prompt.py {' '.join(sys.argv[1:])}`", "",
             "| prompt x completion | tokens padded | tokens packed | padded s | packed s | packed / padded |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {s} | {tp} | {tk} | {a:.2f} | {b:.2f} | {b / a:.2f} |" for s, tp, tk, a, b in rows]
    print_and_write(lines, args.out)


if __name__ == "__main__":
    main()
