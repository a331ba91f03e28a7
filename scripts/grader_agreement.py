"""Grade model responses with flowtracer's math verifier and with math-verify, and compare.

    python scripts/grader_agreement.py runs/math560_greedy512.jsonl --out results/grader_agreement
    python scripts/grader_agreement.py --controls --out results/grader_agreement_controls

Responses: JSONL rows with `id` and `response` (scripts/gen_math_responses.py writes them); the
references come from tests/fixtures/math_references.jsonl (or --references, any JSONL with `id` and
`ground_truth`). Three comparisons, each a 2x2 agreement table:

  boxed       the last ``\\boxed{}`` of the response. Ours: MathVerifier(extraction=["boxed"]).
              math-verify as its README recommends: ``verify(parse(gold), parse(answer))`` with the
              gold as ``$<ground_truth>$`` and the answer as ``\\boxed{<last box content>}``.
  same span   the answer our default extractors find (answer tag, box, ####, last number), judged
              by both: isolates the equivalence judgement from the extraction.
  end to end  each grader with its own default extraction: ours as configured for training
              (MathVerifier()), math-verify's ``parse(response)`` (LaTeX and plain expressions).

--controls grades answers of known truth instead of a model's: for every reference, the gold as
written, the gold without its markup (flowtracer.rewards.latex.canonical: ``\\$36`` -> ``36``,
``90^\\circ`` -> ``90``) and a wrong answer (the number + 1, another choice letter, ``<gold> + 1``),
and, where a rule applies, the gold as models also write it (``36 dollars``, ``90°``, ``\\textbf{(C)}~12``,
``evelyn``, ``5`` for ``x=5``), each as ``... the final answer is $\\boxed{...}$.``; the tables then also
count each grader's errors against that known truth.

Prints the tables and writes <out>.md (tables, counts, command, and every disagreement with its
likely cause) and <out>_disagreements.jsonl (the same rows with all verdicts). The cause is a first
sort: "extraction" when the graders took different answers from the response and agree on the same
one; "equivalence" when they judge the same answer differently (ours names the rule that matched).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from math_verify import parse, verify

from flowtracer.evaluation.stats import wilson_ci
from flowtracer.rewards import MathVerifier
from flowtracer.rewards.extract import boxed
from flowtracer.rewards.latex import canonical, choice_letter, plain_number

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "math_references.jsonl"


def _mv(gold: str, answer_text: str | None) -> tuple[bool, str]:
    """math-verify's verdict and what it parsed from the answer."""
    if answer_text is None:
        return False, ""
    try:
        g, p = parse(f"${gold}$"), parse(answer_text)
        return bool(verify(g, p)), str(p[-1] if p else "")
    except Exception as exc:  # a grader crash counts as wrong, and is shown
        return False, f"error: {type(exc).__name__}"


def grade(row: dict, gold: str, ours_boxed: MathVerifier, ours: MathVerifier) -> dict:
    """All verdicts for one response."""
    text = row["response"]
    box = boxed(text)
    a = ours_boxed(text, gold)
    b, b_parsed = _mv(gold, "\\boxed{" + box[0] + "}" if box else None)
    default = ours(text, gold)
    c, c_parsed = _mv(gold, "\\boxed{" + default.parsed + "}" if default.parsed is not None else None)
    d, d_parsed = _mv(gold, text)
    return {"id": row["id"], "tag": row.get("tag"), "gold": gold, "boxed": box[0] if box else None,
            "ours_extracted": default.parsed, "mv_end_to_end_parsed": d_parsed,
            "boxed_ours": a.reward == 1.0, "boxed_mv": b,
            "span_ours": default.reward == 1.0, "span_mv": c,
            "e2e_ours": default.reward == 1.0, "e2e_mv": d, "truncated": row.get("truncated")}


TABLES = (("boxed", "last \\boxed{}"), ("span", "same extracted answer"), ("e2e", "end to end, own extraction"))


def variant(g: str) -> str | None:
    """The gold as a model might write it in words or symbols (None where no rule applies)."""
    c = canonical(g)
    if "\\$" in g:
        return f"{c} dollars"
    if "circ" in g:
        return f"{c}°"
    if choice_letter(g) is not None:
        return f"\\textbf{{({choice_letter(g)})}}~12"  # a choice, then its (here made-up) value
    if "\\text{" in g and " " not in c:
        return c.replace("\\text{", "").rstrip("}").lower()  # a word answer, bare and lower case
    if g.replace(" ", "").startswith(("x=", "y=")):
        return g.split("=", 1)[1].strip()
    return None


