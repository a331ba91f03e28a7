"""Measure the starting accuracy of a model on a task, to pick a quickstart task that can learn.

GRPO needs reward variance inside each group: a task the model solves 0% or 100% of the time gives
no signal. This samples `--samples` responses for `--prompts` questions (batched HF generate, left
padding) and prints accuracy, mean response length and the fraction cut off by the token cap.

    python scripts/probe_accuracy.py --source data/arith_train.jsonl --temperature 0.8 \
        --max-new-tokens 32 --instruction "Answer with just the final answer inside <answer></answer>."

Scoring: flowtracer.rewards' MathVerifier when available, else "last integer == answer".
Use --threads 1 on a shared CPU: two threads competing with other jobs ran ~9x slower.

Measured on data/arith_train.jsonl (SmolLM2-135M-Instruct, 32 prompts x 4 samples, top-p 1):
    instruction                                      T    max_new  acc   mean_len  capped
    "Answer with just the final answer inside        0.8  32       0.44  16.9      0.27
     <answer></answer>." (the default)               0    32       0.78   9.3      0.03  (greedy)
    "Answer with just the number inside <answer>.."  0.7  32       0.49  16.7      0.23
                                                     0.8  32       0.39  18.0      0.31
                                                     1.0  32       0.27  20.6      0.38
    none (bare question)                             0.7  48       0.38  36.8      0.57
The model never writes the <answer> tags; MathVerifier falls back to the last number.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowtracer.data import DEFAULT_INSTRUCTION, format_prompt, load_rows  # noqa: E402
from flowtracer.model.policy import load_policy  # noqa: E402


def make_scorer():
    try:
        from flowtracer.rewards.math_verifier import MathVerifier

        verifier = MathVerifier()
        return lambda response, answer: verifier(response, answer).reward
    except ImportError:
        def last_int(response: str, answer: str) -> float:
            found = re.findall(r"-?\d+", response)
            return float(bool(found) and found[-1] == str(answer).strip())

        return last_int


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--source", default="data/arith_train.jsonl", help="any flowtracer data source")
    ap.add_argument("--task-kwargs", default="{}", help="JSON dict for reasoning_gym sources")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (one sample)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="'' = bare question")
    ap.add_argument("--system-prompt", default=None)
    ap.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest when shared)")
    ap.add_argument("--show", type=int, default=3, help="print this many responses")
    ap.add_argument("--show-wrong", type=int, default=0, help="print this many wrong responses")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rows = load_rows(args.source, size=args.prompts, seed=args.seed, verifier="math",
                     task_kwargs=json.loads(args.task_kwargs) or None)[: args.prompts]
    model, tok = load_policy(args.model, lora=None)
    model.eval()
    score = make_scorer()
    samples = 1 if args.temperature == 0 else args.samples
    jobs = [(r, format_prompt(tok, r["question"], instruction=args.instruction or None,
                              system_prompt=args.system_prompt)[0]) for r in rows for _ in range(samples)]
    rewards, lengths, capped, shown, tagged, wrong = [], [], 0, 0, 0, 0
    t0 = time.time()
    for i in range(0, len(jobs), args.batch):
        chunk = jobs[i : i + args.batch]
        enc = tok([p for _, p in chunk], return_tensors="pt", padding=True)
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                                 **(sampling if args.temperature > 0 else {"do_sample": False}))
        gen = out[:, enc["input_ids"].shape[1]:]
        for (row, _), ids in zip(chunk, gen):
            ended = (ids == tok.eos_token_id).nonzero()
            n = int(ended[0]) + 1 if len(ended) else len(ids)
            capped += not len(ended)
            text = tok.decode(ids[:n], skip_special_tokens=True)
            rewards.append(score(text, row["answer"]))
            tagged += bool(re.search(r"<answer>.*?</answer>", text, re.DOTALL))
            lengths.append(n)
            if shown < args.show or (rewards[-1] < 1 and wrong < args.show_wrong):
                shown += 1
                wrong += rewards[-1] < 1
                print(f"--- {row['question']!r} -> {text!r} (ref {row['answer']}, r={rewards[-1]})")
    acc = sum(rewards) / len(rewards)
    per_prompt = [sum(rewards[j : j + samples]) / samples for j in range(0, len(rewards), samples)]
    mixed = sum(0 < p < 1 for p in per_prompt) / len(per_prompt)
    print(f"source={args.source} T={args.temperature} top_p={args.top_p} max_new={args.max_new_tokens} "
          f"instruction={args.instruction!r}")
    n = len(rewards)
    print(f"RESULT acc={acc:.3f} mean_len={sum(lengths) / n:.1f} capped={capped / n:.2f} "
          f"tagged={tagged / n:.2f} mixed_groups={mixed:.2f} n={n} time={time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
