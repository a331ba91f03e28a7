"""One grading rule for fit, validation and eval (flowtracer.rewards.graded): a truncated response's
last-number answer is refused everywhere, a closed answer is credited everywhere."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import write_config
from tiny import tiny_tokenizer

import flowtracer.evaluation.engine as engine
from flowtracer.config import EvalSet, SamplingConfig
from flowtracer.evaluation.engine import benchmark_metric, eval_batch
from flowtracer.evaluation.report import markdown
from flowtracer.rewards import VerifierCache
from flowtracer.tools.analysis import given_responses
from flowtracer.train.lightning_cli import main
from flowtracer.train.step.score import score_responses

# (response, truncated) for the reference "7": a cut-off derivation whose last number happens to be
# 7; the same text finished; a closed box and a closed answer tag in cut-off responses.
CASES = [("3 + 4 = 7, then 7 +", True), ("3 + 4 = 7, then 7 +", False),
         ("The sum is \\boxed{7} and", True), ("<answer>7</answer>", True)]
CREDITED = [False, True, True, True]


def fake_sample(texts, truncated):
    """A stand-in for the engine's `sample` that returns the given responses (k per prompt, in order)."""
    def sample(policy, tokenizer, prompts, spans, sampling, row_seeds=None):
        k, n = sampling.num_generations, len(prompts) * sampling.num_generations
        gen = given_responses(tokenizer, [p for p in prompts for _ in range(k)],
                              [s for s in spans for _ in range(k)], [texts[j % len(texts)] for j in range(n)])
        gen.truncated = torch.tensor([truncated[j % len(truncated)] for j in range(n)])
        return gen
    return sample


def test_eval_grades_a_truncated_fallback_answer_as_training_does(monkeypatch):
    tok = tiny_tokenizer()
    texts, cut = [t for t, _ in CASES], [c for _, c in CASES]
    # training: the step's scoring
    gen = given_responses(tok, ["q"] * 4, [None] * 4, texts)
    gen.truncated = torch.tensor(cut)
    scored = score_responses(tok, VerifierCache(), [{"question": "q", "answer": "7"}] * 4, gen)
    assert (scored.rewards >= 1.0).tolist() == CREDITED and scored.truncated_fallback == 1
    # eval (and validation, which runs the same eval_batch): the same responses, the same verdicts
    monkeypatch.setattr(engine, "sample", fake_sample(texts, cut))
    row = {"eval_set": "s", "eval_index": 0, "question": "q", "answer": "7"}
    [rec] = eval_batch(torch.nn.Linear(1, 1), tok, [row], SamplingConfig(num_generations=4), lambda r: ("q", None),
                       seed=0, verifiers=VerifierCache())
    assert rec["correct"] == CREDITED == (scored.rewards >= 1.0).tolist()
    assert rec["refused"] == [True, False, False, False] and rec["truncated"] == cut
    assert rec["keys"][0] is None and rec["keys"][1:] == ["7.0"] * 3  # a refused answer does not vote
    metric = benchmark_metric({"s": EvalSet(source="x", k=4)}, sync_on_compute=False)
    metric.update([rec])
    result = metric.compute()
    assert result["sets"]["s"]["avg@4"] == 0.75 and result["sets"]["s"]["truncated_fallback"] == 1
    assert "Refused as in training: 1 answers (s 1)" in markdown(result)


def test_validation_during_fit_refuses_a_truncated_fallback_answer(tmp_path, tiny_model_dir, monkeypatch):
    """A real fit's validation: per problem one cut-off last-number answer equal to the truth (refused)
    and one closed box (credited): avg@2 = 0.5, not the 1.0 a last-number grader would give."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"question": f"What is {i} + {7 - i}?", "answer": "7"}) + "\n"
                           for i in range(4)))
    monkeypatch.setattr(engine, "sample", fake_sample(["3 + 4 = 7, then 7 +", "The sum is \\boxed{7} and"],
                                                      [True, True]))
    main(["fit", "--config", str(write_config(tmp_path, tiny_model_dir, steps=1, val_source=str(val))),
          "--trainer.val_check_interval", "1"])
    rows = list(csv.DictReader(open(tmp_path / "logs" / "tiny" / "version_0" / "metrics.csv")))
    logged = [r for r in rows if r.get("val/default/avg@2")]
    assert len(logged) == 2  # before training and after step 1
    for r in logged:
        assert float(r["val/default/avg@2"]) == pytest.approx(0.5)
        assert float(r["val/default/truncated_fallback"]) == 4.0  # counted: one per problem