def controls(gold: dict[str, str]) -> list[dict]:
    """Responses of known truth built from the references (see the module docstring)."""
    rows = []
    for rid, g in gold.items():
        number, letter = plain_number(canonical(g)), choice_letter(g)
        if number is not None:
            wrong = str(number + 1) if number.denominator == 1 else f"{float(number + 1):.10g}"
        else:
            wrong = ("(A)" if letter != "A" else "(B)") if letter is not None else canonical(g) + " + 1"
        kinds = [("gold", g, True), ("stripped", canonical(g), True), ("wrong", wrong, False)]
        kinds += [("variant", variant(g), True)] if variant(g) is not None else []
        for kind, answer, truth in kinds:
            rows.append({"id": rid, "tag": kind, "truth": truth,
                         "response": f"Putting it together, the final answer is $\\boxed{{{answer}}}$."})
    return rows


def _pct(k: int, n: int) -> str:
    _, lo, hi = wilson_ci(k, n)
    return f"{100 * k / max(n, 1):.1f}%, 95% Wilson interval {100 * lo:.1f}-{100 * hi:.1f}%"


def table(records: list[dict], key: str, title: str) -> list[str]:
    n = len(records)
    cells = {(o, m): sum(r[f"{key}_ours"] == o and r[f"{key}_mv"] == m for r in records)
             for o in (True, False) for m in (True, False)}
    agree = cells[True, True] + cells[False, False]
    lines = [f"### {title} ({n} responses)", "",
             "| | math-verify correct | math-verify wrong |", "| --- | ---: | ---: |",
             f"| ours correct | {cells[True, True]} | {cells[True, False]} |",
             f"| ours wrong | {cells[False, True]} | {cells[False, False]} |", "",
             f"agreement {agree}/{n} ({_pct(agree, n)}); accuracy ours "
             f"{sum(r[f'{key}_ours'] for r in records)}/{n}, math-verify {sum(r[f'{key}_mv'] for r in records)}/{n}"]
    if key == "boxed":
        lines.append(f"responses with a closed \\boxed{{}}: {sum(r['boxed'] is not None for r in records)}/{n}")
    if all("truth" in r for r in records):
        lines.append(f"errors against the known truth: ours {sum(r[f'{key}_ours'] != r['truth'] for r in records)}, "
                     f"math-verify {sum(r[f'{key}_mv'] != r['truth'] for r in records)}")
    return lines + [""]


def cause(r: dict, ours: MathVerifier) -> str:
    """A first sort of one disagreement (see the module docstring)."""
    if r["span_ours"] != r["span_mv"] or r["boxed_ours"] != r["boxed_mv"]:
        answer = r["ours_extracted"] if r["span_ours"] != r["span_mv"] else r["boxed"]
        rule = ours.match(r["gold"], answer) if answer is not None else None
        return f"equivalence: on {answer!r} ours says {rule or 'no match'}, math-verify the opposite"
    mv_right = bool(r["mv_end_to_end_parsed"]) and ours.equal(r["gold"], r["mv_end_to_end_parsed"])
    return (f"extraction: ours took {r['ours_extracted']!r}, math-verify parsed {r['mv_end_to_end_parsed']!r}"
            f"{' (ours agrees that one is correct)' if mv_right else ''}")


def disagreements(records: list[dict], ours: MathVerifier) -> list[dict]:
    out = []
    for r in records:
        differs = [k for k, _ in TABLES if r[f"{k}_ours"] != r[f"{k}_mv"]]
        if differs:
            out.append({**r, "differs_in": differs, "cause": cause(r, ours)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("responses", nargs="?", help="JSONL with id and response (scripts/gen_math_responses.py)")
    ap.add_argument("--controls", action="store_true", help="grade answers of known truth built from the references")
    ap.add_argument("--references", default=str(FIXTURE), help="JSONL with id and ground_truth")
    ap.add_argument("--out", default=None, help="write <out>.md and <out>_disagreements.jsonl")
    args = ap.parse_args(argv)
    gold = {str(r["id"]): r["ground_truth"] for r in map(json.loads, open(args.references)) if r}
    if args.controls == bool(args.responses):
        ap.error("give a responses file or --controls")
    rows = controls(gold) if args.controls else [json.loads(line) for line in open(args.responses) if line.strip()]
    ours_boxed, ours = MathVerifier(extraction=["boxed"]), MathVerifier()
    records = [{**grade(r, gold[str(r["id"])], ours_boxed, ours), **({"truth": r["truth"]} if "truth" in r else {})}
               for r in rows]
    what = (f"responses of {args.responses}" if not args.controls
            else "control answers (gold, stripped gold, wrong, variant)")
    lines = [f"{len(records)} {what} graded (references: {Path(args.references).name}, {len(gold)} rows)", ""]
    for key, title in TABLES:
        lines += table(records, key, title)
    found = disagreements(records, ours)
    lines += [f"### disagreements ({len(found)})", "", "| id | tag | gold | differs in | cause |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['id']} | {r['tag']} | `{r['gold']}` | {', '.join(r['differs_in'])} | "
              f"{r['cause'].replace('|', '/')} |" for r in found]
    print("\n".join(lines))
    if args.out:
        command = "python " + " ".join(["scripts/grader_agreement.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.out + ".md").write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
        Path(args.out + "_disagreements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
