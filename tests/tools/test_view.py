"""`flowtracer view`: the page of a run's rollouts and curves, loaded in headless Chromium (no console
message, shading equal to the weights and scores of rollouts.jsonl, model text shown as text), two
runs side by side, the cap, grid folders, the CLI; and a tiny `fit` that logs the per-token scores."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import write_config
from tiny import SPECIALS
from view_runs import bpe, write_run

from flowtracer.cli import main
from flowtracer.tools import shading
from flowtracer.tools.browser import BrowserError, load
from flowtracer.tools.view import build_page, cap_rows, run_dirs, token_texts, write_page
from flowtracer.tools.view_page import PER_PAGE

EVIL = 'so <script>document.title="pwned"</script></script><!-- <img src=x onerror=alert(1)> & done'


class Cards(HTMLParser):
    """The rollout cards of a dumped DOM: per card its data-* and its tokens (text, background)."""

    def __init__(self):
        super().__init__()
        self.cards, self.tok, self.depth = [], None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append({**{k[5:]: v for k, v in a.items() if k.startswith("data-")}, "toks": []})
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.tok = {"text": "", "style": a.get("style", ""), "class": a["class"]}
            self.cards[-1]["toks"].append(self.tok)

    def handle_endtag(self, tag):
        if tag == "span":
            self.tok = None

    def handle_data(self, data):
        if self.tok is not None:
            self.tok["text"] += data


def cards_of(dom: str) -> list[dict]:
    parser = Cards()
    parser.feed(dom)
    return parser.cards


def alpha_of(style: str) -> float:
    inner = style.split("rgba(")[1].split(")")[0]
    return float(inner.split(",")[3])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "rollouts.jsonl")]


def assert_shading(cards: list[dict], recs: list[dict], mode: str) -> None:
    """Each token's background alpha is shading's rule applied to its value in rollouts.jsonl."""
    weights = [w for r in recs for w in r["weights"]]
    ents = [e for r in recs for e in r.get("entropy", [])]
    lo, hi = min(weights), max(weights)
    by_key = {(r["step"], r["group"], r["k"]): r for r in recs}
    assert cards
    for card in cards:
        rec = by_key[(int(card["step"]), int(card["group"]), int(card["k"]))]
        if mode == "weight":
            want = shading.by_range(rec["weights"], lo, hi)
        elif mode == "score":
            want = shading.by_max(rec["scores"])
        else:
            want = shading.by_range(rec["entropy"], 0, max(ents))
        # Chromium keeps alpha in 8 bits and prints the fewest decimals that give those 8 bits back:
        # compare in 1/255 steps, one step apart at most (the page rounds to 3 decimals first)
        got = [round(alpha_of(t["style"]) * 255) for t in card["toks"]]
        want = [round(shading.alpha(x) * 255) for x in want]
        assert len(got) == len(want) and all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)
        assert "".join(t["text"] for t in card["toks"]) == "".join(token_texts(rec["tokens"]))


def numbered(run: Path) -> list[dict]:
    """rollouts.jsonl with each record's group and position in it (as the page numbers them)."""
    from flowtracer.tools.view import _number_groups

    recs = records(run)
    _number_groups(recs)
    return recs


# ------------------------------------------------------------------------------ tokens
def test_token_texts_rebuild_the_text():
    text = "déjà vu: 7 + 9 = 16\n<answer>16</answer> 😀"
    assert "".join(token_texts(bpe(text))) == text
    # a character split over two byte-level tokens shows with the token that completes it
    e = "é".encode()
    from view_runs import BYTE_ENCODER
    split = ["a" + BYTE_ENCODER[e[0]], BYTE_ENCODER[e[1]] + "b"]
    assert token_texts(split) == ["a", "éb"]
    assert token_texts(["▁the", "▁sum", "<0x0A>", "16"]) == [" the", " sum", "\n", "16"]  # SentencePiece
    assert token_texts(["7", " ", "+", "\t", "é"]) == ["7", " ", "+", "\t", "é"]  # a character tokenizer


