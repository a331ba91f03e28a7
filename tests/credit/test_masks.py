"""flowtracer.credit.masks: from token ids and text alone, the same question and answer masks as the
suite's prompt formatting (format_prompt + generation.question_mask) and scoring (score_responses)."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny import tiny_tokenizer
from transformers import AutoTokenizer

from flowtracer.batch import Generated
from flowtracer.credit.masks import answer_finder, answer_mask, question_mask
from flowtracer.data.datamodule import DEFAULT_INSTRUCTION
from flowtracer.data.prompts import format_prompt
from flowtracer.generation import question_mask as suite_question_mask
from flowtracer.model.policy import bundled_model_dir
from flowtracer.rewards import VerifierCache
from flowtracer.train.step.score import score_responses

QUESTIONS = ["What is 2+3?", "Compute 7*6 then add 1.", "x = 4; what is x + x?"]
RESPONSES = [
    "2+3=5\n<answer>5</answer>",  # answer tag
    "So it is <answer>\\boxed{43}</answer>",  # a box inside the tag narrows the span
    "x + x = 8.",  # last number, finished (EOS)
    "7*6 = 42 and then 4",  # last number of a truncated response: refused
    "I do not know",  # no answer
    "\\boxed{8} is it",  # boxed
]
TRUNCATED = [False, False, False, True, False, False]


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    if name == "tiny":
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(bundled_model_dir("smollm2-135m-instruct"))


def padded(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    W = max(map(len, rows))
    ids, mask = torch.full((len(rows), W), pad), torch.zeros(len(rows), W, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(W - len(r), W) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


@pytest.mark.parametrize("name", ["tiny", "bundled"])
def test_question_mask_equals_the_suites(name):
    tok = tokenizer(name)
    texts, spans = zip(*(format_prompt(tok, q, instruction=DEFAULT_INSTRUCTION) for q in QUESTIONS))
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = padded(enc["input_ids"], tok.pad_token_id, left=True)
    offsets = torch.zeros(*ids.shape, 2, dtype=torch.long)
    for b, o in enumerate(enc["offset_mapping"]):
        offsets[b, ids.shape[1] - len(o):] = torch.tensor(o)
    expected = suite_question_mask(offsets, mask, list(spans))
    got = question_mask(tok, ids, mask, QUESTIONS)
    assert torch.equal(got, expected) and bool((got.sum(-1) < mask.sum(-1)).all())
    # not found (or no question given): every prompt token is a source, as in the suite
    assert torch.equal(question_mask(tok, ids, mask, ["not in the prompt", None, "?"])[:2], mask[:2].bool())


@pytest.mark.parametrize("name", ["tiny", "bundled"])
def test_answer_mask_equals_the_suites(name):
    tok = tokenizer(name)
    rows = [tok(s, add_special_tokens=False)["input_ids"] + ([] if cut else [tok.eos_token_id])
            for s, cut in zip(RESPONSES, TRUNCATED)]
    c_ids, c_mask = padded(rows, tok.pad_token_id, left=False)
    got = answer_mask(tok, c_ids, c_mask, [tok.eos_token_id])

    # The suite: the math verifier's span, mapped onto tokens by score_responses.
    B, C = c_ids.shape
    gen = Generated(input_ids=c_ids, attention_mask=c_mask, prompt_mask=torch.zeros(B, C, dtype=torch.bool),
                    response_mask=c_mask.bool(), question_mask=torch.zeros(B, C, dtype=torch.bool),
                    responses=tok.batch_decode(c_ids, skip_special_tokens=True), truncated=torch.tensor(TRUNCATED),
                    prompt_len=0)
    scored = score_responses(tok, VerifierCache(), [{"answer": "8"}] * B, gen)
    assert torch.equal(got, scored.answer_mask)
    assert got.any(-1).tolist() == [True, True, True, False, False, True]
    text = tok.decode(c_ids[1][got[1]])
    assert text.strip() == "43"


def test_answer_mask_takes_extractor_names_or_a_function():
    tok = tiny_tokenizer()
    rows = [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in ("a <answer>7</answer>", "b 9")]
    c_ids, c_mask = padded(rows, tok.pad_token_id, left=False)
    only_tags = answer_mask(tok, c_ids, c_mask, [tok.eos_token_id], extraction=["answer_tag"])
    assert only_tags.any(-1).tolist() == [True, False]
    first_char = answer_mask(tok, c_ids, c_mask, [tok.eos_token_id], extraction=lambda text, cut: (0, 1))
    assert first_char.sum(-1).tolist() == [1, 1] and first_char[:, 0].all()
    with pytest.raises(ValueError, match="unknown extractor"):
        answer_finder(["boxd"])
