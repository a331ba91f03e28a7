"""`flowtracer attribution`: ground-truth token masks, per-scorer metrics, CLI output files."""

from __future__ import annotations

import csv
import math

import torch
import yaml
from tiny import tiny_model, tiny_tokenizer

from flowtracer.cli import main
from flowtracer.credit.stats import FINE_CLASSES, fine_class_ids
from flowtracer.data.chains import INSTRUCTION
from flowtracer.data.sources import load_rows
from flowtracer.tools import attribution as attr
from flowtracer.tools import sweep
from flowtracer.tools.analysis import Verifiers, format_prompts, given_responses, protected_mask, rollout_batch
from flowtracer.tools.truth import excluded_mask


def test_ground_truth_masks_pick_the_right_tokens():
    tok = tiny_tokenizer()  # one token per character: decoded masks must equal the spans' text
    rows = load_rows("data/chains_test.jsonl")[:3]
    prompts, spans = format_prompts(tok, [r["question"] for r in rows], instruction=INSTRUCTION)
    gen = given_responses(tok, prompts, spans, [r["meta"]["solution"] for r in rows])
    rb, _ = rollout_batch(tok, Verifiers(), rows, gen, prompts)
    gt = attr.ground_truth(tok, rb, rows, spans)
    for i, r in enumerate(rows):
        q, sol, m = r["question"], r["meta"]["solution"], r["meta"]
        assert tok.decode(rb.input_ids[i][gt["q_dep"][i]]) == "".join(q[a:b] for a, b in m["dep_spans"])
        assert tok.decode(rb.input_ids[i][gt["q_dis"][i]]) == "".join(q[a:b] for a, b in m["distractor_spans"])
        assert tok.decode(rb.input_ids[i][gt["r_used"][i]]) == "".join(sol[a:b] for a, b in m["result_spans"])
    assert not (gt["q_dep"] & gt["q_dis"]).any() and not (gt["r_used"] & rb.answer_mask).any()
    for i, r in enumerate(rows):  # read sites, statements and lines, by their text
        q, sol, m = r["question"], r["meta"]["solution"], r["meta"]
        assert tok.decode(rb.input_ids[i][gt["r_read"][i]]) == "".join(sol[a:b] for a, b in m["use_spans"])
        stmts = [*m["dep_spans"], *m["distractor_spans"]]
        for j, (a, b) in enumerate(stmts):
            assert tok.decode(rb.input_ids[i][gt["q_stmt"][i] == j]) == q[a:b]
        assert gt["q_stmt_label"][i, :len(stmts)].tolist() == [1] * len(m["dep_spans"]) + [0] * len(
            m["distractor_spans"])
        lines = sol.split("\n")[:-1]  # the step lines; the last line is the answer tag
        for j, line in enumerate(lines):
            assert tok.decode(rb.input_ids[i][gt["r_line"][i] == j]) == line + "\n"
        assert gt["r_line_label"][i, :len(lines)].tolist() == [1] * (len(lines) - 1) + [0]  # the final step: unused


def _chain_batch(n=3):
    tok = tiny_tokenizer()
    rows = load_rows("data/chains_test.jsonl")[:n]
    prompts, spans = format_prompts(tok, [r["question"] for r in rows], instruction=INSTRUCTION)
    gen = given_responses(tok, prompts, spans, [r["meta"]["solution"] + "<|im_end|>" for r in rows])
    rb, verdicts = rollout_batch(tok, Verifiers(), rows, gen, prompts)
    protected = protected_mask(tok, rb, verdicts)
    gt = {**attr.ground_truth(tok, rb, rows, spans), "excluded": excluded_mask(rb, protected),
          "digit": fine_class_ids(tok, rb.input_ids) == FINE_CLASSES.index("digit")}
    return tok, rows, rb, gt


def _brute_auroc(pos: list[float], neg: list[float]) -> float:
    if not pos or not neg:
        return math.nan
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))


def test_statement_and_line_auroc_equal_brute_force():
    """Hand-made scores on reference solutions (one token per character): statement and line AUROC
    from batch_metrics equal a pair count over statements/lines scored by the sum and the max of
    their characters' scores; the negatives never include the scaffold, the answer, `</answer>` or eos."""
    tok, rows, rb, gt = _chain_batch()
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, rb.input_ids.shape, generator=g).double()  # few levels: ties
    got = attr.batch_metrics({"s": scores}, gt, rb)["s"]
    plen = int(rb.prompt_mask.any(0).nonzero().max()) + 1
    for i, r in enumerate(rows):
        m, sol = r["meta"], r["meta"]["solution"]
        tail = rb.prompts[i][rb.prompts[i].rindex(r["question"]):]  # the question and what follows it
        q0 = plen - len(tok(tail, add_special_tokens=False)["input_ids"])  # column of the question's char 0
        r0 = int(rb.response_mask[i].nonzero().min())  # column of the response's char 0
        for reduce, fn in (("sum", sum), ("max", max)):
            val = lambda a, b, off, fn=fn, i=i: fn(float(scores[i, off + c]) for c in range(a, b))  # noqa: E731
            want = _brute_auroc([val(a, b, q0) for a, b in m["dep_spans"]],
                                [val(a, b, q0) for a, b in m["distractor_spans"]])
            assert abs(float(got[f"q_stmt_{reduce}"][i]) - want) < 1e-12
            starts = [0] + [k + 1 for k, ch in enumerate(sol) if ch == "\n"]
            lines = [(starts[j], starts[j + 1]) for j in range(len(starts) - 1)]  # each with its newline
            want = _brute_auroc([val(a, b, r0) for a, b in lines[:-1]], [val(*lines[-1], r0)])
            assert abs(float(got[f"line_{reduce}"][i]) - want) < 1e-12
        tag = sol.index("<answer>")
        excl = gt["excluded"][i, r0:r0 + len(sol) + 1].tolist()
        assert excl == [False] * tag + [True] * (len(sol) - tag) + [True]  # scaffold, answer, </answer>, eos