# ------------------------------------------------------------------------------ in the browser
def test_page_loads_clean_and_shades_by_the_logged_weights_and_scores(tmp_path):
    run = write_run(tmp_path / "run", steps=3, prompts=3, group=4)
    page = write_page([run])
    assert page == run / "view.html"
    html_text = page.read_text()
    assert "http://" not in html_text and "https://" not in html_text and "src=" not in html_text  # offline
    recs = numbered(run)
    for mode in ("weight", "score", "entropy"):
        result = load(page, hash=f"mode={mode}")
        result.raise_on_errors()
        cards = cards_of(result.dom)
        assert len(cards) == PER_PAGE and {c["mode"] for c in cards} == {mode}
        assert_shading(cards, recs, mode)
    # filters: step 2, reward 1 only, truncated only, through the URL
    cards = cards_of(load(page, hash="step=2&rmin=1&trunc=1").dom)
    want = [r for r in recs if r["step"] == 2 and r["reward"] >= 1 and r["truncated"]]
    assert [(int(c["step"]), int(c["group"]), int(c["k"])) for c in cards] == [(r["step"], r["group"], r["k"])
                                                                               for r in want]


def test_model_output_is_shown_as_text(tmp_path):
    run = write_run(tmp_path / "run", steps=1, prompts=1, group=2, responses={(0, 0, 0): EVIL},
                    prompt_of=lambda s, p: "<b>bold?</b> </script><script>alert(2)</script>")
    page = write_page([run])
    text = page.read_text()
    assert "<script>document" not in text and "<img" not in text and "<script>alert" not in text
    result = load(page)
    result.raise_on_errors()  # a script that ran would have changed the title or thrown
    assert "<title>flowtracer view" in result.dom and "pwned" not in result.dom.split("</title>")[0]
    card = next(c for c in cards_of(result.dom) if c["k"] == "0")
    assert "".join(t["text"] for t in card["toks"]) == EVIL  # every character, as text
    assert "<img" not in result.dom


def test_the_console_check_catches_a_broken_page(tmp_path):
    run = write_run(tmp_path / "run", steps=1, prompts=1, group=2)
    page = write_page([run])
    broken = tmp_path / "broken.html"
    text = page.read_text()
    broken.write_text(text.replace("<script>const PER_PAGE", "<script>nope();</script><script>const PER_PAGE"))
    with pytest.raises(BrowserError, match="nope is not defined"):
        load(broken).raise_on_errors()
    bad_data = tmp_path / "bad_data.html"  # a render that throws: an error and no render time
    bad_data.write_text(text.replace('id="d0_0">[', 'id="d0_0">{['))
    result = load(bad_data)
    assert result.console and result.render_ms is None
    with pytest.raises(BrowserError):
        result.raise_on_errors()


def test_two_runs_side_by_side_pair_the_same_prompt_and_step(tmp_path):
    a = write_run(tmp_path / "flow", seed=0, steps=2, prompts=2, group=3)
    b = write_run(tmp_path / "uniform", seed=1, steps=2, prompts=2, group=3, scores=False, arm="UniformCredit",
                  responses={(1, 1, 2): "a different answer <answer>2</answer>"},
                  prompt_of=lambda s, p: "another question" if (s, p) == (1, 0) else f"What is {s} + {p}?")
    page = write_page([a, b], tmp_path / "both.html")
    result = load(page, hash="mode=score")
    result.raise_on_errors()
    recs_b = {(r["step"], r["group"], r["k"]): r for r in numbered(b)}
    cards = cards_of(result.dom)
    firsts = [c for c in cards if c["run"] == "0"]
    seconds = [c for c in cards if c["run"] == "1"]
    assert len(firsts) == 12 and len(seconds) == 12 - 3  # step 1, prompt 0 differs: no counterpart
    assert result.dom.count("<div class=\"missing\">") == 3
    for c in seconds:
        rec = recs_b[(int(c["step"]), int(c["group"]), int(c["k"]))]
        assert "".join(t["text"] for t in c["toks"]) == rec["response"]
    pair_keys = [(c["step"], c["group"], c["k"]) for c in cards]
    for i, c in enumerate(cards):  # each B card sits right under the A card of the same step, prompt, k
        if c["run"] == "1":
            assert cards[i - 1]["run"] == "0" and pair_keys[i - 1] == pair_keys[i]
    assert "the arm&#x27;s" in page.read_text() or "the arm's" in page.read_text()
    assert "Not logged by uniform" in result.dom  # run B has no scores: said, not hidden


def test_cap_keeps_whole_spaced_steps_and_says_so(tmp_path):
    rows = [{"step": s, "prompt": "p"} for s in range(10) for _ in range(8)]
    kept, note = cap_rows(rows, 30)
    steps = sorted({r["step"] for r in kept})
    assert len(kept) <= 30 and steps[0] == 0 and steps[-1] == 9 and len(steps) == 3
    assert all(sum(r["step"] == s for r in kept) == 8 for s in steps)  # whole steps
    assert "showing 24 of 80 rollouts" in note and "--max-rollouts 30" in note
    assert cap_rows(rows, 80) == (rows, "")
    run = write_run(tmp_path / "run", steps=6, prompts=2, group=2)
    page = build_page([run], max_rollouts=10)
    assert "showing 8 of 24 rollouts: 2 of 6 steps (0, 5)" in page


