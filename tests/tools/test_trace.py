"""`flowtracer trace` on a tiny model: the HTML page holds every token exactly once, in order; the
terminal view and PNG render; TraceCallback writes pages into the run folder during `fit`."""

from __future__ import annotations

import html
import io
import re

import torch
from conftest import write_config

from flowtracer.cli import main
from flowtracer.credit.select import num_selected
from flowtracer.model.policy import load_policy
from flowtracer.tools.trace import build_trace, render_html, render_terminal, write_trace

SPAN = re.compile(r'<span class="tok[^"]*" id="t(\d+)"[^>]*>(.*?)</span>', re.S)


def _tiny(model_dir):
    model, tok = load_policy(model_dir, lora=None)
    return model.eval(), tok


def test_html_holds_every_token_once(tiny_model_dir, tmp_path):
    model, tok = _tiny(tiny_model_dir)
    trace = build_trace(model, tok, "What is 7 + 9?", response="7 + 9 = 16 <b>&", answer="16")
    page = render_html(trace)
    found = SPAN.findall(page)
    assert [int(i) for i, _ in found] == list(range(len(trace.tokens)))  # each index once, in order
    assert [html.unescape(t) for _, t in found] == trace.tokens
    assert "".join(trace.tokens).endswith("7 + 9 = 16 <b>&")  # the full prompt + response, nothing else
    assert page.count('class="tok') == len(trace.tokens)
    assert trace.reached and trace.paths and "answer" in trace.role and any(trace.hub)
    n_resp = trace.role.count("response") + trace.role.count("answer")
    assert sum(trace.hub) == int(num_selected(torch.tensor(n_resp), 0.4))  # FlowCredit's k
    for path, flow in trace.paths:  # question -> answer, forward in time
        assert trace.role[path[0]] == "question" and trace.role[path[-1]] == "answer" and flow > 0
        assert path == sorted(path)
    files = write_trace(trace, tmp_path)
    assert files["png"].stat().st_size > 5000 and files["html"].read_text() == page
    from rich.console import Console

    buf = io.StringIO()
    render_terminal(trace, Console(file=buf, width=100, force_terminal=True, color_system="truecolor"))
    assert "\x1b[" in buf.getvalue() and "hub" in buf.getvalue()


def test_trace_cli_generates_a_response(tiny_model_dir, tmp_path, capsys):
    main(["trace", "--model", tiny_model_dir, "--prompt", "What is 3 + 4?", "--max-new-tokens", "6",
          "--out", str(tmp_path)])
    page = (tmp_path / "trace.html").read_text()
    text = html.unescape("".join(t for _, t in SPAN.findall(page)))
    assert (tmp_path / "trace.png").exists() and "What is 3 + 4?" in text
    assert "wrote" in capsys.readouterr().out


def test_trace_callback_writes_pages_during_fit(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, steps=2, callbacks=[
        {"class_path": "flowtracer.credit.UniformCredit"},
        {"class_path": "flowtracer.tools.trace.TraceCallback", "init_args": {"every_n_steps": 2, "num_rollouts": 2}}])
    main(["fit", "--config", str(cfg), "--trainer.val_check_interval", "100", "--model.val_before_training", "false"])
    traces = tmp_path / "logs" / "tiny" / "version_0" / "traces"
    assert sorted(p.name for p in traces.iterdir()) == ["step_0_0.html", "step_0_0.png", "step_0_1.html",
                                                        "step_0_1.png"]  # step 1 skipped (every 2)
    assert SPAN.search((traces / "step_0_0.html").read_text())


def test_chain_trace_shows_arms_truth_and_hover(tiny_model_dir):
    from flowtracer.data.chains import INSTRUCTION
    from flowtracer.data.sources import load_rows
    from flowtracer.tools.attribution import SCORERS

    model, tok = _tiny(tiny_model_dir)
    row = load_rows("data/chains_test.jsonl")[0]
    sol = row["meta"]["solution"]
    trace = build_trace(model, tok, row["question"], response=sol, instruction=INSTRUCTION, chain=row)
    assert set(trace.arms) == set(SCORERS) and len(trace.truth) == len(trace.tokens)
    q = row["question"]
    dep = "".join(t for t, g in zip(trace.tokens, trace.truth) if g == "dep")
    assert dep == "".join(q[a:b] for a, b in row["meta"]["dep_spans"])  # char tokenizer: exact text
    used = "".join(t for t, g in zip(trace.tokens, trace.truth) if g == "used")
    assert used == "".join(sol[a:b] for a, b in row["meta"]["result_spans"])
    n_resp = trace.role.count("response") + trace.role.count("answer")
    n_dep = trace.truth.count("dep")
    for arm, marks in trace.arms.items():  # top 40% of the response + top-k of the question statements
        in_resp = sum(m for m, r in zip(marks, trace.role) if r in ("response", "answer"))
        in_q = sum(m for m, g in zip(marks, trace.truth) if g in ("dep", "distractor"))
        assert in_resp == int(num_selected(torch.tensor(n_resp), 0.4)) and in_q == n_dep, arm
    page = render_html(trace)
    assert "What each arm up-weights" in page and page.count("<tr><th>") == 1 + len(SCORERS)
    hover = re.search(r'id="t5" title="([^"]*)"', page)[1]
    assert "f=" in hover and "tau=" in hover and "h=" in hover
    # dominant paths are listed as token text, each token once per step of the path
    items = re.findall(r"<li>flow [0-9.]+: (.*?)</li>", page)
    assert items and all("<code" in it for it in items)
    first_path = trace.paths[0][0]
    texts = [html.unescape(t) for t in re.findall(r"<code[^>]*>(.*?)</code>", items[0])]
    assert len(texts) == len(first_path)
