"""flowtracer.credit.weights: token weights from plain tensors equal the suite's on the same batch, and
need no Lightning."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from tiny import tiny_model, tiny_tokenizer

from flowtracer.batch import RolloutBatch
from flowtracer.credit import AttentionCredit, EntropyCredit, FlowCredit, RandomCredit, UniformCredit
from flowtracer.credit.weights import compute_credit, credit_batch, token_weights
from flowtracer.train.step import micro

PROMPTS = ["What is 2+3?", "Compute 7*6.", "What is 2+3?", "Compute 7*6.", "Name 9-4.", "Name 9-4."]
RESPONSES = ["2+3=5.\nAnswer: 5", "7*6 is 42, so 42", "I think it is", "6*7=42\nso 42", "9-4 = 5", "five"]


def batch(tok) -> RolloutBatch:
    """Prompts left-padded, responses right-padded; the question = the prompt minus its first 2 tokens;
    the answer = the last number of the response (row 2 and 5 have none)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    P = max(len(enc(p)) for p in PROMPTS)
    R = max(len(enc(r)) + 1 for r in RESPONSES)
    B = len(PROMPTS)
    ids = torch.full((B, P + R), tok.pad_token_id)
    m = {k: torch.zeros(B, P + R, dtype=torch.bool) for k in ("prompt", "resp", "question", "answer")}
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        pi, ri = enc(p), enc(r) + [tok.eos_token_id]
        ids[b, P - len(pi):P], ids[b, P:P + len(ri)] = torch.tensor(pi), torch.tensor(ri)
        m["prompt"][b, P - len(pi):P] = True
        m["question"][b, P - len(pi) + 2:P] = True
        m["resp"][b, P:P + len(ri)] = True
        digits = [i for i, c in enumerate(r) if c.isdigit()]
        if digits and b not in (2, 5):
            m["answer"][b, P + digits[-1]] = True
    return RolloutBatch(input_ids=ids, attention_mask=(m["prompt"] | m["resp"]).long(), prompt_mask=m["prompt"],
                        response_mask=m["resp"], question_mask=m["question"], answer_mask=m["answer"],
                        rewards=torch.zeros(B), advantages=torch.zeros(B), group_ids=torch.arange(B))


def suite_weights(arm, model, rb: RolloutBatch, tok, *, micro_batch_size: int, temperature: float, step: int):
    """The GRPO module's path: its micro-batched pre-pass, per-row arms on each micro-batch's view, a
    batch-global arm once on the whole batch (flowtracer.train.step.placement PRE_PASS)."""
    module = SimpleNamespace(tokenizer=tok, rl_step=step)
    rb = RolloutBatch(**{k: getattr(rb, k) for k in ("input_ids", "attention_mask", "prompt_mask", "response_mask",
                                                     "question_mask", "answer_mask", "rewards", "advantages",
                                                     "group_ids")})
    per_row = not arm.batch_global
    pre = micro.pre_pass(model, rb, micro_batch_size=micro_batch_size, temperature=temperature,
                         capture_layers=arm.capture_layers if arm.needs_attention else None,
                         run_callbacks=(lambda v: arm.on_rollout_batch(None, module, v)) if per_row else None,
                         with_reference=False, logits_bytes=None)
    if per_row:
        return pre.token_weights, pre.metrics
    rb.entropies = pre.entropies
    arm.on_rollout_batch(None, module, rb)
    return rb.token_weights, rb.metrics


ARMS = {
    "flow": lambda: FlowCredit(layers=[2, 3]),
    "flow_last_token": lambda: FlowCredit(layers="middle", fallback="last_token", mapping="rank"),
    "attention": lambda: AttentionCredit(variant="max", layers=[1, 4]),
    "entropy": lambda: EntropyCredit(),
    "entropy_80_20": lambda: EntropyCredit(variant="80/20"),
    "random": lambda: RandomCredit(seed=3),
    "uniform": lambda: UniformCredit(),
}


