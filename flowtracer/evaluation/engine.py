"""The evaluation engine: named eval sets -> generate k answers per problem -> verify -> metrics.

Lightning-free: `flowtracer eval` calls `evaluate` directly, and validation during `fit` runs the
same `eval_batch` on every validation batch and `summarize` at the end of the epoch
(flowtracer.train.validation), so both report the same numbers for the same policy and seeds.

Sampling: with ``val_sampling.seed_per_prompt: true`` every response is drawn from its own seed,
a function of (seed, set name, problem index, sample index) (flowtracer.generation.sampler), so a set's
numbers depend neither on the batch size, the generation chunking nor the number of processes.
Otherwise (the default; per-row seeding costs a hash over the vocabulary per token) HF's sampler
is seeded per batch from (seed, set name, batch index): the same numbers for the same batch size
(an old config's single set gets the seeds of the validation before eval sets existed).
Greedy (temperature 0) needs no seed.
Generation goes through the trainer's `flowtracer.rollout.sample` (and whatever chunking its
SamplingConfig asks for).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable

import numpy as np
import torch

from flowtracer.config import LEGACY_SET, EvalSet
from flowtracer.evaluation.metrics import answer_key, macro_average, set_metrics
from flowtracer.generation import sample
from flowtracer.generation.sampler import row_seeds
from flowtracer.rewards import VerifierCache, safe_score
from flowtracer.rewards.extract import row_extraction


def set_seed_offset(name: str) -> int:
    """A stable per-set number, so two sets never share sample seeds (0 for an old config's one
    set, whose batches then get the seeds the validation had before eval sets existed)."""
    return 0 if name == LEGACY_SET else zlib.crc32(name.encode()) & 0x7FFFFFFF


def batch_seed(seed: int, name: str, batch_index: int) -> int:
    """The torch seed of batch `batch_index` of set `name` (HF's sampler path)."""
    return (seed * 1_000_003 + 10**6 + set_seed_offset(name) + batch_index) % 2**31


def eval_batch(policy, tokenizer, rows: list[dict], sampling, format_prompt: Callable, *, seed: int,
               verifiers, threshold: float = 1.0, batch_index: int = 0) -> list[dict]:
    """k answers for each row (all rows of one set), scored: one record per row.

    A record is ``{"set", "index", "question", "responses": [k texts], "correct": [k bool],
    "keys": [k normalised answers or None]}``.
    `format_prompt(row) -> (text, question span)`; `verifiers(row)` -> the row's verifier;
    `batch_index`: the batch's position within its set (seeds HF's sampler, see `batch_seed`).
    """


    name = rows[0]["eval_set"]
    prompts, spans = zip(*(format_prompt(r) for r in rows))
    k = sampling.num_generations
    device = next(policy.parameters()).device
    seeds = None
    if sampling.seed_per_prompt:  # each response from its own seed: independent of batching
        seeds = row_seeds(seed, set_seed_offset(name), [r["eval_index"] for r in rows], k, device=device)
    else:  # HF's sampler, seeded per batch: reproducible for the same batch size (and faster)
        torch.manual_seed(batch_seed(seed, name, batch_index))
    with torch.no_grad():

        gen = sample(policy, tokenizer, list(prompts), list(spans), sampling, row_seeds=seeds)
    records = []
    for i, row in enumerate(rows):
        correct, keys = [], []
        texts = gen.responses[i * k:(i + 1) * k]
        for text in texts:
            score, _ = safe_score(verifiers(row), text, row["answer"], locate=row_extraction(row))
            correct.append(bool(score.reward >= threshold))
            keys.append(answer_key(score.parsed))
        records.append({"set": name, "index": int(row["eval_index"]), "question": row["question"],
                        "responses": list(texts), "correct": correct, "keys": keys})
    return records


def summarize(records: Iterable[dict], specs: dict[str, EvalSet]) -> dict[str, Any]:
    """Per-set metrics and the macro average from `eval_batch` records (duplicates dropped).

    Returns ``{"sets": {name: {"n": problems, "k": k, "avg@k": .., "pass@k'": .., "maj@k": ..}},
    "math_avg": mean avg@k over the sets with math: true (None if none), "math_sets": [names]}``.
    """
    by_set: dict[str, dict[int, dict]] = {}
    for rec in records:  # DDP pads its last batches with repeats: one record per (set, index)
        by_set.setdefault(rec["set"], {})[rec["index"]] = rec
    sets = {}
    for name in specs:
        recs = [by_set.get(name, {})[i] for i in sorted(by_set.get(name, {}))]
        if not recs:
            continue
        correct = np.array([r["correct"] for r in recs], dtype=bool)
        metrics = set_metrics(correct, [r["keys"] for r in recs], specs[name].pass_ks)
        sets[name] = {"n": len(recs), "k": int(correct.shape[1]), **metrics}
    math_sets = [n for n in sets if specs[n].math]
    return {"sets": sets, "math_avg": macro_average(sets, math_sets), "math_sets": math_sets}


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def evaluate(policy, tokenizer, sets: dict[str, tuple[EvalSet, list[dict]]], base_sampling,
             format_prompt: Callable, *, seed: int = 0, batch_size: int = 32, threshold: float = 1.0,
             on_batch: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Evaluate `policy` on every set: `sets` maps name -> (spec, rows tagged by
    flowtracer.data.datamodule.load_set_rows).

    `format_prompt(row, spec) -> (text, span)`; `on_batch(name, n_rows)` reports progress.
    Returns `summarize`'s dict plus "records" (every `eval_batch` record, in set and row order).
    """

    verifiers = VerifierCache()
    records = []
    for name, (spec, rows) in sets.items():
        sampling = spec.sampling(base_sampling)
        for i, chunk in enumerate(batches(rows, batch_size)):
            records += eval_batch(policy, tokenizer, chunk, sampling, lambda r, spec=spec: format_prompt(r, spec),
                                  seed=seed, verifiers=verifiers, threshold=threshold, batch_index=i)
            if on_batch is not None:
                on_batch(name, len(chunk))
    return {**summarize(records, {n: s for n, (s, _) in sets.items()}), "records": records}
