"""Variable chains: ground-truth spans re-derived by brute force, seeds reproducible, parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT

from flowtracer.config import ChainSpec
from flowtracer.data import load_rows
from flowtracer.data.chains import make_problem, make_rows, parse_steps, used_result_spans
from flowtracer.rewards import MathVerifier

SPECS = [ChainSpec(), ChainSpec(depth=(1, 2, 3, 4), distractors=(0, 1, 3), distractor_steps=0),
         ChainSpec(depth=4, distractors=2, distractor_steps=2, ops=("+", "-", "*"), low=0, high=20),
         ChainSpec(depth=3, distractors=1, ops=("-",), allow_negative=True)]


def brute_force(question: str):
    """Evaluate the question from its text alone; return (answer, dependency statements, distractors)."""
    stmts = re.findall(r"Let (([a-z]) = ([^.]+))\.", question)
    defs = {var: expr for _, var, expr in stmts}
    query = re.search(r"What is ([^?]+)\?", question)[1]

    def value(expr):
        return eval(re.sub(r"[a-z]", lambda m: f"({value(defs[m[0]])})", expr))  # noqa: S307 (own text)

    need, todo = set(), re.findall(r"[a-z]", query)
    while todo:  # transitive closure of the variables the query reads
        v = todo.pop()
        if v not in need:
            need.add(v)
            todo += re.findall(r"[a-z]", defs[v])
    dep = [content for content, var, _ in stmts if var in need]
    dis = [content for content, var, _ in stmts if var not in need]
    return value(query), dep, dis, query


@pytest.mark.parametrize("spec", SPECS)
def test_question_spans_match_brute_force(spec):
    for seed in range(60):
        p = make_problem(seed, spec)
        answer, dep, dis, query = brute_force(p.question)
        assert str(answer) == p.answer
        assert [p.question[a:b] for a, b in p.dep_spans] == dep
        assert [p.question[a:b] for a, b in p.distractor_spans] == dis
        assert p.question[slice(*p.query_span)] == query
        depth = p.depth
        assert len(p.solution.splitlines()) == depth + 1  # k steps + the answer line
        assert len(dis) == sum(1 for _ in p.distractor_spans) and (spec.distractor_steps == 0 or dis)


@pytest.mark.parametrize("spec", SPECS)
def test_solution_spans_match_brute_force(spec):
    for seed in range(60):
        p = make_problem(seed, spec)
        defs = dict(re.findall(r"Let ([a-z]) = ([^.]+)\.", p.question))
        lines = p.solution.splitlines()
        starts = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
        results, uses = [], []
        for i, line in enumerate(lines[:-1]):
            lhs, sub, res = line.split(" = ")
            assert eval(sub) == int(res)  # noqa: S307 (own text): every step is arithmetic that holds
            vars_read = re.findall(r"[a-z]", lhs) if " " in lhs else re.findall(r"[a-z]", defs[lhs])
            if " " not in lhs:  # an intermediate step: its result must be read by a later step
                results.append((starts[i] + len(line) - len(res), starts[i] + len(line)))
            nums = list(re.finditer(r"-?\d+", sub))
            for j, v in enumerate(vars_read):
                if re.search(r"[a-z]", defs[v]):  # a derived variable: an earlier step wrote its value
                    o = nums[j]
                    at = starts[i] + len(lhs) + 3
                    uses.append((at + o.start(), at + o.end()))
        assert p.result_spans == results
        assert sorted(p.use_spans) == sorted(uses)
        assert p.solution[slice(*p.answer_span)] == p.answer
        assert lines[-1] == f"<answer>{p.answer}</answer>"


def test_parse_steps_recovers_generator_ground_truth():
    for seed in range(100):
        p = make_problem(seed, SPECS[2])
        steps = parse_steps(p.solution, p.question)
        assert used_result_spans(p.solution, p.question) == p.result_spans
        assert sorted(u for s in steps for u in s["use_spans"]) == sorted(p.use_spans)
        assert steps[-1]["var"] is None and not steps[-1]["used"]  # the final query step


def test_parse_steps_on_a_free_form_response():
    q = "Let a = 7. Let b = 5. Let c = a + 3. Let d = b - 2. What is c + d?"
    text = "First:\nc = 7 + 3 = 10\nsome words\nd = 5 - 2 = 3\nx = 4\nc + d = 10 + 3 = 13\n<answer>13</answer>"
    steps = parse_steps(text, q)
    assert [s["var"] for s in steps] == ["c", "d", None]
    assert [text[slice(*s["result_span"])] for s in steps] == ["10", "3", "13"]
    assert [[text[slice(*u)] for u in s["use_spans"]] for s in steps] == [["10"], ["3"], []]
    # a step no later step reads is not used; a wrong value is still the response's own result
    wrong = "c = 7 + 3 = 11\nd = 5 - 2 = 3\n<answer>14</answer>"
    assert [s["used"] for s in parse_steps(wrong, q)] == [False, False]


def test_seeds_reproducible_and_distinct():
    assert make_rows(20, seed=5) == make_rows(20, seed=5)
    assert make_rows(20, seed=5) != make_rows(20, seed=6)
    assert make_rows(30, seed=5)[:20] == make_rows(20, seed=5)  # prefixes are stable


def test_bundled_splits_regenerate_identically_and_are_disjoint():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_chains", ROOT / "scripts/make_chains.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen: set[str] = set()
    for name, (size, seed, knobs) in mod.SPLITS.items():
        rows = mod.split_rows(size, seed, knobs, seen)
        on_disk = [json.loads(line) for line in open(ROOT / f"data/chains_{name}.jsonl")]
        assert json.loads(json.dumps(rows)) == on_disk
    assert len(seen) == sum(s for s, _, _ in mod.SPLITS.values())  # no question in two splits


def test_chains_source_and_verifier():
    rows = load_rows("chains", size=5, seed=1, task_kwargs={"depth": 2, "distractors": 1})
    assert len(rows) == 5 and all(r["meta"]["depth"] == 2 for r in rows)
    v = MathVerifier()
    for r in rows:
        assert v(r["meta"]["solution"], r["answer"]).reward == 1.0
    with pytest.raises(ValueError, match="chains"):
        load_rows("chains", size=5, task_kwargs={"depth": 0})
    with pytest.raises(ValueError, match="chains"):
        load_rows("chains", size=5, task_kwargs={"colour": 1})
