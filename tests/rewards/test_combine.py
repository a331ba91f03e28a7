"""data.rewards (flowtracer.rewards.combine): the weighted total, each function's logged mean, the
answer-span rule, and one line naming the function and the row for every bad input."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_tokenizer

from flowtracer.errors import InputError
from flowtracer.rewards import VerifierCache
from flowtracer.rewards.combine import RewardError, RewardSet
from flowtracer.tools.analysis import given_responses
from flowtracer.train.step.score import rollout_batch, score_responses

TEXTS = ["so <answer>7</answer>", "I think 12", "<answer>5</answer> done", "maybe <answer>7"]
ROWS = [{"question": "3 + 4", "answer": "7", "verifier": "math", "meta": {}, "index": 10}] * 2 + \
       [{"question": "2 + 3", "answer": "5", "verifier": "math", "meta": {}, "index": 11}] * 2


def _score(entries, texts=TEXTS, rows=ROWS, truncated=None):
    tok = tiny_tokenizer()
    gen = given_responses(tok, [r["question"] for r in rows], [None] * len(rows), texts)
    gen.truncated = torch.tensor(truncated or [False] * len(rows))
    return tok, gen, score_responses(tok, VerifierCache(), rows, gen, rewards=RewardSet(entries))


def test_the_reward_is_the_weighted_sum_and_each_function_is_logged():
    tok, gen, scored = _score([{"fn": "math", "weight": 1.0}, {"fn": "multi_rewards:has_tag", "weight": 0.5},
                               {"fn": "multi_rewards:digit_count", "weight": -2.0, "name": "digits"}])
    acc = [1.0, 0.0, 1.0, 0.0]  # the math verifier: row answers 7, 7, 5, 5
    tag = [1.0, 0.0, 1.0, 0.0]
    digits = [(sum(c.isdigit() for c in t) % 3) / 2 for t in TEXTS]
    assert scored.per_fn == {"math": acc, "has_tag": tag, "digits": digits}
    assert scored.rewards.tolist() == pytest.approx([a + 0.5 * f - 2 * d for a, f, d in zip(acc, tag, digits)])
    rb = rollout_batch(gen, scored, prompts=gen.prompts, answers=[r["answer"] for r in ROWS], group_size=2)
    assert rb.metrics["reward/math"] == 0.5 and rb.metrics["reward/has_tag"] == 0.5
    assert rb.metrics["reward/digits"] == pytest.approx(sum(digits) / 4)
    # the sink is the math verifier's parsed answer (inferred: the only built-in verifier)
    assert tok.decode(gen.input_ids[0][scored.answer_mask[0]]) == "7"


def test_functions_see_the_row_fields_a_class_takes_kwargs_and_a_bare_number_gets_a_located_span():
    tok, gen, scored = _score([{"fn": "multi_rewards:uses_meta", "answer": True},
                               {"fn": "multi_rewards:Scaled", "kwargs": {"scale": 2.0}, "weight": 0.0}])
    assert scored.per_fn["uses_meta"] == [1.0, 0.0, 1.0, 0.0]
    assert scored.per_fn["Scaled"] == [2.0 * len(t) for t in TEXTS] and scored.rewards.tolist() == [1.0, 0, 1.0, 0]
    # uses_meta returns bare numbers: the span comes from the row's extractors (answer tag first)
    assert [tok.decode(gen.input_ids[i][scored.answer_mask[i]]) for i in range(4)] == ["7", "12", "5", "7"]


def test_a_truncated_fallback_answer_loses_its_span_and_keeps_the_rule_of_the_single_verifier():
    _, _, scored = _score([{"fn": "math"}, {"fn": "multi_rewards:has_tag", "weight": 0.5}],
                          truncated=[False, True, False, False])
    # row 1 ("I think 12", cut off): its last-number answer is refused, as with data.verifier alone
    assert scored.truncated_fallback == 1 and not scored.answer_mask[1].any()
    assert scored.per_fn["math"][1] == 0.0 and scored.rewards[1] == 0.0


def test_the_answer_span_supplier_is_named_or_inferred_or_refused_in_one_line():
    assert RewardSet([{"fn": "multi_rewards:has_tag"}]).answer.name == "has_tag"  # the only entry
    assert RewardSet([{"fn": "math"}, {"fn": "multi_rewards:has_tag"}]).answer.name == "math"  # the only verifier
    marked = RewardSet([{"fn": "math"}, {"fn": "multi_rewards:last_char", "answer": True}])
    assert marked.answer.name == "last_char"
    excluded = RewardSet([{"fn": "math", "answer": False}, {"fn": "countdown"}])
    assert excluded.answer.name == "countdown"
    for entries, match in [
        ([{"fn": "multi_rewards:has_tag"}, {"fn": "multi_rewards:last_char"}], "mark exactly one with `answer: true`"),
        ([{"fn": "math"}, {"fn": "countdown"}], "among math, countdown"),
        ([{"fn": "math", "answer": True}, {"fn": "countdown", "answer": True}], "exactly one supplies"),
    ]:
        with pytest.raises(InputError, match=match) as err:
            RewardSet(entries)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("entries, match", [
    ([], "non-empty list"),
    ([{"weight": 1.0}], r"data.rewards\[0\] must be a mapping with `fn`"),
    ([{"fn": "math", "wieght": 1}], r"unknown key\(s\) \['wieght'\]"),
    ([{"fn": "math", "weight": "high"}], r"data.rewards\[0\].weight = 'high'"),
    ([{"fn": "maths"}], r"data.rewards\[0\].fn = 'maths': not a verifier"),
    ([{"fn": "multi_rewards:nope"}], "could not be imported"),
    ([{"fn": "math"}, {"fn": "math", "answer": False}], "two functions are named 'math'"),
    ([{"fn": "multi_rewards:has_tag", "name": "mean"}], "clashes with reward/mean"),
    ([{"fn": "multi_rewards:needs_solution"}], r"requires \['solution'\]"),
])
def test_a_bad_rewards_list_is_refused_in_one_line(entries, match):
    with pytest.raises(InputError, match=match) as err:
        RewardSet(entries)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fn, match", [
    ("multi_rewards:raises_on_seven", r"raised ZeroDivisionError: reward bug on response 0 of training row 10"),
    ("multi_rewards:nan_on_second", r"reward is not finite: nan for response 1 of training row 10"),
    ("multi_rewards:one_short", r"returned 3 rewards for the 4 responses of training rows \[10, 11\]"),
    ("multi_rewards:not_a_number", r"reward is not a number: 'yes' \(str\) for response 0 of training row 10"),
])
def test_every_bad_output_gives_one_line_naming_the_function_and_the_row(fn, match):
    name = fn.split(":")[1]
    with pytest.raises(RewardError, match=match) as err:
        _score([{"fn": "math"}, {"fn": fn, "weight": 0.5}])
    text = str(err.value)
    assert text.startswith(f"data.rewards[1] ({name}, {fn})") and "\n" not in text


def test_a_raising_builtin_verifier_names_its_row():
    rows = [{**r, "answer": {"target": 1}} for r in ROWS]  # no "numbers": the countdown verifier raises
    with pytest.raises(RewardError, match=r"data.rewards\[0\] \(countdown, countdown\) raised ValueError: .* "
                                          r"on response 0 of training row 10") as err:
        _score([{"fn": "countdown"}], rows=rows)
    assert "\n" not in str(err.value)
