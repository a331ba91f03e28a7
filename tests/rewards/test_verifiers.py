"""flowtracer.rewards: extractors and spans, the three verifiers, safe_score, token mapping."""

from __future__ import annotations

import json
import threading

import pytest
import reasoning_gym
import torch
from tiny import tiny_tokenizer

from flowtracer.rewards import (
    EXTRACTORS,
    CountdownVerifier,
    MathVerifier,
    ReasoningGymVerifier,
    Score,
    char_span_to_token_mask,
    get_verifier,
    locate_question_span,
    safe_score,
)
from flowtracer.rewards.countdown import evaluate


def _span_text(response: str, score: Score) -> str:
    assert score.answer_span is not None
    return response[score.answer_span[0] : score.answer_span[1]]


@pytest.mark.parametrize(
    "name, text, parsed",
    [
        ("answer_tag", "think <answer>x</answer> then <answer> 42. </answer> bye", "42"),
        ("answer_tag", "<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("boxed", r"a \boxed{1} b \boxed{\frac{1}{2}} c", r"\frac{1}{2}"),
        ("boxed", r"\fbox{ {a}{b} }", "{a}{b}"),
        ("hash", "steps\n#### 1,000.\nextra", "1,000"),
        ("last_number", "x = 3, y = -2.5 and 7/8 done", "7/8"),
        ("last_number", "total 1,234 apples", "1,234"),
        ("last_line", "work\n  final line  \n\n", "final line"),
    ],
)
def test_extractors_return_exact_spans(name, text, parsed):
    found = EXTRACTORS[name](text)
    assert found is not None
    got, (start, end) = found
    assert got == parsed and text[start:end] == parsed


@pytest.mark.parametrize(
    "name, text",
    [
        ("answer_tag", "<answer>unclosed"),
        ("answer_tag", "<answer>  </answer>"),
        ("boxed", r"\boxed{1} then \boxed{trunc"),
        ("hash", "no marker"),
        ("last_number", "no digits here"),
        ("last_line", "\n \n"),
    ],
)
def test_extractors_no_match(name, text):
    assert EXTRACTORS[name](text) is None


@pytest.fixture(scope="module")
def math_verifier():
    return MathVerifier()


@pytest.mark.parametrize(
    "response, gold, reward, parsed",
    [
        (r"so \boxed{\frac{1}{2}}.", "0.5", 1.0, r"\frac{1}{2}"),
        (r"so \boxed{\frac12}", r"\frac{1}{2}", 1.0, r"\frac12"),
        ("<answer>1/2</answer>", r"\frac{1}{2}", 1.0, "1/2"),
        ("<answer>0.5</answer>", "1/2", 1.0, "0.5"),
        (r"<answer>The result is \boxed{2\sqrt{2}}</answer>", r"\sqrt{8}", 1.0, r"2\sqrt{2}"),
        ("so\n#### 72", "72", 1.0, "72"),
        ("the answer is 1,000", "1000", 1.0, "1,000"),
        (r"\boxed{x = 3}", "3", 1.0, "x = 3"),
        (r"\boxed{0.6}", "0.5", 0.0, "0.6"),
        ("#### 71", "72", 0.0, "71"),
    ],
)
def test_math_verifier(math_verifier, response, gold, reward, parsed):
    score = math_verifier(response, gold)
    assert score.reward == reward and score.parsed == parsed
    assert _span_text(response, score) == parsed


def test_math_verifier_order_unparsable_and_dict(math_verifier):
    # The first extractor in the list wins, not the last answer in the text.
    assert math_verifier(r"<answer>3</answer> \boxed{4}", "3").reward == 1.0
    assert MathVerifier(extraction=["boxed"])(r"<answer>3</answer> \boxed{4}", "3").reward == 0.0
    assert math_verifier("I don't know", "3") == Score(0.0, None, None)
    assert math_verifier(r"\boxed{\text{yes}}", {"answer": "yes"}).reward == 1.0
    with pytest.raises(ValueError, match="valid"):
        MathVerifier(extraction=["boxxed"])


def test_math_verifier_in_worker_thread(math_verifier):
    # math-verify's signal.alarm timeout only works in the main thread; the verifier must not fail.
    out = []
    t = threading.Thread(target=lambda: out.append(safe_score(math_verifier, r"\boxed{\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [(Score(1.0, (7, 18), r"\frac{1}{2}"), None)]


def test_countdown():
    v = CountdownVerifier()
    ref = {"target": 24, "numbers": [4, 6, 3, 2]}
    reused = "<think>try</think>\n<answer> (6 - 2) * (4 + 3) - 4 </answer>"
    assert v(reused, ref).reward == 0.0  # equals 24, but uses 4 twice
    good = "<answer>6 * 4 * (3 - 2)</answer>"
    score = v(good, json.dumps(ref))
    assert score.reward == 1.0 and _span_text(good, score) == "6 * 4 * (3 - 2)"
    line = "reasoning...\n  6 / (3 / 12) \n"
    s2 = v(line, {"target": 24, "nums": [6, 3, 12]})
    assert s2.reward == 1.0 and _span_text(line, s2) == "6 / (3 / 12)"  # exact fractional division
    assert v("<answer>6 * 4</answer>", ref).reward == 0.0  # not all numbers used
    assert CountdownVerifier(use_all=False)("<answer>6 * 4</answer>", ref).reward == 1.0
    assert CountdownVerifier(use_all=False)("<answer>6 * 4 * 1</answer>", ref).reward == 0.0  # 1 not given
    assert v("<answer>6 * 4 * 3 - 2</answer>", ref).reward == 0.0  # wrong value
    assert v("no answer", ref) == Score(0.0, None, None)
    graded = CountdownVerifier(format_score=0.1)
    assert graded("<answer>6 * 4 * 3 - 2</answer>", ref).reward == 0.1
    assert graded("<answer>(6 * 4) / (3 - 3)</answer>", ref).reward == 0.1  # division by zero


@pytest.mark.parametrize(
    "expr",
    [
        '__import__("os").system("true")', "2 ** 10", "abs(-3)", "1.5 * 2", "x + 1", "[1][0]",
        "(" * 300 + "1" + ")" * 300,
    ],
)
def test_countdown_rejects_unsafe_expressions(expr):
    with pytest.raises(ValueError):
        evaluate(expr)
    score = CountdownVerifier()(f"<answer>{expr}</answer>", {"target": 1, "numbers": [1]})
    assert score.reward == 0.0 and score.parsed == expr


def test_countdown_evaluate_exact():
    value, used = evaluate("(1 + 2) / 3 * 3 - -1")
    assert value == 4 and used == [1, 2, 3, 3, 1]


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum"])
def test_reasoning_gym(task):
    entries = list(reasoning_gym.create_dataset(task, seed=7, size=3))
    v = ReasoningGymVerifier()
    pinned = ReasoningGymVerifier(task=task)
    for entry in entries:
        response = f"Let me compute.\n<answer> {entry['answer']} </answer>"
        score = v(response, entry)
        assert score.reward == 1.0 and _span_text(response, score) == entry["answer"]
        assert pinned(response, json.dumps(entry)).reward == 1.0
        last_line = f"thinking\n{entry['answer']}\n"
        assert v(last_line, entry).reward == 1.0
        wrong = str(int(entry["answer"]) + 1)
        assert v(f"<answer>{wrong}</answer>", entry).reward == 0.0
    assert v("", entries[0]) == Score(0.0, None, None)
    with pytest.raises(ValueError, match="basic_arithmetic"):
        ReasoningGymVerifier(task="basic_arithmetc")


def test_registry():
    assert isinstance(get_verifier("math"), MathVerifier)
    assert get_verifier("countdown", format_score=0.1).format_score == 0.1
    assert isinstance(get_verifier("reasoning_gym", task="chain_sum"), ReasoningGymVerifier)
    with pytest.raises(ValueError, match="math, countdown, reasoning_gym"):
        get_verifier("maths")


def test_safe_score_error_paths():
    def boom(response, reference):
        raise RuntimeError("verifier bug")

    assert safe_score(boom, "r", "a") == (Score(0.0), "RuntimeError: verifier bug")
    score, err = safe_score(lambda r, a: "1.0", "r", "a")
    assert score == Score(0.0) and "not a number" in err
    score, err = safe_score(lambda r, a: Score(float("nan"), (0, 1), "r"), "r", "a")
    assert score == Score(0.0) and "not finite" in err
    assert safe_score(lambda r, a: 1, "r", "a") == (Score(1.0), None)
    assert safe_score(lambda r, a: torch.tensor(0.5), "r", "a") == (Score(0.5), None)
    assert safe_score(lambda r, a: Score(1.0, (0, 1), "r"), "r", "a") == (Score(1.0, (0, 1), "r"), None)
    # A malformed reference inside a real verifier is an error, not a crash.
    score, err = safe_score(CountdownVerifier(), "<answer>1</answer>", {"numbers": [1]})
    assert score == Score(0.0) and "target" in err


def test_char_span_to_token_mask_hand_offsets():
    # "12 + 34": tokens "12", " +", " 34", a (0, 0) special, and a trailing special with real offsets
    offsets = [(0, 2), (2, 4), (4, 7), (0, 0), (7, 7)]
    assert char_span_to_token_mask(offsets, (5, 7), 6).tolist() == [False, False, True, False, False, False]
    assert char_span_to_token_mask(offsets, (1, 5), 5).tolist() == [True, True, True, False, False]
    assert char_span_to_token_mask(offsets, (0, 1), 3).tolist() == [True, False, False]  # (0,0) never marked
    assert char_span_to_token_mask(offsets, (2, 4), 2).tolist() == [False, True]  # truncated to length
    assert not char_span_to_token_mask(offsets, None, 5).any()
    assert not char_span_to_token_mask(offsets, (3, 3), 5).any()
    assert not char_span_to_token_mask([], (0, 3), 4).any()
    as_tensor = char_span_to_token_mask(torch.tensor(offsets), (5, 7), 5)
    assert as_tensor.tolist() == [False, False, True, False, False]


def test_answer_span_to_tokens_with_tiny_tokenizer(math_verifier):
    tok = tiny_tokenizer()
    response = r"so \boxed{12}" + tok.eos_token
    score = math_verifier(response, "12")
    enc = tok(response, return_offsets_mapping=True, add_special_tokens=False)
    mask = char_span_to_token_mask(enc["offset_mapping"], score.answer_span, len(enc["input_ids"]) + 2)
    marked = [tid for tid, m in zip(enc["input_ids"], mask.tolist()) if m]
    assert tok.decode(marked) == "12"
    assert mask.sum().item() == 2


def test_locate_question_span():
    tok = tiny_tokenizer()
    question = "What is 2 + 3?"
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Solve: What is 2 + 3?"}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True,
    )
    span = locate_question_span(prompt, "  " + question + "\n")
    assert span is not None and prompt[span[0] : span[1]] == question
    assert span[0] > prompt.index("user")  # the last occurrence, not the system copy
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    mask = char_span_to_token_mask(enc["offset_mapping"], span, len(enc["input_ids"]))
    assert tok.decode([t for t, m in zip(enc["input_ids"], mask.tolist()) if m]) == question
    assert locate_question_span(prompt, "absent") is None
    assert locate_question_span(prompt, "   ") is None


def test_scaffold_span_of_each_extractor():
    from flowtracer.rewards.extract import EXTRACTORS, scaffold_span

    cases = [  # (text, extractor that produces the answer, the scaffold text or None)
        ("x = 4\n<answer> 4</answer>", "answer_tag", "<answer> "),
        ("so \\boxed{ 4 }", "boxed", "\\boxed{ "),
        ("so \\fbox{4}", "boxed", "\\fbox{"),
        ("x = 4\n####  4", "hash", "####  "),
        ("3 + 1 = 4. The answer is: 4", "last_number", "The answer is: "),
        ("3 + 1 = 4. The final answer is $4", "last_number", "The final answer is $"),
        ("3 + 1 = 4", "last_number", None),
        ("<answer>4</answer> and then 5", "last_number", None),  # the tag is not what produced 5
    ]
    for text, name, want in cases:
        _, span = EXTRACTORS[name](text)
        got = scaffold_span(text, span)
        assert (None if got is None else text[got[0]:got[1]]) == want, text
