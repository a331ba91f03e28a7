"""Credit arms (flowtracer.credit) against plain-loop references, on hand-built and real rollouts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from flowtracer.batch import RolloutBatch
from flowtracer.credit import AttentionCredit, EntropyCredit, FlowCredit, RandomCredit, RolloutCallback, UniformCredit
from flowtracer.credit.attention import received_attention
from flowtracer.credit.select import batch_top_mask, select_mask, select_weights
from flowtracer.credit.stats import CLASSES, class_shares, token_class
from flowtracer.flow import trace_flow

T = 12
# (left pad, prompt length, question span inside the prompt, response length, answer span in the response)
ROWS = [
    (1, 4, (1, 4), 7, (4, 6)),
    (0, 5, (1, 4), 5, (3, 4)),
    (2, 3, (0, 3), 6, None),  # no answer span: falls back to uniform
    (0, 5, (0, 5), 7, (6, 7)),  # answer = the last token
]


# ----------------------------------------------------------------------------- plain-loop references
def k_of(n: int, frac: float) -> int:
    return 0 if n == 0 else min(n, max(1, math.floor(frac * n + 0.5)))


def ref_hard(scores, resp, frac, gamma, select="top"):
    out = []
    for srow, mrow in zip(scores.tolist(), resp.tolist()):
        pos = [t for t in range(len(mrow)) if mrow[t]]
        key = (lambda t, srow=srow: (-srow[t], t)) if select == "top" else (lambda t, srow=srow: (srow[t], t))
        chosen = set(sorted(pos, key=key)[: k_of(len(pos), frac)])
        out.append([(gamma if t in chosen else 1.0) if mrow[t] else 0.0 for t in range(len(mrow))])
    return torch.tensor(out)


def ref_linear(scores, resp, gamma, select="top"):
    out = []
    for srow, mrow in zip(scores.tolist(), resp.tolist()):
        vals = [max(srow[t], 0.0) for t in range(len(mrow)) if mrow[t]]
        top = max(vals, default=0.0)
        row = []
        for t in range(len(mrow)):
            frac = max(srow[t], 0.0) / top if top > 0 else (0.0 if select == "top" else 1.0)
            frac = frac if select == "top" else 1.0 - frac
            row.append(1.0 + (gamma - 1.0) * frac if mrow[t] else 0.0)
        out.append(row)
    return torch.tensor(out)


def ref_rank(scores, resp, gamma, select="top"):
    out = []
    for srow, mrow in zip(scores.tolist(), resp.tolist()):
        pos = [t for t in range(len(mrow)) if mrow[t]]
        key = (lambda t, srow=srow: (-srow[t], t)) if select == "top" else (lambda t, srow=srow: (srow[t], t))
        order = sorted(pos, key=key)
        n = len(pos)
        row = [0.0] * len(mrow)
        for r, t in enumerate(order):
            row[t] = 1.0 + (gamma - 1.0) * ((n - 1 - r) / (n - 1) if n > 1 else 1.0)
        out.append(row)
    return torch.tensor(out)


def ref_normalize(w, resp):
    out = []
    for wrow, mrow in zip(w.tolist(), resp.tolist()):
        n, s = sum(mrow), sum(wrow)
        out.append([x * n / s if s > 0 else x for x in wrow])
    return torch.tensor(out)


# ----------------------------------------------------------------------------- the hand-built batch
def hand_batch(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    B = len(ROWS)
    masks = {k: torch.zeros(B, T, dtype=torch.bool) for k in ("valid", "prompt", "resp", "question", "answer")}
    for b, (pad, plen, (q0, q1), rlen, ans) in enumerate(ROWS):
        masks["prompt"][b, pad:pad + plen] = True
        masks["question"][b, pad + q0:pad + q1] = True
        start = pad + plen
        masks["resp"][b, start:start + rlen] = True
        if ans is not None:
            masks["answer"][b, start + ans[0]:start + ans[1]] = True
    valid = masks["prompt"] | masks["resp"]
    # A causal map with softmax rows over the valid keys k <= q; padded rows/columns zero.
    logits = torch.randn(B, T, T, generator=g) * 2
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, :] & valid[:, :, None]
    attn = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    # Entropies with ties (multiples of 0.25) to exercise the by-position tie break.
    ent = (torch.randint(0, 8, (B, T), generator=g).float() * 0.25) * valid
    ids = torch.randint(3, 103, (B, T), generator=g) * valid
    return RolloutBatch(
        input_ids=ids, attention_mask=valid.long(), prompt_mask=masks["prompt"], response_mask=masks["resp"],
        question_mask=masks["question"], answer_mask=masks["answer"], rewards=torch.zeros(B),
        advantages=torch.tensor([1.0, -1.0, 0.5, 0.0]), group_ids=torch.zeros(B, dtype=torch.long),
        entropies=ent, attn=attn)


def stand_in(step: int = 0, tokenizer=None):
    return SimpleNamespace(tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(), rl_step=step)


def flow_tau_loop(rb: RolloutBatch, **kw):
    """tau per row from unbatched trace_flow calls (rows without an answer: None)."""
    out = []
    for b in range(rb.batch_size):
        if not rb.answer_mask[b].any():
            out.append(None)
            continue
        res = trace_flow(rb.attn[b], rb.question_mask[b], rb.answer_mask[b], valid_mask=rb.attention_mask[b].bool(),
                         **kw)
        out.append((res.throughput, bool(res.reached), float(res.sink_flow.sum())))
    return out


# ----------------------------------------------------------------------------- select.py
@pytest.mark.parametrize("select", ["top", "bottom"])
@pytest.mark.parametrize("frac", [0.0, 0.2, 0.4, 0.5, 1.0])
def test_select_weights_hard_matches_loop(select, frac):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        scores = torch.randint(0, 4, (6, 15), generator=g).float()  # many ties
        resp = torch.rand(6, 15, generator=g) < 0.6
        resp[0] = False  # an empty response
        got = select_weights(scores, resp, top_frac=frac, gamma=1.5, select=select)
        torch.testing.assert_close(got, ref_hard(scores, resp, frac, 1.5, select))
        assert got.dtype == torch.float32


@pytest.mark.parametrize("select", ["top", "bottom"])
@pytest.mark.parametrize("normalize", [False, True])
def test_select_weights_continuous_and_normalize_match_loop(select, normalize):
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (5, 10), generator=g).double() / 3
    scores[1] = 0.0  # max 0: ones
    resp = torch.rand(5, 10, generator=g) < 0.7
    resp[2] = False
    resp[3] = False
    resp[3, 4] = True  # a one-token response
    for mapping, ref in (("linear", ref_linear(scores, resp, 3.0, select)),
                         ("rank", ref_rank(scores, resp, 3.0, select)),
                         ("hard", ref_hard(scores, resp, 0.4, 3.0, select))):
        ref = ref_normalize(ref, resp) if normalize else ref
        got = select_weights(scores, resp, top_frac=0.4, gamma=3.0, select=select, mapping=mapping, normalize=normalize)
        torch.testing.assert_close(got, ref.float(), msg=mapping)


def test_k_is_round_half_up_at_least_one():
    resp = torch.zeros(4, 10, dtype=torch.bool)
    for b, n in enumerate([1, 5, 9, 10]):
        resp[b, :n] = True
    counts = select_mask(torch.rand(4, 10), resp, top_frac=0.25).sum(-1).tolist()
    assert counts == [1, 1, 2, 3]  # 0.25 -> 1 (at least one), 1.25 -> 1, 2.25 -> 2, 2.5 -> 3


def test_infinite_scores_still_rank_before_padding():
    scores = torch.tensor([[5.0, -math.inf, -math.inf, 0.0]])
    resp = torch.tensor([[False, True, True, False]])
    assert select_mask(scores, resp, top_frac=1.0).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("bad", [dict(top_frac=1.5), dict(gamma=-1.0), dict(select="middle"), dict(mapping="soft")])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        select_weights(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), **bad)
    with pytest.raises(ValueError):
        FlowCredit(**bad)


# ----------------------------------------------------------------------------- FlowCredit
@pytest.mark.parametrize("select", ["top", "bottom"])
@pytest.mark.parametrize("cond,cons", [(True, True), (False, False)])
def test_flow_credit_matches_loop(select, cond, cons):
    rb = hand_batch()
    FlowCredit(select=select, condition_on_answer=cond, conserve=cons).on_rollout_batch(None, stand_in(), rb)
    loop = flow_tau_loop(rb, condition_on_answer=cond, conserve=cons)
    for b, item in enumerate(loop):
        resp = rb.response_mask[b:b + 1]
        if item is None or not item[1]:
            ref = resp.float()
        else:
            ref = ref_hard(item[0][None], resp, 0.4, 1.5, select)
        torch.testing.assert_close(rb.token_weights[b:b + 1], ref.float())
    m = rb.metrics
    assert m["credit/fallback_frac"] == pytest.approx(0.25)
    assert m["credit/no_answer_frac"] == pytest.approx(0.25)
    assert m["credit/reached_frac"] == pytest.approx(1.0)
    if cond:
        assert m["credit/answer_mass"] == pytest.approx(1.0, abs=1e-9)
    assert m["credit/flow_seconds"] >= 0
    assert sum(m[f"credit/class/{c}"] for c in CLASSES) == pytest.approx(1.0)


def test_flow_credit_reachability_injection_matches_loop():
    rb = hand_batch(2)
    FlowCredit(inject="reachability").on_rollout_batch(None, stand_in(), rb)
    uniform = flow_tau_loop(rb)
    differs = 0
    for b, item in enumerate(flow_tau_loop(rb, inject="reachability")):
        resp = rb.response_mask[b:b + 1]
        ref = resp.float() if item is None or not item[1] else ref_hard(item[0][None], resp, 0.4, 1.5)
        torch.testing.assert_close(rb.token_weights[b:b + 1], ref.float())
        differs += item is not None and not torch.allclose(item[0], uniform[b][0])
    assert differs > 0  # the knob changes the throughput
    assert rb.metrics["credit/answer_mass"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("mapping", ["linear", "rank"])
def test_flow_credit_continuous_normalized(mapping):
    rb = hand_batch(3)
    FlowCredit(mapping=mapping, normalize=True, gamma=2.0).on_rollout_batch(None, stand_in(), rb)
    for b, item in enumerate(flow_tau_loop(rb)):
        resp = rb.response_mask[b:b + 1]
        if item is None:
            ref = resp.float()
        else:
            ref = (ref_linear if mapping == "linear" else ref_rank)(item[0][None], resp, 2.0)
            ref = ref_normalize(ref, resp)
        torch.testing.assert_close(rb.token_weights[b:b + 1], ref.float())


def test_flow_credit_unreached_and_prompt_source():
    rb = hand_batch()
    rb.question_mask[0] = False  # no source token: flow cannot reach the answer
    FlowCredit().on_rollout_batch(None, stand_in(), rb)
    assert torch.equal(rb.token_weights[0], rb.response_mask[0].float())
    assert rb.metrics["credit/fallback_frac"] == pytest.approx(0.5)
    assert rb.metrics["credit/reached_frac"] == pytest.approx(2 / 3)
    # With the whole prompt as the source, row 0 is traced again.
    rb.metrics.clear()
    FlowCredit(source="prompt").on_rollout_batch(None, stand_in(), rb)
    assert rb.metrics["credit/fallback_frac"] == pytest.approx(0.25)
    res = trace_flow(rb.attn[0], rb.prompt_mask[0], rb.answer_mask[0], valid_mask=rb.attention_mask[0].bool())
    torch.testing.assert_close(rb.token_weights[:1],
                               ref_hard(res.throughput[None], rb.response_mask[:1], 0.4, 1.5).float())


def test_flow_credit_last_token_fallback():
    rb = hand_batch()
    FlowCredit(fallback="last_token").on_rollout_batch(None, stand_in(), rb)
    ans = torch.zeros(T, dtype=torch.bool)
    ans[int(rb.response_mask[2].nonzero().max())] = True
    res = trace_flow(rb.attn[2], rb.question_mask[2], ans, valid_mask=rb.attention_mask[2].bool())
    torch.testing.assert_close(rb.token_weights[2:3],
                               ref_hard(res.throughput[None], rb.response_mask[2:3], 0.4, 1.5).float())
    assert rb.metrics["credit/fallback_frac"] == 0.0
    assert rb.metrics["credit/no_answer_frac"] == pytest.approx(0.25)


def test_flow_credit_no_answer_anywhere_and_missing_attn():
    rb = hand_batch()
    rb.answer_mask[:] = False
    FlowCredit().on_rollout_batch(None, stand_in(), rb)
    assert torch.equal(rb.token_weights, rb.response_mask.float())
    assert rb.metrics["credit/fallback_frac"] == 1.0
    rb.attn = None
    with pytest.raises(RuntimeError, match="needs rollouts.attn"):
        FlowCredit().on_rollout_batch(None, stand_in(), rb)


def test_flags_and_layers():
    assert FlowCredit.needs_attention and AttentionCredit.needs_attention
    for arm in (UniformCredit(), RandomCredit(), EntropyCredit()):
        assert isinstance(arm, RolloutCallback) and not arm.needs_attention
    assert EntropyCredit.needs_entropy
    assert FlowCredit(layers=[3, 4]).capture_layers == [3, 4]
    assert AttentionCredit(layers="late").capture_layers == "late"
    with pytest.raises(ValueError):
        FlowCredit(layers="middle-ish")
    assert FlowCredit().capture_heads == AttentionCredit().capture_heads == RolloutCallback.capture_heads == "mean"
    assert FlowCredit(heads="max").capture_heads == AttentionCredit(heads="max").capture_heads == "max"
    assert FlowCredit().inject == "uniform" and FlowCredit(inject="reachability").inject == "reachability"
    for bad in (dict(heads="sum"), dict(inject="h")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FlowCredit(**bad)
    with pytest.raises(ValueError, match="heads"):
        AttentionCredit(heads="median")


# ----------------------------------------------------------------------------- baselines
def test_uniform_credit():
    rb = hand_batch()
    UniformCredit().on_rollout_batch(None, stand_in(), rb)
    assert torch.equal(rb.token_weights, rb.response_mask.float())


def test_random_credit_counts_and_reproducibility():
    rb = hand_batch()
    arm = RandomCredit(seed=7)
    arm.on_rollout_batch(None, stand_in(step=5), rb)
    w1 = rb.token_weights.clone()
    n = rb.response_mask.sum(-1).tolist()
    assert (w1 == 1.5).sum(-1).tolist() == [k_of(x, 0.4) for x in n]
    assert ((w1 == 1.0) | (w1 == 1.5)).eq(rb.response_mask).all() and (w1[~rb.response_mask] == 0).all()
    RandomCredit(seed=7).on_rollout_batch(None, stand_in(step=5), rb)  # a resumed run: same draw
    assert torch.equal(rb.token_weights, w1)
    RandomCredit(seed=7).on_rollout_batch(None, stand_in(step=6), rb)
    assert not torch.equal(rb.token_weights, w1)
    RandomCredit(seed=8).on_rollout_batch(None, stand_in(step=5), rb)
    assert not torch.equal(rb.token_weights, w1)


@pytest.mark.parametrize("select", ["top", "bottom"])
def test_entropy_credit_topk_matches_loop(select):
    rb = hand_batch()
    EntropyCredit(select=select).on_rollout_batch(None, stand_in(), rb)
    torch.testing.assert_close(rb.token_weights, ref_hard(rb.entropies, rb.response_mask, 0.4, 1.5, select).float())


def test_entropy_credit_80_20_is_batch_level():
    rb = hand_batch()
    EntropyCredit(variant="80/20").on_rollout_batch(None, stand_in(), rb)
    cells = [(b, t) for b in range(rb.batch_size) for t in range(T) if rb.response_mask[b, t]]
    ent = rb.entropies.tolist()
    keep = set(sorted(cells, key=lambda c: (-ent[c[0]][c[1]], c[0], c[1]))[: k_of(len(cells), 0.2)])
    ref = torch.tensor([[1.0 if (b, t) in keep else 0.0 for t in range(T)] for b in range(rb.batch_size)])
    torch.testing.assert_close(rb.token_weights, ref)
    # Batch level, not per response: the kept count differs between responses.
    assert int(rb.token_weights.sum()) == k_of(len(cells), 0.2)
    assert torch.equal(batch_top_mask(rb.entropies, rb.response_mask, 0.2), ref.bool())
    with pytest.raises(ValueError):
        EntropyCredit(variant="80/20", normalize=True)


@pytest.mark.parametrize("variant", ["mean", "max"])
def test_attention_credit_matches_loop(variant):
    rb = hand_batch()
    A, resp = rb.attn.tolist(), rb.response_mask.tolist()
    ref_scores = []
    for b in range(rb.batch_size):
        row = []
        for k in range(T):
            vals = [A[b][q][k] for q in range(k + 1, T) if resp[b][q]]
            row.append((sum(vals) / len(vals) if variant == "mean" else max(vals)) if vals else 0.0)
        ref_scores.append(row)
    ref_scores = torch.tensor(ref_scores)
    torch.testing.assert_close(received_attention(rb.attn, rb.response_mask, variant), ref_scores)
    AttentionCredit(variant=variant).on_rollout_batch(None, stand_in(), rb)
    torch.testing.assert_close(rb.token_weights, ref_hard(ref_scores, rb.response_mask, 0.4, 1.5).float())


# ----------------------------------------------------------------------------- token classes
def test_token_class():
    cases = {"\n": "newline", " \n": "newline", " ": "whitespace", "\t": "whitespace", "12": "digit",
             " 3.5": "digit", "+": "operator", " =": "operator", "(": "operator", "^": "operator",
             ".": "punctuation", ",": "punctuation", "{": "punctuation", "\\": "punctuation", "x": "word",
             " Therefore": "word", "x2": "word", "": "special", "<|im_end|>": "special"}
    for text, cls in cases.items():
        assert token_class(text) == cls, text


def test_class_shares_counts_selected_tokens():
    tok = tiny_tokenizer()
    ids = torch.tensor([tok.convert_tokens_to_ids(list("a1+.\n ")) + [tok.eos_token_id, 0]])
    sel = torch.tensor([[True, True, True, True, True, True, True, False]])
    shares = class_shares(tok, ids, sel)
    assert set(shares) == {f"credit/class/{c}" for c in CLASSES}
    assert all(shares[f"credit/class/{c}"] == pytest.approx(1 / 7) for c in CLASSES)
    assert all(v == 0.0 for v in class_shares(tok, ids, torch.zeros_like(sel)).values())


# ----------------------------------------------------------------------------- end to end on a tiny model
def real_batch(tok):
    """Two prompts x two responses, real token ids: prompt left-padded, response right-padded."""
    prompts = ["What is 2+3?", "Compute 7*6.", "What is 2+3?", "Compute 7*6."]
    responses = ["2+3=5.\nAnswer: 5", "7*6 is 42, so 42", "I think it is", "6*7=42\nso 42"]
    answers = [(len(responses[0]) - 1, len(responses[0])), (len(responses[1]) - 2, len(responses[1])), None,
               (len(responses[3]) - 2, len(responses[3]))]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    P = max(len(enc(p)) for p in prompts)
    R = max(len(enc(r)) + 1 for r in responses)
    B, L = len(prompts), P + R
    ids = torch.full((B, L), tok.pad_token_id)
    m = {k: torch.zeros(B, L, dtype=torch.bool) for k in ("prompt", "resp", "question", "answer")}
    for b, (p, r, a) in enumerate(zip(prompts, responses, answers)):
        pi, ri = enc(p), enc(r) + [tok.eos_token_id]
        ids[b, P - len(pi):P] = torch.tensor(pi)
        ids[b, P:P + len(ri)] = torch.tensor(ri)
        m["prompt"][b, P - len(pi):P] = True
        m["question"][b, P - len(pi) + 8:P] = True if len(pi) > 8 else False
        m["resp"][b, P:P + len(ri)] = True
        if a is not None:
            m["answer"][b, P + a[0]:P + a[1]] = True
    valid = m["prompt"] | m["resp"]
    return RolloutBatch(input_ids=ids, attention_mask=valid.long(), prompt_mask=m["prompt"], response_mask=m["resp"],
                        question_mask=m["question"], answer_mask=m["answer"], rewards=torch.tensor([1.0, 1, 0, 1]),
                        advantages=torch.tensor([0.5, 0.5, -1.5, 0.5]), group_ids=torch.tensor([0, 1, 0, 1]),
                        responses=responses)


def test_flow_credit_end_to_end_tiny_model():
    from flowtracer.model.forward import teacher_forced_pass

    tok, model = tiny_tokenizer(), tiny_model("llama")
    rb = real_batch(tok)
    out = teacher_forced_pass(model, rb.input_ids, rb.attention_mask, capture_layers="middle")
    rb.old_logprobs, rb.entropies, rb.attn = out.logprobs, out.entropy, out.attn
    module = SimpleNamespace(tokenizer=tok, rl_step=0)
    FlowCredit(gamma=1.5).on_rollout_batch(None, module, rb)
    w, resp = rb.token_weights, rb.response_mask
    assert w.shape == resp.shape and w.dtype == torch.float32
    assert (w[~resp] == 0).all()
    assert (((w == 1.0) | (w == 1.5)) | ~resp).all()
    n = resp.sum(-1).tolist()
    assert (w == 1.5).sum(-1).tolist() == [k_of(n[0], 0.4), k_of(n[1], 0.4), 0, k_of(n[3], 0.4)]
    m = rb.metrics
    assert m["credit/fallback_frac"] == pytest.approx(0.25) and m["credit/reached_frac"] == 1.0
    assert m["credit/answer_mass"] == pytest.approx(1.0, abs=1e-6)
    for key in ("credit/flow_seconds", "credit/selected_frac", "credit/weight_mean", "credit/score_share",
                *(f"credit/class/{c}" for c in CLASSES)):
        assert key in m, key
    # Every other arm runs on the same pass's outputs.
    for arm in (UniformCredit(), RandomCredit(), EntropyCredit(), EntropyCredit(variant="80/20"),
                AttentionCredit(), AttentionCredit(variant="max")):
        arm.on_rollout_batch(None, module, rb)
        assert rb.token_weights.shape == resp.shape and (rb.token_weights[~resp] == 0).all()


def test_arms_parse_from_config():
    """The arms' signatures work with jsonargparse, as LightningCLI's trainer.callbacks uses them."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    cfg = parser.parse_args(['--callbacks=[{"class_path": "flowtracer.credit.FlowCredit", '
                             '"init_args": {"layers": [2, 3], "top_frac": 0.2, "mapping": "rank"}}, '
                             '{"class_path": "flowtracer.credit.EntropyCredit", "init_args": {"variant": "80/20"}}]'])
    flow, ent = parser.instantiate_classes(cfg).callbacks
    assert flow.capture_layers == [2, 3] and flow.top_frac == 0.2 and flow.mapping == "rank"
    assert ent.variant == "80/20"
