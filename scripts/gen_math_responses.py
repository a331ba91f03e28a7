"""Greedy responses of a model to a local math benchmark file, for grader comparisons.

    python scripts/gen_math_responses.py ../shared/benchmarks/math_benchmarks.jsonl runs/math560_greedy512.jsonl
    python scripts/gen_math_responses.py SRC OUT --limit 32          # the first 32 problems only

Each problem is rendered with the model's chat template and the file's own system prompt (the
`system` turn of its `messages` column: "Please reason step by step, and put your final answer
within \\boxed{}."), no extra instruction; decoding is greedy with `--max-new-tokens` (512) new
tokens, in batches of `--batch-size` prompts sorted by length. Output: one JSON line per problem
(`id`, `tag`, `response`, `tokens`, `truncated`), appended and flushed per batch; a rerun skips the
ids already in OUT, so an interrupted run resumes. Grade the result with scripts/grader_agreement.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from flowtracer.config import SamplingConfig
from flowtracer.data.prompts import format_prompt
from flowtracer.generation import generate
from flowtracer.model.policy import load_policy


def system_prompt(row: dict) -> str | None:
    """The system turn of the row's `messages` (a JSON string or a list of chat turns)."""
    messages = row.get("messages")
    if isinstance(messages, str):
        messages = json.loads(messages)
    return next((m["content"] for m in messages or [] if m.get("role") == "system"), None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("source", help="JSONL with id, tag, prompt and messages fields")
    ap.add_argument("out", help="JSONL to append responses to (resumed when it exists)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems of the file")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.source) if line.strip()][: args.limit]
    done = {json.loads(line)["id"] for line in open(args.out)} if os.path.exists(args.out) else set()
    model, tok = load_policy(args.model, dtype="float32", lora=None)
    model.eval()
    todo = []
    for r in rows:
        if r["id"] not in done:
            text, span = format_prompt(tok, r["prompt"], system_prompt=system_prompt(r), instruction=None)
            todo.append((r, text, span))
    todo.sort(key=lambda x: len(x[1]))
    cfg = SamplingConfig(num_generations=1, max_new_tokens=args.max_new_tokens, temperature=0.0)
    t0 = time.time()
    with open(args.out, "a") as f:
        for i in range(0, len(todo), args.batch_size):
            chunk = todo[i:i + args.batch_size]
            gen = generate(model, tok, [c[1] for c in chunk], [c[2] for c in chunk], cfg)
            ntok = gen.response_mask.sum(1).tolist()
            for (r, _, _), resp, n, cut in zip(chunk, gen.responses, ntok, gen.truncated.tolist()):
                f.write(json.dumps({"id": r["id"], "tag": r["tag"], "response": resp, "tokens": n,
                                    "truncated": cut}) + "\n")
            f.flush()
            print(f"{i + len(chunk)}/{len(todo)} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