@pytest.mark.parametrize("name", list(ARMS))
def test_token_weights_equal_the_suite_on_the_same_batch(name):
    tok, model = tiny_tokenizer(), tiny_model("llama")
    rb = batch(tok)
    expected, suite_metrics = suite_weights(ARMS[name](), model, rb, tok, micro_batch_size=4, temperature=0.7,
                                            step=5)
    credit = compute_credit(ARMS[name](), model, rb.input_ids, rb.attention_mask, rb.prompt_mask, rb.response_mask,
                            rb.question_mask, rb.answer_mask, temperature=0.7, micro_batch_size=4, tokenizer=tok,
                            step=5)
    torch.testing.assert_close(credit.weights, expected.float(), atol=1e-6, rtol=0)
    assert credit.weights.dtype == torch.float32 and (credit.weights[~rb.response_mask] == 0).all()
    for k, v in suite_metrics.items():
        if not k.endswith("_seconds"):
            assert credit.metrics[k] == pytest.approx(v), k
    assert credit.metrics["credit/nonfinite_frac"] == 0.0 and credit.metrics["credit/seconds"] > 0
    if name == "flow":  # rows 2 and 5 have no answer: all ones, and counted
        assert torch.equal(credit.weights[[2, 5]], rb.response_mask[[2, 5]].float())
        assert credit.metrics["credit/no_answer_frac"] == pytest.approx(2 / 6)
        assert credit.metrics["credit/fallback_frac"] >= 2 / 6
        assert (credit.weights[[0, 1, 3, 4]] == 1.5).any(-1).all()


def test_token_weights_leave_the_model_as_it_was():
    tok, model = tiny_tokenizer(), tiny_model("llama").train()
    rb = batch(tok)
    w = token_weights(FlowCredit(layers=[2, 3]), model, rb.input_ids, rb.attention_mask, rb.prompt_mask,
                      rb.response_mask, rb.question_mask, rb.answer_mask)
    assert model.training and w.shape == rb.input_ids.shape


def test_bad_inputs_are_refused():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    rb = batch(tok)
    with pytest.raises(ValueError, match="shape of input_ids"):
        credit_batch(rb.input_ids, rb.attention_mask, rb.prompt_mask[:, 1:], rb.response_mask, rb.question_mask,
                     rb.answer_mask)

    class GlobalMap(FlowCredit):
        batch_global = True

    with pytest.raises(ValueError, match="batch-global arm cannot read the attention map"):
        token_weights(GlobalMap(), model, rb.input_ids, rb.attention_mask, rb.prompt_mask, rb.response_mask,
                      rb.question_mask, rb.answer_mask)


def test_non_finite_map_gives_ones_and_is_counted(monkeypatch):
    from flowtracer.credit import weights as weights_mod

    tok, model = tiny_tokenizer(), tiny_model("llama")
    rb = batch(tok)
    real = weights_mod.teacher_forced_pass

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.attn.shape[0] == 2 and kwargs.get("capture_layers") is not None and not poisoned.done:
            out.attn[0, -1, 0], poisoned.done = float("nan"), True  # the second micro-batch of 4 + 2 rows
        return out

    poisoned.done = False
    monkeypatch.setattr(weights_mod, "teacher_forced_pass", poisoned)
    credit = compute_credit(FlowCredit(layers=[2, 3]), model, rb.input_ids, rb.attention_mask, rb.prompt_mask,
                            rb.response_mask, rb.question_mask, rb.answer_mask, micro_batch_size=4)
    assert credit.metrics["credit/nonfinite_frac"] == pytest.approx(2 / 6)
    assert torch.equal(credit.weights[4:], rb.response_mask[4:].float())
    assert (credit.weights[:4] == 1.5).any()


@pytest.mark.slow
def test_arms_and_weights_need_no_lightning(tmp_path):
    """With Lightning unimportable, the arms are plain objects and give the same weights, and the other
    pure parts (selection, token classes, flow, capture) import. One subprocess: each costs a torch import."""
    tok, model = tiny_tokenizer(), tiny_model("llama")
    rb = batch(tok)
    names = ("input_ids", "attention_mask", "prompt_mask", "response_mask", "question_mask", "answer_mask")
    here = token_weights(FlowCredit(layers=[2, 3]), model, *(getattr(rb, k) for k in names))
    torch.save({k: getattr(rb, k) for k in names}, tmp_path / "batch.pt")
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "import torch; sys.path.insert(0, 'tests')\n"
            "from tiny import tiny_model\n"
            "from flowtracer.credit import FlowCredit, RolloutCallback, token_weights\n"
            "import flowtracer.credit.select, flowtracer.credit.stats, flowtracer.flow, flowtracer.model.capture\n"
            "assert RolloutCallback.__bases__ == (object,)\n"
            f"b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
            "w = token_weights(FlowCredit(layers=[2, 3]), tiny_model('llama'), *b.values())\n"
            "assert not any(k.startswith('lightning') and sys.modules[k] is not None for k in sys.modules)\n"
            f"torch.save(w, {str(tmp_path / 'w.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert torch.equal(torch.load(tmp_path / "w.pt"), here)