def test_grid_folder_and_folder_of_versions(tmp_path):
    grid = tmp_path / "grid"
    for cell in ("arm=flow,seed=0", "arm=uniform,seed=0"):
        write_run(grid / "cells" / cell / "run" / "version_0", steps=1, prompts=1, group=2)
    (grid / "cells" / "arm=broken,seed=0").mkdir()  # a cell that never ran: no folder to show
    assert [label for label, _ in run_dirs(grid)] == ["arm=flow,seed=0", "arm=uniform,seed=0"]
    for v in (0, 1, 10):
        write_run(tmp_path / "logs" / "quick" / f"version_{v}", steps=1, prompts=1, group=2)
    assert [label for label, _ in run_dirs(tmp_path / "logs" / "quick")] == ["quick/version_0", "quick/version_1",
                                                                             "quick/version_10"]


def test_cli_writes_the_page_and_refuses_a_wrong_folder(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=1, prompts=1, group=2)
    assert main(["view", str(run)]) == 0
    assert f"wrote {run / 'view.html'}" in capsys.readouterr().out
    assert main(["view", str(run), "--out", str(tmp_path / "x" / "v.html"), "--screenshot",
                 str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_:
        main(["view", str(tmp_path)])  # no run in it
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no rollouts.jsonl or metrics.csv" in err
    (run / "rollouts.jsonl").write_text('{"step": 0\n')
    with pytest.raises(SystemExit):
        main(["view", str(run)])
    assert "rollouts.jsonl:1: not a JSON record" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real (tiny) run
def test_fit_logs_token_scores_and_the_page_shows_them(tmp_path, tiny_model_dir):
    """A tiny fit with FlowCredit and model.log_token_scores: rollouts.jsonl holds the arm's scores,
    entropies, the question, the answer span and truncation; the page of that run shades by them."""
    flow = [{"class_path": "flowtracer.credit.FlowCredit", "init_args": {"layers": [1, 2]}}]
    cfg = write_config(tmp_path, tiny_model_dir, steps=2, callbacks=flow, verifier="toy_rewards:digits")
    main(["fit", "--config", str(cfg), "--model.log_token_scores", "true", "--trainer.val_check_interval", "2"])
    run = tmp_path / "logs" / "tiny" / "version_0"
    recs = records(run)
    assert len(recs) == 2 * 2 * 4
    for r in recs:
        n = len(r["tokens"])
        assert len(r["weights"]) == len(r["scores"]) == len(r["entropy"]) == n and r["arm"] == "FlowCredit"
        assert r["question"] and r["question"] in r["prompt"] and isinstance(r["truncated"], bool)
        assert all(0 <= i < n for i in r["answer_span"])
        # the response text is decoded without special tokens (a random model samples some mid-response)
        assert "".join(t for t in token_texts(r["tokens"]) if t not in SPECIALS) == r["response"]
    assert any(r["answer_span"] for r in recs) and any(max(r["scores"]) > 0 for r in recs)
    assert any(e > 0 for r in recs for e in r["entropy"])
    page = write_page([run])
    recs = numbered(run)
    for mode in ("weight", "score"):
        result = load(page, hash=f"mode={mode}")
        result.raise_on_errors()
        assert_shading(cards_of(result.dom), recs, mode)


def test_records_from_before_the_new_fields_and_a_run_without_rollouts(tmp_path):
    """Runs logged before question/answer_span/truncated/scores existed, and one with metrics only."""
    old = write_run(tmp_path / "old", steps=2, prompts=1, group=2, scores=False)
    recs = records(old)
    for r in recs:
        for key in ("question", "answer_span", "truncated"):
            r.pop(key)
    (old / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.csv").write_text((old / "metrics.csv").read_text())
    page = write_page([old, bare], tmp_path / "v.html")
    assert "no per-token scores or entropies logged" in page.read_text() and "no rollouts.jsonl" in page.read_text()
    for view in ("mode=score", "a=1&b=0"):
        result = load(page, hash=view)
        result.raise_on_errors()
    dom = load(page).dom
    assert len(cards_of(dom)) == 4 and dom.count('<div class="missing">') == 4  # run B has no response to show
