"""`flowtracer probe` on a tiny model: it runs, each arm masks the requested share of the reasoning
tokens, and regenerating with nothing masked reproduces the original answers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT

from flowtracer.credit.select import num_selected
from flowtracer.model.policy import load_policy
from flowtracer.tools.analysis import Verifiers, load_problems
from flowtracer.tools.probe import (
    PROBE_ARMS,
    ProbeResult,
    class_matched,
    probe_batch,
    probe_masks,
    regenerate,
    regenerate_hf,
    relative_positions,
    run_probe,
)


def test_probe_masks_have_requested_size():
    g = torch.Generator().manual_seed(0)
    reasoning = torch.rand(6, 40, generator=g) < 0.5
    reasoning[0] = False  # a row with nothing to mask
    flow = torch.rand(6, 40, generator=g)
    scores = {"flow_top": flow, "flow_bottom": flow, "random": torch.rand(6, 40, generator=g)}
    masks = probe_masks(scores, reasoning, 0.2)
    want = num_selected(reasoning.sum(-1), 0.2)
    for arm, m in masks.items():
        assert not (m & ~reasoning).any(), arm  # only reasoning tokens are masked
        assert torch.equal(m.sum(-1), torch.zeros(6, dtype=torch.long) if arm == "none" else want), arm
    top, bottom, s = masks["flow_top"], masks["flow_bottom"], scores["flow_top"]
    for b in range(1, 6):  # the top-k by flow score above the bottom-k, row by row
        assert s[b][top[b]].min() >= s[b][bottom[b]].max()


def test_probe_runs_on_tiny_model(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir, lora=None)
    model.eval()
    rows = load_problems([str(ROOT / "data/arith_train.jsonl")], 6)
    # A random tiny model rarely writes a number: probe given responses so that answers parse.
    responses = [f"{r['question'][8:-1]} = {r['answer']}" for r in rows]
    for protect, n_protected in (("scaffold", 1), ("none", 0)):
        torch.manual_seed(0)
        result = ProbeResult(frac=0.2, protect=protect)
        masks = probe_batch(model, tok, rows, result, verifiers=Verifiers(), max_new_tokens=6, responses=responses)
        assert result.n_problems == 6 and result.n_eligible == 6
        # one char per token: the reasoning is the text before the answer, less (protected) the space before it
        n_reason = torch.tensor([len(r) - len(str(row["answer"])) - n_protected for r, row in zip(responses, rows)])
        assert masks["protected"].sum(-1).tolist() == [1] * 6  # last_number, no "The answer is": the space
        want = num_selected(n_reason, 0.2)
        for arm in PROBE_ARMS:
            assert torch.equal(masks[arm].sum(-1), want), arm
            assert result.masked_tokens[arm] == int(want.sum())
            assert sum(result.class_counts[arm]) == int(want.sum())
        assert result.reasoning_tokens == int(n_reason.sum())
        assert result.class_counts["class_random"] == result.class_counts["flow_top"]
        assert {r["arm"] for r in result.records} == set(PROBE_ARMS)
        table = {r["arm"]: r for r in result.table()}
        assert set(table) == {"none", *PROBE_ARMS}
        assert all(0.0 <= r[k] <= 1.0 for r in table.values() for k in ("changed", "flipped", "changed_repro"))
        assert "| flow_top |" in result.markdown() and f"protect = {protect}" in result.markdown()


EXTRACTOR_CASES = {  # extractor -> (response, its scaffold text right before the answer)
    "answer_tag": ("12 + 30 = 42\n<answer>42</answer>", "<answer>"),
    "boxed": ("12 + 30 = 42, so \\boxed{42}", "\\boxed{"),
    "hash": ("12 + 30 = 42\n#### 42", "#### "),
    "last_number": ("12 + 30 = 42. The answer is 42", "The answer is "),
}


@pytest.mark.parametrize("extractor", list(EXTRACTOR_CASES))
def test_protected_scaffold_is_never_masked(tiny_model_dir, extractor):
    """For each extractor, no arm (random and class-matched random included) masks the scaffold or
    the token before the answer, even when 90% of the reasoning is masked; without protection the
    same probe does mask them (so the test can fail)."""
    model, tok = load_policy(tiny_model_dir, lora=None)
    model.eval()
    response, scaffold = EXTRACTOR_CASES[extractor]
    rows = [{"question": "What is 12 + 30?", "answer": "42", "verifier": "math"}] * 4
    start = response.rindex("42") - len(scaffold)
    want = set(range(start, start + len(scaffold))) | {response.rindex("42") - 1}
    hit = {}
    for protect in ("scaffold", "none"):
        result = ProbeResult(frac=0.9, protect=protect)
        masks = probe_batch(model, tok, rows, result, verifiers=Verifiers(), max_new_tokens=4,
                            responses=[response] * 4, seed=3)
        assert result.n_eligible == 4
        for b in range(4):
            cols = masks["response"][b].nonzero().squeeze(-1).tolist()  # one token per character
            assert len(cols) == len(response)
            assert {i for i, c in enumerate(cols) if masks["protected"][b, c]} == want
        hit[protect] = any(bool((masks[arm] & masks["protected"]).any()) for arm in PROBE_ARMS)
    assert not hit["scaffold"] and hit["none"]


def test_none_arm_changes_no_greedy_answer(tiny_model_dir):
    """Nothing masked: regenerating each greedy response from its cut gives back its answer (0 changed,
    0 flipped). The same probe on those responses with the answer swapped reports every one changed,
    so the 0 is a measurement and not a constant."""
    model, tok = load_policy(tiny_model_dir, lora=None)
    model.eval()
    # the 5th character is the answer: a random tiny model's greedy text then always has one
    rows = [{**r, "verifier": "faulty_rewards:fifth_char"}
            for r in load_problems([str(ROOT / "data/arith_train.jsonl")], 6)]
    greedy = ProbeResult(frac=0.2)
    probe_batch(model, tok, rows, greedy, verifiers=Verifiers(), max_new_tokens=8)
    assert greedy.n_problems == greedy.n_eligible == 6 and greedy.protect == "scaffold"
    assert greedy.changed["none"] == 0 and greedy.flipped["none"] == 0 and greedy.n_repro == 6
    originals = [r["original"] for r in greedy.records if r["arm"] == "random"]
    assert len(originals) == 6 and all(len(o) >= 5 for o in originals)
    swapped = [o[:4] + ("1" if o[4] == "0" else "0") + o[5:] for o in originals]
    given = ProbeResult(frac=0.2)
    probe_batch(model, tok, rows, given, verifiers=Verifiers(), max_new_tokens=8, responses=swapped)
    assert given.n_eligible == 6 and given.changed["none"] == 6


def test_class_matched_random_reproduces_the_class_histogram():
    """Per row and class, class_random masks exactly as many tokens as flow_top, all eligible,
    drawn by the noise (another noise draws other tokens)."""
    g = torch.Generator().manual_seed(4)
    B, T = 8, 60
    reasoning = torch.rand(B, T, generator=g) < 0.8
    classes = torch.randint(0, 5, (B, T), generator=g)
    flow = torch.rand(B, T, generator=g) + (classes == 2) * 1.0  # flow prefers class 2, as it prefers newlines
    scores = {"flow_top": flow, "random": torch.rand(B, T, generator=g)}
    masks = probe_masks(scores, reasoning, 0.3, classes=classes, noise=torch.rand(B, T, generator=g))
    top, cm = masks["flow_top"], masks["class_random"]
    assert not (cm & ~reasoning).any()
    for c in range(5):
        assert torch.equal((top & (classes == c)).sum(-1), (cm & (classes == c)).sum(-1)), c
    assert not torch.equal(cm, top)  # same histogram, other tokens
    other = class_matched(top, reasoning, classes, torch.rand(B, T, generator=g))
    assert not torch.equal(other, cm) and torch.equal(other.sum(-1), top.sum(-1))


def test_relative_positions_against_a_loop():
    """Each pick's index among its row's reasoning tokens over (count - 1), picks outside the
    reasoning ignored; a one-token reasoning counts as 1."""
    g = torch.Generator().manual_seed(7)
    reasoning = torch.rand(6, 20, generator=g) < 0.6
    reasoning[5] = False
    reasoning[5, 9] = True
    mask = torch.rand(6, 20, generator=g) < 0.4
    mask[5, 9] = True
    want = []
    for b in range(6):
        cols = reasoning[b].nonzero().squeeze(-1).tolist()
        want += [cols.index(c) / max(len(cols) - 1, 1) if len(cols) > 1 else 1.0
                 for c in range(20) if mask[b, c] and reasoning[b, c]]
    got = relative_positions(mask, reasoning)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    assert got.min() >= 0 and got.max() <= 1 and got[-1] == 1.0


def test_regenerate_matches_generate_and_masking_changes_logits(tiny_model_dir, monkeypatch):
    """Shared-prefill greedy decoding with nothing blocked = HF generate on each unpadded context;
    blocking a token changes the continuation's logits (the mask reaches the model)."""
    model, tok = load_policy(tiny_model_dir, lora=None)
    model.eval()
    prompts = ["<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n", "<|im_start|>user\nHi<|im_end|>\n"]
    segs = ["12 + 30 = ", "abc"]
    P = tok(prompts, return_tensors="pt", padding=True)
    S = [tok(s)["input_ids"] for s in segs]
    W = max(map(len, S))
    seg_ids = torch.tensor([[tok.pad_token_id] * (W - len(s)) + s for s in S])
    seg_valid = torch.tensor([[False] * (W - len(s)) + [True] * len(s) for s in S])
    blocked = torch.zeros(3, 2, W, dtype=torch.bool)
    blocked[1, :, -2] = True  # arm 1 blocks the second-to-last segment token
    blocked[2, :, :-1] = True  # arm 2 all but the last
    new = regenerate(model, P["input_ids"], P["attention_mask"].bool(), seg_ids, seg_valid, blocked, 8,
                     [tok.eos_token_id], tok.pad_token_id)
    for b in range(2):
        ctx = tok(prompts[b] + segs[b], return_tensors="pt")
        ref = model.generate(**ctx, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, ctx["input_ids"].shape[1]:]
        got = new[b * 3][: len(ref)]
        assert got.tolist() == ref.tolist()
    assert new.shape[0] == 6
    ids = tok(prompts[0] + segs[0], return_tensors="pt")["input_ids"]
    hole = torch.ones_like(ids)
    hole[0, -2] = 0
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    full = model(input_ids=ids, position_ids=pos).logits[0, -1]
    masked = model(input_ids=ids, attention_mask=hole, position_ids=pos).logits[0, -1]
    assert not torch.allclose(full, masked)
    # the fast decode path (what regenerate runs for this Llama) equals the model's own forward in
    # every arm, the blocked one included
    slow = regenerate_hf(model, P["input_ids"], P["attention_mask"].bool(), seg_ids, seg_valid, blocked, 8,
                         [tok.eos_token_id], tok.pad_token_id)
    assert torch.equal(new, slow)
    # and so it does with the prompt and the segment prefilled one row at a time
    from flowtracer.generation import fast
    monkeypatch.setattr(fast, "PREFILL_TOKENS", 1)
    assert torch.equal(regenerate(model, P["input_ids"], P["attention_mask"].bool(), seg_ids, seg_valid, blocked, 8,
                                  [tok.eos_token_id], tok.pad_token_id), slow)


