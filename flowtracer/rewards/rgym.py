"""reasoning-gym tasks scored by the package's own per-task scorer."""

from __future__ import annotations

import json
from typing import Any, Callable

from flowtracer.errors import InputError
from flowtracer.rewards.base import Score
from flowtracer.rewards.extract import FALLBACK_EXTRACTORS, check_extraction, extract_answer


def _registered() -> dict:
    from reasoning_gym.factory import DATASETS  # heavy: imported on first use

    return DATASETS


class ReasoningGymVerifier:
    """Reward from reasoning-gym's ``score_answer(answer, entry)`` for the entry's task.

    reference: the reasoning-gym entry, ``{"question", "answer", "metadata"}`` (a dict or its JSON
    string), as produced by ``reasoning_gym.create_dataset(name, seed=..., size=...)[i]``.
    task: the dataset name whose scorer to use; None = ``entry["metadata"]["source_dataset"]``.
    extraction: the answer is the content of the last ``<answer>...</answer>`` if present, else
        the last non-empty line of the response. The reward is whatever the task's scorer returns
        (most give 1.0/0.0; some give partial credit, e.g. the default scorer gives
        len(gold)/len(answer) when the answer contains the gold string).

    Scorers come from ``reasoning_gym.get_score_answer_fn(name)`` and are cached per task.
    """

    def __init__(
        self,
        task: str | None = None,
        extraction: tuple[str, ...] | list[str] = ("answer_tag", "last_line"),
    ):
        if task is not None and task not in _registered():
            valid = ", ".join(sorted(_registered()))
            raise InputError(f"unknown reasoning-gym task {task!r}; valid: {valid}")
        self.task = task
        self.extraction = check_extraction(extraction)
        self._scorers: dict[str, Callable[[str | None, dict], float]] = {}

    def _scorer(self, name: str) -> Callable[[str | None, dict], float]:
        if name not in self._scorers:
            from reasoning_gym import get_score_answer_fn  # heavy: imported on first use

            self._scorers[name] = get_score_answer_fn(name)
        return self._scorers[name]

    def check_reference(self, reference: Any) -> str | None:
        """Why `reference` is not a reasoning-gym entry this verifier can score, else None."""
        try:
            entry = json.loads(reference) if isinstance(reference, str) else reference
        except ValueError:
            return "not a JSON reasoning-gym entry"
        if not isinstance(entry, dict) or "answer" not in entry:
            return 'a reasoning-gym entry needs {"question", "answer", "metadata"}'
        if self.task is None and not entry.get("metadata", {}).get("source_dataset"):
            return "no metadata.source_dataset; pass task=... in data.verifier_kwargs"
        return None

    def __call__(self, response: str, reference: Any) -> Score:
        entry = json.loads(reference) if isinstance(reference, str) else reference
        name = self.task or entry.get("metadata", {}).get("source_dataset")
        if name is None:
            raise InputError(
                "reasoning-gym entry has no metadata.source_dataset; pass task=... to the verifier"
            )
        how, found = extract_answer(response, self.extraction)
        if found is None:
            return Score(0.0, None, None)
        parsed, span = found
        return Score(float(self._scorer(name)(parsed, entry)), span, parsed, fallback=how in FALLBACK_EXTRACTORS)
