"""PromptDataModule: the prompts of an RL run, addressed by step number for exact resume."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from flowtracer.config import LEGACY_SET, EvalSet
from flowtracer.data import prompts
from flowtracer.data.rows import Rows, RowsChain
from flowtracer.data.sources import DataError, is_generated, load_rows
from flowtracer.rewards.combine import RewardSet
from flowtracer.rewards.extract import check_extraction

DEFAULT_INSTRUCTION = "Answer with just the final answer inside <answer></answer>."
_DEFAULT_GENERATED_SIZE = 1000


class PromptDataModule(L.LightningDataModule):
    """Prompts for GRPO: a training stream addressed by step, and validation batches.

    The training position is a pure function of (seed, step), so resuming needs no dataloader
    state: ``train_batch(step)`` returns the prompts of RL step `step`. Epoch ``e`` visits every
    training row once, in a permutation seeded by (seed, e); a step that straddles two epochs takes
    the end of one and the start of the next. ``train_dataloader()`` only paces Lightning's loop
    (it yields step indices within an epoch, which the module ignores).

    Args:
        train_source (str, default "data/arith_train.jsonl"): training data, in the grammar of
            flowtracer.data.sources: ``reasoning_gym:<task>``, ``chains``, ``hf:<id>[:<config>][@<split>]`` or a
            local .jsonl/.json/.parquet/.csv file (read by `datasets`: rows stay in its memory-mapped
            Arrow cache and are decoded when a step draws them).
        val_source (str | None, default "data/arith_val.jsonl"): validation data, same grammar;
            None = carve `val_size` rows out of the training data (seeded, disjoint from training
            rows). Set it (or null) whenever you change train_source.
        train_size (int | None, default None): rows to generate for reasoning_gym sources (None =
            1000); for files and hub datasets, a cap on the rows read (None = all).
        val_size (int, default 64): validation rows (carved, generated or capped as above);
            0 = no validation.
        seed (int, default 0): seeds generation, the train/val carve and the epoch permutations.
        prompts_per_step (int, default 8): prompts per RL step (each gets G sampled responses).
        val_batch_size (int, default 32): prompts per validation batch.
        question_field (str, default "question"): the row field holding the question.
        answer_field (str, default "answer"): the row field holding the reference answer.
        verifier (str | None, default None): verifier name for every row ("math", "countdown",
            "reasoning_gym", ...); None = per source (reasoning_gym sources: "reasoning_gym";
            files: the row's "verifier" field, else "math").
        verifier_kwargs (dict | None, default None): init args of the verifier, stored in every
            row as "verifier_kwargs", e.g. ``{extraction: [answer_tag, last_number]}`` for "math".
        rewards (list[dict] | None, default None): several weighted reward functions for training,
            each ``{fn: <verifier name> | package.module:function, weight: 1.0}`` (also ``name``,
            ``answer``, ``kwargs``; flowtracer.rewards.combine): the reward is the weighted sum,
            each function's mean is logged as ``reward/<name>``, and one function (``answer: true``,
            or inferred) supplies the answer span. None = each row's verifier. Validation grades with
            data.verifier (when unset: the answer function if it is a verifier name, else the row's).
        answer_extraction (list[str] | None, default None): extractors (flowtracer.rewards.extract)
            that locate the answer span when the reward is a function returning a bare number
            (``verifier: module:function``), in order, first match wins; None = answer_tag, boxed,
            hash, last_number. A reward that returns a Score with a span is not affected.
        task_kwargs (dict | None, default None): config fields of a reasoning-gym task, e.g.
            ``{min_digits: 1, max_digits: 1}``; passed to ``reasoning_gym.create_dataset``.
        instruction (str | None, default "Answer with just the final answer inside
            <answer></answer>."): text
            appended to every question as its own paragraph (or a template with ``{question}``);
            None = the bare question.
        system_prompt (str | None, default None): system message; None = the chat template's own
            default (SmolLM2 adds its "helpful AI assistant" line).
        use_chat_template (bool, default True): render prompts with the tokenizer's chat
            template; False for base models without one (plain text prompt).
        cache_dir (str, default "data/cache"): where generated reasoning-gym data are cached.
        eval_sets (dict[str, dict] | None, default None): named evaluation sets for validation and
            `flowtracer eval`, each ``{source, k, pass_ks, temperature, max_new_tokens, extraction,
            verifier, ...}`` (flowtracer.config.EvalSet; unset keys inherit model.val_sampling
            and the settings above). None = one set, "default", from val_source / val_size (old
            configs). With eval_sets, val_source no longer feeds validation (val_source: null
            still carves val_size rows out of training: set val_size: 0 to keep them).
        filter (dict | str | None, default None): keep only the training/validation rows it holds
            for: ``{column: value}`` (a list = any of them) or an expression such as
            ``tag == "aime2024"`` (flowtracer.data.rows.RowFilter); applied before `size`.
        map (str | None, default None): ``package.module:function`` taking a record (dict) and
            returning the fields to add or replace, run with ``Dataset.map`` (cached by `datasets`)
            before the field mapping: reshape nested or chat-formatted data without rewriting it.
    """

    def __init__(
        self,
        train_source: str = "data/arith_train.jsonl",
        val_source: str | None = "data/arith_val.jsonl",
        train_size: int | None = None,
        val_size: int = 64,
        seed: int = 0,
        prompts_per_step: int = 8,
        val_batch_size: int = 32,
        question_field: str = "question",
        answer_field: str = "answer",
        verifier: str | None = None,
        verifier_kwargs: dict[str, Any] | None = None,
        rewards: list[dict[str, Any]] | None = None,
        answer_extraction: list[str] | None = None,
        task_kwargs: dict[str, Any] | None = None,
        instruction: str | None = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        cache_dir: str = "data/cache",
        eval_sets: dict[str, dict[str, Any]] | None = None,
        filter: dict[str, Any] | str | None = None,
        map: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # recorded in checkpoints and hparams.yaml
        if prompts_per_step < 1 or val_batch_size < 1:
            raise DataError("prompts_per_step and val_batch_size must be >= 1")
        if val_size < 0 or (train_size is not None and train_size < 1):
            raise DataError("train_size must be >= 1 (or null) and val_size >= 0")
        self.train_source, self.val_source = train_source, val_source
        self.train_size, self.val_size = train_size, val_size
        self.seed, self.prompts_per_step, self.val_batch_size = seed, prompts_per_step, val_batch_size
        self.question_field, self.answer_field = question_field, answer_field
        self.reward_set = RewardSet(rewards) if rewards is not None else None  # data.rewards, built (or refused) now
        answer = self.reward_set.answer if self.reward_set is not None else None
        if verifier is None and answer is not None and answer.builtin:  # validation grades as training does
            verifier, verifier_kwargs = answer.spec, verifier_kwargs or answer.kwargs
        self.verifier, self.task_kwargs = verifier, dict(task_kwargs or {})
        self.verifier_kwargs = dict(verifier_kwargs or {})
        self.answer_extraction = list(check_extraction(answer_extraction)) if answer_extraction else None
        self.instruction, self.system_prompt = instruction, system_prompt
        self.use_chat_template, self.cache_dir = use_chat_template, cache_dir
        self.row_filter, self.row_map = filter, map
        self.train_rows: Rows | None = None
        self.val_rows: Sequence[dict] = []
        self.eval_specs = _eval_specs(eval_sets, val_source)  # name -> EvalSet (validation sets)
        self.legacy_validation = not eval_sets  # one set, "default", from val_source / the carve
        self.eval_rows: dict[str, Rows] = {}
        self._perms: dict[int, torch.Tensor] = {}
        self._fingerprint_cache: str | None = None

    # ---------------------------------------------------------------- loading
    def _load(self, source: str, size: int | None, seed: int) -> Rows:
        generated = is_generated(source)
        return load_rows(
            source, size=(size or _DEFAULT_GENERATED_SIZE) if generated else size, seed=seed,
            question_field=self.question_field, answer_field=self.answer_field,
            verifier=self.verifier, task_kwargs=self.task_kwargs if generated else None,
            cache_dir=self.cache_dir, filter=self.row_filter, map=self.row_map,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load (or generate) the rows once; later calls are no-ops."""
        if self.train_rows is not None:
            return
        if self.val_source is not None:
            train = self._load(self.train_source, self.train_size, self.seed)
            # a different seed, so a generated validation set is not the training set again
            val = (self._load(self.val_source, self.val_size, self.seed + 1)
                   if self.val_size and self.legacy_validation else None)
        else:
            train, val = self._carve()
        if not len(train):
            raise DataError(
                f"{self.train_source}: no training rows left after carving val_size={self.val_size} "
                "validation rows; lower val_size or give val_source"
            )
        self.train_rows = train.with_fields(**self._shared_fields())
        self._setup_eval_sets(val)

    def _carve(self) -> tuple[Rows, Rows | None]:
        """val_size rows of the training source (seeded), and the rest (file order) for training."""
        generated = is_generated(self.train_source)
        size = (self.train_size or _DEFAULT_GENERATED_SIZE) + self.val_size if generated else None
        rows = self._load(self.train_source, size, self.seed)
        if not self.val_size:
            train, val = rows, None
        else:
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed))
            keep = torch.ones(len(rows), dtype=torch.bool)
            keep[order[: self.val_size]] = False
            train, val = rows.select(keep.nonzero().flatten().numpy()), rows.select(order[: self.val_size].numpy())
        if self.train_size and self.train_size < len(train):
            train = train.select(range(self.train_size))
        return train, val

    def setup_eval(self) -> None:
        """Only the validation / eval sets (what `flowtracer eval` needs): the training data is
        read only when the validation set is carved out of it (val_source: null, no eval_sets)."""
        if self.train_rows is not None or self.eval_rows:
            return
        if self.legacy_validation and self.val_source is None:
            return self.setup()
        val = None
        if self.legacy_validation and self.val_size:
            val = self._load(self.val_source, self.val_size, self.seed + 1)
        self._setup_eval_sets(val)

    def _setup_eval_sets(self, legacy_val: Rows | None) -> None:
        """Rows of every eval set, tagged with set name and index; val_rows = all of them."""
        shared = self._shared_fields()
        self.eval_rows = {}
        if self.legacy_validation:
            if legacy_val is not None and len(legacy_val):
                self.eval_rows[LEGACY_SET] = legacy_val.with_fields(index_key="eval_index", eval_set=LEGACY_SET,
                                                                    **shared)
        else:
            for name, spec in self.eval_specs.items():
                rows = load_set_rows(name, spec, seed=self.seed + 1, cache_dir=self.cache_dir,
                                     default_verifier=self.verifier)
                own = rows.extra.get("verifier_kwargs")  # a set's own verifier_kwargs win
                self.eval_rows[name] = rows.with_fields(**{**shared, **({"verifier_kwargs": own} if own else {})})
        self.val_rows = RowsChain(list(self.eval_rows.values()))

    def _shared_fields(self) -> dict[str, Any]:
        """Grading settings every row carries (only those set)."""
        out: dict[str, Any] = {"verifier_kwargs": self.verifier_kwargs} if self.verifier_kwargs else {}
        if self.answer_extraction:
            out["answer_extraction"] = self.answer_extraction
        return out

    # ---------------------------------------------------------------- training position
    @property
    def num_train_rows(self) -> int:
        self.setup()
        return len(self.train_rows)

    @property
    def steps_per_epoch(self) -> int:
        """RL steps that cover every training row once (the last one wraps into the next epoch)."""
        return math.ceil(self.num_train_rows / self.prompts_per_step)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # only the current and next epoch are ever needed
                self._perms.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # a tensor (8 bytes a row), not a list of Python ints (about 36)
            self._perms[epoch] = torch.randperm(self.num_train_rows, generator=gen)
        return self._perms[epoch]

    def train_indices(self, step: int) -> list[int]:
        """Training-row indices of RL step `step` (0-based): a pure function of (seed, step)."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        n, p = self.num_train_rows, self.prompts_per_step
        out = []
        for g in range(step * p, (step + 1) * p):  # g = global position in the endless stream
            out.append(int(self._permutation(g // n)[g % n]))
        return out

    def train_batch(self, step: int) -> list[dict]:
        """The prompts of RL step `step`: row dicts (question, answer, verifier, meta) plus
        "index", the row's position in the training set (for logging)."""
        indices = self.train_indices(step)
        return [{**row, "index": i} for row, i in zip(self.train_rows.take(indices), indices)]

    def format_prompt(self, tokenizer, question: str) -> tuple[str, tuple[int, int] | None]:
        """Prompt text and question span for `question`, with this module's prompt settings
        (see flowtracer.data.format_prompt)."""
        return prompts.format_prompt(
            tokenizer, question, system_prompt=self.system_prompt,
            instruction=self.instruction, use_chat_template=self.use_chat_template,
        )

    def format_eval_prompt(self, tokenizer, row: dict) -> tuple[str, tuple[int, int] | None]:
        """Prompt of an eval row: the row's set may override the instruction ("" = none)."""
        spec = self.eval_specs.get(row.get("eval_set"))
        instruction = self.instruction if spec is None or spec.instruction is None else (spec.instruction or None)
        system = row.get("system_prompt") or self.system_prompt  # the set's own (its chat field) wins
        return prompts.format_prompt(tokenizer, row["question"], system_prompt=system,
                                     instruction=instruction, use_chat_template=self.use_chat_template)

    # ---------------------------------------------------------------- Lightning hooks
    def train_dataloader(self) -> DataLoader:
        # paces Lightning's epoch loop only; the module asks train_batch(step) for the prompts
        return DataLoader(range(self.steps_per_epoch), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        # Batches never mix sets (each has its own k and sampling); a batch is a list of rows,
        # decoded when the loader reaches it.
        self.setup()
        return DataLoader(EvalBatches(self.eval_rows, self.val_batch_size), batch_size=None, shuffle=False,
                          collate_fn=list)

    def _fingerprint(self) -> str:
        """sha1 of the JSON list of training questions, streamed (the training rows never change)."""
        if self._fingerprint_cache is None:
            h = hashlib.sha1(b"[")
            for i, q in enumerate(self.train_rows.questions()):
                h.update(((", " if i else "") + json.dumps(q)).encode())
            h.update(b"]")
            self._fingerprint_cache = h.hexdigest()
        return self._fingerprint_cache

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run checks: the same training rows in the same order, same seed and P."""
        self.setup()
        return {"seed": self.seed, "prompts_per_step": self.prompts_per_step,
                "num_train_rows": len(self.train_rows), "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        changed = [k for k in now if k in state and state[k] != now[k]]
        if changed:
            raise DataError(
                f"the data settings differ from the checkpoint's ({', '.join(changed)}), so the "
                "resumed run would not see the prompts it would have seen; resume with the same "
                "train_source, train_size, val_size, seed and prompts_per_step"
            )


def _eval_specs(eval_sets: dict[str, dict[str, Any]] | None, val_source: str | None) -> dict:

    if not eval_sets:  # an old config: one set from val_source (or the carve)
        return {LEGACY_SET: EvalSet(source=val_source or "(carved from train_source)")}
    if not isinstance(eval_sets, dict):
        raise DataError("data.eval_sets must map set names to {source: ..., k: ...}")
    return {str(name): EvalSet.from_config(str(name), dict(cfg or {})) for name, cfg in eval_sets.items()}


def load_set_rows(name: str, spec, *, seed: int, cache_dir: str, default_verifier: str | None = None) -> Rows:
    """The rows of eval set `name` (a flowtracer.config.EvalSet), tagged with ``eval_set`` (its
    name) and ``eval_index`` (its position)."""
    generated = is_generated(spec.source)
    rows = load_rows(spec.source, size=(spec.size or 64) if generated else spec.size, seed=seed,
                     question_field=spec.question_field, answer_field=spec.answer_field,
                     verifier=spec.verifier or default_verifier, task_kwargs=spec.task_kwargs if generated else None,
                     cache_dir=cache_dir, filter=spec.filter, map=spec.map, messages_field=spec.messages_field,
                     label=f"data.eval_sets.{name}")
    kwargs = spec.row_verifier_kwargs()
    return rows.with_fields(index_key="eval_index", eval_set=name, **({"verifier_kwargs": kwargs} if kwargs else {}))


class EvalBatches(Sequence):
    """Validation batches: `size` rows of one set at a time (sets never mix), drawn when asked."""

    def __init__(self, sets: dict[str, Rows], size: int):
        self.sets = sets
        self.spans = [(name, i, min(i + size, len(rows))) for name, rows in sets.items()
                      for i in range(0, len(rows), size)]

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> list[dict]:
        name, lo, hi = self.spans[i]
        return self.sets[name].take(range(lo, hi))