def test_probe_cli_batches(tiny_model_dir, tmp_path, capsys):
    import csv

    from flowtracer.cli import main

    out = tmp_path / "probe.json"
    main(["probe", "--model", tiny_model_dir, "--data", str(ROOT / "data/arith_val.jsonl"), "--n", "5",
          "--batch-size", "2", "--max-new-tokens", "8", "--out", str(out), "--results", str(tmp_path / "probe")])
    printed = capsys.readouterr().out
    assert "| arm | answer changed | correctness flipped | changed (none reproduces) |" in printed
    assert f"flowtracer probe: wrote {tmp_path / 'probe'}.csv, " in printed and printed.rstrip().endswith(str(out))
    data = json.loads(out.read_text())
    assert data["n_problems"] == 5 and len(data["table"]) == 7 and len(data["classes"]) == 6
    assert data["args"]["protect"] == "scaffold"
    classes = list(csv.DictReader(open(tmp_path / "probe_classes.csv")))
    assert [r["arm"] for r in classes] == list(PROBE_ARMS) and "scaffold" in classes[0]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "probe.csv")))
    assert {r["protect"] for r in rows} == {"scaffold"}
    assert [r["arm"] for r in rows] == [r["arm"] for r in data["table"]]
    for r in rows:  # a rate lies inside its interval (or no eligible problem: no interval)
        assert r["changed_lo"] == "nan" or float(r["changed_lo"]) <= float(r["changed"]) <= float(r["changed_hi"])
    assert "flowtracer probe" in (tmp_path / "probe.md").read_text()
    with pytest.raises(SystemExit):  # argparse: one of the choices
        main(["probe", "--model", tiny_model_dir, "--protect", "tag"])


def test_run_probe_rejects_bad_frac(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir, lora=None)
    with pytest.raises(ValueError, match="--frac"):
        run_probe(model, tok, [], frac=1.5)


def test_probe_problems_from_a_generated_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # reasoning-gym rows are cached under ./data/cache
    from flowtracer.tools.analysis import load_problems

    rows = load_problems(["reasoning_gym:chain_sum"], 5)
    assert len(rows) == 5 and all(r["question"] and r["answer"] is not None for r in rows)
