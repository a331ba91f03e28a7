"""Synthetic run folders for `flowtracer view` tests and benchmarks/view_scale.py: rollouts.jsonl,
metrics.csv and config.yaml as `fit` writes them, with byte-level BPE tokens (as SmolLM2 logs them)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import yaml

from flowtracer.tools.view import BYTE_DECODER

BYTE_ENCODER = {b: ch for ch, b in BYTE_DECODER.items()}
WORDS = ("so", "the", "sum", "is", "we", "add", "carry", "then", "first", "digits", "answer", "=", "+", "7", "9", "16")


def bpe(text: str) -> list[str]:
    """Word-ish byte-level tokens of `text` ("Ġthe"), so that token_texts() gives `text` back."""
    out, word = [], b""
    for ch in text:
        if ch in " \n" and word:
            out.append(word)
            word = b""
        word += ch.encode()
    if word:
        out.append(word)
    return ["".join(BYTE_ENCODER[b] for b in w) for w in out]


def write_run(path: Path, *, steps: int = 3, prompts: int = 2, group: int = 4, words: int = 12, seed: int = 0,
              scores: bool = True, arm: str = "FlowCredit", responses: dict[tuple[int, int, int], str] | None = None,
              prompt_of=None) -> Path:
    """A run folder with steps x prompts x group rollouts; responses[(step, prompt, k)] overrides a text."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    lines, metrics = [], []
    for s in range(steps):
        for p in range(prompts):
            question = prompt_of(s, p) if prompt_of else f"What is {s} + {p}?"
            prompt = f"<|im_start|>user\n{question} Answer inside <answer></answer>.<|im_end|>\n<|im_start|>assistant\n"
            rewards = [float(rng.random() < 0.5) for _ in range(group)]
            mean = sum(rewards) / group
            for k in range(group):
                text = (responses or {}).get((s, p, k)) or (" ".join(rng.choice(WORDS) for _ in range(words))
                                                           + f" <answer>{s + p}</answer><|im_end|>")
                toks = bpe(text)
                n = len(toks)
                w = [1.5 if rng.random() < 0.4 else 1.0 for _ in range(n)]
                rec = {"step": s, "prompt": prompt, "response": text, "answer": str(s + p), "reward": rewards[k],
                       "advantage": rewards[k] - mean, "tokens": toks, "weights": w, "question": question,
                       "answer_span": [n - 2] if n > 2 else [], "truncated": k == group - 1}
                if scores:
                    rec["scores"] = [round(rng.random(), 4) for _ in range(n)]
                    rec["entropy"] = [round(2 * rng.random(), 4) for _ in range(n)]
                    rec["arm"] = arm
                lines.append(json.dumps(rec))
        metrics.append({"rl_step": s + 1, "reward/mean": rng.random(), "credit/fallback_frac": rng.random() / 4,
                        "time/step": 10 + rng.random(), "val/pass@1": ""})
    metrics.append({"rl_step": "", "reward/mean": "", "credit/fallback_frac": "", "time/step": "", "val/pass@1": 0.5})
    (path / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics[0]))
        writer.writeheader()
        writer.writerows(metrics)
    cfg = {"trainer": {"callbacks": [{"class_path": f"flowtracer.credit.{arm}", "init_args": {}}]}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path
