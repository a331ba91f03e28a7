"""`flowtracer attribution`: ground-truth token masks, per-scorer metrics, CLI output files."""

from __future__ import annotations

import csv

import torch
import yaml
from tiny import tiny_model, tiny_tokenizer

from flowtracer.cli import main
from flowtracer.data.chains import INSTRUCTION
from flowtracer.data.sources import load_rows
from flowtracer.tools import attribution as attr
from flowtracer.tools.analysis import Verifiers, format_prompts, given_responses, rollout_batch


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
