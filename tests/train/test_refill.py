"""DAPO knobs: group filtering, refill rounds, overlong penalty and mask (flowtracer.rl.dapo)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import write_config
from tiny import tiny_model, tiny_tokenizer

from flowtracer.batch import RolloutBatch
from flowtracer.cli import main
from flowtracer.config import DapoConfig, LossConfig, SamplingConfig
from flowtracer.generation import generate
from flowtracer.rl import group_advantages
from flowtracer.rl.dapo import apply_overlong, informative_groups, overlong_penalty, select_groups
from flowtracer.train.refill import RolloutSource, sample_rollouts


def test_informative_groups_and_selection():
    rewards = torch.tensor([1., 1., 0., 1., 0., 0., .5, .5])
    ids, info = informative_groups(rewards, torch.tensor([3, 3, 1, 1, 7, 7, 2, 2]))
    assert ids.tolist() == [3, 1, 7, 2] and info.tolist() == [False, True, False, False]
    assert select_groups(torch.tensor([False, True, False, True, True]), 2).tolist() == [1, 3]
    assert select_groups(torch.tensor([False, True, False]), 2).tolist() == [1, 0]  # topped up


def test_overlong_penalty_values():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    # max 20, buffer 8: free up to 12, then linear to -1 at 20
    assert overlong_penalty(lengths, 20, 8).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0])
    assert overlong_penalty(lengths, 20, 0, 0.5).tolist() == [0, 0, 0, 0, -0.5]
    rewards, trunc = torch.ones(5), torch.tensor([False, False, False, False, True])
    shaped, keep = apply_overlong(rewards, lengths, trunc, DapoConfig(overlong="penalty", overlong_buffer=8), 20)
    assert shaped.tolist() == pytest.approx([1, 1, 0.75, 0.5, 0]) and keep.all()
    shaped, keep = apply_overlong(rewards, lengths, trunc, DapoConfig(overlong="mask"), 20)
    assert torch.equal(shaped, rewards) and keep.tolist() == [True] * 4 + [False]


# question -> reward of its G responses: "flat" questions give every response the same reward
TABLE = {"q0 flat?": [1, 1, 1], "q1 mixed?": [1, 0, 0], "q2 flat?": [0, 0, 0], "q3 mixed?": [0, 1, 1],
         "q4 flat?": [1, 1, 1], "q5 flat?": [0, 0, 0]}
STEP0, REFILLS = ["q0 flat?", "q1 mixed?"], [["q2 flat?", "q3 mixed?"], ["q4 flat?", "q5 flat?"]]


class StubModule:
    """What sample_rollouts needs of the GRPO module (its RolloutSource): generation on a tiny model,
    table rewards."""

    def __init__(self, dapo: DapoConfig, max_new_tokens: int = 8):
        self.model, self.tokenizer = tiny_model("llama"), tiny_tokenizer()
        self.dapo, self.loss_cfg = dapo, LossConfig()
        self.sampling = SamplingConfig(num_generations=3, max_new_tokens=max_new_tokens, temperature=1.0)
        batches = {}

        def train_batch(key):
            batches.setdefault(key, len(batches))  # round k of the refill asks for a new data position
            rows = STEP0 if key == 0 else REFILLS[batches[key] - 1]
            return [{"question": q, "answer": "x"} for q in rows]

        self.train_batch = train_batch
        self.generated: dict[str, list[str]] = {}

    def source(self) -> RolloutSource:
        return RolloutSource(generate=self.generate, score=self.score,
                             refill_rows=lambda key: (self.train_batch(key), [0, 1]), any_process=lambda flag: flag,
                             dapo=self.dapo, max_new_tokens=self.sampling.max_new_tokens, advantage="grpo",
                             pad_id=self.tokenizer.pad_token_id)

    def generate(self, rows, positions, key):
        return generate(self.model, self.tokenizer, [r["question"] for r in rows], [None] * len(rows), self.sampling)

    def score(self, rows, gen):
        g = self.sampling.num_generations
        rewards = torch.tensor([float(r) for row in rows for r in TABLE[row["question"]]])
        for i, row in enumerate(rows):
            self.generated[row["question"]] = gen.responses[i * g:(i + 1) * g]
        group_ids = torch.arange(len(rows)).repeat_interleave(g)
        adv, _ = group_advantages(rewards, group_ids)
        return RolloutBatch(gen.input_ids, gen.attention_mask, gen.prompt_mask, gen.response_mask, gen.question_mask,
                            torch.zeros_like(gen.response_mask), rewards, adv, group_ids,
                            prompts=[r["question"] for r in rows for _ in range(g)], responses=gen.responses,
                            answers=["x"] * len(gen.responses))


class _Timer:
    def __call__(self, name):
        import contextlib

        return contextlib.nullcontext()


def _run(dapo: DapoConfig, **kw):
    module = StubModule(dapo, **kw)
    rows = module.train_batch(0)
    gen, batch = sample_rollouts(module.source(), rows, [0, 1], 0, _Timer())
    return module, gen, batch


def test_zero_variance_groups_are_dropped_and_refilled():
    module, gen, batch = _run(DapoConfig(dynamic_sampling=True, max_extra_rounds=2))
    # step 0: q0 flat (dropped), q1 kept; round 1: q2 flat (dropped), q3 refills -> target 2 reached
    assert batch.metrics["dapo/groups_dropped"] == 2 and batch.metrics["dapo/groups_refilled"] == 1
    assert batch.metrics["dapo/extra_rounds"] == 1
    assert [batch.prompts[i] for i in (0, 3)] == ["q1 mixed?", "q3 mixed?"]
    assert batch.rewards.tolist() == [1, 0, 0, 0, 1, 1] and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.responses == module.generated["q1 mixed?"] + module.generated["q3 mixed?"]
    assert gen.responses == batch.responses and gen.input_ids.shape == batch.input_ids.shape
    # the merged layout: prompt right-aligned at prompt_len, each response decodes to its text
    for i, text in enumerate(batch.responses):
        ids = batch.input_ids[i, gen.prompt_len:][batch.response_mask[i, gen.prompt_len:]]
        assert module.tokenizer.decode(ids, skip_special_tokens=True) == text
        assert module.tokenizer.decode(batch.input_ids[i][batch.prompt_mask[i]]) == batch.prompts[i]
    assert (batch.advantages.view(2, 3).std(1) > 0).all()


def test_refill_stops_at_the_cap_and_tops_up():
    _, _, batch = _run(DapoConfig(dynamic_sampling=True, max_extra_rounds=0))
    assert batch.metrics["dapo/extra_rounds"] == 0 and batch.metrics["dapo/groups_dropped"] == 1
    assert batch.metrics["dapo/groups_refilled"] == 0
    assert [batch.prompts[i] for i in (0, 3)] == ["q1 mixed?", "q0 flat?"]  # topped up with a dropped group
    assert batch.advantages[3:].abs().sum() == 0


def test_overlong_mask_zeroes_truncated_advantages():
    _, gen, batch = _run(DapoConfig(overlong="mask"), max_new_tokens=3)  # 3 tokens: nearly all truncated
    assert gen.truncated.any()
    assert (batch.advantages[gen.truncated] == 0).all()
    assert batch.metrics["dapo/overlong_masked"] == float(gen.truncated.sum())


def test_fit_with_dapo_knobs_logs_the_counts(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=1, verifier="faulty_rewards:varied")
    main(["fit", "--config", str(cfg), "--model.val_before_training", "false",
          "--model.dapo.dynamic_sampling", "true", "--model.dapo.max_extra_rounds", "1",
          "--model.dapo.overlong", "penalty", "--model.dapo.overlong_buffer", "4",
          "--model.sampling.generation_batch_size", "4"])
    with open(tmp_path / "logs" / "tiny" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    step = next(r for r in rows if r.get("dapo/extra_rounds"))
    dropped, rounds = float(step["dapo/groups_dropped"]), float(step["dapo/extra_rounds"])
    assert rounds == (1.0 if dropped > 0 else 0.0)  # a flat group in round 0 triggers one extra round
    assert float(step["dapo/overlong_penalty_mean"]) <= 0