def test_metrics_on_reference_solutions_tiny_model():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    rows = load_rows("data/chains_test.jsonl")[:6]
    per, counts = attr.run(model, tok, rows, batch_size=3, reference=True)
    assert counts["problems"] == 6 and counts["correct"] == 6  # reference solutions are right
    assert set(per) == set(attr.SCORERS)
    for s in attr.SCORERS:
        for m, v in per[s].items():
            ok = v[torch.isfinite(v)]
            assert ((ok >= 0) & (ok <= 1)).all(), (s, m)
    reached = torch.isfinite(per["flow_top"]["q_auroc"])
    assert int(reached.sum()) == counts["reached"]
    # flow_bottom ranks by -tau: its AUROC mirrors flow_top's on every scored problem
    torch.testing.assert_close(per["flow_bottom"]["q_auroc"][reached], 1 - per["flow_top"]["q_auroc"][reached])


def test_cli_writes_csv_and_markdown(tmp_path, tiny_model_dir):
    cfg = tmp_path / "attr.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny_model_dir, "n": 4, "batch_size": 2, "reference": True,
                                   "out": str(tmp_path / "attr")}))
    main(["attribution", "--config", str(cfg)])
    rows = list(csv.DictReader(open(tmp_path / "attr.csv")))
    assert len(rows) == len(attr.SCORERS) * len(attr.METRICS)
    assert all(r["n"] and (r["mean"] == "nan" or 0 <= float(r["mean"]) <= 1) for r in rows)
    md = (tmp_path / "attr.md").read_text()
    assert "flow_top" in md and "question AUROC" in md


def test_bad_config_key_is_one_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("modle: x\n")
    try:
        main(["attribution", "--config", str(cfg)])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown keys ['modle']" in capsys.readouterr().err


def test_sweep_covers_every_variant_and_its_default_is_the_main_run():
    """The sweep's (flow, middle, mean) variant, built from per-layer maps, scores exactly like the
    main run's flow_top (the teacher-forced pass's own middle-layer map); every variant is there."""
    tok, model = tiny_tokenizer(), tiny_model("llama")
    rows = load_rows("data/chains_test.jsonl")[:4]
    per, counts = attr.run(model, tok, rows, batch_size=2, reference=True, with_sweep=True)
    sw = counts["sweep"]
    layers = ["early", "middle", "late", "all", *(f"L{i}" for i in range(6))]
    assert set(sw) == {(s, lay, h) for s in sweep.SCORERS for lay in layers for h in ("mean", "max")}
    for m in ("q_auroc", "q_stmt_sum", "wr_auroc", "line_max"):
        torch.testing.assert_close(sw["flow", "middle", "mean"][m], per["flow_top"][m], atol=1e-6, rtol=0,
                                   equal_nan=True)
        torch.testing.assert_close(sw["attention_max", "middle", "mean"][m], per["attention_max"][m], atol=1e-6,
                                   rtol=0, equal_nan=True)
    assert any(not torch.allclose(sw["flow", "middle", "max"][m], per["flow_top"][m], equal_nan=True)
               for m in attr.METRICS)  # the head maximum is another map
    table = sweep.summarise(sw)
    assert "intervals" in sweep.versus_default(sw, table, "q_stmt_sum")
    cls = counts["classes"]["random"]  # (2, C): percentile sums, token counts
    assert cls.shape == (2, len(attr.CLASS_COLUMNS)) and cls[1].sum() == rows_tokens(tok, rows)
    assert cls[1, attr.CLASS_COLUMNS.index("scaffold")] == 4 * len("<answer>")  # the protected scaffold
    means = cls[0] / cls[1].clamp(min=1)
    assert ((means >= 0) & (means <= 1)).all()


def rows_tokens(tok, rows) -> int:
    """Response tokens of the reference solutions (one per character)."""
    return sum(len(r["meta"]["solution"]) for r in rows)


def test_cli_sweep_and_problems_without_ground_truth(tmp_path, tiny_model_dir):
    main(["attribution", "--model", tiny_model_dir, "--n", "2", "--batch-size", "2", "--reference", "--sweep",
          "--out", str(tmp_path / "a")])
    sweep_rows = list(csv.DictReader(open(tmp_path / "a_sweep.csv")))
    assert {r["heads"] for r in sweep_rows} == {"mean", "max"} and "best flow variant" in (
        tmp_path / "a_sweep.md").read_text()
    assert "Mean score by token class" in (tmp_path / "a.md").read_text()
    # the quickstart's problems carry no ground truth: only the by-class table
    main(["attribution", "--model", tiny_model_dir, "--data", "data/arith_val.jsonl", "--n", "2",
          "--max-new-tokens", "4", "--out", str(tmp_path / "q")])
    assert not (tmp_path / "q.csv").exists() and (tmp_path / "q_classes.csv").exists()
    assert "question AUROC" not in (tmp_path / "q.md").read_text()
