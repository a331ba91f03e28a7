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

import torch

from flowtracer.config import LEGACY_SET, EvalSet
from flowtracer.evaluation.metrics import BenchmarkAccuracy, answer_key
from flowtracer.generation import sample
from flowtracer.generation.sampler import row_seeds
from flowtracer.rewards import VerifierCache, graded, safe_score
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
    "keys": [k normalised answers or None], "truncated": [k bool], "refused": [k bool]}``.
    Graded as training grades (flowtracer.rewards.graded): a fallback answer (last number, no
    answer marker) of a response cut off at max_new_tokens is refused (not correct, no vote), and
    counted in "refused"; "truncated" marks the responses that hit max_new_tokens.
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
        correct, keys, cut, refused = [], [], [], []
        texts = gen.responses[i * k:(i + 1) * k]
        for j, text in enumerate(texts):
            truncated = bool(gen.truncated[i * k + j])
            score, _ = safe_score(verifiers(row), text, row["answer"], locate=row_extraction(row))
            score, was_refused = graded(score, truncated)  # training's rule (flowtracer.rewards.graded)
            correct.append(bool(score.reward >= threshold))
            keys.append(answer_key(score.parsed))
            cut.append(truncated)
            refused.append(was_refused)
        records.append({"set": name, "index": int(row["eval_index"]), "question": row["question"],
                        "responses": list(texts), "correct": correct, "keys": keys,
                        "truncated": cut, "refused": refused})
    return records


def benchmark_metric(specs: dict[str, EvalSet], **kwargs) -> BenchmarkAccuracy:
    """The metric of these eval sets (flowtracer.evaluation.metrics.BenchmarkAccuracy)."""
    return BenchmarkAccuracy({name: (spec.pass_ks, spec.math) for name, spec in specs.items()}, **kwargs)


def summarize(records: Iterable[dict], specs: dict[str, EvalSet]) -> dict[str, Any]:
    """Per-set metrics and the macro average from `eval_batch` records of this process.

    Returns ``{"sets": {name: {"n": problems, "k": k, "avg@k": .., "pass@k'": .., "maj@k": ..}},
    "math_avg": mean avg@k over the sets with math: true (None if none), "math_sets": [names]}``.
    """
    metric = benchmark_metric(specs, sync_on_compute=False)
    metric.update(list(records))
    return metric.compute()


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
