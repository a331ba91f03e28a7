"""The evaluation engine: named eval sets -> generate k answers per problem -> verify -> metrics.

Lightning-free: `flowtracer eval` calls `evaluate` directly, and validation during `fit` runs the
same `eval_batch` on every validation batch and `summarize` at the end of the epoch
(flowtracer.validation), so both report the same numbers for the same policy and seeds.

Sampling: with ``val_sampling.seed_per_prompt: true`` every response is drawn from its own seed,
a function of (seed, set name, problem index, sample index) (flowtracer.sampling), so a set's
numbers depend neither on the batch size, the generation chunking nor the number of processes.
Otherwise (the default; per-row seeding costs a hash over the vocabulary per token) HF's sampler
is seeded per batch from (seed, set name, batch index): the same numbers for the same batch size
(an old config's single set gets the seeds of the validation before eval sets existed).
Greedy (temperature 0) needs no seed.
Generation goes through the trainer's `flowtracer.rollout.sample` (and whatever chunking its
SamplingConfig asks for).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from flowtracer.evaluation.metrics import answer_key, macro_average, set_metrics

LEGACY_SET = "default"  # the one set of an old config (data.val_source / val_size)


@dataclass
class EvalSet:
    """One named evaluation set (``data.eval_sets.<name>``); None = inherit.

    Args:
        source (str): ``hf:<id>[:<config>][@<split>]``, ``reasoning_gym:<task>`` or a local
            .jsonl/.json/.parquet file (grammar of flowtracer.data.sources).
        k (int | None, default None): samples per problem (avg@k, maj@k); None = model.val_sampling.num_generations.
        pass_ks (list[int] | None, default None): the k' <= k of pass@k'; None = 1, 2, 4, ... and k.
        temperature (float | None, default None): 0 = greedy; None = model.val_sampling.temperature.
        top_p (float | None, default None): nucleus mass; None = model.val_sampling.top_p.
        max_new_tokens (int | None, default None): response cap; None = model.val_sampling.max_new_tokens.
        size (int | None, default None): rows to read (cap) or to generate (reasoning_gym, default 64).
        question_field / answer_field (str, default question / answer): the row fields.
        verifier (str | None, default None): verifier name; None = per row (default "math").
        verifier_kwargs (dict | None, default None): its init args.
        extraction (list[str] | None, default None): answer extractors in order (shortcut for
            ``verifier_kwargs.extraction`` of the math verifier), e.g. [boxed, answer_tag].
        instruction (str | None, default None): text appended to each question; None = data.instruction,
            "" = none.
        task_kwargs (dict | None, default None): reasoning-gym task config.
        math (bool, default True): counts in the macro average (``math_avg``).
    """

    source: str
    k: int | None = None
    pass_ks: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    size: int | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    verifier: str | None = None
    verifier_kwargs: dict[str, Any] | None = None
    extraction: list[str] | None = None
    instruction: str | None = None
    task_kwargs: dict[str, Any] | None = None
    math: bool = True

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> "EvalSet":
        if not isinstance(cfg, dict) or "source" not in cfg:
            raise ValueError(f"data.eval_sets.{name} needs a `source` (e.g. hf:HuggingFaceH4/MATH-500@test)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"data.eval_sets.{name}: unknown key(s) {unknown}; valid: {sorted(known)}")
        spec = cls(**cfg)
        if spec.k is not None and spec.k < 1:
            raise ValueError(f"data.eval_sets.{name}.k must be >= 1, got {spec.k}")
        return spec

    def row_verifier_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.verifier_kwargs or {})
        if self.extraction:
            kwargs["extraction"] = list(self.extraction)
        return kwargs

    def sampling(self, base):
        """The SamplingConfig of this set: `base` (model.val_sampling) with this set's overrides."""
        k = self.k or base.num_generations
        if self.pass_ks and (max(self.pass_ks) > k or min(self.pass_ks) < 1):
            raise ValueError(f"eval set {self.source}: pass_ks {self.pass_ks} must lie in 1..k = {k}; "
                             "raise k or drop the larger k'")
        over = {"num_generations": self.k, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}
        return dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})


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
    import torch

    from flowtracer.rewards import safe_score
    from flowtracer.sampling import row_seeds

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
        from flowtracer.rollout import sample  # lazy: the package imports no model code at import time

        gen = sample(policy, tokenizer, list(prompts), list(spans), sampling, row_seeds=seeds)
    records = []
    for i, row in enumerate(rows):
        correct, keys = [], []
        texts = gen.responses[i * k:(i + 1) * k]
        for text in texts:
            score, _ = safe_score(verifiers(row), text, row["answer"])
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
    from flowtracer.rewards import VerifierCache

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
